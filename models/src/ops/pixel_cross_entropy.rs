//! Per-pixel cross-entropy over the class dim of channels-first logits, as one node with a
//! one-pass backward on the CPU (the segmentation loss at full label resolution); other devices
//! and dtypes run the same loss from candle's ops.
//!
//! The composed loss is a permute to channels-last (a copy), candle_nn's `log_softmax` (max,
//! sub, exp, sum, log, sub), a gather, a product with the pixel weights and a sum: about ten
//! passes over `B x C x H x W` forward and more backward, each gradient zero-filled and added.
//! Here the forward reads the logits in place, plane by plane (`C` strided planes of `H W`, in
//! blocks of pixels that stay in cache), and the backward writes `g w_y (softmax - onehot)` in one
//! pass, recomputing each pixel's log-sum-exp.
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{dispatch, par_items, slice, storage, Real};

/// Pixels per block: the block's max and sum stay in registers/L1 while the `C` planes stream.
const BLOCK: usize = 256;

/// `sum_i w[y_i] (logsumexp_c x[b, c, i] - x[b, y_i, i])` over the pixels `i` of every image `b`
/// of `logits [B, C, *]` whose target `y_i` (`targets`, `B x H x W` in order) is not `ignore`;
/// `w = 1` without `class_weight`. A scalar of the logits' dtype; on the CPU in f32/f64 one node
/// summed in f64 in image order (reproducible at any thread count), elsewhere [`composed`]. The
/// mean loss is this divided by `sum_i w[y_i]`, which the caller knows. A target that is neither
/// a class nor `ignore` is an error naming it.
pub fn pixel_cross_entropy(
    logits: &Tensor,
    targets: &[u32],
    ignore: u32,
    class_weight: Option<&[f64]>,
) -> Result<Tensor> {
    let dims = logits.dims();
    if dims.len() < 2 {
        candle_core::bail!("pixel-cross-entropy: logits {dims:?} are not [B, C, ...]")
    }
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    if targets.len() != b * spatial {
        candle_core::bail!(
            "pixel-cross-entropy: {} targets for logits {dims:?} ({} pixels)",
            targets.len(),
            b * spatial
        )
    }
    if let Some(&bad) = targets.iter().find(|&&t| t != ignore && t as usize >= c) {
        candle_core::bail!(
            "segmentation label {bad} is neither a class of 0..{c} nor the ignore index {ignore}"
        )
    }
    let weight = match class_weight {
        Some(w) if w.len() != c => {
            candle_core::bail!(
                "pixel-cross-entropy: {} class weights for {c} classes",
                w.len()
            )
        }
        Some(w) => w.to_vec(),
        None => vec![1.0; c],
    };
    if !super::is_fused(logits) {
        return composed(logits, targets, ignore, &weight);
    }
    let op = PixelCe {
        classes: c,
        spatial,
        targets: targets
            .iter()
            .map(|&t| if t == ignore { SKIP } else { t })
            .collect::<Vec<_>>()
            .into(),
        weight: weight.into(),
    };
    logits.contiguous()?.apply_op1(op)
}

