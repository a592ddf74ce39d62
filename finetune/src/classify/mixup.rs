//! Mixup and CutMix with label smoothing, batch mode, exactly as timm's `Mixup` (the official
//! fine-tuning recipe, architecture.md 7.1): one lambda per batch, each image mixed with the image
//! at the mirrored batch position (`x.flip(0)`).
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Beta, Distribution};

use crate::config::FinetuneConfig;

/// What one batch gets: the label weight `lam` of the original image, and the CutMix box
/// `(y_lo, y_hi, x_lo, x_hi)` (rows/cols taken from the flipped batch) when CutMix was drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixParams {
    /// Weight of each sample's own label (1 = not mixed).
    pub lam: f64,
    /// CutMix box in pixels, half-open: rows `y_lo..y_hi`, columns `x_lo..x_hi`.
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

/// timm `Mixup(mode='batch', correct_lam=True, cutmix_minmax=None)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mixup {
    /// Mixup Beta alpha (0 = off).
    pub mixup_alpha: f64,
    /// CutMix Beta alpha (0 = off).
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    pub mix_prob: f64,
    /// Probability of CutMix when both are on.
    pub switch_prob: f64,
    /// Label smoothing applied to both labels.
    pub smoothing: f64,
    /// Classes of the one-hot targets.
    pub num_classes: usize,
}

fn beta(alpha: f64, rng: &mut StdRng) -> Result<f64> {
    let d = Beta::new(alpha, alpha).map_err(|e| anyhow::anyhow!("Beta({alpha}, {alpha}): {e}"))?;
    Ok(d.sample(rng))
}

impl Mixup {
    /// From the `finetune:` section.
    pub fn new(cfg: &FinetuneConfig, num_classes: usize) -> Self {
        Self {
            mixup_alpha: cfg.mixup,
            cutmix_alpha: cfg.cutmix,
            mix_prob: cfg.mix_prob,
            switch_prob: cfg.switch_prob,
            smoothing: cfg.label_smoothing,
            num_classes,
        }
    }

    /// timm `_params_per_batch` + `cutmix_bbox_and_lam` for `h x w` images.
    pub fn draw(&self, h: usize, w: usize, rng: &mut StdRng) -> Result<MixParams> {
        let none = MixParams {
            lam: 1.0,
            cutmix_box: None,
        };
        let on = self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0;
        if !on || rng.random::<f64>() >= self.mix_prob {
            return Ok(none);
        }
        let (use_cutmix, lam) = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
            let cut = rng.random::<f64>() < self.switch_prob;
            let a = if cut {
                self.cutmix_alpha
            } else {
                self.mixup_alpha
            };
            (cut, beta(a, rng)?)
        } else if self.mixup_alpha > 0.0 {
            (false, beta(self.mixup_alpha, rng)?)
        } else {
            (true, beta(self.cutmix_alpha, rng)?)
        };
        if !use_cutmix {
            return Ok(MixParams {
                lam,
                cutmix_box: None,
            });
        }
        // timm rand_bbox (margin 0): a box of (int(h*r), int(w*r)), r = sqrt(1-lam), centred at a
        // uniform pixel and clipped to the image; then lam = 1 - box area / image area.
        let r = (1.0 - lam).sqrt();
        let (cut_h, cut_w) = ((h as f64 * r) as i64, (w as f64 * r) as i64);
        let cy = rng.random_range(0..h as i64);
        let cx = rng.random_range(0..w as i64);
        let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
        let (yl, yh) = (clip(cy - cut_h / 2, h), clip(cy + cut_h / 2, h));
        let (xl, xh) = (clip(cx - cut_w / 2, w), clip(cx + cut_w / 2, w));
        let lam = 1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64;
        Ok(MixParams {
            lam,
            cutmix_box: Some((yl, yh, xl, xh)),
        })
    }

    /// Mixes `[B, C, H, W]` images (B even) and returns them with the soft targets `[B, classes]`.
    pub fn apply(
        &self,
        images: &Tensor,
        labels: &[u32],
        p: &MixParams,
    ) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = images.dims4()?;
        ensure!(
            labels.len() == b,
            "mixup: {b} images but {} labels",
            labels.len()
        );
        let targets = mix_targets(labels, self.num_classes, p.lam, self.smoothing)?;
        let targets = Tensor::from_vec(targets, (b, self.num_classes), images.device())?;
        if p.lam == 1.0 {
            return Ok((images.clone(), targets));
        }
        ensure!(
            b % 2 == 0,
            "mixup/cutmix needs an even batch size (timm), got {b}: change train.batch_size"
        );
        let x: Vec<f32> = images.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let per = c * h * w;
        let mut out = x.clone();
        for i in 0..b {
            let j = b - 1 - i; // x.flip(0)
            let (dst, src) = (&mut out[i * per..(i + 1) * per], &x[j * per..(j + 1) * per]);
            match p.cutmix_box {
                Some((yl, yh, xl, xh)) => {
                    for ch in 0..c {
                        for y in yl..yh {
                            let row = ch * h * w + y * w;
                            dst[row + xl..row + xh].copy_from_slice(&src[row + xl..row + xh]);
                        }
                    }
                }
                None => {
                    let (l, m) = (p.lam as f32, (1.0 - p.lam) as f32);
                    let own = &x[i * per..(i + 1) * per];
                    for ((d, a), s) in dst.iter_mut().zip(own).zip(src) {
                        *d = a * l + s * m;
                    }
                }
            }
        }
        let mixed =
            Tensor::from_vec(out, (b, c, h, w), &Device::Cpu)?.to_device(images.device())?;
        Ok((mixed, targets))
    }
}

