//! L2 normalization over the last dim (`F.normalize(x, dim=-1)`) with a one-pass backward.
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::{dispatch, lane_dot, par_items, slice, storage, Real};

/// `F.normalize`'s default eps.
const EPS: f64 = 1e-12;

/// `x / max(||x||, 1e-12)` over the last dim, as `torch.nn.functional.normalize(x, dim=-1)`.
/// Backward: `dx = (g - y * sum(g * y)) / ||x||`, and `g / 1e-12` where the norm is clamped
/// (also for a zero row, e.g. the key of a padding token: Swin-V2's k has no bias). Off the fused
/// path: [`composed`].
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    normalize_groups(x, x.dims().last().copied().unwrap_or(1))
}

/// [`normalize`] over each run of `group` consecutive elements of the last dim (which `group`
/// divides): the heads of a `[B_, N, nH * hd]` q or k with `group = hd`, without a reshape node.
pub fn normalize_groups(x: &Tensor, group: usize) -> Result<Tensor> {
    let last = x.dims().last().copied().unwrap_or(1);
    if group == 0 || last % group != 0 {
        candle_core::bail!("normalize: groups of {group} in a last dim of {last}")
    }
    if !super::is_fused(x) {
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.extend([last / group, group]);
        return composed(&x.reshape(dims)?)?.reshape(x.shape());
    }
    x.contiguous()?.apply_op1(Normalize { c: group })
}

/// [`normalize`] from candle ops (other devices and dtypes): `x / sqrt(max(sum(x^2), eps^2))`,
/// the same values as `x / max(||x||, eps)`. Clamping before the `sqrt` keeps a clamped row's
/// backward at `g / eps` as the fused op's: clamping after it puts `sqrt`'s backward at 0, whose
/// infinity times the zero row gave NaN weight gradients on CUDA at image sizes with padded
/// windows (tests/fixtures.rs `training_forward_and_backward_at_other_sizes`, caught on an H200).
fn composed(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .maximum(EPS * EPS)?
        .sqrt()?;
    x.broadcast_div(&norm)
}

/// L2 normalization of each run of `c` elements.
struct Normalize {
    c: usize,
}

/// `(max(||row||, eps), whether it was clamped)`.
fn clamped_norm<T: Real>(row: &[T]) -> (T, bool) {
    let norm = lane_dot(row, row).sqrt();
    let eps = T::from_f64(EPS);
    if norm >= eps {
        (norm, false)
    } else {
        (eps, true)
    }
}

fn forward<T: Real>(s: &CpuStorage, l: &Layout, c: usize) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "normalize")?;
    let mut y = vec![T::zero(); x.len()];
    par_items(&mut y, c, |first, out| {
        let x = &x[first * c..][..out.len()];
        for (yr, xr) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (norm, _) = clamped_norm(xr);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v / norm;
            }
        }
    });
    Ok(storage(y, l.shape().clone()))
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, forward(s, l, self.c))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &grad.contiguous()?,
            &NormalizeBwd { c: self.c },
        )?))
    }
}

/// `(x, y, grad)` -> `dx`, runs of `c`.
struct NormalizeBwd {
    c: usize,
}

fn backward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    c: usize,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "normalize-bwd")?;
    let y = slice::<T>(s2, l2, "normalize-bwd")?;
    let g = slice::<T>(s3, l3, "normalize-bwd")?;
    let mut dx = vec![T::zero(); x.len()];
    par_items(&mut dx, c, |first, out| {
        let at = first * c..first * c + out.len();
        let (x, y, g) = (&x[at.clone()], &y[at.clone()], &g[at]);
        let rows = out.chunks_exact_mut(c).zip(x.chunks_exact(c));
        for ((dr, xr), (yr, gr)) in rows.zip(y.chunks_exact(c).zip(g.chunks_exact(c))) {
            let (norm, clamped) = clamped_norm(xr);
            if clamped {
                // the norm is the constant eps here
                for (d, &gv) in dr.iter_mut().zip(gr) {
                    *d = gv / norm;
                }
                continue;
            }
            let dot = lane_dot(yr, gr);
            for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                *d = (gv - yv * dot) / norm;
            }
        }
    });
    Ok(storage(dx, l1.shape().clone()))
}

