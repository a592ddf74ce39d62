//! Recipe, model stage: a Swin-V2 backbone from earlier work. A run folder or weights file
//! (`--init`, `--teacher`, `--weights`; resolved by `engine::run_dir::resolve_init`), the key
//! prefix under which the objective that wrote it keeps the backbone (SimMIM `encoder.`,
//! feature distillation `student.`, a classifier or an official / timm file none), and the
//! architecture from the run's `config.yaml`. The models crate loads what it is told.
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use mimlab_engine::run_dir::read_config_section;
use mimlab_models::checkpoint::{checkpoint_keys, LoadReport};
use mimlab_models::pretrained::{self, Head};
use mimlab_models::swin_v2::{preset_layer, SwinV2, SwinV2Config};

/// Prefix of the backbone in a SimMIM checkpoint ([`crate::simmim::SimMim`]'s `encoder`).
pub const SIMMIM_PREFIX: &str = "encoder.";
/// Prefix of the backbone in a feature-distillation checkpoint ([`crate::distill::Distill`]'s
/// student).
pub const DISTILL_PREFIX: &str = "student.";

/// The prefix that holds the backbone among checkpoint `keys`: the first of the pretraining
/// objectives' prefixes that some key carries, else "" (classifier, official or timm file).
pub fn backbone_prefix<S: AsRef<str>>(keys: &[S]) -> &'static str {
    [SIMMIM_PREFIX, DISTILL_PREFIX]
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
}
