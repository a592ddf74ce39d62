//! The FCOS head (model stage), mmdet 3.x `FCOSHead` (mmdet/models/dense_heads/fcos_head.py) in
//! the improved variant (`norm_on_bbox`, `centerness_on_reg`, `center_sampling`, `conv_bias`,
//! GIoU; dense-tasks.md 1.3): per level, shared towers of `stacked_convs` x (3x3 conv, GroupNorm,
//! ReLU) for classification and regression, `conv_cls` and `conv_reg` / `conv_centerness` on
//! their towers (centerness on the regression tower), a learnable scalar per level multiplying the
//! regression, then ReLU. With `norm_on_bbox` the regression is in strides: mmdet multiplies it by
//! the stride at test time, here the post-processing does ([`crate::detect::postprocess`]).
//!
//! Variables under mmdet's names: `cls_convs.N.conv.{weight,bias}`, `cls_convs.N.gn.*`,
//! `reg_convs.N.*`, `conv_cls`, `conv_reg`, `conv_centerness`, `scales.N.scale`. Init as mmdet:
//! every conv N(0, 0.01) with bias 0, `conv_cls` bias `-log((1 - 0.01) / 0.01)` (prior 0.01).
use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use mimlab_models::layers::{Conv2d, ConvGnRelu};
use serde::{Deserialize, Serialize};

use crate::detect::fcos_loss::LossConfig;
use crate::detect::fcos_targets::{AssignConfig, INF};

/// The `head:` settings (mmdet's FCOS defaults; `channels` 256 in the reference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FcosHeadConfig {
    /// Classes (no background class: sigmoid scores).
    pub num_classes: usize,
    /// Input and tower channels (the neck's `channels`).
    pub channels: usize,
    /// Convs per tower (`stacked_convs`).
    pub stacked_convs: usize,
    /// Most GroupNorm groups (32); fewer where they do not divide `channels`.
    pub gn_groups: usize,
    /// Tower convs with a bias (the improved variant's `conv_bias=True`).
    pub conv_bias: bool,
    /// Stride of each pyramid level (must equal the neck's).
    pub strides: Vec<usize>,
    /// `[lo, hi]` of each level's largest regression distance, pixels; `hi` 1e8 = INF.
    pub regress_ranges: Vec<[f32; 2]>,
    /// Center sampling radius in strides; 0 = off (points anywhere inside the box).
    pub center_sample_radius: f32,
    /// Focal loss alpha.
    pub focal_alpha: f64,
    /// Focal loss gamma.
    pub focal_gamma: f64,
    /// Test: classification score threshold (before the centerness product).
    pub score_thr: f32,
    /// Test: best (point, class) pairs kept per level before NMS (`nms_pre`).
    pub nms_pre: usize,
    /// Test: per-class NMS IoU threshold.
    pub nms_iou: f32,
    /// Test: detections kept per image.
    pub max_per_img: usize,
    /// Test: boxes must be wider and taller than this, pixels (`min_bbox_size` 0).
    pub min_bbox_size: f32,
}

impl Default for FcosHeadConfig {
    fn default() -> Self {
        Self {
            num_classes: 80,
            channels: 256,
            stacked_convs: 4,
            gn_groups: 32,
            conv_bias: true,
            strides: vec![8, 16, 32, 64, 128],
            regress_ranges: vec![
                [-1.0, 64.0],
                [64.0, 128.0],
                [128.0, 256.0],
                [256.0, 512.0],
                [512.0, INF],
            ],
            center_sample_radius: 1.5,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            score_thr: 0.05,
            nms_pre: 1000,
            nms_iou: 0.5,
            max_per_img: 100,
            min_bbox_size: 0.0,
        }
    }
}

impl FcosHeadConfig {
    /// Checks the sizes agree, naming the key.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.num_classes > 0, "head.num_classes must be at least 1");
        ensure!(self.channels > 0, "head.channels must be at least 1");
        ensure!(!self.strides.is_empty(), "head.strides is empty");
        ensure!(
            self.regress_ranges.len() == self.strides.len(),
            "head.regress_ranges has {} ranges for {} strides",
            self.regress_ranges.len(),
            self.strides.len()
        );
        ensure!(
            self.strides.iter().all(|&s| s > 0),
            "head.strides must be positive"
        );
        ensure!(
            self.center_sample_radius >= 0.0,
            "head.center_sample_radius must not be negative"
        );
        Ok(())
    }

    /// The target assignment's view of this config.
    pub fn assign_config(&self) -> AssignConfig {
        AssignConfig {
            num_classes: self.num_classes,
            strides: self.strides.clone(),
            regress_ranges: self.regress_ranges.iter().map(|r| (r[0], r[1])).collect(),
            center_sample_radius: (self.center_sample_radius > 0.0)
                .then_some(self.center_sample_radius),
        }
    }

    /// The loss's view of this config.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            alpha: self.focal_alpha,
            gamma: self.focal_gamma,
        }
    }
}

