//! Model stage of segmentation: mmsegmentation's UPerNet decode head on the backbone's stage maps
//! (mmsegmentation:mmseg/models/decode_heads/uper_head.py, psp_head.py `PPM`, fcn_head.py;
//! dense-tasks.md 1.4), with GroupNorm where the reference has SyncBN (small batches on one
//! machine).
//!
//! - Pyramid pooling on the last stage: for each scale `s`, adaptive average pooling to `s x s`,
//!   1x1 ConvModule, bilinear resize back (align_corners false); concatenated with the stage and
//!   fused by the 3x3 `bottleneck`.
//! - FPN fuse: 1x1 `lateral_convs` on the other stages, top-down `lateral[i-1] += resize(lateral[i])`
//!   (bilinear), 3x3 `fpn_convs` on all but the top, every level resized to the finest and
//!   concatenated, 3x3 `fpn_bottleneck`, channel dropout (`nn.Dropout2d`), 1x1 `conv_seg`.
//!
//! ConvModules and `conv_seg` as [`crate::segment::conv`]. Names follow mmseg with `gn` for the
//! norm: `psp_modules.{i}.1.conv`, `bottleneck.conv`, `lateral_convs.{i}.conv`,
//! `fpn_convs.{i}.conv`, `fpn_bottleneck.conv`, `conv_seg`.
use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::layers::{adaptive_avg_pool2d, dropout2d, resize_bilinear, Conv2d, ConvGnRelu};

use crate::segment::config::DecodeHeadConfig;
use crate::segment::conv::{conv_module, conv_seg};

/// UPerNet.
#[derive(Debug, Clone)]
pub struct UperNet {
    cfg: DecodeHeadConfig,
    psp: Vec<ConvGnRelu>,
    bottleneck: ConvGnRelu,
    laterals: Vec<ConvGnRelu>,
    fpn_convs: Vec<ConvGnRelu>,
    fpn_bottleneck: ConvGnRelu,
    conv_seg: Conv2d,
    rng: SharedRng,
}

