//! The FCOS detector (model stage): Swin-V2 backbone (dense or MoE), neck ([`crate::detect::fpn`])
//! and FCOS head ([`crate::detect::fcos_head`]), under mmdet's top-level names `backbone.*`,
//! `neck.*` and `bbox_head.*`. A forward returns the head's maps and the backbone's MoE
//! statistics (the caller adds their aux loss; nothing is dropped on the way).
use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use mimlab_engine::data::ObjectBox;
use mimlab_engine::rng::SharedRng;
use mimlab_models::moe::MoeAux;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};
use serde::{Deserialize, Serialize};

use crate::detect::fcos_head::{FcosHead, FcosHeadConfig, HeadOutput};
use crate::detect::fcos_loss::{fcos_loss, FcosLosses};
use crate::detect::fcos_targets::assign;
use crate::detect::fpn::{Neck, NeckConfig};
use crate::detect::postprocess::{decode, Detection, ImageMeta};

/// The detector's model sections: `backbone` (a Swin-V2 config; its classifier is not built),
/// `neck`, `head`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// The backbone.
    pub backbone: SwinV2Config,
    /// The neck.
    #[serde(default)]
    pub neck: NeckConfig,
    /// The head.
    #[serde(default)]
    pub head: FcosHeadConfig,
}

impl DetectorConfig {
    /// Stride of each backbone stage (`patch_size * 2^i`).
    pub fn stage_strides(&self) -> Vec<usize> {
        (0..self.backbone.num_stages())
            .map(|i| self.backbone.patch_size << i)
            .collect()
    }

    /// Checks that the parts fit together, naming the keys.
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.neck.validate(self.backbone.num_stages())?;
        self.head.validate()?;
        ensure!(
            self.neck.channels == self.head.channels,
            "neck.channels ({}) and head.channels ({}) differ",
            self.neck.channels,
            self.head.channels
        );
        let strides = self.neck.out_strides(&self.stage_strides())?;
        ensure!(
            strides == self.head.strides,
            "head.strides {:?} but the neck gives levels at strides {strides:?}",
            self.head.strides
        );
        Ok(())
    }
}

/// The `detect:` section of an experiment: the neck and the head (the backbone is the `model:`
/// section).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectSection {
    /// The neck.
    pub neck: NeckConfig,
    /// The head.
    pub head: FcosHeadConfig,
}

impl DetectSection {
    /// The detector on `backbone`, checked.
    pub fn detector(&self, backbone: &SwinV2Config) -> Result<DetectorConfig> {
        let cfg = DetectorConfig {
            backbone: backbone.clone(),
            neck: self.neck.clone(),
            head: self.head.clone(),
        };
        cfg.validate().context("detect")?;
        Ok(cfg)
    }
}

/// Swin-V2 + neck + FCOS head.
#[derive(Debug)]
pub struct FcosDetector {
    backbone: SwinV2,
    neck: Neck,
    head: FcosHead,
}

