//! Starting a Swin-V2 from earlier weights: checking a target architecture against the one the
//! weights were trained as, and loading a backbone from a weights file of any supported layout
//! (mimlab, official, timm). The caller says which key prefix holds the backbone (a pretraining
//! objective keeps it under its own prefix; a classifier or an official file under none): this
//! crate knows no run folders and no objectives.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;

use crate::checkpoint::{load_into_varmap, read_weights, unshare_cpb, LoadOptions, LoadReport};
use crate::swin_v2::{SwinV2, SwinV2Config};

/// Checks that `target` (the model about to be trained) has the architecture of `pretrained`
/// (the run its weights come from), naming the first differing key, and carries the pretraining
/// windows over as in the official fine-tuning configs (architecture.md 1.5 / 10): where a stage's
/// window changes and `target.pretrained_window_sizes` is 0 there, it becomes the window the
/// pretraining normalized its CPB coordinates by. Returns one note per change.
pub fn adapt_to_pretrained(
    target: &mut SwinV2Config,
    pretrained: &SwinV2Config,
) -> Result<Vec<String>> {
    let same = [
        ("patch_size", target.patch_size == pretrained.patch_size),
        ("in_chans", target.in_chans == pretrained.in_chans),
        ("embed_dim", target.embed_dim == pretrained.embed_dim),
        ("depths", target.depths == pretrained.depths),
        ("num_heads", target.num_heads == pretrained.num_heads),
        ("mlp_ratio", target.mlp_ratio == pretrained.mlp_ratio),
        ("qkv_bias", target.qkv_bias == pretrained.qkv_bias),
        ("patch_norm", target.patch_norm == pretrained.patch_norm),
        // expert count and placement fix the weight shapes; routing knobs may change
        (
            "moe",
            target.moe.num_experts == pretrained.moe.num_experts
                && target.moe.effective_blocks(&target.depths)
                    == pretrained.moe.effective_blocks(&pretrained.depths),
        ),
    ];
    if let Some((key, _)) = same.iter().find(|(_, ok)| !ok) {
        bail!(
            "model.{key} differs from the pretrained run's (target {:?} vs pretrained {:?}): \
             the weights cannot be loaded",
            field(target, key),
            field(pretrained, key)
        );
    }
    let mut notes = vec![];
    let stages = target.num_stages();
    if target.pretrained_window_sizes.len() != stages {
        target.pretrained_window_sizes = vec![0; stages];
    }
    for i in 0..stages {
        let res = |c: &SwinV2Config| (c.img_size / c.patch_size) >> i;
        let pre_norm = match pretrained.pretrained_window_sizes.get(i) {
            Some(&w) if w > 0 => w,
            _ => pretrained.window_at(res(pretrained), res(pretrained)).0,
        };
        let now = target.window_at(res(target), res(target)).0;
        if target.pretrained_window_sizes[i] == 0 && now != pre_norm {
            target.pretrained_window_sizes[i] = pre_norm;
            notes.push(format!(
                "stage {i}: window {now} (pretrained at {pre_norm}): \
                 model.pretrained_window_sizes[{i}] = {pre_norm}"
            ));
        }
    }
    Ok(notes)
}

fn field(c: &SwinV2Config, key: &str) -> String {
    match key {
        "patch_size" => c.patch_size.to_string(),
        "in_chans" => c.in_chans.to_string(),
        "embed_dim" => c.embed_dim.to_string(),
        "depths" => format!("{:?}", c.depths),
        "num_heads" => format!("{:?}", c.num_heads),
        "mlp_ratio" => c.mlp_ratio.to_string(),
        "qkv_bias" => c.qkv_bias.to_string(),
        "patch_norm" => c.patch_norm.to_string(),
        _ => format!("{:?}", c.moe),
    }
}

/// What to do with a classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Keep the model's freshly initialized head and skip any head in the checkpoint (a new
    /// task, or a pretraining checkpoint that has none).
    Reinit,
    /// Load the checkpoint's head; it must be there and have the model's shape.
    Load,
}

/// Loads the backbone held under `prefix` in `weights` into `varmap` (built for a Swin-V2 by
/// [`SwinV2::new`]); official / timm keys are remapped. Keys outside `prefix` (a pretraining
/// objective's decoder or projector) are skipped and reported as ignored. Every backbone variable
/// must be loaded; only the head may stay at init (`Head::Reinit`).
pub fn load_backbone_weights(
    varmap: &VarMap,
    weights: &Path,
    prefix: &str,
    head: Head,
) -> Result<LoadReport> {
    let tensors = read_weights(weights)?;
    load_backbone_tensors(varmap, tensors, prefix, head)
        .with_context(|| format!("loading {}", weights.display()))
}

