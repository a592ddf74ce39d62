//! The one typed experiment config: every knob has a default here, YAML files in `configs/`
//! override it (with `base:` inheritance), and `--set key=value` overrides any key.
use std::path::Path;

use anyhow::{Context, Result};
use mimlab_engine::data::DataConfig;
use mimlab_engine::run_dir::InitSource;
use mimlab_engine::trainer::{RunConfig, TrainConfig};
use mimlab_finetune::config::FinetuneConfig;
use mimlab_finetune::init::prepare_init;
use mimlab_models::swin_v2::ModelSection;
use mimlab_pretrain::distill::DistillConfig;
use mimlab_pretrain::mask::SimMimConfig;
use serde::{Deserialize, Serialize};

/// A whole experiment: model, data, optimization, run folder, and the objective's own section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// Swin-V2 backbone: `preset` plus timm-named overrides.
    pub model: ModelSection,
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
    /// Feature distillation: teacher, loss, student options, feature cache.
    pub distill: DistillConfig,
}

impl Experiment {
    /// Loads defaults <- YAML file (and its `base:` chain) <- `--set` overrides, then fills every
    /// model key from the preset so the written config repeats the run exactly.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let mut exp: Experiment = mimlab_engine::config::load(path, sets)?;
        exp.model = exp.model.resolved()?;
        if let Some(m) = &exp.distill.teacher_model {
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
        let init = prepare_init(path, &self.model.resolve()?)?;
        if let Some(w) = init.pretrained_window_sizes {
            self.model.pretrained_window_sizes = Some(w);
        }
        Ok(Some(init.source))
    }

    /// The resolved config as YAML (what `config show` prints and runs write to `config.yaml`).
    pub fn to_yaml(&self) -> Result<String> {
        mimlab_engine::config::to_yaml(self)
    }
}