impl CustomOp3 for NormalizeBwd {
    fn name(&self) -> &'static str {
        "normalize-bwd"
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
            backward((s1, l1), (s2, l2), (s3, l3), self.c)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, IndexOp, Var};

    #[test]
    fn normalize_matches_composed_ops() -> Result<()> {
        // q of 6 windows, 2 heads, 16 tokens, head dim 8
        for (dtype, fwd_tol, grad_tol) in [(DType::F64, 1e-12, 1e-12), (DType::F32, 1e-6, 1e-6)] {
            let x = Tensor::randn(0f64, 1.0, (6, 2, 16, 8), &Device::Cpu)?.to_dtype(dtype)?;
            let x = Var::from_tensor(&x)?;
            let r = Tensor::randn(0f64, 1.0, x.shape(), &Device::Cpu)?.to_dtype(dtype)?;
            let (fused, plain) = (normalize(&x)?, composed(&x)?);
            let d = rel_diff(&fused, &plain)?;
            assert!(d < fwd_tol, "{dtype:?} forward {d}");
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gp = (&plain * &r)?.sum_all()?.backward()?;
            let d = rel_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap())?;
            assert!(d < grad_tol, "{dtype:?} grad {d}");
        }
        Ok(())
    }

    /// Groups of the last dim (the heads of a `[B_, N, nH * hd]` q) equal the normalization of
    /// the `[B_, N, nH, hd]` view, forward and backward.
    #[test]
    fn groups_match_the_split_view() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (6, 16, 3 * 8), &dev)?)?;
        let r = Tensor::randn(0f64, 1.0, x.shape(), &dev)?;
        let fused = normalize_groups(&x, 8)?;
        let plain = composed(&x.reshape((6, 16, 3, 8))?)?.reshape((6, 16, 24))?;
        assert!(rel_diff(&fused, &plain)? < 1e-12);
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        let d = rel_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap())?;
        assert!(d < 1e-12, "grad {d}");
        let e = normalize_groups(&x, 5).unwrap_err().to_string();
        assert!(
            e.contains("normalize: groups of 5 in a last dim of 24"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn normalize_clamped_rows() -> Result<()> {
        // rows of [4, 5]: normal, zero, norm ~1e-14 (clamped), normal
        let dev = Device::Cpu;
        let mut v: Vec<f64> = Tensor::randn(0f64, 1.0, 20, &dev)?.to_vec1()?;
        v[5..10].fill(0.0);
        v[10..15].iter_mut().for_each(|t| *t *= 1e-14);
        let x = Var::from_vec(v, (4, 5), &dev)?;
        let r = Tensor::randn(0f64, 1.0, (4, 5), &dev)?;
        let y = normalize(&x)?;
        assert_eq!(y.i(1)?.abs()?.sum_all()?.to_scalar::<f64>()?, 0.0);
        let dx = (&y * &r)?.sum_all()?.backward()?.get(&x).unwrap().clone();
        // zero row: g / eps
        let d = rel_diff(&dx.i(1)?, &(r.i(1)? / EPS)?)?;
        assert!(d < 1e-15, "zero row: {d}");
        // the composed fallback agrees on every row, the clamped ones included (a clamp after
        // the sqrt gave NaN on the zero row)
        let plain = composed(&x)?;
        let dp = (&plain * &r)?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .clone();
        for row in 0..4 {
            let d = rel_diff(&y.i(row)?, &plain.i(row)?)?;
            assert!(d < 1e-12, "row {row} forward: {d}");
            let d = rel_diff(&dx.i(row)?, &dp.i(row)?)?;
            assert!(d < 1e-12, "row {row} grad: {d}");
        }
        Ok(())
    }
}