/// What the head predicts for each level (NCHW maps).
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// `[B, K, H, W]` classification logits.
    pub cls: Vec<Tensor>,
    /// `[B, 4, H, W]` distances (l, t, r, b) in strides, >= 0.
    pub reg: Vec<Tensor>,
    /// `[B, 1, H, W]` centerness logits.
    pub ctr: Vec<Tensor>,
}

impl HeadOutput {
    /// `(h, w)` of each level.
    pub fn sizes(&self) -> Result<Vec<(usize, usize)>> {
        self.cls
            .iter()
            .map(|t| Ok((t.dim(2)?, t.dim(3)?)))
            .collect()
    }

    /// All levels flattened in the targets' order (level, image, row, column):
    /// `cls [N, K]`, `reg [N, 4]`, `ctr [N]`.
    pub fn flatten(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let flat = |ts: &[Tensor]| -> Result<Tensor> {
            let parts = ts
                .iter()
                .map(|t| {
                    let (b, c, h, w) = t.dims4()?;
                    // (B, H, W, C) -> (B*H*W, C)
                    t.permute((0, 2, 3, 1))?.reshape((b * h * w, c))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let ctr = flat(&self.ctr)?;
        let n = ctr.dim(0)?;
        Ok((flat(&self.cls)?, flat(&self.reg)?, ctr.reshape(n)?))
    }
}

/// The FCOS head, shared by every level.
#[derive(Debug, Clone)]
pub struct FcosHead {
    cfg: FcosHeadConfig,
    cls_convs: Vec<ConvGnRelu>,
    reg_convs: Vec<ConvGnRelu>,
    conv_cls: Conv2d,
    conv_reg: Conv2d,
    conv_centerness: Conv2d,
    scales: Vec<Tensor>,
}

/// mmdet `bias_init_with_prob(0.01)`: `-log((1 - p) / p)`.
pub fn bias_init_with_prob(p: f64) -> f64 {
    -((1.0 - p) / p).ln()
}

impl FcosHead {
    /// Builds the head under `vb` (mmdet names, module header).
    pub fn new(cfg: &FcosHeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let c = cfg.channels;
        let n01 = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let bias = cfg.conv_bias.then_some(Init::Const(0.0));
        let tower = |name: &str| -> Result<Vec<ConvGnRelu>> {
            (0..cfg.stacked_convs)
                .map(|i| {
                    let v = vb.pp(name).pp(i);
                    Ok(ConvGnRelu::new(c, c, 3, cfg.gn_groups, n01, bias, v)?)
                })
                .collect()
        };
        let prior = Init::Const(bias_init_with_prob(0.01));
        let zero = Some(Init::Const(0.0));
        let scales = (0..cfg.strides.len())
            .map(|i| {
                vb.pp("scales")
                    .pp(i)
                    .get_with_hints((), "scale", Init::Const(1.0))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cls_convs: tower("cls_convs").context("FCOS head cls_convs")?,
            reg_convs: tower("reg_convs").context("FCOS head reg_convs")?,
            conv_cls: Conv2d::new(
                c,
                cfg.num_classes,
                3,
                1,
                1,
                n01,
                Some(prior),
                vb.pp("conv_cls"),
            )?,
            conv_reg: Conv2d::new(c, 4, 3, 1, 1, n01, zero, vb.pp("conv_reg"))?,
            conv_centerness: Conv2d::new(c, 1, 3, 1, 1, n01, zero, vb.pp("conv_centerness"))?,
            scales,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FcosHeadConfig {
        &self.cfg
    }

    /// Runs on each level of `feats` (`[B, channels, H_l, W_l]`, one per stride).
    pub fn forward(&self, feats: &[Tensor]) -> Result<HeadOutput> {
        ensure!(
            feats.len() == self.scales.len(),
            "FCOS head: {} feature maps for {} strides",
            feats.len(),
            self.scales.len()
        );
        let mut out = HeadOutput {
            cls: vec![],
            reg: vec![],
            ctr: vec![],
        };
        for (x, scale) in feats.iter().zip(&self.scales) {
            let mut c = x.clone();
            for l in &self.cls_convs {
                c = l.forward(&c)?;
            }
            let mut r = x.clone();
            for l in &self.reg_convs {
                r = l.forward(&r)?;
            }
            out.cls.push(self.conv_cls.forward(&c)?);
            // norm_on_bbox: relu(scale * reg), in strides
            let reg = self.conv_reg.forward(&r)?.broadcast_mul(scale)?.relu()?;
            out.reg.push(reg);
            out.ctr.push(self.conv_centerness.forward(&r)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_models::layers::gn_groups;

    #[test]
    fn head_keys_shapes_and_init() -> Result<()> {
        let cfg = FcosHeadConfig {
            num_classes: 3,
            channels: 16,
            stacked_convs: 2,
            strides: vec![8, 16],
            regress_ranges: vec![[-1.0, 64.0], [64.0, INF]],
            ..FcosHeadConfig::default()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let head = FcosHead::new(&cfg, vb)?;
        let data = vm.data().lock().unwrap().clone();
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort();
        let want = [
            "cls_convs.0.conv.bias",
            "cls_convs.0.conv.weight",
            "cls_convs.0.gn.bias",
            "cls_convs.0.gn.weight",
            "cls_convs.1.conv.bias",
            "cls_convs.1.conv.weight",
            "cls_convs.1.gn.bias",
            "cls_convs.1.gn.weight",
            "conv_centerness.bias",
            "conv_centerness.weight",
            "conv_cls.bias",
            "conv_cls.weight",
            "conv_reg.bias",
            "conv_reg.weight",
            "reg_convs.0.conv.bias",
            "reg_convs.0.conv.weight",
            "reg_convs.0.gn.bias",
            "reg_convs.0.gn.weight",
            "reg_convs.1.conv.bias",
            "reg_convs.1.conv.weight",
            "reg_convs.1.gn.bias",
            "reg_convs.1.gn.weight",
            "scales.0.scale",
            "scales.1.scale",
        ];
        assert_eq!(keys, want);
        assert_eq!(data["conv_cls.weight"].dims(), &[3, 16, 3, 3]);
        assert_eq!(data["scales.0.scale"].dims(), &[] as &[usize]);
        let b = data["conv_cls.bias"].as_tensor().to_vec1::<f32>()?;
        assert!(b.iter().all(|v| (v + 4.59512).abs() < 1e-4), "{b:?}");
        // N(0, 0.01) weights: the sample std of 16*16*9 draws is close to 0.01
        let w = data["cls_convs.0.conv.weight"].as_tensor().flatten_all()?;
        let std = w.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!((std - 0.01).abs() < 0.001, "{std}");

        // forward on two levels of a 2-image batch, odd sizes
        let feats = [
            Tensor::randn(0f32, 1.0, (2, 16, 5, 7), &Device::Cpu)?,
            Tensor::randn(0f32, 1.0, (2, 16, 3, 4), &Device::Cpu)?,
        ];
        let out = head.forward(&feats)?;
        assert_eq!(out.cls[0].dims(), &[2, 3, 5, 7]);
        assert_eq!(out.reg[1].dims(), &[2, 4, 3, 4]);
        assert_eq!(out.ctr[1].dims(), &[2, 1, 3, 4]);
        assert!(
            out.reg[0]
                .min_keepdim(1)?
                .flatten_all()?
                .min(0)?
                .to_scalar::<f32>()?
                >= 0.0
        );
        assert_eq!(out.sizes()?, vec![(5, 7), (3, 4)]);
        let (c, r, z) = out.flatten()?;
        assert_eq!(
            (c.dims(), r.dims(), z.dims()),
            (&[2 * 35 + 2 * 12, 3][..], &[94, 4][..], &[94][..])
        );
        // flattened order: level, image, row, column
        let want = out.cls[0]
            .get(1)?
            .get(2)?
            .get(4)?
            .get(6)?
            .to_scalar::<f32>()?;
        let got = c.get(35 + 4 * 7 + 6)?.get(2)?.to_scalar::<f32>()?;
        assert_eq!(got, want);
        assert_eq!(gn_groups(16, 32), 16);
        assert_eq!(gn_groups(256, 32), 32);
        assert_eq!(gn_groups(48, 32), 24);
        Ok(())
    }
}
