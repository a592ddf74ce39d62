//! Recipe, model stage: a Swin-V2 backbone from earlier work. A run folder or weights file
//! (`--init`, `--teacher`, `--weights`; resolved by `engine::run_dir::resolve_init`), the key
//! prefix under which the objective that wrote it keeps the backbone (SimMIM `encoder.`,
//! feature distillation `student.`, detection and segmentation `backbone.`, a classifier or an
//! official / timm file none), and the
//! architecture from the run's `config.yaml`. The models crate loads what it is told. Also the
//! eval forward over saved tensors and the description of `mimlab model run` / `model info`.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::run_dir::read_config_section;
use mimlab_models::checkpoint::{checkpoint_keys, read_weights, LoadReport};
use mimlab_models::pretrained::{self, Head};
use mimlab_models::swin_v2::{preset_layer, SwinV2, SwinV2Config, PRESETS};

/// Prefix of the backbone in a SimMIM checkpoint ([`crate::simmim::SimMim`]'s `encoder`).
pub const SIMMIM_PREFIX: &str = "encoder.";
/// Prefix of the backbone in a feature-distillation checkpoint ([`crate::distill::Distill`]'s
/// student).
pub const DISTILL_PREFIX: &str = "student.";
/// Prefix of the backbone in a detection or segmentation checkpoint (the finetune crate's
/// detector and segmentor keep it under `backbone.`, beside their `neck.` / `head.` /
/// `decode_head.` tensors), so that one dense task's run can start another's.
pub const DENSE_PREFIX: &str = "backbone.";

/// The prefix that holds the backbone among checkpoint `keys`: the first of the pretraining
/// objectives' prefixes that some key carries, else "" (classifier, official or timm file).
pub fn backbone_prefix<S: AsRef<str>>(keys: &[S]) -> &'static str {
    [SIMMIM_PREFIX, DISTILL_PREFIX, DENSE_PREFIX]
        .into_iter()
        .find(|p| keys.iter().any(|k| k.as_ref().starts_with(p)))
        .unwrap_or("")
}

/// The backbone prefix of the checkpoint `weights` (read from its header).
pub fn backbone_prefix_of(weights: &Path) -> Result<&'static str> {
    Ok(backbone_prefix(&checkpoint_keys(weights)?))
}

/// Loads the backbone of `weights` (any mimlab objective's checkpoint, or an official / timm
/// file) into `varmap`, built for a Swin-V2; see [`pretrained::load_backbone_weights`].
pub fn load_backbone_weights(varmap: &VarMap, weights: &Path, head: Head) -> Result<LoadReport> {
    let prefix = backbone_prefix_of(weights)?;
    pretrained::load_backbone_weights(varmap, weights, prefix, head)
}

/// Builds `cfg` and loads the backbone of `weights` into it (with the head when both have one);
/// see [`pretrained::load_backbone`].
pub fn load_backbone(
    cfg: &SwinV2Config,
    weights: &Path,
    device: &Device,
) -> Result<(SwinV2, VarMap, LoadReport)> {
    let prefix = backbone_prefix_of(weights)?;
    pretrained::load_backbone(cfg, weights, prefix, device)
}

/// The eval forward of `model` (on `device`) over the tensor `input` of the safetensors file
/// `input` (`[N, C, H, W]`, already normalized; H and W any multiples of the patch size): the
/// outputs `pre_logits` `[N, C]`, `features` (the last stage, NHWC) and, when the model has a
/// head, `logits`, all on the CPU.
pub fn run_backbone(
    model: &SwinV2,
    input: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let inputs = read_weights(input)?;
    let x = inputs
        .get("input")
        .with_context(|| format!("{}: no tensor named `input`", input.display()))?
        .to_dtype(DType::F32)?
        .to_device(device)?;
    let feats = model.forward_features(&x, None, false)?;
    let pre = model.pre_logits(&feats)?;
    let last = feats.stages.last().context("model has no stages")?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("pre_logits".into(), pre.clone());
    out.insert("features".into(), last.permute((0, 2, 3, 1))?.contiguous()?);
    if model.config().num_classes > 0 {
        out.insert("logits".into(), model.forward(&x, false)?.0);
    }
    out.into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect()
}

