//! Batched matmul of many small matrices (window attention's `q @ k^T` and `attn @ v`: B*nW*nH
//! products of `N x hd` by `hd x N`).
//!
//! candle's CPU matmul loops over the batch and hands each small product to gemm with
//! rayon parallelism, which a 64x64x32 product is too small to use: every product runs on one
//! thread while the other core waits. Here the batch itself is split over the rayon threads, one
//! single-threaded gemm per product. Operands may be strided views (e.g. `k.transpose(1, 2)`), so
//! the backward (`da = g @ b^T`, `db = a^T @ g`) needs no copies either.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::is_fused;

/// `a [B, M, K] @ b [B, K, N] -> [B, M, N]`; any strides within each matrix. Differentiable.
pub fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ba, _, k) = a.dims3()?;
    let (bb, kb, _) = b.dims3()?;
    if ba != bb || k != kb || !is_fused(a) || a.dtype() != b.dtype() {
        return a.matmul(b);
    }
    a.apply_op2(b, Bmm)
}

struct Bmm;

/// Offset, batch stride, row stride and column stride of a rank-3 layout.
fn strides(l: &Layout) -> (usize, usize, isize, isize) {
    let s = l.stride();
    (l.start_offset(), s[0], s[1] as isize, s[2] as isize)
}

fn run<T: WithDType>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Result<Vec<T>> {
    let (batch, m, k) = la.shape().dims3()?;
    let n = lb.shape().dims3()?.2;
    let (oa, ba, a_rs, a_cs) = strides(la);
    let (ob, bb, b_rs, b_cs) = strides(lb);
    let mut out = vec![T::zero(); batch * m * n];
    if m * n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
        // SAFETY: `dst` is `m x n` row-major; the layouts bound every element of matrix `i` of
        // `a` (`m x k`) and `b` (`k x n`) read through their strides inside the storages.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr().add(oa + i * ba),
                a_cs,
                a_rs,
                b.as_ptr().add(ob + i * bb),
                b_cs,
                b_rs,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    });
    Ok(out)
}

impl CustomOp2 for Bmm {
    fn name(&self) -> &'static str {
        "bmm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, m, _) = l1.shape().dims3()?;
        let n = l2.shape().dims3()?.2;
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(run(a, l1, b, l2)?),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(run(a, l1, b, l2)?),
            _ => candle_core::bail!("bmm: f32 or f64 of one dtype expected"),
        };
        Ok((out, Shape::from((batch, m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = g.apply_op2_no_bwd(&b.transpose(1, 2)?, &Bmm)?;
        let db = a.transpose(1, 2)?.apply_op2_no_bwd(g, &Bmm)?;
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Equals candle's matmul, forward and both gradients, for contiguous and transposed
    /// (strided) operands.
    #[test]
    fn matches_matmul_with_strided_operands() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 7, 3), &dev)?.to_dtype(dt)?)?;
            // stored as [B, N, K]; used transposed, like k^T in attention
            let bt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 4, 3), &dev)?.to_dtype(dt)?)?;
            let probe = Tensor::randn(0f64, 1.0, (5, 7, 4), &dev)?.to_dtype(dt)?;
            let b = bt.transpose(1, 2)?;
            let fused = bmm(&a, &b)?;
            let plain = a.matmul(&b)?;
            let diff = |x: &Tensor, y: &Tensor| -> Result<f64> {
                (x - y)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()
            };
            assert_eq!(fused.dims(), [5, 7, 4]);
            assert!(diff(&fused, &plain)? < tol, "{dt:?} forward");
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gp = (plain * &probe)?.sum_all()?.backward()?;
            for v in [&a, &bt] {
                let d = diff(gf.get(v).unwrap(), gp.get(v).unwrap())?;
                assert!(d < tol, "{dt:?} gradient {d}");
            }
        }
        Ok(())
    }
}
