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
//! - Optional auxiliary FCN head on one stage (`auxiliary_head`: one 3x3 ConvModule, dropout,
//!   `conv_seg`; loss weight 0.4 in the reference).
//!
//! ConvModules are conv (no bias: mmcv's `bias='auto'` under a norm) + GN + ReLU with mmcv's init
//! (Kaiming normal, fan_out, ReLU gain: N(0, 2 / (out * k * k))); `conv_seg` is N(0, 0.01), bias 0
//! (`BaseDecodeHead.init_weights`). Names follow mmseg with `gn` for the norm:
//! `psp_modules.{i}.1.conv`, `bottleneck.conv`, `lateral_convs.{i}.conv`, `fpn_convs.{i}.conv`,
//! `fpn_bottleneck.conv`, `conv_seg`; `auxiliary_head.convs.0.conv`, `auxiliary_head.conv_seg`.
use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use mimlab_engine::rng::SharedRng;
use mimlab_models::layers::{adaptive_avg_pool2d, dropout2d, resize_bilinear, Conv2d, ConvGnRelu};
use serde::{Deserialize, Serialize};

/// The `decode_head:` settings (mmseg's `upernet_swin.py` values as defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UperNetConfig {
    /// Backbone stages read, finest first (all four in the reference).
    pub in_stages: Vec<usize>,
    /// Width of every ConvModule (512 in the reference; CPU presets use less).
    pub channels: usize,
    /// Pyramid pooling output sizes.
    pub pool_scales: Vec<usize>,
    /// `nn.Dropout2d` probability before `conv_seg`.
    pub dropout: f64,
    /// GroupNorm groups (at most; the largest divisor of the width).
    pub gn_groups: usize,
    /// Classes predicted (logits per pixel).
    pub num_classes: usize,
    /// Stage of the auxiliary FCN head (`null`: none; 2 in the reference).
    pub aux_stage: Option<usize>,
    /// Width of the auxiliary head (256 in the reference).
    pub aux_channels: usize,
    /// Weight of the auxiliary loss (0.4 in the reference).
    pub aux_weight: f64,
}

impl Default for UperNetConfig {
    fn default() -> Self {
        Self {
            in_stages: vec![0, 1, 2, 3],
            channels: 512,
            pool_scales: vec![1, 2, 3, 6],
            dropout: 0.1,
            gn_groups: 32,
            num_classes: 150,
            aux_stage: Some(2),
            aux_channels: 256,
            aux_weight: 0.4,
        }
    }
}

impl UperNetConfig {
    /// Checks the config against a backbone of `num_stages` stages, naming the key.
    pub fn validate(&self, num_stages: usize) -> Result<()> {
        ensure!(self.channels > 0, "decode_head.channels must be at least 1");
        ensure!(
            self.num_classes > 0,
            "decode_head.num_classes must be at least 1"
        );
        ensure!(!self.in_stages.is_empty(), "decode_head.in_stages is empty");
        ensure!(
            self.in_stages.windows(2).all(|w| w[0] < w[1]),
            "decode_head.in_stages must go from the finest stage up, got {:?}",
            self.in_stages
        );
        for &s in self.in_stages.iter().chain(&self.aux_stage) {
            ensure!(
                s < num_stages,
                "decode_head: stage {s} but the backbone has {num_stages} stages"
            );
        }
        ensure!(
            self.pool_scales.iter().all(|&s| s > 0),
            "decode_head.pool_scales must be positive, got {:?}",
            self.pool_scales
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "decode_head.dropout must be in [0, 1), got {}",
            self.dropout
        );
        ensure!(
            self.aux_channels > 0,
            "decode_head.aux_channels must be at least 1"
        );
        Ok(())
    }
}

/// mmcv's ConvModule init: Kaiming normal, fan_out, ReLU gain.
fn kaiming(o: usize, k: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (o * k * k) as f64).sqrt(),
    }
}

/// `BaseDecodeHead.conv_seg`: 1x1, N(0, 0.01), bias 0.
fn conv_seg(c: usize, n: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let n01 = Init::Randn {
        mean: 0.0,
        stdev: 0.01,
    };
    Conv2d::new(c, n, 1, 1, 0, n01, Some(Init::Const(0.0)), vb)
}

/// The head's outputs at the finest stage's resolution.
#[derive(Debug, Clone)]
pub struct SegLogits {
    /// `[B, num_classes, H_0, W_0]` decode-head logits.
    pub main: Tensor,
    /// The auxiliary head's logits at its stage's resolution, when there is one.
    pub aux: Option<Tensor>,
}

/// The auxiliary FCN head (mmseg `FCNHead`, `num_convs=1`, `concat_input=False`).
#[derive(Debug, Clone)]
struct FcnHead {
    /// The backbone stage it reads.
    stage: usize,
    conv: ConvGnRelu,
    conv_seg: Conv2d,
}

/// UPerNet.
#[derive(Debug, Clone)]
pub struct UperNet {
    cfg: UperNetConfig,
    psp: Vec<ConvGnRelu>,
    bottleneck: ConvGnRelu,
    laterals: Vec<ConvGnRelu>,
    fpn_convs: Vec<ConvGnRelu>,
    fpn_bottleneck: ConvGnRelu,
    conv_seg: Conv2d,
    aux: Option<FcnHead>,
    rng: SharedRng,
}

