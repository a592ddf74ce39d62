//! LayerNorm over the last dim with a one-pass backward.
//!
//! candle's fused `layer_norm` kernel has no backward (and sums in f32 even for f64), so training
//! used `layer_norm_slow`: ~10 ops, and its weight/bias gradients go through candle's scalar
//! leading-dim reduction.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::{dispatch, lane_dot, lane_sum, par_items, slice, storage, sum_partials, unpack, Real};

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dim (biased variance, two passes, as
/// `torch.nn.LayerNorm`); `w`, `b`: `[C]`. Off the fused path: candle's `layer_norm_slow`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if w.dims1()? != c || b.dims1()? != c {
        candle_core::bail!(
            "layer-norm: x {:?} with weight {:?} and bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    let fused = super::is_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype();
    if !fused {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps as f32);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// Mean and `1 / sqrt(var + eps)` of one row (two passes, biased variance); GroupNorm's of one
/// (image, group) block too.
pub(super) fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

fn forward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "layer-norm")?;
    let w = slice::<T>(s2, l2, "layer-norm")?;
    let b = slice::<T>(s3, l3, "layer-norm")?;
    let c = w.len();
    let eps = T::from_f64(eps);
    let mut y = vec![T::zero(); x.len()];
    par_items(&mut y, c, |first, out| {
        let x = &x[first * c..][..out.len()];
        for (yr, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (mean, rstd) = moments(xr, eps);
            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * w + b;
            }
        }
    });
    Ok(storage(y, l1.shape().clone()))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            self.name(),
            s1,
            forward((s1, l1), (s2, l2), (s3, l3), self.eps)
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let mut g = unpack(&packed, &[x.shape(), w.shape(), b.shape()])?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

/// `(x, w, grad)` -> packed `[dx | dw | db]`.
struct LayerNormBwd {
    eps: f64,
}

fn backward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "layer-norm-bwd")?;
    let w = slice::<T>(s2, l2, "layer-norm-bwd")?;
    let g = slice::<T>(s3, l3, "layer-norm-bwd")?;
    let c = w.len();
    let eps = T::from_f64(eps);
    let inv_c = T::one() / T::from_f64(c as f64);
    let mut out = vec![T::zero(); x.len() + 2 * c];
    let (dx, dwb) = out.split_at_mut(x.len());
    // xh = (x - mean) * rstd, gw = g * w:
    // dx = (gw - mean(gw) - xh * mean(gw * xh)) * rstd, dw = sum_rows g * xh, db = sum_rows g
    let parts = par_items(dx, c, |first, dx| {
        let x = &x[first * c..][..dx.len()];
        let g = &g[first * c..][..dx.len()];
        let mut part = vec![T::zero(); 2 * c];
        let (pw, pb) = part.split_at_mut(c);
        let (mut xh, mut gw) = (vec![T::zero(); c], vec![T::zero(); c]);
        let rows = dx.chunks_exact_mut(c).zip(x.chunks_exact(c));
        for ((dxr, xr), gr) in rows.zip(g.chunks_exact(c)) {
            let (mean, rstd) = moments(xr, eps);
            for (h, &v) in xh.iter_mut().zip(xr) {
                *h = (v - mean) * rstd;
            }
            for ((o, &gv), &wv) in gw.iter_mut().zip(gr).zip(w) {
                *o = gv * wv;
            }
            let m1 = lane_sum(&gw, |v| v) * inv_c;
            let m2 = lane_dot(&gw, &xh) * inv_c;
            for ((d, &a), &h) in dxr.iter_mut().zip(&gw).zip(&xh) {
                *d = (a - m1 - h * m2) * rstd;
            }
            for ((p, &gv), &h) in pw.iter_mut().zip(gr).zip(&xh) {
                *p += gv * h;
            }
            for (p, &gv) in pb.iter_mut().zip(gr) {
                *p += gv;
            }
        }
        part
    });
    sum_partials(&parts, dwb);
    Ok(storage(out, x.len() + 2 * c))
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            self.name(),
            s1,
            backward((s1, l1), (s2, l2), (s3, l3), self.eps)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// (fused, composed) outputs and gradients of x, w, b under a random linear loss.
    fn both(dtype: DType, dims: &[usize]) -> Result<Vec<(Tensor, Tensor)>> {
        let dev = Device::Cpu;
        let c = *dims.last().unwrap();
        let x = Var::from_tensor(&(Tensor::randn(0f64, 2.0, dims, &dev)? + 0.5)?.to_dtype(dtype)?)?;
        let w = Var::from_tensor(&(Tensor::randn(1f64, 0.5, c, &dev)?.to_dtype(dtype)?))?;
        let b = Var::from_tensor(&(Tensor::randn(0f64, 0.5, c, &dev)?.to_dtype(dtype)?))?;
        let r = Tensor::randn(0f64, 1.0, dims, &dev)?.to_dtype(dtype)?;
        let fused = layer_norm(&x, &w, &b, 1e-5)?;
        let plain = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5)?;
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        let mut out = vec![(fused, plain)];
        for v in [&x, &w, &b] {
            out.push((gf.get(v).unwrap().clone(), gp.get(v).unwrap().clone()));
        }
        Ok(out)
    }

    #[test]
    fn layer_norm_matches_layer_norm_slow() -> Result<()> {
        // rows 6 * 40 = 240: several rayon tasks; C = 24
        for (dtype, fwd_tol, grad_tol) in [(DType::F64, 1e-12, 1e-12), (DType::F32, 1e-6, 1e-5)] {
            for (i, (f, p)) in both(dtype, &[6, 40, 24])?.iter().enumerate() {
                let d = rel_diff(f, p)?;
                let tol = if i == 0 { fwd_tol } else { grad_tol };
                assert!(d < tol, "{dtype:?} output/grad {i}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, c) = (3, 5);
        let x0: Vec<f64> = Tensor::randn(0f64, 1.5, (rows, c), &dev)?
            .flatten_all()?
            .to_vec1()?;
        let w0 = vec![0.7, -1.2, 0.3, 1.5, 0.9];
        let b0 = vec![0.1, 0.2, -0.3, 0.0, 0.5];
        let r = Tensor::randn(0f64, 1.0, (rows, c), &dev)?;
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> Result<f64> {
            let y = layer_norm(
                &Tensor::from_slice(x, (rows, c), &dev)?,
                &Tensor::from_slice(w, c, &dev)?,
                &Tensor::from_slice(b, c, &dev)?,
                1e-5,
            )?;
            (y * &r)?.sum_all()?.to_scalar::<f64>()
        };
        let x = Var::from_slice(&x0, (rows, c), &dev)?;
        let w = Var::from_slice(&w0, c, &dev)?;
        let b = Var::from_slice(&b0, c, &dev)?;
        let g = (layer_norm(&x, &w, &b, 1e-5)? * &r)?
            .sum_all()?
            .backward()?;
        let h = 1e-6;
        for (which, v) in [&x, &w, &b].into_iter().enumerate() {
            let grad: Vec<f64> = g.get(v).unwrap().flatten_all()?.to_vec1()?;
            for (k, &an) in grad.iter().enumerate() {
                let mut p = [x0.clone(), w0.clone(), b0.clone()];
                p[which][k] += h;
                let up = loss(&p[0], &p[1], &p[2])?;
                p[which][k] -= 2.0 * h;
                let down = loss(&p[0], &p[1], &p[2])?;
                let num = (up - down) / (2.0 * h);
                assert!(
                    (num - an).abs() < 1e-7 * (1.0 + an.abs()),
                    "{which}[{k}]: {num} vs {an}"
                );
            }
        }
        Ok(())
    }
}
