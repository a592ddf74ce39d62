//! The one typed experiment config: every knob has a default here, YAML files in `configs/`
//! override it (with `base:` inheritance), and `--set key=value` overrides any key.
use std::path::Path;

use anyhow::{Context, Result};
use mimlab_engine::config::PresetSection;
use mimlab_engine::data::DataConfig;
use mimlab_engine::run_dir::InitSource;
use mimlab_engine::trainer::{RunConfig, TrainConfig};
use mimlab_finetune::config::FinetuneConfig;
use mimlab_finetune::detect::model::DetectSection;
use mimlab_finetune::init::prepare_init;
use mimlab_finetune::segment::SegmentSection;
use mimlab_models::swin_v2::{preset_layer, SwinV2Config};
use mimlab_pretrain::distill::DistillConfig;
use mimlab_pretrain::simmim::mask::SimMimConfig;
use serde::{Deserialize, Serialize};

/// A whole experiment: model, data, optimization, run folder, and the objective's own section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// Swin-V2 backbone: `preset` (a layer under the file and `--set`) and timm-named keys.
    pub model: SwinV2Config,
    /// Dataset, loader and augmentation.
    pub data: DataConfig,
    /// Optimizer, schedule, epochs, batch size.
    pub train: TrainConfig,
    /// Output folder, seed, device, logging and checkpoint intervals.
    pub run: RunConfig,
    /// SimMIM masking and target options.
    pub simmim: SimMimConfig,
    /// Classification finetuning recipe and frozen-feature evaluations.
    pub finetune: FinetuneConfig,
    /// Detection neck and head (`finetune.task: detect`).
    pub detect: DetectSection,
    /// Segmentation heads and inference (`finetune.task: segment`).
    pub segment: SegmentSection,
    /// Feature distillation: teacher, loss, student options, feature cache.
    pub distill: DistillConfig,
}

/// The sections whose `preset` key is a layer of the merge.
const MODEL_PRESETS: [PresetSection; 2] = [
    PresetSection {
        path: "model",
        expand: preset_layer,
    },
    PresetSection {
        path: "distill.teacher_model",
        expand: preset_layer,
    },
];

