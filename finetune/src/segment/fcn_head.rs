//! Model stage of segmentation: the auxiliary head, mmseg's `FCNHead` as `upernet_swin.py` sets it
//! (`num_convs=1`, `concat_input=False`, on stage 2, 256 channels, loss weight 0.4): one 3x3
//! ConvModule, channel dropout, `conv_seg`. Names `convs.0.{conv,gn}`, `conv_seg` under
//! `auxiliary_head`.
use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::layers::{dropout2d, Conv2d, ConvGnRelu};

use crate::segment::conv::{conv_module, conv_seg};

/// The auxiliary FCN head.
#[derive(Debug, Clone)]
pub struct FcnHead {
    stage: usize,
    conv: ConvGnRelu,
    conv_seg: Conv2d,
    dropout: f64,
    rng: SharedRng,
}

impl FcnHead {
    /// Reads `stage` (of `in_channels`), `channels` wide, `num_classes` logits.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stage: usize,
        in_channels: usize,
        channels: usize,
        num_classes: usize,
        gn_groups: usize,
        dropout: f64,
        rng: SharedRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            stage,
            conv: conv_module(in_channels, channels, 3, gn_groups, vb.pp("convs").pp(0))?,
            conv_seg: conv_seg(channels, num_classes, vb.pp("conv_seg"))?,
            dropout,
            rng,
        })
    }

    /// Logits at its stage's resolution.
    pub fn forward(&self, stages: &[Tensor], train: bool) -> Result<Tensor> {
        let x = stages
            .get(self.stage)
            .with_context(|| format!("FCN head: the backbone has no stage {}", self.stage))?;
        let f = dropout2d(&self.conv.forward(x)?, self.dropout, &self.rng, train)?;
        Ok(self.conv_seg.forward(&f)?)
    }
}
