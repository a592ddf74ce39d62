//! Parameter groups: which variables get weight decay, and their lr multipliers.
use candle_nn::VarMap;

use super::ParamGroup;

/// Name fragments that never get weight decay (architecture.md 1.8 / 3.5: the Swin-V2
/// `no_weight_decay()` names and `no_weight_decay_keywords()`, plus SimMIM's `mask_token`, plus the
/// Swin-MoE expert biases (architecture.md 6: reference keywords `fc1_bias`, `fc2_bias`; they are
/// `[E, 1, n]`, neither 1-D nor named `.bias`)).
pub const DEFAULT_NO_DECAY_KEYWORDS: [&str; 7] = [
    "cpb_mlp",
    "logit_scale",
    "relative_position_bias_table",
    "mask_token",
    "absolute_pos_embed",
    "batched_fc1_bias",
    "batched_fc2_bias",
];

/// Default no-weight-decay rule (architecture.md 1.8): 1-D params, names ending `.bias`, and names
/// containing a default keyword or one of `extra_keywords`.
///
/// The keywords are applied in pretraining too. The official SimMIM code prefixes them with
/// `encoder.` so they never match and pretraining decays `cpb_mlp`/`logit_scale` (architecture.md
/// 3.5 "Quirk"); we deliberately do NOT reproduce that quirk.
pub fn no_weight_decay(name: &str, rank: usize, extra_keywords: &[String]) -> bool {
    rank == 1
        || name.ends_with(".bias")
        || DEFAULT_NO_DECAY_KEYWORDS.iter().any(|k| name.contains(k))
        || extra_keywords
            .iter()
            .any(|k| !k.is_empty() && name.contains(k.as_str()))
}

/// Builds groups from a VarMap (sorted by name): `weight_decay` or 0 by [`no_weight_decay`];
/// `lr_scale` from `lr_scale(name)`.
pub fn param_groups(
    varmap: &VarMap,
    weight_decay: f64,
    extra_no_decay: &[String],
    lr_scale: &dyn Fn(&str) -> f64,
) -> Vec<ParamGroup> {
    // Invariant: the VarMap mutex is only poisoned if another thread panicked while holding it.
    let data = varmap.data().lock().expect("varmap mutex poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let var = data[name].clone();
            let wd = if no_weight_decay(name, var.rank(), extra_no_decay) {
                0.0
            } else {
                weight_decay
            };
            ParamGroup {
                name: name.clone(),
                var,
                weight_decay: wd,
                lr_scale: lr_scale(name),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn swin_v2_names_follow_the_official_rule() {
        let none: Vec<String> = vec![];
        assert!(no_weight_decay(
            "layers.0.blocks.0.attn.cpb_mlp.0.weight",
            2,
            &none
        ));
        assert!(!no_weight_decay(
            "layers.0.blocks.0.attn.qkv.weight",
            2,
            &none
        ));
        assert!(no_weight_decay("layers.0.blocks.0.norm1.weight", 1, &none));
        assert!(no_weight_decay(
            "layers.0.blocks.0.attn.proj.bias",
            1,
            &none
        ));
        assert!(no_weight_decay(
            "layers.0.blocks.0.attn.logit_scale",
            3,
            &none
        ));
        assert!(no_weight_decay("mask_token", 3, &none));
        assert!(no_weight_decay("encoder.mask_token", 3, &none));
        let expert_bias = "layers.2.blocks.1.mlp._moe_layer.experts.batched_fc2_bias";
        assert!(no_weight_decay(expert_bias, 3, &none));
        assert!(!no_weight_decay(
            "layers.2.blocks.1.mlp._moe_layer.experts.batched_fc2_w",
            3,
            &none
        ));
        assert!(!no_weight_decay("head.weight", 2, &none));
        assert!(no_weight_decay("head.weight", 2, &["head".to_string()]));
        // An empty extra keyword must not match everything.
        assert!(!no_weight_decay("head.weight", 2, &[String::new()]));
    }

    #[test]
    fn groups_are_sorted_with_decay_and_scale() {
        let vm = VarMap::new();
        let dev = Device::Cpu;
        vm.get(
            (2, 2),
            "b.weight",
            candle_nn::Init::Const(0.),
            DType::F32,
            &dev,
        )
        .unwrap();
        vm.get(2, "b.bias", candle_nn::Init::Const(0.), DType::F32, &dev)
            .unwrap();
        vm.get(
            (1, 1, 4),
            "a.mask_token",
            candle_nn::Init::Const(0.),
            DType::F32,
            &dev,
        )
        .unwrap();
        let scale = |n: &str| if n.starts_with("b.") { 0.5 } else { 1.0 };
        let g = param_groups(&vm, 0.05, &[], &scale);
        let got: Vec<(&str, f64, f64)> = g
            .iter()
            .map(|p| (p.name.as_str(), p.weight_decay, p.lr_scale))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.mask_token", 0.0, 1.0),
                ("b.bias", 0.0, 0.5),
                ("b.weight", 0.05, 0.5)
            ]
        );
    }
}
