//! A block's residual add with drop path (stochastic depth) as one node.
//!
//! Composed, `x + y.broadcast_mul(s)` (`s` `[B, 1, ..]`, the per-sample keep scale) is a
//! broadcast, a mul and an add. candle's backward of the mul also computes the gradient of the
//! broadcast scale at full size (`grad * y`, a zero-filled buffer and an add), which nothing needs,
//! and starts every node's input gradient at zeros plus an add. [`residual`] is `x + y * s_b` in
//! one pass with the backward `dx = g`, `dy = g * s_b`: the same operations in the same order, so
//! the same bits as the composed ops.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{dispatch, is_fused, par_items, slice, storage, Real};

/// `x + y * scales[b]` over samples `b` (dim 0), `x` and `y` of one shape, `scales` one per
/// sample (drop path: 0 or `1 / keep`). Off the fused path: `x + y.broadcast_mul(scales)`.
pub fn residual(x: &Tensor, y: &Tensor, scales: &[f32]) -> Result<Tensor> {
    let b = x.dims().first().copied().unwrap_or(0);
    if x.dims() != y.dims() || scales.len() != b {
        candle_core::bail!(
            "residual: x {:?}, y {:?} and {} scales: expected one shape [B, ..] and B scales",
            x.dims(),
            y.dims(),
            scales.len()
        )
    }
    if !is_fused(x) || y.dtype() != x.dtype() || x.elem_count() == 0 {
        let mut shape = vec![1usize; x.rank()];
        shape[0] = b;
        let s = Tensor::from_vec(scales.to_vec(), shape, x.device())?.to_dtype(x.dtype())?;
        return x + y.broadcast_mul(&s)?;
    }
    let op = Residual {
        scales: scales.to_vec(),
    };
    x.contiguous()?.apply_op2(&y.contiguous()?, op)
}

/// Scalars per rayon item.
const ITEM: usize = 1024;

struct Residual {
    scales: Vec<f32>,
}

/// Per sample: `out = x + y * s` (`x` = None: `out = y * s`).
fn per_sample<T: Real>(x: Option<&[T]>, y: &[T], scales: &[f32]) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    let per = y.len() / scales.len();
    for (i, (o, &s)) in out.chunks_mut(per).zip(scales).enumerate() {
        let s = T::from_f64(s as f64);
        let at = i * per;
        par_items(o, ITEM, |first, o| {
            let from = at + first * ITEM;
            match x {
                Some(x) => add_scaled(&x[from..], &y[from..], s, o),
                None => scaled(&y[from..], s, o),
            }
        });
    }
    out
}

mimlab_engine::wide_kernel! {
/// `out = x + y * s`.
fn add_scaled<T: Real>(x: &[T], y: &[T], s: T, out: &mut [T]) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = a + b * s;
    }
}
}

mimlab_engine::wide_kernel! {
/// `out = y * s`.
fn scaled<T: Real>(y: &[T], s: T, out: &mut [T]) {
    for (o, &b) in out.iter_mut().zip(y) {
        *o = b * s;
    }
}
}

fn forward<T: Real>(
    op: &Residual,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "residual")?;
    let y = slice::<T>(s2, l2, "residual")?;
    Ok(storage(
        per_sample(Some(x), y, &op.scales),
        l1.shape().clone(),
    ))
}

impl CustomOp2 for Residual {
    fn name(&self) -> &'static str {
        "residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, forward(self, (s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = g.contiguous()?.apply_op1_no_bwd(&Scale(self))?;
        Ok((Some(g.clone()), Some(dy)))
    }
}

/// `g -> g * s_b`, the gradient of `y`.
struct Scale<'a>(&'a Residual);

fn scale<T: Real>(op: &Residual, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(s, l, "residual-bwd")?;
    Ok(storage(per_sample(None, g, &op.scales), l.shape().clone()))
}

impl CustomOp1 for Scale<'_> {
    fn name(&self) -> &'static str {
        "residual-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, scale(self.0, s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Bitwise the composed `x + y.broadcast_mul(s)`: forward and both gradients, f32 and f64,
    /// with a dropped sample (scale 0), kept ones (1 / 0.8) and samples cut into several rayon
    /// items; eval's unit scales too.
    #[test]
    fn matches_composed_broadcast_mul_and_add() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            for scales in [vec![1.25f32, 0.0, 1.25], vec![1.0; 3]] {
                let shape = (3, 7, 5, 67); // 2345 per sample: 2 whole items and a tail
                let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?.to_dtype(dt)?)?;
                let y = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?.to_dtype(dt)?)?;
                let probe = Tensor::randn(0f64, 1.0, shape, &dev)?.to_dtype(dt)?;
                let fused = residual(&x, &y, &scales)?;
                let s = Tensor::from_vec(scales.clone(), (3, 1, 1, 1), &dev)?.to_dtype(dt)?;
                let plain = (x.as_tensor() + y.broadcast_mul(&s)?)?;
                assert_eq!(rel_diff(&fused, &plain)?, 0.0, "{dt:?} {scales:?} forward");
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gp = (&plain * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("y", &y)] {
                    let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                    assert_eq!(rel_diff(a, b)?, 0.0, "{dt:?} {scales:?} d{name}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_inputs_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let y = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let err = residual(&x, &y, &[1.0, 1.0]).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[2, 4]"), "{err}");
        let err = residual(&x, &x, &[1.0]).unwrap_err().to_string();
        assert!(err.contains("1 scales"), "{err}");
    }
}