/// [`pixel_cross_entropy`] from candle's ops (any device; checked inputs): channels-last (a
/// copy), `log_softmax`, a gather, the pixel weights and a sum.
fn composed(logits: &Tensor, targets: &[u32], ignore: u32, weight: &[f64]) -> Result<Tensor> {
    let (b, c) = (logits.dim(0)?, logits.dim(1)?);
    let n = targets.len();
    let dev = logits.device();
    let pix_w: Vec<f64> = targets
        .iter()
        .map(|&t| if t == ignore { 0.0 } else { weight[t as usize] })
        .collect();
    let safe: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore { 0 } else { t })
        .collect();
    // [B, C, *] -> [B * pixels, C]
    let flat = logits
        .reshape((b, c, n / b.max(1)))?
        .transpose(1, 2)?
        .reshape((n, c))?;
    let logp = candle_nn::ops::log_softmax(&flat, candle_core::D::Minus1)?;
    let picked = logp
        .gather(&Tensor::from_vec(safe, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let pix_w = Tensor::from_vec(pix_w, n, dev)?.to_dtype(logits.dtype())?;
    (picked * pix_w)?.sum_all()?.neg()
}

/// A pixel without a loss.
const SKIP: u32 = u32::MAX;

#[derive(Clone)]
struct PixelCe {
    classes: usize,
    /// Pixels per image.
    spatial: usize,
    /// Per pixel, image by image: the class or [`SKIP`].
    targets: Arc<[u32]>,
    weight: Arc<[f64]>,
}

/// `lse[i] = log sum_c exp(x[c, p0 + i])` for the `lse.len()` pixels from `p0` of one image's
/// `C` planes of `hw` pixels.
fn block_lse<T: Real>(x: &[T], c: usize, hw: usize, p0: usize, lse: &mut [T], sum: &mut [T]) {
    let n = lse.len();
    lse.copy_from_slice(&x[p0..p0 + n]);
    for k in 1..c {
        for (m, &v) in lse.iter_mut().zip(&x[k * hw + p0..k * hw + p0 + n]) {
            *m = m.fmax(v);
        }
    }
    sum.fill(T::zero());
    for k in 0..c {
        for ((s, &v), &m) in sum
            .iter_mut()
            .zip(&x[k * hw + p0..k * hw + p0 + n])
            .zip(&*lse)
        {
            *s += (v - m).exp_fast();
        }
    }
    for (m, &s) in lse.iter_mut().zip(&*sum) {
        *m += T::from_f64(s.to_f64().ln());
    }
}

impl PixelCe {
    /// The weighted loss sum of image `b` (its logits `x`, `C x H W`).
    fn image_loss<T: Real>(&self, b: usize, x: &[T]) -> f64 {
        let (c, hw) = (self.classes, self.spatial);
        let y = &self.targets[b * hw..(b + 1) * hw];
        let (mut lse, mut sum) = ([T::zero(); BLOCK], [T::zero(); BLOCK]);
        let mut total = 0f64;
        for p0 in (0..hw).step_by(BLOCK) {
            let n = BLOCK.min(hw - p0);
            block_lse(x, c, hw, p0, &mut lse[..n], &mut sum[..n]);
            for (i, &t) in y[p0..p0 + n].iter().enumerate() {
                if t != SKIP {
                    let t = t as usize;
                    total += self.weight[t] * (lse[i] - x[t * hw + p0 + i]).to_f64();
                }
            }
        }
        total
    }

    /// `dx` of image `b` for the upstream gradient `g`: `g w_y (softmax - onehot(y))` per pixel,
    /// 0 where the pixel is ignored; subnormal entries are 0.
    fn image_grad<T: Real>(&self, b: usize, x: &[T], g: f64, dx: &mut [T]) {
        let (c, hw) = (self.classes, self.spatial);
        let y = &self.targets[b * hw..(b + 1) * hw];
        let (mut lse, mut sum) = ([T::zero(); BLOCK], [T::zero(); BLOCK]);
        let mut scale = [T::zero(); BLOCK];
        for p0 in (0..hw).step_by(BLOCK) {
            let n = BLOCK.min(hw - p0);
            block_lse(x, c, hw, p0, &mut lse[..n], &mut sum[..n]);
            for (s, &t) in scale[..n].iter_mut().zip(&y[p0..p0 + n]) {
                *s = if t == SKIP {
                    T::zero()
                } else {
                    T::from_f64(g * self.weight[t as usize])
                };
            }
            for k in 0..c {
                let (xs, ds) = (
                    &x[k * hw + p0..k * hw + p0 + n],
                    &mut dx[k * hw + p0..k * hw + p0 + n],
                );
                for (((d, &v), &m), &s) in ds.iter_mut().zip(xs).zip(&lse[..n]).zip(&scale[..n]) {
                    // a probability near e^-87 times a small scale is subnormal: 0 instead, so
                    // that the products downstream (the upsampling's backward) meet none
                    *d = (s * (v - m).exp_fast()).flush_subnormal();
                }
            }
            for (i, &t) in y[p0..p0 + n].iter().enumerate() {
                if t != SKIP {
                    dx[t as usize * hw + p0 + i] -= scale[i];
                }
            }
        }
    }

    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(s, l, "pixel-cross-entropy")?;
        let per = self.classes * self.spatial;
        let images = x.len() / per.max(1);
        let loss = |b: usize| self.image_loss(b, &x[b * per..(b + 1) * per]);
        let parts: Vec<f64> = if images > 1 && rayon::current_num_threads() > 1 {
            (0..images).into_par_iter().map(loss).collect()
        } else {
            (0..images).map(loss).collect()
        };
        let total = parts.into_iter().fold(0f64, |a, v| a + v);
        Ok(storage(vec![T::from_f64(total)], ()))
    }
}

impl CustomOp1 for PixelCe {
    fn name(&self) -> &'static str {
        "pixel-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, fwd_of(self, s, l))
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let op = PixelCeBwd {
            ce: self.clone(),
            g,
        };
        Ok(Some(x.apply_op1_no_bwd(&op)?))
    }
}

fn fwd_of<T: Real>(op: &PixelCe, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    op.fwd::<T>(s, l)
}

/// The gradient of [`PixelCe`] for an upstream scalar `g`.
struct PixelCeBwd {
    ce: PixelCe,
    g: f64,
}

fn bwd_of<T: Real>(op: &PixelCeBwd, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "pixel-cross-entropy-bwd")?;
    let per = op.ce.classes * op.ce.spatial;
    let mut dx = vec![T::zero(); x.len()];
    par_items(&mut dx, per, |first, out| {
        for (i, d) in out.chunks_exact_mut(per).enumerate() {
            let b = first + i;
            op.ce.image_grad(b, &x[b * per..(b + 1) * per], op.g, d);
        }
    });
    Ok(storage(dx, l.shape().clone()))
}

