//! Softmax over the last dim as one node with a one-pass backward (the MoE router's scores).
//!
//! candle_nn's `softmax` is 5 ops (max, sub, exp, sum, div), each a pass and a backward that
//! zero-fills and adds; its fused `softmax_last_dim` has no backward. Here: one pass forward
//! (`exp(x - max) / sum`), and `dx = y * (g - sum(g * y))` per row backward.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::{dispatch, lane_dot, lane_max, par_items, slice, storage, Real};

/// `softmax(x)` over the last dim. Off the fused path: candle_nn's composed softmax.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !super::is_fused(x) || x.elem_count() == 0 {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

fn fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "softmax")?;
    let n = l.shape().dims().last().copied().unwrap_or(1);
    let mut y = vec![T::zero(); x.len()];
    par_items(&mut y, n, |first, out| {
        for (i, row) in out.chunks_exact_mut(n).enumerate() {
            let src = &x[(first + i) * n..(first + i + 1) * n];
            let m = lane_max(src);
            let mut sum = T::zero();
            for (o, &v) in row.iter_mut().zip(src) {
                *o = (v - m).exp_fast();
                sum += *o;
            }
            let inv = T::one() / sum;
            for o in row.iter_mut() {
                *o *= inv;
            }
        }
    });
    Ok(storage(y, l.shape().clone()))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, fwd(s, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

/// `(y, g)` -> `y * (g - sum(g * y))` per row.
struct SoftmaxBwd;

fn bwd<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let y = slice::<T>(s1, l1, "softmax-bwd")?;
    let g = slice::<T>(s2, l2, "softmax-bwd")?;
    let n = l1.shape().dims().last().copied().unwrap_or(1);
    let mut dx = vec![T::zero(); y.len()];
    par_items(&mut dx, n, |first, out| {
        for (i, row) in out.chunks_exact_mut(n).enumerate() {
            let at = (first + i) * n;
            let (yr, gr) = (&y[at..at + n], &g[at..at + n]);
            let dot = lane_dot(gr, yr);
            for ((o, &yv), &gv) in row.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        }
    });
    Ok(storage(dx, l1.shape().clone()))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, bwd((s1, l1), (s2, l2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Forward and gradient against candle_nn's composed softmax, f64 and f32, on rows of 2,
    /// 8 and 33 entries (lane remainders), with large logits (the max shift); one entry gives 1.
    #[test]
    fn matches_candle_softmax_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let one = softmax_last(&Tensor::new(&[[3.5f32], [-7.0]], &dev)?)?;
        assert_eq!(one.flatten_all()?.to_vec1::<f32>()?, [1.0, 1.0]);
        for n in [2, 8, 33] {
            for dt in [DType::F64, DType::F32] {
                let x =
                    Var::from_tensor(&(Tensor::randn(0f64, 30.0, (41, n), &dev)?.to_dtype(dt)?))?;
                let probe = Tensor::randn(0f64, 1.0, (41, n), &dev)?.to_dtype(dt)?;
                let fused = softmax_last(&x)?;
                let plain = candle_nn::ops::softmax(&x, D::Minus1)?;
                let tol = if dt == DType::F64 { 1e-14 } else { 1e-6 };
                assert!(rel_diff(&fused, &plain)? < tol, "n={n} {dt:?} forward");
                let sums = fused.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert!(sums.iter().all(|s| (s - 1.0).abs() < tol * 10.0), "n={n}");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gp = (plain * &probe)?.sum_all()?.backward()?;
                let d = rel_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap())?;
                assert!(d < tol * 10.0, "n={n} {dt:?} backward: {d}");
            }
        }
        Ok(())
    }
}