/// timm `mixup_target`: smoothed one-hot of each label (`1 - s + s/C` on, `s/C` off) weighted
/// `lam`, plus the same for the mirrored label (`target.flip(0)`) weighted `1 - lam`; `[B * C]`.
pub fn mix_targets(labels: &[u32], classes: usize, lam: f64, smoothing: f64) -> Result<Vec<f32>> {
    let b = labels.len();
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing + off;
    let mut t = vec![0f32; b * classes];
    for (i, &l) in labels.iter().enumerate() {
        ensure!(
            (l as usize) < classes,
            "label {l} out of range for a {classes}-class head (model.num_classes)"
        );
        let flipped = labels[b - 1 - i] as usize;
        ensure!(
            flipped < classes,
            "label {flipped} out of range for a {classes}-class head (model.num_classes)"
        );
        for k in 0..classes {
            let y1 = if k == l as usize { on } else { off };
            let y2 = if k == flipped { on } else { off };
            t[i * classes + k] = (y1 * lam + y2 * (1.0 - lam)) as f32;
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn mixer(mixup: f64, cutmix: f64) -> Mixup {
        Mixup {
            mixup_alpha: mixup,
            cutmix_alpha: cutmix,
            mix_prob: 1.0,
            switch_prob: 0.5,
            smoothing: 0.1,
            num_classes: 4,
        }
    }

    #[test]
    fn targets_sum_to_one_and_hold_hand_values() -> Result<()> {
        let t = mix_targets(&[0, 2, 3], 4, 0.7, 0.1)?;
        // sample 0: own label 0, partner label 3 (flip); off = 0.025, on = 0.925
        let want0 = [
            0.7 * 0.925 + 0.3 * 0.025,
            0.025,
            0.025,
            0.7 * 0.025 + 0.3 * 0.925,
        ];
        for (g, w) in t[..4].iter().zip(want0) {
            assert!((*g as f64 - w).abs() < 1e-7, "{g} vs {w}");
        }
        // the middle sample is its own partner: a plain smoothed one-hot
        assert_eq!(&t[4..8], &[0.025, 0.025, 0.925, 0.025]);
        for row in t.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!(mix_targets(&[5], 4, 1.0, 0.0)
            .unwrap_err()
            .to_string()
            .contains("label 5"));
        Ok(())
    }

    #[test]
    fn cutmix_lambda_matches_the_pasted_area() -> Result<()> {
        let m = mixer(0.0, 1.0);
        let (b, h, w) = (4, 8, 10);
        let labels = [0u32, 1, 2, 3];
        // image i is constant i, so a pixel tells which image it came from
        let data: Vec<f32> = (0..b).flat_map(|i| vec![i as f32; h * w]).collect();
        let x = Tensor::from_vec(data, (b, 1, h, w), &Device::Cpu)?;
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen_box = 0;
        for _ in 0..50 {
            let p = m.draw(h, w, &mut rng)?;
            let (yl, yh, xl, xh) = p.cutmix_box.expect("cutmix only");
            let area = (yh - yl) * (xh - xl);
            assert!((p.lam - (1.0 - area as f64 / (h * w) as f64)).abs() < 1e-12);
            let (mx, t) = m.apply(&x, &labels, &p)?;
            let mx: Vec<f32> = mx.flatten_all()?.to_vec1()?;
            let t: Vec<f32> = t.flatten_all()?.to_vec1()?;
            for i in 0..b {
                let img = &mx[i * h * w..(i + 1) * h * w];
                let pasted = img.iter().filter(|&&v| v == (b - 1 - i) as f32).count();
                let own = img.iter().filter(|&&v| v == i as f32).count();
                assert_eq!(pasted, area, "pasted pixels = box area");
                assert_eq!(own, h * w - area);
                // label weight of the partner = pasted fraction (before smoothing)
                let row = &t[i * 4..(i + 1) * 4];
                let partner = row[b - 1 - i] as f64;
                let want = (1.0 - p.lam) * 0.9 + 0.025;
                assert!((partner - want).abs() < 1e-6, "{partner} vs {want}");
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
            seen_box += usize::from(area > 0);
        }
        assert!(seen_box > 40, "most draws paste something");
        Ok(())
    }

    #[test]
    fn mixup_blends_pixels_with_lambda() -> Result<()> {
        let m = mixer(0.8, 0.0);
        let x = Tensor::from_vec(vec![1f32, 1., 3., 3.], (2, 1, 1, 2), &Device::Cpu)?;
        let mut rng = StdRng::seed_from_u64(1);
        let p = m.draw(1, 2, &mut rng)?;
        assert!(p.cutmix_box.is_none() && p.lam > 0.0 && p.lam < 1.0);
        let (mx, _) = m.apply(&x, &[0, 1], &p)?;
        let v: Vec<f32> = mx.flatten_all()?.to_vec1()?;
        let a = (p.lam + 3.0 * (1.0 - p.lam)) as f32;
        assert!((v[0] - a).abs() < 1e-6 && (v[2] - (4.0 - a)).abs() < 1e-6);
        let odd = Tensor::zeros((3, 1, 1, 2), candle_core::DType::F32, &Device::Cpu)?;
        let err = m.apply(&odd, &[0, 1, 2], &p).unwrap_err().to_string();
        assert!(err.contains("even batch size"), "{err}");
        // mixing off: targets are the smoothed one-hot, images untouched
        let off = Mixup { mix_prob: 0.0, ..m };
        let p = off.draw(1, 2, &mut rng)?;
        assert_eq!(p.lam, 1.0);
        Ok(())
    }
}