impl Experiment {
    /// Loads defaults <- model presets <- YAML file (and its `base:` chain) <- `--set`
    /// overrides, then validates the model sections (with the MoE placement spelled out) so the
    /// written config repeats the run exactly.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let mut exp: Experiment =
            mimlab_engine::config::load_with_presets(path, sets, &MODEL_PRESETS)?;
        exp.model = exp.model.resolved()?;
        exp.train.validate()?;
        for w in exp.train.warnings() {
            eprintln!("warning: {w}");
        }
        exp.run.validate()?;
        if let Some(m) = exp.distill.teacher_model.take() {
            exp.distill.teacher_model = Some(m.resolved().context("distill.teacher_model")?);
        }
        Ok(exp)
    }

    /// Resolves `finetune.init` (run folder or weights file) for a model about to start from it,
    /// checking the architecture and carrying the pretraining windows over into `model`
    /// ([`prepare_init`]). None when there is no init.
    pub fn apply_init(&mut self) -> Result<Option<InitSource>> {
        let Some(path) = &self.finetune.init else {
            return Ok(None);
        };
        let init = prepare_init(path, &self.model)?;
        if let Some(w) = init.pretrained_window_sizes {
            self.model.pretrained_window_sizes = w;
        }
        Ok(Some(init.source))
    }

    /// The resolved config as YAML (what `config show` prints and runs write to `config.yaml`).
    pub fn to_yaml(&self) -> Result<String> {
        mimlab_engine::config::to_yaml(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(sets: &[&str]) -> Result<Experiment> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Experiment::load(None, &sets)
    }

    #[test]
    fn model_preset_is_a_layer_under_the_keys() -> Result<()> {
        assert_eq!(load(&[])?.model, SwinV2Config::preset("swinv2_nano")?);
        let c = load(&[
            "model.preset=swinv2_base_window12_192",
            "model.drop_path_rate=0.1",
            "model.num_classes=0",
        ])?
        .model;
        assert_eq!(
            (c.embed_dim, c.window_size, c.num_classes, c.drop_path_rate),
            (128, 12, 0, 0.1)
        );
        assert_eq!(c.preset.as_deref(), Some("swinv2_base_window12_192"));
        // a 22K->1K shape keeps its pretrained windows
        let f = load(&["model.preset=swinv2_base_window12to16_192to256"])?.model;
        assert_eq!(f.pretrained_window_sizes, vec![12, 12, 12, 6]);
        // depth override without pretrained windows: one 0 per stage
        let d = load(&["model.depths=[2,2]", "model.num_heads=[1,2]"])?.model;
        assert_eq!(d.pretrained_window_sizes, vec![0, 0]);
        Ok(())
    }

    #[test]
    fn model_errors_name_the_key() {
        let e = format!("{:#}", load(&["model.windw_size=7"]).unwrap_err());
        assert_eq!(
            e,
            "--set model.windw_size=7: unknown key `model.windw_size` \
             (did you mean `model.window_size`?)"
        );
        let e = format!("{:#}", load(&["model.window_size=5"]).unwrap_err());
        assert!(e.contains("model.window_size"), "{e}");
        let e = format!("{:#}", load(&["model.preset=swinv2_huge"]).unwrap_err());
        assert!(
            e.starts_with("--set model.preset=swinv2_huge: key `model.preset`: unknown model preset `swinv2_huge`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load(&[
                "distill.teacher_model.preset=swinv2_micro",
                "distill.teacher_model.window_size=5"
            ])
            .unwrap_err()
        );
        assert!(
            e.starts_with("distill.teacher_model: model.img_size: model.window_size"),
            "{e}"
        );
    }

    #[test]
    fn moe_placement_is_spelled_out_and_the_written_config_repeats_the_run() -> Result<()> {
        let exp = load(&[
            "model.depths=[2,2]",
            "model.num_heads=[1,2]",
            "model.moe.num_experts=2",
            "train.base_lr=1e-6",
            "distill.teacher_model.preset=swinv2_micro",
        ])?;
        assert_eq!(exp.model.moe.blocks, vec![vec![1], vec![1]]);
        assert_eq!(
            exp.distill.teacher_model.as_ref().map(|t| t.embed_dim),
            Some(48)
        );
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, exp.to_yaml()?)?;
        assert_eq!(Experiment::load(Some(&p), &[])?, exp);
        Ok(())
    }

    /// Every float of a written config is a float for YAML 1.1 readers (PyYAML's resolver: a `.`
    /// in the mantissa and a signed exponent), and nothing else is written as one.
    #[test]
    fn written_config_floats_are_yaml_1_1_floats() -> Result<()> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/simmim/swinv2_nano_fmnist.yaml");
        let exp = Experiment::load(
            Some(&path),
            &["train.eps=1e-8".into(), "train.base_lr=2e20".into()],
        )?;
        let yaml = exp.to_yaml()?;
        assert!(yaml.contains("  eps: 1.0e-8\n"), "{yaml}");
        assert!(yaml.contains("  base_lr: 2.0e+20\n"), "{yaml}");
        // every plain scalar that YAML 1.2 (serde_yaml_ng) reads as a float
        let floats: Vec<&str> = yaml
            .lines()
            .filter_map(|l| {
                let l = l.trim_start().trim_start_matches("- ");
                let v = l.split_once(": ").map_or(l, |(_, v)| v);
                serde_yaml_ng::from_str::<serde_yaml_ng::Value>(v)
                    .is_ok_and(|x| x.is_f64())
                    .then_some(v)
            })
            .collect();
        assert!(floats.len() > 20, "{floats:?}");
        for t in floats {
            let exp_ok = t
                .split_once(['e', 'E'])
                .is_none_or(|(_, e)| e.starts_with(['-', '+']));
            assert!(t.contains('.') && exp_ok, "`{t}` is not a YAML 1.1 float");
        }
        Ok(())
    }
}