/// What `mimlab model info` prints of `cfg`, one line each: preset, image size, parameters,
/// GFLOPs per image, accepted input sizes, each stage's blocks / dim / heads / map / window and
/// the output features.
pub fn describe_backbone(cfg: &SwinV2Config) -> Vec<String> {
    let mut lines = vec![
        format!("preset            {}", cfg.preset.as_deref().unwrap_or("-")),
        format!("img_size          {}", cfg.img_size),
        format!("parameters        {}", cfg.num_params()),
        format!(
            "GFLOPs / image    {:.3} (multiply-adds, forward)",
            cfg.flops() as f64 / 1e9
        ),
        format!(
            "inputs            any multiple of {} px (the windows of img_size, padded)",
            cfg.size_multiple()
        ),
    ];
    let mut res = cfg.img_size / cfg.patch_size;
    for (i, (&d, &h)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
        let dim = cfg.embed_dim << i;
        let (win, shift) = cfg.stage_window(i);
        lines.push(format!(
            "stage {i}           {d} blocks, dim {dim}, heads {h}, map {res}x{res}, window {win}, \
             shift {shift}"
        ));
        res /= 2;
    }
    lines.push(format!(
        "features          {} channels at stride {}",
        cfg.num_features(),
        cfg.out_stride()
    ));
    lines
}

/// What `mimlab model list` prints: a header naming the conventions, then one row per preset
/// ([`PRESETS`]): name, image size, window, embed dim, depths, heads, parameters (exact, the
/// preset's own head) and GMACs per image at its image size ([`SwinV2Config::macs`]).
pub fn describe_presets() -> Result<Vec<String>> {
    let mut rows = vec![[
        "preset", "img", "window", "embed", "depths", "heads", "params", "GMACs",
    ]
    .map(String::from)
    .to_vec()];
    for name in PRESETS {
        let c = SwinV2Config::preset(name)?;
        let list = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        rows.push(vec![
            name.to_string(),
            c.img_size.to_string(),
            c.window_size.to_string(),
            c.embed_dim.to_string(),
            list(&c.depths),
            list(&c.num_heads),
            c.num_params().to_string(),
            format!("{:.2}", c.macs() as f64 / 1e9),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut lines = vec![concat!(
        "# GMACs: forward multiply-adds per image at its img size, counted as timm / fvcore ",
        "do (1 multiply-add = 1 FLOP): patch embed, qkv / proj, attention matmuls per window, ",
        "CPB MLP, MLPs, patch merging, head; norms, softmax and GELU not counted. params: ",
        "exact, with the preset's head."
    )
    .to_string()];
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (s, &w))| {
                if i == 0 || i == 4 || i == 5 {
                    format!("{s:<w$}")
                } else {
                    format!("{s:>w$}")
                }
            })
            .collect();
        lines.push(cells.join("  ").trim_end().to_string());
    }
    Ok(lines)
}

