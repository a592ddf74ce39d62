//! Model stage of segmentation: the light baseline decode head, mmseg's `SegformerHead`
//! (mmsegmentation:mmseg/models/decode_heads/segformer_head.py): a 1x1 ConvModule per read stage
//! to `channels`, each resized bilinearly (align_corners false) to the finest stage, concatenated,
//! one 1x1 ConvModule `fusion_conv`, channel dropout, `conv_seg`. About a tenth of UPerNet's
//! multiply-adds at equal width (no 3x3 convs). Names `convs.{i}.{conv,gn}`,
//! `fusion_conv.{conv,gn}`, `conv_seg`; GroupNorm for the reference's SyncBN.
use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::layers::{dropout2d, resize_bilinear, Conv2d, ConvGnRelu};

use crate::segment::config::DecodeHeadConfig;
use crate::segment::conv::{conv_module, conv_seg};

/// The SegFormer decode head.
#[derive(Debug, Clone)]
pub struct SegformerHead {
    cfg: DecodeHeadConfig,
    convs: Vec<ConvGnRelu>,
    fusion: ConvGnRelu,
    conv_seg: Conv2d,
    rng: SharedRng,
}

impl SegformerHead {
    /// Builds the head for stages of `stage_channels` channels under `vb`.
    pub fn new(
        cfg: &DecodeHeadConfig,
        stage_channels: &[usize],
        rng: SharedRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate(stage_channels.len())?;
        let (c, g) = (cfg.channels, cfg.gn_groups);
        let convs = cfg
            .in_stages
            .iter()
            .enumerate()
            .map(|(i, &s)| conv_module(stage_channels[s], c, 1, g, vb.pp("convs").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n = cfg.in_stages.len();
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            fusion: conv_module(n * c, c, 1, g, vb.pp("fusion_conv"))?,
            conv_seg: conv_seg(c, cfg.num_classes, vb.pp("conv_seg"))?,
            rng,
        })
    }

    /// `[B, num_classes, H_0, W_0]` logits at the finest read stage's resolution.
    pub fn forward(&self, stages: &[Tensor], train: bool) -> Result<Tensor> {
        let first = self.cfg.in_stages[0];
        let (_, _, h0, w0) = stages
            .get(first)
            .with_context(|| format!("SegFormer head: the backbone has no stage {first}"))?
            .dims4()?;
        let mut outs = vec![];
        for (&s, conv) in self.cfg.in_stages.iter().zip(&self.convs) {
            let x = stages
                .get(s)
                .with_context(|| format!("SegFormer head: the backbone has no stage {s}"))?;
            outs.push(resize_bilinear(&conv.forward(x)?, h0, w0)?);
        }
        let f = self.fusion.forward(&Tensor::cat(&outs, 1)?)?;
        let f = dropout2d(&f, self.cfg.dropout, &self.rng, train)?;
        Ok(self.conv_seg.forward(&f)?)
    }
}
