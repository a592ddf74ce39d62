//! SimMIM's mask-token substitution as one node.
//!
//! Composed, `x * (1 - m) + tok * m` (`m` `[.., 1]` per token, `tok` `[C]`) is two broadcast
//! muls and an add. candle's backward of each broadcast mul also builds the gradient of the
//! broadcast operand at full size, and reduces the token's gradient with its strided
//! `sum_keepdim` over every row. [`mask_token`] does the same forward in one pass, with the
//! backward `dx = g (1 - m)`, `dtok = sum_rows g m` (partial sums per row block, added in block
//! order).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{dispatch, is_fused, par_items, slice, storage, sum_partials, unpack, Real};

/// `x * (1 - m) + tok * m` per row of `x [.., C]`: `mask` has one value per row (shape `x`'s
/// leading dims, or with a trailing 1), `tok` has `C` elements (e.g. `[1, 1, C]`). The output has
/// `x`'s shape. Differentiable in `x` and `tok`. Off the fused path: the composed broadcast ops.
pub fn mask_token(x: &Tensor, tok: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let c = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / c.max(1);
    if tok.elem_count() != c || mask.elem_count() != rows {
        candle_core::bail!(
            "mask-token: x {:?}, token {:?}, mask {:?}: expected [.., C], C elements, one per row",
            x.dims(),
            tok.dims(),
            mask.dims()
        )
    }
    let m = mask.to_dtype(x.dtype())?;
    if !is_fused(x) || tok.dtype() != x.dtype() || rows * c == 0 {
        let mut lead = x.dims().to_vec();
        *lead.last_mut().expect("rank >= 1") = 1;
        let m = m.reshape(lead)?;
        let keep = m.affine(-1.0, 1.0)?;
        let tok = tok.reshape(c)?;
        return x.broadcast_mul(&keep)? + m.broadcast_mul(&tok)?;
    }
    let m: Vec<f64> = m
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()?;
    let op = MaskToken { mask: m, c };
    x.contiguous()?
        .apply_op2(&tok.contiguous()?.reshape(c)?, op)
}

/// Rows per rayon item (each `C` scalars).
const ROWS: usize = 16;

struct MaskToken {
    /// One value per row of `x` (in `x`'s dtype, as f64).
    mask: Vec<f64>,
    c: usize,
}

/// `(m, 1 - m)` of row `r`, computed as candle's `affine(-1, 1)` in `T`.
#[inline(always)]
fn weights<T: Real>(m: &[f64], r: usize) -> (T, T) {
    let m = T::from_f64(m[r]);
    (m, m * T::from_f64(-1.0) + T::one())
}

fn forward<T: Real>(
    op: &MaskToken,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "mask-token")?;
    let tok = slice::<T>(s2, l2, "mask-token")?;
    let c = op.c;
    let mut y = vec![T::zero(); x.len()];
    par_items(&mut y, c * ROWS, |first, out| {
        let r0 = first * ROWS;
        for (i, (yr, xr)) in out.chunks_mut(c).zip(x[r0 * c..].chunks(c)).enumerate() {
            let (m, keep) = weights::<T>(&op.mask, r0 + i);
            for ((o, &v), &t) in yr.iter_mut().zip(xr).zip(tok) {
                *o = v * keep + m * t;
            }
        }
    });
    Ok(storage(y, l1.shape().clone()))
}

impl CustomOp2 for MaskToken {
    fn name(&self) -> &'static str {
        "mask-token"
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
        tok: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = g.contiguous()?.apply_op1_no_bwd(&MaskTokenBwd(self))?;
        let mut d = unpack(&packed, &[g.shape(), tok.shape()])?.into_iter();
        Ok((d.next(), d.next()))
    }
}

/// `g` -> packed `[dx | dtok]`.
struct MaskTokenBwd<'a>(&'a MaskToken);

fn backward<T: Real>(op: &MaskToken, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(s, l, "mask-token-bwd")?;
    let c = op.c;
    let mut out = vec![T::zero(); g.len() + c];
    let (dx, dtok) = out.split_at_mut(g.len());
    let parts = par_items(dx, c * ROWS, |first, dx| {
        let r0 = first * ROWS;
        let mut part = vec![T::zero(); c];
        for (i, (dr, gr)) in dx.chunks_mut(c).zip(g[r0 * c..].chunks(c)).enumerate() {
            let (m, keep) = weights::<T>(&op.mask, r0 + i);
            for ((d, p), &v) in dr.iter_mut().zip(part.iter_mut()).zip(gr) {
                *d = v * keep;
                *p += v * m;
            }
        }
        part
    });
    sum_partials(&parts, dtok);
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp1 for MaskTokenBwd<'_> {
    fn name(&self) -> &'static str {
        "mask-token-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, backward(self.0, s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// The composed `x * (1 - m) + m * tok` (SwinV2's code before this op): forward bitwise, the
    /// gradients of x bitwise and of the token within rounding (candle sums it in another order),
    /// for f32 and f64, with rows cut into several rayon items.
    #[test]
    fn matches_composed_broadcast_ops() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F64, DType::F32] {
            let (b, h, w, c) = (2, 9, 7, 5);
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?)?;
            let tok = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, 1, c), &dev)?.to_dtype(dt)?)?;
            let mask = Tensor::rand(0f32, 1.0, (b, h, w), &dev)?
                .ge(0.4)?
                .to_dtype(DType::F32)?;
            let probe = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?;
            let fused = mask_token(&x, &tok, &mask)?;
            let m = mask.to_dtype(dt)?.unsqueeze(3)?;
            let keep = m.affine(-1.0, 1.0)?;
            let plain = (x.broadcast_mul(&keep)? + m.broadcast_mul(&tok)?)?;
            assert_eq!(rel_diff(&fused, &plain)?, 0.0, "{dt:?} forward");
            let gf = (&fused * &probe)?.sum_all()?.backward()?;
            let gp = (&plain * &probe)?.sum_all()?.backward()?;
            assert_eq!(
                rel_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap())?,
                0.0,
                "{dt:?} dx"
            );
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-5 };
            let d = rel_diff(gf.get(&tok).unwrap(), gp.get(&tok).unwrap())?;
            assert!(d < tol, "{dt:?} dtok {d}");
            assert_eq!(gf.get(&tok).unwrap().dims(), [1, 1, c]);
        }
        Ok(())
    }

    #[test]
    fn mismatched_inputs_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let tok = Tensor::zeros(5, DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let err = mask_token(&x, &tok, &mask).unwrap_err().to_string();
        assert!(err.contains("[2, 3, 4]") && err.contains("[5]"), "{err}");
    }
}
