//! The `segment:` section of an experiment (`finetune.task: segment`): which decode head, its
//! widths, the auxiliary FCN head, the inference mode and the class weights. Defaults are
//! mmsegmentation's `upernet_swin.py` (dense-tasks.md 1.4); the CPU presets shrink the widths.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// The decode head's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// mmseg's `UPerHead` (pyramid pooling + FPN fuse).
    #[default]
    Upernet,
    /// The light baseline: mmseg's `SegformerHead` (a 1x1 ConvModule per stage, upsampled to the
    /// finest, concatenated and fused by one 1x1 ConvModule).
    Segformer,
}

/// The decode head's settings (`segment.decode_head`), shared by both kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeHeadConfig {
    /// Backbone stages read, finest first (all four in the reference).
    pub in_stages: Vec<usize>,
    /// Width of every ConvModule (512 in the reference UPerNet, 256 in SegFormer's B0 head).
    pub channels: usize,
    /// Pyramid pooling output sizes (UPerNet only).
    pub pool_scales: Vec<usize>,
    /// `nn.Dropout2d` probability before `conv_seg`.
    pub dropout: f64,
    /// GroupNorm groups (at most; the largest divisor of the width), for the reference's SyncBN.
    pub gn_groups: usize,
    /// Classes predicted (logits per pixel); must equal the dataset's.
    pub num_classes: usize,
}

impl Default for DecodeHeadConfig {
    fn default() -> Self {
        Self {
            in_stages: vec![0, 1, 2, 3],
            channels: 512,
            pool_scales: vec![1, 2, 3, 6],
            dropout: 0.1,
            gn_groups: 32,
            num_classes: 150,
        }
    }
}

impl DecodeHeadConfig {
    /// Checks the config against a backbone of `num_stages` stages, naming the key.
    pub fn validate(&self, num_stages: usize) -> Result<()> {
        ensure!(
            self.channels > 0,
            "segment.decode_head.channels must be at least 1"
        );
        ensure!(
            self.num_classes > 0,
            "segment.decode_head.num_classes must be at least 1"
        );
        ensure!(
            !self.in_stages.is_empty(),
            "segment.decode_head.in_stages is empty"
        );
        ensure!(
            self.in_stages.windows(2).all(|w| w[0] < w[1]),
            "segment.decode_head.in_stages must go from the finest stage up, got {:?}",
            self.in_stages
        );
        for &s in &self.in_stages {
            ensure!(
                s < num_stages,
                "segment.decode_head.in_stages: stage {s} but the backbone has {num_stages} stages"
            );
        }
        ensure!(
            self.pool_scales.iter().all(|&s| s > 0),
            "segment.decode_head.pool_scales must be positive, got {:?}",
            self.pool_scales
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "segment.decode_head.dropout must be in [0, 1), got {}",
            self.dropout
        );
        Ok(())
    }
}

/// The auxiliary FCN head (`segment.auxiliary_head`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuxHeadConfig {
    /// Backbone stage it reads (`null`: no auxiliary head; 2 in the reference).
    pub stage: Option<usize>,
    /// Width of its ConvModule (256 in the reference).
    pub channels: usize,
    /// Weight of its loss (0.4 in the reference).
    pub weight: f64,
}

impl Default for AuxHeadConfig {
    fn default() -> Self {
        Self {
            stage: Some(2),
            channels: 256,
            weight: 0.4,
        }
    }
}

/// How eval images are run (mmseg `test_cfg.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TestMode {
    /// The whole (resized) image in one forward.
    #[default]
    Whole,
    /// Overlapping `img_size` windows at `slide_stride`, logits averaged where they overlap.
    Slide,
}

/// The `segment:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentSection {
    /// Decode head kind.
    pub head: HeadKind,
    /// Decode head settings.
    pub decode_head: DecodeHeadConfig,
    /// Auxiliary FCN head.
    pub auxiliary_head: AuxHeadConfig,
    /// Inference mode of the evaluation.
    pub test_mode: TestMode,
    /// Window stride of `slide` (null: two thirds of the window, as mmseg's 341 at 512).
    pub slide_stride: Option<usize>,
    /// Cross-entropy class weights (null: all 1).
    pub class_weight: Option<Vec<f64>>,
    /// Inference subtracts `ln class_weight[c]` from class `c`'s logits: the weighted loss
    /// trains the softmax towards `w_c p_c / sum_k w_k p_k`, and this undoes that prior (logit
    /// adjustment, Menon et al. 2021) so the argmax is the unweighted one again. Not in mmseg;
    /// needs `class_weight`, every weight above 0. Training is unchanged.
    pub logit_adjust: bool,
}

impl SegmentSection {
    /// Checks the section against a backbone of `num_stages` stages, naming the key.
    pub fn validate(&self, num_stages: usize) -> Result<()> {
        self.decode_head.validate(num_stages)?;
        let a = &self.auxiliary_head;
        if let Some(s) = a.stage {
            ensure!(
                s < num_stages,
                "segment.auxiliary_head.stage {s} but the backbone has {num_stages} stages"
            );
            ensure!(
                a.channels > 0,
                "segment.auxiliary_head.channels must be at least 1"
            );
            ensure!(
                a.weight.is_finite() && a.weight >= 0.0,
                "segment.auxiliary_head.weight must be >= 0, got {}",
                a.weight
            );
        }
        if let Some(s) = self.slide_stride {
            ensure!(s > 0, "segment.slide_stride must be at least 1");
        }
        if let Some(w) = &self.class_weight {
            ensure!(
                w.len() == self.decode_head.num_classes,
                "segment.class_weight has {} values for {} classes",
                w.len(),
                self.decode_head.num_classes
            );
            ensure!(
                w.iter().all(|v| v.is_finite() && *v >= 0.0),
                "segment.class_weight values must be >= 0"
            );
        }
        if self.logit_adjust {
            let w = self.class_weight.as_deref().unwrap_or_default();
            ensure!(
                !w.is_empty() && w.iter().all(|&v| v > 0.0),
                "segment.logit_adjust needs segment.class_weight with every weight above 0, got {:?}",
                self.class_weight
            );
        }
        Ok(())
    }
}
