//! Cyclic shift of the two spatial dims of a `[B, H, W, C]` map (Swin's shifted windows,
//! `torch.roll(x, (sh, sw), (1, 2))`).
//!
//! candle's `roll` is a `narrow` + `cat` per dim, whose backward builds a zero-padded full-size
//! gradient for each of the two pieces and adds them into a zeroed one: ~7 passes over the map per
//! dim. Here the forward is one copy (two `memcpy` runs per row) and the backward is the opposite
//! roll, also one copy.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::is_fused;

/// `out[b, (i + sh) mod H, (j + sw) mod W, c] = x[b, i, j, c]` for `x [B, H, W, C]`; shifts may be
/// negative (torch.roll semantics). Differentiable.
pub fn roll2d(x: &Tensor, sh: i64, sw: i64) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (sh, sw) = (
        sh.rem_euclid(h as i64) as usize,
        sw.rem_euclid(w as i64) as usize,
    );
    if sh == 0 && sw == 0 {
        return Ok(x.clone());
    }
    if !is_fused(x) {
        return x.roll(sh as i32, 1)?.roll(sw as i32, 2);
    }
    x.contiguous()?.apply_op1(Roll2d { sh, sw })
}

/// Non-negative shifts below H and W.
struct Roll2d {
    sh: usize,
    sw: usize,
}

impl Roll2d {
    fn run<T: WithDType>(&self, x: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        let (row, tail) = (w * c, self.sw * c);
        // one output row (b, i') comes from input row (b, (i' - sh) mod H)
        out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
            let (bi, i) = (r / h, r % h);
            let src_i = (i + h - self.sh) % h;
            let src = &x[(bi * h + src_i) * row..][..row];
            // out[j] = src[(j - sw) mod W]: the last sw columns of src come first
            dst[..tail].copy_from_slice(&src[row - tail..]);
            dst[tail..].copy_from_slice(&src[..row - tail]);
        });
        debug_assert_eq!(out.len(), b * h * w * c);
        out
    }
}

impl CustomOp1 for Roll2d {
    fn name(&self) -> &'static str {
        "roll2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("roll2d: non-contiguous input")
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..z], dims)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[a..z], dims)),
            _ => candle_core::bail!("roll2d: f32 or f64 expected"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(roll2d(grad, -(self.sh as i64), -(self.sw as i64))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Equals candle's composed `roll` (same as torch.roll) for positive, negative and
    /// wrapped-around shifts, and so do the gradients.
    #[test]
    fn matches_candle_roll_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 6, 5, 3), &dev)?.to_dtype(dt)?)?;
            let probe = Tensor::randn(0f64, 1.0, (2, 6, 5, 3), &dev)?.to_dtype(dt)?;
            for (sh, sw) in [(3, 2), (-3, -2), (1, 0), (0, -4), (7, 11)] {
                let fused = roll2d(&x, sh, sw)?;
                let plain = x
                    .roll(sh.rem_euclid(6) as i32, 1)?
                    .roll(sw.rem_euclid(5) as i32, 2)?;
                let d = (&fused - &plain)?.abs()?.sum_all()?.to_dtype(DType::F64)?;
                assert_eq!(d.to_scalar::<f64>()?, 0.0, "{dt:?} forward ({sh}, {sw})");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gp = (plain * &probe)?.sum_all()?.backward()?;
                let d = (gf.get(&x).unwrap() - gp.get(&x).unwrap())?
                    .abs()?
                    .sum_all()?
                    .to_dtype(DType::F64)?;
                assert_eq!(d.to_scalar::<f64>()?, 0.0, "{dt:?} backward ({sh}, {sw})");
            }
        }
        // a hand case: one row of 4, shifted right by 1
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?.reshape((1, 1, 4, 1))?;
        let y = roll2d(&x, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, [4.0, 1.0, 2.0, 3.0]);
        Ok(())
    }
}