impl UperNet {
    /// Builds the head for stages of `stage_channels` channels under `vb` (the auxiliary head
    /// under `aux_vb`: mmseg keeps it beside `decode_head`).
    pub fn new(
        cfg: &UperNetConfig,
        stage_channels: &[usize],
        rng: SharedRng,
        vb: VarBuilder,
        aux_vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate(stage_channels.len())?;
        let (c, g) = (cfg.channels, cfg.gn_groups);
        let conv = |i: usize, o: usize, k: usize, v: VarBuilder| {
            ConvGnRelu::new(i, o, k, g, kaiming(o, k), None, v)
        };
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
        let aux = match cfg.aux_stage {
            Some(s) => {
                let a = cfg.aux_channels;
                Some(FcnHead {
                    stage: s,
                    conv: ConvGnRelu::new(
                        stage_channels[s],
                        a,
                        3,
                        g,
                        kaiming(a, 3),
                        None,
                        aux_vb.pp("convs").pp(0),
                    )?,
                    conv_seg: conv_seg(a, cfg.num_classes, aux_vb.pp("conv_seg"))?,
                })
            }
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            psp,
            bottleneck,
            laterals,
            fpn_convs,
            fpn_bottleneck,
            conv_seg: conv_seg(c, cfg.num_classes, vb.pp("conv_seg"))?,
            aux,
            rng,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UperNetConfig {
        &self.cfg
    }

    /// Logits from the backbone's NCHW stage maps (`stages[i]` is stage `i`).
    pub fn forward(&self, stages: &[Tensor], train: bool) -> Result<SegLogits> {
        // each stage read (the aux head's may be one of them) made contiguous once
        let mut maps = BTreeMap::new();
        for &s in self
            .cfg
            .in_stages
            .iter()
            .chain(self.aux.as_ref().map(|a| &a.stage))
        {
            let t = stages
                .get(s)
                .with_context(|| format!("UPerNet: the backbone has no stage {s}"))?;
            maps.entry(s).or_insert(t.contiguous()?);
        }
        let top_stage = *self.cfg.in_stages.last().context("no stages")?;
        let x = maps[&top_stage].clone();
        let (_, _, h, w) = x.dims4()?;
        let mut cat = vec![x.clone()];
        for (m, &s) in self.psp.iter().zip(&self.cfg.pool_scales) {
            let pooled = m.forward(&adaptive_avg_pool2d(&x, s, s)?)?;
            cat.push(resize_bilinear(&pooled, h, w)?);
        }
        let psp = self.bottleneck.forward(&Tensor::cat(&cat, 1)?)?;
        let mut lat = self
            .cfg
            .in_stages
            .iter()
            .zip(&self.laterals)
            .map(|(s, l)| l.forward(&maps[s]))
            .collect::<candle_core::Result<Vec<_>>>()?;
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
        let main = self.conv_seg.forward(&feats)?;
        let aux = match &self.aux {
            Some(a) => {
                let f = a.conv.forward(&maps[&a.stage])?;
                let f = dropout2d(&f, self.cfg.dropout, &self.rng, train)?;
                Some(a.conv_seg.forward(&f)?)
            }
            None => None,
        };
        Ok(SegLogits { main, aux })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;

    fn small() -> UperNetConfig {
        UperNetConfig {
            channels: 8,
            gn_groups: 4,
            num_classes: 5,
            aux_channels: 6,
            ..UperNetConfig::default()
        }
    }

    /// Odd maps of a 72x40 input (18x10, 9x5, 5x3, 3x2): logits at the finest map, mmseg's
    /// names, every parameter and stage reached by the gradient.
    #[test]
    fn shapes_names_and_gradients_on_odd_maps() -> Result<()> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let dims = [4, 8, 16, 32];
        let head = UperNet::new(
            &small(),
            &dims,
            SharedRng::new(0),
            vb.pp("decode_head"),
            vb.pp("auxiliary_head"),
        )?;
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
        assert_eq!(out.main.dims(), &[2, 5, 18, 10]);
        assert_eq!(out.aux.as_ref().unwrap().dims(), &[2, 5, 5, 3]);
        let data = vm.data().lock().unwrap().clone();
        for k in [
            "decode_head.psp_modules.3.1.conv.weight",
            "decode_head.psp_modules.0.1.gn.bias",
            "decode_head.bottleneck.conv.weight",
            "decode_head.lateral_convs.2.conv.weight",
            "decode_head.fpn_convs.2.gn.weight",
            "decode_head.fpn_bottleneck.conv.weight",
            "decode_head.conv_seg.bias",
            "auxiliary_head.convs.0.conv.weight",
            "auxiliary_head.conv_seg.weight",
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
        let loss = (out.main.sqr()?.sum_all()? + out.aux.unwrap().sqr()?.sum_all()?)?;
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
        let e = UperNetConfig {
            in_stages: vec![1, 0],
            ..small()
        }
        .validate(4)
        .unwrap_err();
        assert!(e.to_string().contains("decode_head.in_stages"), "{e}");
        let e = UperNetConfig {
            aux_stage: Some(5),
            ..small()
        }
        .validate(4)
        .unwrap_err();
        assert!(e.to_string().contains("stage 5"), "{e}");
    }
}