/// The `model:` section of a run's `config.yaml` (the architecture its weights were trained as),
/// over its preset layer (runs write every key; a hand-written section may name only some) and
/// validated.
pub fn run_model_section(config_yaml: &Path) -> Result<SwinV2Config> {
    let section: serde_yaml_ng::Mapping = read_config_section(config_yaml, "model")?;
    let context = || format!("{}: model section", config_yaml.display());
    let preset = section.get("preset").and_then(serde_yaml_ng::Value::as_str);
    let mut full = preset_layer(preset, &section).with_context(context)?;
    for (k, v) in section {
        full[k] = v;
    }
    serde_yaml_ng::from_value::<SwinV2Config>(full)
        .map_err(anyhow::Error::from)
        .and_then(SwinV2Config::resolved)
        .with_context(context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::Distill;
    use crate::simmim::tiny_setup;
    use candle_core::DType;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_engine::rng::SharedRng;

    fn keys(vm: &VarMap) -> Vec<String> {
        let mut k: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn each_objective_keeps_its_backbone_under_its_prefix() -> Result<()> {
        let (model, cfg) = tiny_setup();
        let simmim = VarMap::new();
        let vb = seeded_var_builder(&simmim, 0, DType::F32, &Device::Cpu);
        crate::simmim::SimMim::new(&model, &cfg, SharedRng::new(0), vb)?;
        let k = keys(&simmim);
        assert_eq!(backbone_prefix(&k), SIMMIM_PREFIX);
        assert!(k.contains(&"encoder.patch_embed.proj.weight".to_string()));

        let student = SwinV2Config {
            num_classes: 0,
            ..model.clone()
        };
        let distill = VarMap::new();
        Distill::new(
            &student,
            8,
            2.0,
            None,
            SharedRng::new(0),
            &distill,
            0,
            &Device::Cpu,
        )?;
        let k = keys(&distill);
        assert_eq!(backbone_prefix(&k), DISTILL_PREFIX);
        assert!(k.contains(&"student.patch_embed.proj.weight".to_string()));

        let dense = [
            "backbone.patch_embed.proj.weight",
            "decode_head.conv_seg.weight",
        ];
        assert_eq!(backbone_prefix(&dense), DENSE_PREFIX);
        let plain = ["patch_embed.proj.weight", "head.weight"];
        assert_eq!(backbone_prefix(&plain), "");
        Ok(())
    }

    #[test]
    fn a_simmim_checkpoint_loads_into_a_classifier_and_the_run_config_is_read() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (model, cfg) = tiny_setup();
        let simmim = VarMap::new();
        let vb = seeded_var_builder(&simmim, 1, DType::F32, &Device::Cpu);
        crate::simmim::SimMim::new(&model, &cfg, SharedRng::new(0), vb)?;
        let w = dir.path().join("step_2.safetensors");
        mimlab_models::checkpoint::save_varmap(&simmim, &w)?;
        assert_eq!(backbone_prefix_of(&w)?, SIMMIM_PREFIX);
        let cls = SwinV2Config {
            num_classes: 3,
            ..model.clone()
        };
        let (_, vm, r) = load_backbone(&cls, &w, &Device::Cpu)?;
        let encoder = keys(&simmim)
            .iter()
            .filter(|k| k.starts_with(SIMMIM_PREFIX))
            .count();
        assert_eq!(r.loaded, encoder - 1, "every encoder tensor but mask_token");
        assert_eq!(r.missing_allowed, vec!["head.bias", "head.weight"]);
        assert!(r
            .ignored
            .iter()
            .all(|k| k.starts_with("decoder.") || k == "encoder.mask_token"));
        let k = "layers.0.blocks.0.attn.cpb_mlp.0.weight";
        let get = |vm: &VarMap, k: &str| -> Vec<f32> {
            vm.data().lock().unwrap()[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(get(&vm, k), get(&simmim, &format!("encoder.{k}")));

        let c = dir.path().join("config.yaml");
        std::fs::write(&c, "model:\n  preset: swinv2_nano\n  img_size: 32\n")?;
        let m = run_model_section(&c)?;
        assert_eq!(m.preset.as_deref(), Some("swinv2_nano"));
        assert_eq!((m.img_size, m.embed_dim), (32, 32));
        Ok(())
    }

    #[test]
    fn run_backbone_gives_nhwc_features_and_names_a_missing_input() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (cfg, _) = tiny_setup();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
        let model = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
        let p = dir.path().join("in.safetensors");
        candle_core::safetensors::save(&HashMap::from([("x", x.clone())]), &p)?;
        let e = run_backbone(&model, &p, &dev).unwrap_err().to_string();
        assert!(e.contains("no tensor named `input`"), "{e}");
        candle_core::safetensors::save(&HashMap::from([("input", x)]), &p)?;
        let out = run_backbone(&model, &p, &dev)?;
        let (side, c) = (32 / cfg.out_stride(), cfg.num_features());
        assert_eq!(out["features"].dims(), [2, side, side, c]);
        assert_eq!(out["pre_logits"].dims(), [2, c]);
        assert_eq!(out["logits"].dims(), [2, cfg.num_classes]);
        // pre-logits: the mean of the last stage's map
        let diff = (out["features"].mean((1, 2))? - &out["pre_logits"])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");

        let lines = describe_backbone(&cfg);
        assert_eq!(lines.len(), 6 + cfg.depths.len());
        assert_eq!(lines[1], "img_size          32");
        assert_eq!(lines[2], format!("parameters        {}", cfg.num_params()));
        Ok(())
    }
}
