//! `x @ w^T + b` over the last dim of an any-rank `x`, as one graph node.
//!
//! Composed, a linear layer on a `[B, N, C]` activation is `reshape -> matmul(w.t()) -> add_bias
//! -> reshape`: four nodes, and candle's backward starts the gradient of every node's input at
//! zero and adds into it (`GradStore::or_insert` + `add`), so each reshape costs a zero fill and an
//! add over the whole activation. candle's matmul also zero-fills its output before gemm
//! overwrites it, and hands one `M x K x N` gemm to gemm's own rayon split, which reached 55-95
//! GFLOP/s on 2 cores where the same gemm kernel on row blocks, one block per task, reached 85-115
//! (`models/examples/gemm_probe.rs`). Here: one node, the bias written as the gemm's initial
//! output, gemms on row blocks; the backward computes `dx`, `dw` and `db` in one op, `dw` and `db`
//! as per-block partial sums added in block order.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{dispatch, is_fused, slice, storage, sum_partials, unpack, Real};

/// `x [.., K] @ w[N, K]^T + b[N] -> [.., N]` (PyTorch's `F.linear`). Differentiable in all three.
/// Off the fused path (other devices, dtypes): `reshape -> matmul -> broadcast_add -> reshape`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) || b.is_some_and(|b| b.dims() != [n]) {
        candle_core::bail!(
            "linear: input {:?}, weight {:?}, bias {:?}: expected [.., K], [N, K], [N]",
            x.dims(),
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1 checked above") = n;
    let m = x.elem_count() / k.max(1);
    let fused = is_fused(x)
        && w.dtype() == x.dtype()
        && b.is_none_or(|b| b.dtype() == x.dtype())
        && m * n * k > 0;
    if !fused {
        let y = x.reshape((m, k))?.matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return y.reshape(out);
    }
    let op = Linear {
        m,
        k,
        n,
        out: out.into(),
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// Rows per gemm task. A function of `m` alone, never of the thread count: `dw` and `db` are
/// partial sums per row block, added in block order, so results are the same on any machine.
fn rows_per_task(m: usize) -> usize {
    // at most 16 blocks of whole 16-row microkernel tiles, each at least MIN rows (tests: small
    // blocks, so that their small shapes run the multi-block paths)
    const TILE: usize = if cfg!(test) { 1 } else { 16 };
    const MIN: usize = if cfg!(test) { 2 } else { 64 };
    m.div_ceil(16).next_multiple_of(TILE).max(MIN).min(m.max(1))
}

/// A `[rows, cols]` matrix at `ptr` with row and column strides (in elements).
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

/// `dst[m, n] (row-major, rs = n) = (dst if read) + a[m, k] @ b[k, n]`, one thread.
///
/// # Safety
/// `dst` holds `m * n` elements (initialized if `read`); `a` and `b` with their strides address
/// `m x k` and `k x n` elements inside live allocations.
unsafe fn gemm1<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    read: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        read,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// `x [m, k] @ w[n, k]^T (+ b) -> [m, n]`: row blocks of `x` on rayon, the bias as gemm's
/// initial output (no zero fill without it).
fn forward<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, (m, k, n): (usize, usize, usize)) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let per = rows_per_task(m);
    let wt = Mat {
        ptr: w.as_ptr(),
        rs: 1,
        cs: k as isize,
    }; // w^T: (kk, j) at j * k + kk
    out.spare_capacity_mut()[..m * n]
        .par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(t, dst)| {
            let rows = dst.len() / n;
            if let Some(b) = b {
                for row in dst.chunks_exact_mut(n) {
                    for (d, &v) in row.iter_mut().zip(b) {
                        d.write(v);
                    }
                }
            }
            let a = Mat {
                ptr: x[t * per * k..].as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            // SAFETY: `dst` is `rows x n` (written above if it is read); `a` is rows
            // `t*per..t*per+rows` of the contiguous `[m, k]` x, `wt` the contiguous `[n, k]` w.
            unsafe { gemm1(rows, n, k, dst.as_mut_ptr().cast::<T>(), b.is_some(), a, wt) }
        });
    // SAFETY: the chunks cover all `m * n` elements and each was written by its task's gemm
    // (read_dst = false) or by the bias fill (read_dst = true).
    unsafe { out.set_len(m * n) };
    out
}

