//! The `finetune:` section of an experiment: the classification recipe and the frozen-feature
//! evaluations. Defaults are the official SimMIM Swin fine-tuning recipe (architecture.md 7.1).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Classification finetuning, k-NN and linear-probe knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// The downstream task: `classify` (a linear head), `detect` (FPN + FCOS, the `detect:`
    /// section) or `segment` (UPerNet or the light head, the `segment:` section).
    pub task: Task,
    /// Pretrained weights to start from: a run folder (its newest checkpoint) or a weights file
    /// (`--init` sets it); null = train from scratch.
    pub init: Option<std::path::PathBuf>,
    /// Layer-wise lr decay: group lr = lr * decay^(n+1-layer_id) (1.0 = off; SwinV2-B 0.75).
    pub layer_decay: f64,
    /// Label smoothing of the (mixed) targets (0.1).
    pub label_smoothing: f64,
    /// Mixup Beta(alpha, alpha); 0 = off (0.8).
    pub mixup: f64,
    /// CutMix Beta(alpha, alpha); 0 = off (1.0).
    pub cutmix: f64,
    /// Probability that a batch is mixed at all (1.0).
    pub mix_prob: f64,
    /// Probability of CutMix instead of Mixup when both are on (0.5).
    pub switch_prob: f64,
    /// Neighbours of the k-NN evaluation (20, as DINO).
    pub knn_k: usize,
    /// Temperature of the k-NN vote weights exp(sim / T) (0.07, as DINO).
    pub knn_temperature: f64,
    /// Linear probe: epochs over the cached features.
    pub probe_epochs: usize,
    /// Linear probe: peak AdamW lr (cosine to 0).
    pub probe_lr: f64,
    /// Linear probe: AdamW weight decay.
    pub probe_weight_decay: f64,
    /// Linear probe: minibatch size.
    pub probe_batch_size: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            task: Task::Classify,
            init: None,
            layer_decay: 0.9,
            label_smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            knn_k: 20,
            knn_temperature: 0.07,
            probe_epochs: 100,
            probe_lr: 1e-2,
            probe_weight_decay: 1e-4,
            probe_batch_size: 256,
        }
    }
}

/// The downstream task of `mimlab finetune` / `mimlab eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Image classification.
    #[default]
    Classify,
    /// Object detection.
    Detect,
    /// Semantic segmentation (the `segment:` section).
    Segment,
}

impl FinetuneConfig {
    /// Rejects values that cannot run, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            bail!(
                "finetune.layer_decay must be in (0, 1], got {}",
                self.layer_decay
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "finetune.label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            );
        }
        for (k, v) in [("mixup", self.mixup), ("cutmix", self.cutmix)] {
            if v.is_nan() || v < 0.0 {
                bail!("finetune.{k} must be >= 0 (0 = off), got {v}");
            }
        }
        for (k, v) in [
            ("mix_prob", self.mix_prob),
            ("switch_prob", self.switch_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("finetune.{k} must be in [0, 1], got {v}");
            }
        }
        if self.knn_k == 0 {
            bail!("finetune.knn_k must be > 0");
        }
        if self.knn_temperature.is_nan() || self.knn_temperature <= 0.0 {
            bail!(
                "finetune.knn_temperature must be > 0, got {}",
                self.knn_temperature
            );
        }
        if self.probe_batch_size == 0 || self.probe_epochs == 0 {
            bail!("finetune.probe_batch_size and finetune.probe_epochs must be > 0");
        }
        Ok(())
    }

    /// True when batches are mixed (Mixup or CutMix on, with a non-zero probability).
    pub fn mixing(&self) -> bool {
        (self.mixup > 0.0 || self.cutmix > 0.0) && self.mix_prob > 0.0
    }
}