/// [`load_backbone_weights`] on tensors already read.
pub fn load_backbone_tensors(
    varmap: &VarMap,
    tensors: HashMap<String, Tensor>,
    prefix: &str,
    head: Head,
) -> Result<LoadReport> {
    let (tensors, outside): (HashMap<String, Tensor>, HashMap<String, Tensor>) = tensors
        .into_iter()
        .partition(|(k, _)| k.starts_with(prefix));
    let (model_has_mask_token, model_shares_cpb) = {
        // Invariant: the VarMap mutex is only poisoned if another thread panicked holding it.
        let data = varmap.data().lock().expect("varmap mutex poisoned");
        (
            data.contains_key("mask_token"),
            data.contains_key("cpb_mlp.0.weight"),
        )
    };
    // A shared-CPB checkpoint (feature distillation) into a per-block model: copy the MLP into
    // every block, as FD does with its shared relative position bias for finetuning.
    let tensors = if model_shares_cpb {
        tensors
    } else {
        unshare_cpb(tensors, prefix)?
    };
    let mut ignore: Vec<String> = vec![];
    let mut allow_missing = vec![];
    if !model_has_mask_token {
        ignore.push("mask_token".into());
    }
    if head == Head::Reinit {
        ignore.push("head.".into());
        allow_missing.push("head.".into());
    }
    if model_has_mask_token {
        // A classifier checkpoint has no mask token; a SimMIM model built from it starts one.
        allow_missing.push("mask_token".into());
    }
    let opts = LoadOptions {
        prefix: prefix.to_string(),
        allow_missing,
        ignore_unexpected: ignore,
    };
    let mut report = load_into_varmap(varmap, tensors, &opts)?;
    report.ignored.extend(outside.into_keys());
    report.ignored.sort();
    Ok(report)
}