/// `(x [m, k], w [n, k], g [m, n]) -> [dx (m*k) | dw (n*k) | db (n, if bias)]`.
fn backward<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    (m, k, n): (usize, usize, usize),
    bias: bool,
) -> Vec<T> {
    let per = rows_per_task(m);
    let nb = if bias { n } else { 0 };
    let mut dx: Vec<T> = Vec::with_capacity(m * k + n * k + nb);
    let w_mat = Mat {
        ptr: w.as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    // per row block: dx rows = g rows @ w; partial dw = g_rows^T @ x_rows; partial db = column
    // sums of g_rows
    let partials: Vec<(Vec<T>, Vec<T>)> = dx.spare_capacity_mut()[..m * k]
        .par_chunks_mut(per * k)
        .enumerate()
        .map(|(t, dst)| {
            let rows = dst.len() / k;
            let (g0, x0) = (&g[t * per * n..], &x[t * per * k..]);
            let g_rows = Mat {
                ptr: g0.as_ptr(),
                rs: n as isize,
                cs: 1,
            };
            // SAFETY: `dst` is `rows x k`, written (read_dst = false); `g_rows` is rows of the
            // contiguous `[m, n]` g, `w_mat` the contiguous `[n, k]` w.
            unsafe {
                gemm1(
                    rows,
                    k,
                    n,
                    dst.as_mut_ptr().cast::<T>(),
                    false,
                    g_rows,
                    w_mat,
                )
            };
            let mut dw = vec![T::zero(); n * k];
            let gt = Mat {
                ptr: g0.as_ptr(),
                rs: 1,
                cs: n as isize,
            }; // (j, r) at r * n + j
            let x_rows = Mat {
                ptr: x0.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            // SAFETY: `dw` is `n x k` (zeroed, read); `gt` is the `n x rows` transpose of g's
            // block, `x_rows` the `rows x k` block of x.
            unsafe { gemm1(n, k, rows, dw.as_mut_ptr(), true, gt, x_rows) };
            let mut db = vec![T::zero(); nb];
            if bias {
                for row in g0[..rows * n].chunks_exact(n) {
                    for (s, &v) in db.iter_mut().zip(row) {
                        *s += v;
                    }
                }
            }
            (dw, db)
        })
        .collect();
    // SAFETY: the chunks cover all `m * k` elements of dx, each written by its gemm.
    unsafe { dx.set_len(m * k) };
    let (dws, dbs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    let mut tail = vec![T::zero(); n * k + nb];
    let (dw, db) = tail.split_at_mut(n * k);
    sum_partials(&dws, dw);
    sum_partials(&dbs, db);
    dx.extend_from_slice(&tail);
    dx
}

struct Linear {
    m: usize,
    k: usize,
    n: usize,
    out: Shape,
}

impl Linear {
    fn dims(&self) -> (usize, usize, usize) {
        (self.m, self.k, self.n)
    }

    /// `[dx, dw, db?]` of the inputs `x`, `w`, (`b`).
    fn grads(&self, x: &Tensor, w: &Tensor, g: &Tensor, b: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let bwd = LinearBwd {
            m: self.m,
            k: self.k,
            n: self.n,
            bias: b.is_some(),
        };
        let packed = g.contiguous()?.apply_op3_no_bwd(x, w, &bwd)?;
        let mut shapes = vec![x.shape(), w.shape()];
        shapes.extend(b.map(|b| b.shape()));
        unpack(&packed, &shapes)
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!("linear", s1, run_fwd(self, (s1, l1), (s2, l2), None))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut d = self.grads(x, w, g, None)?.into_iter().map(Some);
        Ok((d.next().flatten(), d.next().flatten()))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
            "linear",
            s1,
            run_fwd(self, (s1, l1), (s2, l2), Some((s3, l3)))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut d = self.grads(x, w, g, Some(b))?.into_iter().map(Some);
        Ok((d.next().flatten(), d.next().flatten(), d.next().flatten()))
    }
}

/// `(g, x, w)` -> packed `[dx | dw | db]` (db only with a bias).
struct LinearBwd {
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
}

fn run_fwd<T: Real>(
    op: &Linear,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "linear")?;
    let w = slice::<T>(s2, l2, "linear")?;
    let b = bias.map(|(s, l)| slice::<T>(s, l, "linear")).transpose()?;
    Ok(storage(forward(x, w, b, op.dims()), op.out.clone()))
}

fn run_bwd<T: Real>(
    op: &LinearBwd,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(s1, l1, "linear-bwd")?;
    let x = slice::<T>(s2, l2, "linear-bwd")?;
    let w = slice::<T>(s3, l3, "linear-bwd")?;
    let out = backward(x, w, g, (op.m, op.k, op.n), op.bias);
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "linear-bwd"
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
            "linear-bwd",
            s1,
            run_bwd(self, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

// SAFETY: a `Mat` points into a slice borrowed for the duration of one kernel call, which the
// tasks only read.
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Equals the composed `reshape -> matmul -> broadcast_add -> reshape`, forward and all three
    /// gradients, with and without a bias, over several row blocks (tests use 2-row blocks) and a
    /// weight that is a row block of a larger one (as q, k, v of the qkv weight).
    #[test]
    fn matches_composed_linear() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-5 };
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 7, 5), &dev)?.to_dtype(dt)?)?;
            let big = Var::from_tensor(&Tensor::randn(0f64, 1.0, (12, 5), &dev)?.to_dtype(dt)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev)?.to_dtype(dt)?)?;
            let probe = Tensor::randn(0f64, 1.0, (3, 7, 4), &dev)?.to_dtype(dt)?;
            let w = big.narrow(0, 4, 4)?;
            for bias in [Some(b.as_tensor()), None] {
                let fused = linear(&x, &w, bias)?;
                let y = x.reshape((21, 5))?.matmul(&w.t()?)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let plain = y.reshape((3, 7, 4))?;
                assert_eq!(fused.dims(), [3, 7, 4]);
                assert!(rel_diff(&fused, &plain)? < tol, "{dt:?} forward");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gp = (plain * &probe)?.sum_all()?.backward()?;
                let vars: &[&Var] = if bias.is_some() {
                    &[&x, &big, &b]
                } else {
                    &[&x, &big]
                };
                for v in vars {
                    let d = rel_diff(gf.get(v).unwrap(), gp.get(v).unwrap())?;
                    assert!(d < tol, "{dt:?} gradient {d} (bias {})", bias.is_some());
                }
                if bias.is_none() {
                    assert!(gf.get(&b).is_none(), "no bias, no bias gradient");
                }
            }
        }
        Ok(())
    }

    /// The blocks depend on the sizes only: forward and backward give the same bits on 1 and on
    /// 3 threads (tests use 2-row blocks, so there are many).
    #[test]
    fn results_do_not_depend_on_the_thread_count() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (37, 19, 11);
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1()?;
        let w: Vec<f32> = Tensor::randn(0f32, 1.0, n * k, &dev)?.to_vec1()?;
        let b: Vec<f32> = Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1()?;
        let g: Vec<f32> = Tensor::randn(0f32, 1.0, m * n, &dev)?.to_vec1()?;
        assert!(rows_per_task(m) < m / 4, "several blocks under test");
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                (
                    forward(&x, &w, Some(&b), (m, k, n)),
                    backward(&x, &w, &g, (m, k, n), true),
                )
            })
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one, three);
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_tensors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 5), DType::F32, &dev)?;
        let e = linear(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("linear: input [2, 3], weight [4, 5]"), "{e}");
        Ok(())
    }
}