impl FcosDetector {
    /// Builds the detector under `vb` (`rng`: the backbone's drop path/dropout draws).
    pub fn new(cfg: &DetectorConfig, rng: SharedRng, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let bcfg = SwinV2Config {
            num_classes: 0,
            ..cfg.backbone.clone()
        };
        let backbone = SwinV2::new(&bcfg, false, rng, vb.pp("backbone"))?;
        let dims: Vec<usize> = (0..bcfg.num_stages()).map(|i| bcfg.stage_dim(i)).collect();
        let neck = Neck::new(&cfg.neck, &dims, &cfg.stage_strides(), vb.pp("neck"))
            .context("building the neck")?;
        let head =
            FcosHead::new(&cfg.head, vb.pp("bbox_head")).context("building the FCOS head")?;
        Ok(Self {
            backbone,
            neck,
            head,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &SwinV2 {
        &self.backbone
    }

    /// The head.
    pub fn head(&self) -> &FcosHead {
        &self.head
    }

    /// Runs on `images [B, C, H, W]` (sides multiples of the patch size): the head's maps and
    /// the backbone's MoE statistics of this forward.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<(HeadOutput, MoeAux)> {
        let f = self.backbone.forward_features(images, None, train)?;
        let pyramid = self.neck.forward(&f, train)?;
        let out = self.head.forward(&pyramid)?;
        Ok((out, f.moe))
    }

    /// The FCOS losses of `out` against each image's `boxes` (batch pixels).
    pub fn loss(&self, out: &HeadOutput, boxes: &[Vec<ObjectBox>]) -> Result<FcosLosses> {
        let cfg = self.head.config();
        let targets = assign(&cfg.assign_config(), &out.sizes()?, boxes)?;
        let (cls, reg, ctr) = out.flatten()?;
        fcos_loss(&cls, &reg, &ctr, &targets, &cfg.loss_config())
    }

    /// The detections of each image in original-image pixels.
    pub fn predict(&self, out: &HeadOutput, metas: &[ImageMeta]) -> Result<Vec<Vec<Detection>>> {
        decode(out, metas, self.head.config())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::fcos_loss::scalar;
    use crate::detect::fpn::ExtraFrom;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_models::moe::MoeConfig;

    fn tiny(moe: MoeConfig) -> Result<DetectorConfig> {
        let backbone = SwinV2Config {
            preset: None,
            img_size: 64,
            embed_dim: 8,
            depths: vec![1, 1, 1, 1],
            num_heads: vec![1, 1, 2, 2],
            pretrained_window_sizes: vec![0, 0, 0, 0],
            moe,
            ..SwinV2Config::preset("swinv2_nano")?
        };
        Ok(DetectorConfig {
            backbone,
            neck: NeckConfig {
                channels: 16,
                extra_from: ExtraFrom::Input,
                ..NeckConfig::default()
            },
            // 4 groups: P6 and P7 are 1x1 at 64 px, and GroupNorm over groups of one value
            // (16 groups of 16 channels) would be constant there, with no gradient behind it
            head: FcosHeadConfig {
                num_classes: 3,
                channels: 16,
                stacked_convs: 1,
                gn_groups: 4,
                ..FcosHeadConfig::default()
            },
        })
    }

    fn images() -> Result<Tensor> {
        let v: Vec<f32> = (0..2 * 3 * 64 * 64)
            .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (2, 3, 64, 64), &Device::Cpu)?)
    }

    fn boxes() -> Vec<Vec<ObjectBox>> {
        let o = |xyxy, class, crowd| ObjectBox { xyxy, class, crowd };
        vec![
            vec![
                o([4.0, 6.0, 30.0, 40.0], 1, false),
                o([20.0, 20.0, 60.0, 50.0], 2, false),
                o([0.0, 0.0, 64.0, 64.0], 0, true),
            ],
            vec![o([10.0, 30.0, 50.0, 62.0], 0, false)],
        ]
    }

    fn grad_sum(g: &candle_core::backprop::GradStore, vm: &VarMap, prefix: &str) -> Result<f64> {
        let data = vm.data().lock().unwrap().clone();
        let mut s = 0.0;
        let mut n = 0;
        for (k, v) in data.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let gv = g.get(v).with_context(|| format!("{k} has no gradient"))?;
            s += scalar(&gv.abs()?.sum_all()?)?;
            n += 1;
        }
        ensure!(n > 0, "no variables under {prefix}");
        Ok(s)
    }