/// Builds `cfg` on `device` and loads the backbone held under `prefix` in `weights` into it (the
/// head too when the model has one and the checkpoint carries it with the same shape, else it
/// stays at init).
pub fn load_backbone(
    cfg: &SwinV2Config,
    weights: &Path,
    prefix: &str,
    device: &Device,
) -> Result<(SwinV2, VarMap, LoadReport)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, device);
    let model = SwinV2::new(cfg, false, SharedRng::new(0), vb)?;
    let tensors = read_weights(weights)?;
    let has_head = ["head.weight", "head.fc.weight"]
        .iter()
        .any(|h| tensors.contains_key(&format!("{prefix}{h}")));
    let head = if cfg.num_classes > 0 && has_head {
        Head::Load
    } else {
        Head::Reinit
    };
    let report = load_backbone_tensors(&varmap, tensors, prefix, head)
        .with_context(|| format!("loading {}", weights.display()))?;
    Ok((model, varmap, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> SwinV2Config {
        SwinV2Config {
            img_size: 16,
            patch_size: 2,
            embed_dim: 8,
            depths: vec![1, 1],
            num_heads: vec![1, 2],
            window_size: 4,
            num_classes: 0,
            pretrained_window_sizes: vec![0, 0],
            ..SwinV2Config::preset("swinv2_nano").unwrap()
        }
    }

    fn build(cfg: &SwinV2Config, mask_token: bool, seed: u64) -> (SwinV2, VarMap) {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let m = SwinV2::new(cfg, mask_token, SharedRng::new(0), vb).unwrap();
        (m, vm)
    }

    fn get(vm: &VarMap, k: &str) -> Vec<f32> {
        let data = vm.data().lock().unwrap();
        data[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn simmim_encoder_loads_into_a_classifier_with_nothing_left_over() -> Result<()> {
        // A SimMIM-shaped checkpoint: encoder.* (with mask_token) + decoder.*.
        let (_, src) = build(&tiny(), true, 1);
        let mut tensors: HashMap<String, Tensor> = src
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (format!("encoder.{k}"), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "decoder.0.weight".into(),
            Tensor::zeros((12, 16, 1, 1), DType::F32, &Device::Cpu)?,
        );
        let n_encoder = tensors.len() - 2; // minus decoder and mask_token
        let cls = SwinV2Config {
            num_classes: 5,
            ..tiny()
        };
        let (_, dst) = build(&cls, false, 2);
        let r = load_backbone_tensors(&dst, tensors, "encoder.", Head::Reinit)?;
        assert_eq!(r.loaded, n_encoder, "every encoder tensor but mask_token");
        assert_eq!(r.missing_allowed, vec!["head.bias", "head.weight"]);
        assert_eq!(r.ignored, vec!["decoder.0.weight", "encoder.mask_token"]);
        let k = "layers.1.blocks.0.attn.cpb_mlp.0.weight";
        assert_eq!(get(&dst, k), get(&src, k));
        Ok(())
    }

    #[test]
    fn finetuning_at_a_larger_window_keeps_the_pretraining_cpb_scale() -> Result<()> {
        // SimMIM Swin-V2-B at 192 / window 12, finetuned at 256 / window 16 (official configs
        // swinv2_base_patch4_window12to16_192to256: PRETRAINED_WINDOW_SIZES [12, 12, 12, 6]).
        let pre = SwinV2Config::preset("swinv2_base_window12_192")?;
        let mut ft = SwinV2Config {
            img_size: 256,
            window_size: 16,
            pretrained_window_sizes: vec![0; 4],
            ..pre.clone()
        };
        let notes = adapt_to_pretrained(&mut ft, &pre)?;
        assert_eq!(ft.pretrained_window_sizes, vec![12, 12, 12, 6]);
        assert_eq!(notes.len(), 4);
        // same resolution and window: nothing changes
        let mut same = pre.clone();
        assert!(adapt_to_pretrained(&mut same, &pre)?.is_empty());
        assert_eq!(same, pre);
        let mut wide = SwinV2Config {
            embed_dim: 96,
            ..pre.clone()
        };
        let err = adapt_to_pretrained(&mut wide, &pre)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.embed_dim") && err.contains("96") && err.contains("128"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_missing_backbone_tensor_is_an_error_naming_it() {
        let (_, src) = build(&tiny(), false, 1);
        let mut tensors: HashMap<String, Tensor> = src
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors.remove("layers.0.blocks.0.mlp.fc1.weight");
        let (_, dst) = build(&tiny(), false, 2);
        let err = load_backbone_tensors(&dst, tensors, "", Head::Reinit).unwrap_err();
        assert!(
            format!("{err:#}").contains("`layers.0.blocks.0.mlp.fc1.weight`"),
            "{err:#}"
        );
    }

    #[test]
    fn shared_cpb_unshares_into_per_block_tables_with_identical_outputs() -> Result<()> {
        // 2 stages with 1 and 2 heads: the shared MLP has 2 outputs, stage 0 uses the first.
        let shared_cfg = SwinV2Config {
            shared_cpb: true,
            ..tiny()
        };
        let (shared, src) = build(&shared_cfg, false, 1);
        assert_eq!(
            src.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
            shared_cfg.num_params()
        );
        // Random weights everywhere (norm1/norm2 start at zero, which would hide attention).
        let mut rng = mimlab_engine::rng::rng_for(4, &[]);
        let mut vars: Vec<_> = src.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &vars {
            use rand::Rng;
            let off = if name.contains("norm") { 1.0 } else { 0.0 };
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.5f32..0.5) + off)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
        }
        let keys: Vec<&String> = vars.iter().map(|(k, _)| k).collect();
        assert!(keys.iter().any(|k| *k == "cpb_mlp.2.weight"));
        assert!(!keys.iter().any(|k| k.contains("attn.cpb_mlp")));
        // As a distillation run stores it: under `student.`, with a projector.
        let mut tensors: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (format!("student.{k}"), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "projector.weight".into(),
            Tensor::zeros((4, 16), DType::F32, &Device::Cpu)?,
        );
        let (plain, dst) = build(&tiny(), false, 2);
        let r = load_backbone_tensors(&dst, tensors, "student.", Head::Reinit)?;
        assert_eq!(r.ignored, vec!["projector.weight"]);
        let w2 = |vm: &VarMap, k: &str| vm.data().lock().unwrap()[k].as_tensor().dims().to_vec();
        assert_eq!(
            w2(&dst, "layers.0.blocks.0.attn.cpb_mlp.2.weight"),
            [1, 512]
        );
        assert_eq!(
            w2(&dst, "layers.1.blocks.0.attn.cpb_mlp.2.weight"),
            [2, 512]
        );
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu)?;
        let a = shared.forward_features(&x, None, false)?.last;
        let b = plain.forward_features(&x, None, false)?.last;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // to rounding: a 1-head stage's unshared table is a 1-output linear (in-order dot
        // products, ops::linear), the shared one a column of a 2-output gemm
        assert!(diff < 1e-5, "max abs diff {diff}");
        Ok(())
    }
}
