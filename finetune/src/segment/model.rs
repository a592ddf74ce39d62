//! The segmentor (model stage): Swin-V2 backbone (dense or MoE), a decode head
//! ([`crate::segment::upernet`] or the light [`crate::segment::segformer_head`]) and the optional
//! auxiliary FCN head, under mmseg's top-level names `backbone.*`, `decode_head.*`,
//! `auxiliary_head.*` (mmseg's `EncoderDecoder`).
//!
//! - Training loss: the logits upsampled bilinearly (align_corners false) to the label size, then
//!   per-pixel cross-entropy with ignore index 255 ([`cross_entropy_ignore`]); the auxiliary
//!   head's loss times its weight is added.
//! - Inference (mmseg `EncoderDecoder.inference`): `whole` runs the image once and upsamples the
//!   logits to the input size; `slide` runs `img_size` windows at the stride (the last window of a
//!   row or column moved back to end at the border, as mmseg), upsamples each window's logits to
//!   the window and averages the overlaps.
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::layers::resize_bilinear;
use mimlab_models::moe::MoeAux;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

use crate::segment::config::{HeadKind, SegmentSection, TestMode};
use crate::segment::fcn_head::FcnHead;
use crate::segment::loss::cross_entropy_ignore;
use crate::segment::segformer_head::SegformerHead;
use crate::segment::upernet::UperNet;

/// Label value of unlabelled pixels.
pub const IGNORE_INDEX: u32 = 255;

/// The decode head.
#[derive(Debug, Clone)]
enum DecodeHead {
    Upernet(UperNet),
    Segformer(SegformerHead),
}

/// A forward's logits at the heads' resolutions.
#[derive(Debug, Clone)]
pub struct SegOutput {
    /// `[B, num_classes, H/4, W/4]` (the finest read stage).
    pub main: Tensor,
    /// The auxiliary head's logits at its stage, in training when there is one.
    pub aux: Option<Tensor>,
}

/// The losses of a batch.
#[derive(Debug, Clone)]
pub struct SegLosses {
    /// Decode head cross-entropy.
    pub main: Tensor,
    /// Auxiliary cross-entropy, unweighted.
    pub aux: Option<Tensor>,
    /// `main + aux_weight * aux`.
    pub total: Tensor,
}

/// Swin-V2 + decode head (+ auxiliary head).
#[derive(Debug)]
pub struct Segmentor {
    backbone: SwinV2,
    head: DecodeHead,
    aux: Option<FcnHead>,
    section: SegmentSection,
    class_weight: Option<Tensor>,
    /// `-ln class_weight` as `[1, C, 1, 1]`, added to eval logits (`segment.logit_adjust`).
    logit_offset: Option<Tensor>,
}

