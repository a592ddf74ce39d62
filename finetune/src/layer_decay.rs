//! Layer-wise learning-rate decay for Swin (architecture.md 7.1: the official `get_swin_layer`
//! and `build_finetune_optimizer`).
/// Layer id of a parameter (official `get_swin_layer`, n = sum(depths)): `patch_embed.*` and
/// `mask_token` -> 0; `layers.i.blocks.j.*` -> sum(depths[..i]) + j + 1;
/// `layers.i.downsample.*` -> sum(depths[..=i]) (the id of the stage's last block); everything
/// else (`norm`, `head`) -> n + 1.
pub fn swin_layer_id(name: &str, depths: &[usize]) -> usize {
    let n: usize = depths.iter().sum();
    if name == "mask_token" || name.starts_with("patch_embed") {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("layers.") {
        let mut parts = rest.split('.');
        let stage = parts.next().and_then(|s| s.parse::<usize>().ok());
        let kind = parts.next();
        let third = parts.next();
        if let Some(i) = stage.filter(|&i| i < depths.len()) {
            let before: usize = depths[..i].iter().sum();
            match (kind, third.and_then(|j| j.parse::<usize>().ok())) {
                (Some("blocks"), Some(j)) => return before + j + 1,
                (Some("downsample"), _) => return before + depths[i],
                _ => {}
            }
        }
    }
    n + 1
}

/// lr multiplier of a parameter: `decay^(n + 1 - layer_id)` (official `scales[layer_id]` with
/// `scales = [decay^i for i in reversed(range(n + 2))]`).
pub fn swin_lr_scale(name: &str, depths: &[usize], decay: f64) -> f64 {
    let n: usize = depths.iter().sum();
    decay.powi((n + 1 - swin_layer_id(name, depths)) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swinv2_tiny_ids_and_scales_follow_the_official_rule() {
        // swinv2_tiny_window8_256: depths [2, 2, 6, 2], n = 12, 14 distinct scales.
        let d = [2, 2, 6, 2];
        let cases = [
            ("patch_embed.proj.weight", 0),
            ("patch_embed.norm.bias", 0),
            ("mask_token", 0),
            ("layers.0.blocks.0.attn.qkv.weight", 1),
            ("layers.0.blocks.1.norm2.weight", 2),
            ("layers.0.downsample.reduction.weight", 2),
            ("layers.0.downsample.norm.weight", 2),
            ("layers.1.blocks.0.attn.cpb_mlp.0.weight", 3),
            ("layers.1.downsample.reduction.weight", 4),
            ("layers.2.blocks.5.mlp.fc2.bias", 10),
            ("layers.2.downsample.norm.bias", 10),
            ("layers.3.blocks.0.attn.logit_scale", 11),
            ("layers.3.blocks.1.attn.proj.weight", 12),
            ("norm.weight", 13),
            ("head.weight", 13),
            ("head.bias", 13),
        ];
        for (name, id) in cases {
            assert_eq!(swin_layer_id(name, &d), id, "{name}");
        }
        // Official scales at decay 0.75: head 1, last block 0.75, patch embed 0.75^13.
        let s = |n: &str| swin_lr_scale(n, &d, 0.75);
        assert_eq!(s("head.weight"), 1.0);
        assert_eq!(s("layers.3.blocks.1.attn.proj.weight"), 0.75);
        assert_eq!(s("layers.2.downsample.reduction.weight"), 0.75f64.powi(3));
        assert!((s("patch_embed.proj.weight") - 0.023_757_264_018_058_777).abs() < 1e-15);
        assert_eq!(
            swin_lr_scale("layers.1.blocks.0.mlp.fc1.weight", &d, 1.0),
            1.0
        );
    }

    #[test]
    fn moe_expert_names_get_their_blocks_id() {
        // Swin-MoE expert weights live inside a block's mlp.
        let d = [2, 2];
        assert_eq!(
            swin_layer_id("layers.1.blocks.1.mlp._moe_layer.experts.batched_fc1_w", &d),
            4
        );
        assert_eq!(swin_layer_id("layers.9.blocks.0.attn.qkv.weight", &d), 5);
    }
}