impl UperNet {
    /// Builds the head for stages of `stage_channels` channels under `vb`.
    pub fn new(
        cfg: &DecodeHeadConfig,
        stage_channels: &[usize],
        rng: SharedRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate(stage_channels.len())?;
        let (c, g) = (cfg.channels, cfg.gn_groups);
        let conv = |i: usize, o: usize, k: usize, v: VarBuilder| conv_module(i, o, k, g, v);
        let top = stage_channels[*cfg.in_stages.last().context("no stages")?];
        let psp = (0..cfg.pool_scales.len())
            .map(|i| conv(top, c, 1, vb.pp("psp_modules").pp(i).pp(1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bottleneck = conv(top + cfg.pool_scales.len() * c, c, 3, vb.pp("bottleneck"))?;
        let lower = &cfg.in_stages[..cfg.in_stages.len() - 1];
        let mut laterals = vec![];
        let mut fpn_convs = vec![];
        for (i, &s) in lower.iter().enumerate() {
            laterals.push(conv(stage_channels[s], c, 1, vb.pp("lateral_convs").pp(i))?);
            fpn_convs.push(conv(c, c, 3, vb.pp("fpn_convs").pp(i))?);
        }
        let fpn_bottleneck = conv(cfg.in_stages.len() * c, c, 3, vb.pp("fpn_bottleneck"))?;
        Ok(Self {
            cfg: cfg.clone(),
            psp,
            bottleneck,
            laterals,
            fpn_convs,
            fpn_bottleneck,
            conv_seg: conv_seg(c, cfg.num_classes, vb.pp("conv_seg"))?,
            rng,
        })
    }

    /// `[B, num_classes, H_0, W_0]` logits at the finest read stage's resolution, from the
    /// backbone's NCHW stage maps (`stages[i]` is stage `i`, contiguous).
    pub fn forward(&self, stages: &[Tensor], train: bool) -> Result<Tensor> {
        let stage = |s: usize| {
            stages
                .get(s)
                .with_context(|| format!("UPerNet: the backbone has no stage {s}"))
        };
        let top_stage = *self.cfg.in_stages.last().context("no stages")?;
        let x = stage(top_stage)?;
        let (_, _, h, w) = x.dims4()?;
        let mut cat = vec![x.clone()];
        for (m, &s) in self.psp.iter().zip(&self.cfg.pool_scales) {
            let pooled = m.forward(&adaptive_avg_pool2d(x, s, s)?)?;
            cat.push(resize_bilinear(&pooled, h, w)?);
        }
        let psp = self.bottleneck.forward(&Tensor::cat(&cat, 1)?)?;
        let mut lat = self
            .cfg
            .in_stages
            .iter()
            .zip(&self.laterals)
            .map(|(&s, l)| Ok(l.forward(stage(s)?)?))
            .collect::<Result<Vec<_>>>()?;
        lat.push(psp);
        for i in (1..lat.len()).rev() {
            let (_, _, h, w) = lat[i - 1].dims4()?;
            let up = resize_bilinear(&lat[i], h, w)?;
            lat[i - 1] = (&lat[i - 1] + up)?;
        }
        let (_, _, h0, w0) = lat[0].dims4()?;
        let mut outs = vec![];
        for (i, l) in lat.iter().enumerate() {
            let o = match self.fpn_convs.get(i) {
                Some(c) => c.forward(l)?,
                None => l.clone(),
            };
            outs.push(if i == 0 {
                o
            } else {
                resize_bilinear(&o, h0, w0)?
            });
        }
        let feats = self.fpn_bottleneck.forward(&Tensor::cat(&outs, 1)?)?;
        let feats = dropout2d(&feats, self.cfg.dropout, &self.rng, train)?;
        Ok(self.conv_seg.forward(&feats)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;

    fn small() -> DecodeHeadConfig {
        DecodeHeadConfig {
            channels: 8,
            gn_groups: 4,
            num_classes: 5,
            ..DecodeHeadConfig::default()
        }
    }

    /// Odd maps of a 72x40 input (18x10, 9x5, 5x3, 3x2): logits at the finest map, mmseg's
    /// names, every parameter and stage reached by the gradient.
    #[test]
    fn shapes_names_and_gradients_on_odd_maps() -> Result<()> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let dims = [4, 8, 16, 32];
        let head = UperNet::new(&small(), &dims, SharedRng::new(0), vb.pp("decode_head"))?;
        let sizes = [(18, 10), (9, 5), (5, 3), (3, 2)];
        let vars = dims
            .iter()
            .zip(sizes)
            .map(|(&c, (h, w))| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &Device::Cpu)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let stages: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = head.forward(&stages, true)?;
        assert_eq!(out.dims(), &[2, 5, 18, 10]);
        let data = vm.data().lock().unwrap().clone();
        for k in [
            "decode_head.psp_modules.3.1.conv.weight",
            "decode_head.psp_modules.0.1.gn.bias",
            "decode_head.bottleneck.conv.weight",
            "decode_head.lateral_convs.2.conv.weight",
            "decode_head.fpn_convs.2.gn.weight",
            "decode_head.fpn_bottleneck.conv.weight",
            "decode_head.conv_seg.bias",
        ] {
            assert!(data.contains_key(k), "{k} missing: {:?}", data.keys());
        }
        assert!(!data.contains_key("decode_head.bottleneck.conv.bias"));
        // the bottleneck reads the stage and 4 pooled maps: 32 + 4 * 8 channels
        assert_eq!(
            data["decode_head.bottleneck.conv.weight"].dims(),
            &[8, 64, 3, 3]
        );
        assert_eq!(
            data["decode_head.fpn_bottleneck.conv.weight"].dims(),
            &[8, 32, 3, 3]
        );
        let loss = out.sqr()?.sum_all()?;
        let g = loss.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let gs = g
                .get(v)
                .with_context(|| format!("stage {i} has no gradient"))?;
            assert!(gs.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "stage {i}");
        }
        for (k, v) in &data {
            let gv = g.get(v).with_context(|| format!("{k} has no gradient"))?;
            assert_eq!(gv.dims(), v.dims(), "{k}");
        }
        Ok(())
    }

    #[test]
    fn dropout2d_zeroes_whole_channels_and_keeps_the_mean() -> Result<()> {
        let x = Tensor::ones((4, 50, 3, 3), DType::F32, &Device::Cpu)?;
        let y = dropout2d(&x, 0.5, &SharedRng::new(1), true)?;
        let per_channel = y.sum((2, 3))?.flatten_all()?.to_vec1::<f32>()?;
        assert!(
            per_channel.iter().all(|&v| v == 0.0 || v == 18.0),
            "{per_channel:?}"
        );
        let zeros = per_channel.iter().filter(|&&v| v == 0.0).count();
        assert!(
            (60..=140).contains(&zeros),
            "{zeros} of 200 channels dropped"
        );
        let same = dropout2d(&x, 0.5, &SharedRng::new(1), false)?;
        assert_eq!(same.sum_all()?.to_scalar::<f32>()?, 4.0 * 50.0 * 9.0);
        Ok(())
    }

    #[test]
    fn validation_names_the_key() {
        let e = DecodeHeadConfig {
            in_stages: vec![1, 0],
            ..small()
        }
        .validate(4)
        .unwrap_err();
        assert!(
            e.to_string().contains("segment.decode_head.in_stages"),
            "{e}"
        );
        let e = DecodeHeadConfig {
            in_stages: vec![0, 5],
            ..small()
        }
        .validate(4)
        .unwrap_err();
        assert!(e.to_string().contains("stage 5"), "{e}");
    }
}