impl CustomOp1 for PixelCeBwd {
    fn name(&self) -> &'static str {
        "pixel-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, bwd_of(self, s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Against the composed loss, f64 and f32, with and without class weights, on an odd map
    /// (blocks with a remainder), large logits (the max shift), ignored pixels, one class; the
    /// gradient too, scaled by an upstream factor; bad targets are named.
    #[test]
    fn matches_the_composed_loss_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w) in [
            (3usize, 5usize, 17usize, 19usize),
            (2, 1, 3, 4),
            (1, 11, 16, 20),
        ] {
            let n = b * h * w;
            let t: Vec<u32> = (0..n)
                .map(|i| if i % 7 == 3 { 255 } else { (i * 31 % c) as u32 })
                .collect();
            let cw: Vec<f64> = (0..c).map(|k| 0.2 + k as f64 * 0.3).collect();
            for dt in [DType::F64, DType::F32] {
                let x = Var::from_tensor(
                    &Tensor::randn(0f64, 20.0, (b, c, h, w), &dev)?.to_dtype(dt)?,
                )?;
                for weight in [None, Some(cw.as_slice())] {
                    let fused = pixel_cross_entropy(&x, &t, 255, weight)?;
                    let cwv = weight.map_or(vec![1.0; c], <[f64]>::to_vec);
                    let plain = composed(&x, &t, 255, &cwv)?;
                    let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
                    let d = rel_diff(&fused, &plain)?;
                    assert!(d < tol, "{b}x{c}x{h}x{w} {dt:?} {weight:?}: {d}");
                    let gf = (fused * 0.37)?.backward()?;
                    let gp = (plain * 0.37)?.backward()?;
                    let d = rel_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap())?;
                    assert!(d < tol * 10.0, "{b}x{c}x{h}x{w} {dt:?} grad: {d}");
                }
            }
        }
        // the segmentation loss's case: 11 classes with the background weighted down, an odd
        // map, a fifth of the pixels ignored; the mean (sum / sum of pixel weights) and its
        // gradient
        let x = Var::from_tensor(&Tensor::randn(0f32, 4.0, (2, 11, 9, 13), &dev)?)?;
        let ids: Vec<u32> = (0..2 * 9 * 13)
            .map(|i| if i % 5 == 0 { 255 } else { (i * 7 % 11) as u32 })
            .collect();
        let cw: Vec<f64> = (0..11)
            .map(|k| if k == 0 { 0.2 } else { 1.0 + k as f64 * 0.1 })
            .collect();
        let denom: f64 = ids
            .iter()
            .filter(|&&v| v != 255)
            .map(|&v| cw[v as usize])
            .sum();
        let fused = (pixel_cross_entropy(&x, &ids, 255, Some(&cw))? / denom)?;
        let plain = (composed(&x, &ids, 255, &cw)? / denom)?;
        let (f, p) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((f - p).abs() < 1e-5 * p.abs(), "{f} vs {p}");
        let (gf, gp) = (fused.backward()?, plain.backward()?);
        let d = (gf.get(&x).unwrap() - gp.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        // a dtype the fused op does not take goes the composed way: bf16 logits, the same loss
        // as f32 to bf16's precision
        let xb = Tensor::randn(0f32, 2.0, (1, 3, 4, 5), &dev)?;
        let tb: Vec<u32> = (0..20u32)
            .map(|i| if i % 4 == 3 { 255 } else { i % 3 })
            .collect();
        let lf = pixel_cross_entropy(&xb, &tb, 255, None)?.to_scalar::<f32>()?;
        let lb = pixel_cross_entropy(&xb.to_dtype(DType::BF16)?, &tb, 255, None)?;
        assert_eq!(lb.dtype(), DType::BF16);
        let lb = lb.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!((lf - lb).abs() < 0.02 * lf.abs(), "{lf} vs {lb}");
        // far-apart logits: probabilities down to e^-87 times a 1e-3 scale are flushed, not
        // subnormal, and the kept entries are as before
        let x = Var::from_tensor(&(Tensor::randn(0f32, 60.0, (2, 4, 8, 8), &dev)?))?;
        let t: Vec<u32> = (0..128).map(|i| (i % 4) as u32).collect();
        let g = (pixel_cross_entropy(&x, &t, 255, None)? * 1e-3)?.backward()?;
        let g = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(g
            .iter()
            .all(|v| v.is_finite() && (*v == 0.0 || v.abs() >= f32::MIN_POSITIVE)));
        assert!(g.contains(&0.0) && g.iter().any(|&v| v != 0.0));
        let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &dev)?;
        let e = pixel_cross_entropy(&x, &[0, 1, 9, 255], 255, None).unwrap_err();
        assert!(e.to_string().contains("label 9"), "{e}");
        let e = pixel_cross_entropy(&x, &[0, 1], 255, None).unwrap_err();
        assert!(e.to_string().contains("2 targets"), "{e}");
        // uniform logits over 3 classes: ln 3 per kept pixel
        let l = pixel_cross_entropy(&x, &[0, 1, 2, 255], 255, None)?.to_scalar::<f32>()?;
        assert!((l - 3.0 * 3f32.ln()).abs() < 1e-6, "{l}");
        Ok(())
    }
}