impl Segmentor {
    /// Builds the segmentor for `backbone` (its classifier is not built) under `vb`.
    pub fn new(
        backbone: &SwinV2Config,
        section: &SegmentSection,
        rng: SharedRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        backbone.validate()?;
        section.validate(backbone.num_stages()).context("segment")?;
        let bcfg = SwinV2Config {
            num_classes: 0,
            ..backbone.clone()
        };
        let dev = vb.device().clone();
        let net = SwinV2::new(&bcfg, false, rng.clone(), vb.pp("backbone"))?;
        let dims: Vec<usize> = (0..bcfg.num_stages()).map(|i| bcfg.stage_dim(i)).collect();
        let d = &section.decode_head;
        let hv = vb.pp("decode_head");
        let head = match section.head {
            HeadKind::Upernet => DecodeHead::Upernet(UperNet::new(d, &dims, rng.clone(), hv)?),
            HeadKind::Segformer => {
                DecodeHead::Segformer(SegformerHead::new(d, &dims, rng.clone(), hv)?)
            }
        };
        let a = &section.auxiliary_head;
        let aux = match a.stage {
            Some(s) => Some(FcnHead::new(
                s,
                dims[s],
                a.channels,
                d.num_classes,
                d.gn_groups,
                d.dropout,
                rng,
                vb.pp("auxiliary_head"),
            )?),
            None => None,
        };
        let class_weight = match &section.class_weight {
            Some(w) => {
                let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                Some(Tensor::from_vec(w, d.num_classes, &dev)?)
            }
            None => None,
        };
        let logit_offset = match (&section.class_weight, section.logit_adjust) {
            (Some(w), true) => {
                let o: Vec<f32> = w.iter().map(|&v| -(v.ln()) as f32).collect();
                Some(Tensor::from_vec(o, (1, d.num_classes, 1, 1), &dev)?)
            }
            _ => None,
        };
        Ok(Self {
            backbone: net,
            head,
            aux,
            section: section.clone(),
            class_weight,
            logit_offset,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &SwinV2 {
        &self.backbone
    }

    /// Classes predicted.
    pub fn num_classes(&self) -> usize {
        self.section.decode_head.num_classes
    }

    /// Runs on `images [B, C, H, W]` (sides multiples of the backbone's size multiple): the
    /// heads' logits (the auxiliary head's in training only) and the backbone's MoE statistics.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<(SegOutput, MoeAux)> {
        let f = self.backbone.forward_features(images, None, train)?;
        let stages = f
            .stages
            .iter()
            .map(|t| t.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let main = match &self.head {
            DecodeHead::Upernet(h) => h.forward(&stages, train)?,
            DecodeHead::Segformer(h) => h.forward(&stages, train)?,
        };
        // mmseg runs the auxiliary head in training only
        let aux = match (&self.aux, train) {
            (Some(a), true) => Some(a.forward(&stages, train)?),
            _ => None,
        };
        Ok((SegOutput { main, aux }, f.moe))
    }

    /// The losses of `out` against `labels [B, H, W]` (u32, 255 = ignore; the batch's padded
    /// size): each head's logits upsampled to `H x W` first.
    pub fn loss(&self, out: &SegOutput, labels: &Tensor) -> Result<SegLosses> {
        let (_, h, w) = labels
            .dims3()
            .context("segmentation labels must be [B, H, W]")?;
        let ce = |logits: &Tensor| -> Result<Tensor> {
            let up = resize_bilinear(logits, h, w)?;
            cross_entropy_ignore(&up, labels, IGNORE_INDEX, self.class_weight.as_ref())
        };
        let main = ce(&out.main)?;
        let aux = match &out.aux {
            Some(a) => Some(ce(a)?),
            None => None,
        };
        let total = match &aux {
            Some(a) => (&main + (a * self.section.auxiliary_head.weight)?)?,
            None => main.clone(),
        };
        Ok(SegLosses { main, aux, total })
    }

    /// Logits `[B, num_classes, H, W]` at the input size of `images` (eval mode), by the
    /// configured test mode (module doc).
    pub fn infer(&self, images: &Tensor) -> Result<Tensor> {
        match self.section.test_mode {
            TestMode::Whole => self.whole(images),
            TestMode::Slide => self.slide(images),
        }
    }

    /// [`Self::infer`] reusing `out`, this model's eval forward of `images` (whole mode needs no
    /// other).
    pub fn infer_from(&self, images: &Tensor, out: &SegOutput) -> Result<Tensor> {
        match self.section.test_mode {
            TestMode::Whole => {
                let (_, _, h, w) = images.dims4()?;
                self.eval_logits(&out.main, h, w)
            }
            TestMode::Slide => self.slide(images),
        }
    }

    fn whole(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let (out, _) = self.forward(images, false)?;
        self.eval_logits(&out.main, h, w)
    }

    /// The decode head's logits upsampled to `h x w`, with the `logit_adjust` offsets (a
    /// per-class constant, so adding it before the bilinear resize is the same as after).
    fn eval_logits(&self, main: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let main = match &self.logit_offset {
            Some(o) => main.broadcast_add(&o.to_dtype(main.dtype())?)?,
            None => main.clone(),
        };
        Ok(resize_bilinear(&main, h, w)?)
    }

    /// mmseg `slide_inference` with `crop = img_size` and the configured stride; windows smaller
    /// than the crop (small images) are zero-padded to the backbone's multiple and cut back.
    fn slide(&self, images: &Tensor) -> Result<Tensor> {
        let cfg = self.backbone.config();
        let crop = cfg.img_size;
        let stride = self.section.slide_stride.unwrap_or((crop * 2 / 3).max(1));
        let mult = cfg.size_multiple().max(1);
        let (b, _, h, w) = images.dims4()?;
        let grids = |n: usize| n.saturating_sub(crop).div_ceil(stride) + 1;
        let n = self.num_classes();
        let dev = images.device();
        let mut sum = Tensor::zeros((b, n, h, w), DType::F32, dev)?;
        let mut count = vec![0f32; h * w];
        for gy in 0..grids(h) {
            for gx in 0..grids(w) {
                let y2 = (gy * stride + crop).min(h);
                let x2 = (gx * stride + crop).min(w);
                let (y1, x1) = (y2.saturating_sub(crop), x2.saturating_sub(crop));
                let (wh, ww) = (y2 - y1, x2 - x1);
                let win = images.narrow(2, y1, wh)?.narrow(3, x1, ww)?;
                let (ph, pw) = (wh.div_ceil(mult) * mult, ww.div_ceil(mult) * mult);
                let win = win
                    .pad_with_zeros(2, 0, ph - wh)?
                    .pad_with_zeros(3, 0, pw - ww)?;
                let logits = self.whole(&win)?.narrow(2, 0, wh)?.narrow(3, 0, ww)?;
                let placed = logits
                    .pad_with_zeros(2, y1, h - y2)?
                    .pad_with_zeros(3, x1, w - x2)?;
                sum = (sum + placed)?;
                for y in y1..y2 {
                    count[y * w + x1..y * w + x2]
                        .iter_mut()
                        .for_each(|c| *c += 1.0);
                }
            }
        }
        ensure!(
            count.iter().all(|&c| c > 0.0),
            "slide inference left pixels uncovered"
        );
        let count = Tensor::from_vec(count, (1, 1, h, w), dev)?;
        Ok(sum.broadcast_div(&count)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::segment::config::{AuxHeadConfig, DecodeHeadConfig};
    use candle_core::Device;
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_models::moe::MoeConfig;

    pub(crate) fn tiny_backbone(moe: MoeConfig) -> Result<SwinV2Config> {
        Ok(SwinV2Config {
            preset: None,
            img_size: 64,
            embed_dim: 8,
            depths: vec![1, 1, 1, 1],
            num_heads: vec![1, 1, 2, 2],
            pretrained_window_sizes: vec![0, 0, 0, 0],
            moe,
            ..SwinV2Config::preset("swinv2_nano")?
        })
    }

    pub(crate) fn tiny_section(head: HeadKind) -> SegmentSection {
        SegmentSection {
            head,
            decode_head: DecodeHeadConfig {
                channels: 8,
                gn_groups: 4,
                num_classes: 3,
                pool_scales: vec![1, 2],
                ..DecodeHeadConfig::default()
            },
            auxiliary_head: AuxHeadConfig {
                channels: 8,
                ..AuxHeadConfig::default()
            },
            ..SegmentSection::default()
        }
    }

    fn images(h: usize, w: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..2 * 3 * h * w)
            .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu)?)
    }

    fn labels(h: usize, w: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..2 * h * w)
            .map(|i| match i % 7 {
                0 => 255,
                k => (k % 3) as u32,
            })
            .collect();
        Ok(Tensor::from_vec(v, (2, h, w), &Device::Cpu)?)
    }

    #[test]
    fn both_heads_train_every_part_and_moe_statistics_come_back() -> Result<()> {
        for (head, moe) in [
            (HeadKind::Upernet, MoeConfig::default()),
            (
                HeadKind::Segformer,
                MoeConfig {
                    num_experts: 2,
                    blocks: vec![vec![0], vec![], vec![], vec![0]],
                    ..MoeConfig::default()
                },
            ),
        ] {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
            let moe_layers = moe.num_experts;
            let seg = Segmentor::new(
                &tiny_backbone(moe)?,
                &tiny_section(head),
                SharedRng::new(0),
                vb,
            )?;
            let (out, moe) = seg.forward(&images(64, 64)?, true)?;
            assert_eq!(out.main.dims(), &[2, 3, 16, 16], "{head:?}");
            assert_eq!(out.aux.as_ref().unwrap().dims(), &[2, 3, 4, 4]);
            assert_eq!(moe.layers.len(), if moe_layers > 0 { 2 } else { 0 });
            let l = seg.loss(&out, &labels(64, 64)?)?;
            let (m, a, t) = (
                l.main.to_scalar::<f32>()?,
                l.aux.as_ref().unwrap().to_scalar::<f32>()?,
                l.total.to_scalar::<f32>()?,
            );
            // fresh heads (conv_seg N(0, 0.01)) predict near-uniform: ln 3
            assert!((m - 3f32.ln()).abs() < 0.05, "{head:?}: {m}");
            assert!((t - (m + 0.4 * a)).abs() < 1e-5, "{t} {m} {a}");
            let g = l.total.backward()?;
            let data = vm.data().lock().unwrap().clone();
            for prefix in ["backbone.patch_embed", "decode_head.", "auxiliary_head."] {
                let mut n = 0;
                for (k, v) in data.iter().filter(|(k, _)| k.starts_with(prefix)) {
                    let gv = g.get(v).with_context(|| format!("{k} has no gradient"))?;
                    assert_eq!(gv.dims(), v.dims());
                    n += 1;
                }
                assert!(n > 0, "{prefix}");
            }
            let names: Vec<&String> = data.keys().collect();
            let want = match head {
                HeadKind::Upernet => "decode_head.fpn_bottleneck.conv.weight",
                HeadKind::Segformer => "decode_head.fusion_conv.conv.weight",
            };
            assert!(data.contains_key(want), "{names:?}");
            assert!(data.contains_key("auxiliary_head.convs.0.conv.weight"));
        }
        Ok(())
    }

    /// `logit_adjust`: eval logits move by `-ln w_c` per class (whole and slide), the training
    /// forward and loss do not; a zero weight or no weights are refused, naming the key.
    #[test]
    fn logit_adjust_offsets_eval_logits_only() -> Result<()> {
        let build = |adjust: bool, mode: TestMode| -> Result<Segmentor> {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
            let mut section = tiny_section(HeadKind::Upernet);
            section.class_weight = Some(vec![0.25, 1.0, 2.0]);
            section.logit_adjust = adjust;
            section.test_mode = mode;
            section.slide_stride = Some(32);
            Segmentor::new(
                &tiny_backbone(MoeConfig::default())?,
                &section,
                SharedRng::new(0),
                vb,
            )
        };
        let x = images(64, 96)?;
        for mode in [TestMode::Whole, TestMode::Slide] {
            let (plain, adj) = (build(false, mode)?, build(true, mode)?);
            let diff = (adj.infer(&x)? - plain.infer(&x)?)?;
            for (c, w) in [0.25f32, 1.0, 2.0].into_iter().enumerate() {
                let d = diff.narrow(1, c, 1)?.flatten_all()?.to_vec1::<f32>()?;
                let (lo, hi) = d
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                assert!(
                    (lo + w.ln()).abs() < 1e-5 && (hi + w.ln()).abs() < 1e-5,
                    "{mode:?} class {c}: {lo}..{hi}"
                );
            }
            let l = |m: &Segmentor| -> Result<f32> {
                let (out, _) = m.forward(&images(64, 64)?, false)?;
                Ok(m.loss(&out, &labels(64, 64)?)?.total.to_scalar::<f32>()?)
            };
            assert_eq!(l(&plain)?, l(&adj)?);
        }
        let mut section = tiny_section(HeadKind::Upernet);
        section.logit_adjust = true;
        let e = section.validate(4).unwrap_err().to_string();
        assert!(
            e.contains("segment.logit_adjust") && e.contains("None"),
            "{e}"
        );
        section.class_weight = Some(vec![0.0, 1.0, 1.0]);
        let e = section.validate(4).unwrap_err().to_string();
        assert!(e.contains("segment.logit_adjust"), "{e}");
        Ok(())
    }

    /// Slide inference over one window equals whole inference; over overlapping windows every
    /// pixel is an average of the windows that cover it (a 64 x 96 image, 64 px windows, stride
    /// 32: windows at x 0 and 32, the overlap 32..64 averaged).
    #[test]
    fn slide_inference_averages_windows() -> Result<()> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let mut section = tiny_section(HeadKind::Segformer);
        section.slide_stride = Some(32);
        let whole = Segmentor::new(
            &tiny_backbone(MoeConfig::default())?,
            &section,
            SharedRng::new(0),
            vb.clone(),
        )?;
        section.test_mode = TestMode::Slide;
        let slide = Segmentor::new(
            &tiny_backbone(MoeConfig::default())?,
            &section,
            SharedRng::new(0),
            vb,
        )?;
        let x = images(64, 64)?;
        let d = (whole.infer(&x)? - slide.infer(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let x = images(64, 96)?;
        let s = slide.infer(&x)?;
        assert_eq!(s.dims(), &[2, 3, 64, 96]);
        let left = whole.infer(&x.narrow(3, 0, 64)?)?;
        let right = whole.infer(&x.narrow(3, 32, 64)?)?;
        let at = |t: &Tensor, xx: usize| -> Result<f32> {
            Ok(t.narrow(3, xx, 1)?.flatten_all()?.to_vec1::<f32>()?[5])
        };
        assert!((at(&s, 10)? - at(&left, 10)?).abs() < 1e-5);
        assert!((at(&s, 80)? - at(&right, 48)?).abs() < 1e-5);
        let mid = (at(&left, 40)? + at(&right, 8)?) / 2.0;
        assert!((at(&s, 40)? - mid).abs() < 1e-5);
        Ok(())
    }
}