    #[test]
    fn forward_loss_backward_reaches_backbone_neck_and_head() -> Result<()> {
        let cfg = tiny(MoeConfig::default())?;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let det = FcosDetector::new(&cfg, SharedRng::new(0), vb)?;
        let (out, moe) = det.forward(&images()?, true)?;
        assert!(moe.layers.is_empty());
        assert_eq!(out.sizes()?, vec![(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]);
        let l = det.loss(&out, &boxes())?;
        assert!(l.num_pos > 0);
        let total = l.total()?;
        for (name, t) in [
            ("cls", &l.cls),
            ("bbox", &l.bbox),
            ("ctr", &l.centerness),
            ("total", &total),
        ] {
            let v = scalar(t)?;
            assert!(v.is_finite() && v > 0.0, "{name} loss {v}");
        }
        let g = total.backward()?;
        for prefix in [
            "backbone.patch_embed",
            "backbone.layers.3",
            "neck.",
            "bbox_head.",
        ] {
            let s = grad_sum(&g, &vm, prefix)?;
            assert!(s.is_finite() && s > 0.0, "{prefix}: gradient sum {s}");
        }
        for k in [
            // scales.4 has none: no box reaches the 512+ range of P7
            "bbox_head.scales.0.scale",
            "neck.fpn_convs.3.conv.weight",
            "neck.fpn_convs.4.conv.weight",
            "backbone.patch_embed.proj.weight",
        ] {
            let data = vm.data().lock().unwrap().clone();
            let gv = g.get(&data[k]).with_context(|| k.to_string())?;
            assert!(scalar(&gv.abs()?.sum_all()?)? > 0.0, "{k}");
        }
        // eval decode: plain detections of the original images
        let metas = [ImageMeta {
            valid_size: (64, 64),
            scale: (1.0, 1.0),
        }; 2];
        let dets = det.predict(&out, &metas)?;
        assert_eq!(dets.len(), 2);
        for d in dets.iter().flatten() {
            assert!(d.bbox_xyxy.iter().all(|v| (0.0..=64.0).contains(v)) && d.class < 3);
        }
        Ok(())
    }

    #[test]
    fn moe_backbone_statistics_come_back() -> Result<()> {
        let moe = MoeConfig {
            num_experts: 2,
            blocks: vec![vec![0], vec![], vec![], vec![0]],
            ..MoeConfig::default()
        };
        let cfg = tiny(moe)?;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let det = FcosDetector::new(&cfg, SharedRng::new(0), vb)?;
        let (out, moe) = det.forward(&images()?, true)?;
        assert_eq!(moe.layers.len(), 2);
        let aux = moe.aux_losses()?;
        assert_eq!(aux.len(), 1);
        let total = (det.loss(&out, &boxes())?.total()? + &aux[0].value)?;
        assert!(scalar(&total)?.is_finite());
        Ok(())
    }

    #[test]
    fn mismatched_strides_and_channels_are_refused() -> Result<()> {
        let mut cfg = tiny(MoeConfig::default())?;
        cfg.head.strides = vec![8, 16, 32];
        cfg.head.regress_ranges.truncate(3);
        let e = format!("{:#}", cfg.validate().unwrap_err());
        assert!(
            e.contains("head.strides [8, 16, 32] but the neck gives"),
            "{e}"
        );
        let mut cfg = tiny(MoeConfig::default())?;
        cfg.head.channels = 8;
        let e = format!("{:#}", cfg.validate().unwrap_err());
        assert!(
            e.contains("neck.channels (16) and head.channels (8)"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn config_sections_default_and_refuse_unknown_keys() -> Result<()> {
        let backbone = serde_json::to_value(tiny(MoeConfig::default())?.backbone)?;
        let j = serde_json::json!({
            "backbone": backbone,
            "neck": {"channels": 16},
            "head": {"num_classes": 2, "channels": 16, "stacked_convs": 1},
        });
        let cfg: DetectorConfig = serde_json::from_value(j.clone())?;
        assert_eq!(cfg.neck.in_stages, vec![1, 2, 3]);
        assert_eq!(cfg.head.strides, vec![8, 16, 32, 64, 128]);
        assert_eq!((cfg.head.nms_pre, cfg.head.max_per_img), (1000, 100));
        assert_eq!((cfg.head.score_thr, cfg.head.nms_iou), (0.05, 0.5));
        cfg.validate()?;
        let mut bad = j;
        bad["head"]["nms_iuo"] = serde_json::json!(0.6);
        let e = serde_json::from_value::<DetectorConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `nms_iuo`"), "{e}");
        Ok(())
    }
}
