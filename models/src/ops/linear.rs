//! `x @ w^T + b` over the last dim of an any-rank `x`, as one graph node.
//!
//! Composed, a linear layer on a `[B, N, C]` activation is `reshape -> matmul(w.t()) -> add_bias
//! -> reshape`: four nodes, and candle's backward starts the gradient of every node's input at
//! zero and adds into it (`GradStore::or_insert` + `add`), so each reshape costs a zero fill and an
//! add over the whole activation. candle's matmul also zero-fills its output before gemm
//! overwrites it, and gives one `M x K x N` product to gemm's own thread split. Here: one node,
//! the bias written as the gemm's initial output, single-threaded gemms on row blocks (column
//! blocks where there are few rows: tiny_w8's last stage at 128 px has 128 token rows against a
//! 3072 x 768 weight); the backward computes `dx`, `dw` and `db` in one op, `dw` and `db` as
//! per-row-block partial sums added in block order. `models/examples/gemm_probe.rs` prints the
//! GFLOP/s of both on the model's shapes.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{dispatch, is_fused, lane_dot, par_items, slice, storage, unpack, Real};

/// `x [.., K] @ w[N, K]^T + b[N] -> [.., N]` (PyTorch's `F.linear`). Differentiable in all three.
/// Off the fused path (other devices, dtypes): `reshape -> matmul -> broadcast_add -> reshape`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out, (m, k, n)) = checked_dims(x, w, b)?;
    let fused = is_fused(x)
        && w.dtype() == x.dtype()
        && b.is_none_or(|b| b.dtype() == x.dtype())
        && m * n * k > 0;
    if !fused {
        let y = super::matmul(&x.reshape((m, k))?, &w.t()?)?;
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
        gelu: None,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// `gelu_erf(linear(x, w, b))` (an MLP's fc1 and its activation) as one graph node, the same
/// numbers as the two ops. The node keeps the pre-activation for its backward, as the two nodes
/// did, but candle's backward no longer zero-fills and adds a gradient for it: on the hidden
/// `[.., 4C]` activation, the largest of a Swin block.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (out, (m, k, n)) = checked_dims(x, w, Some(b))?;
    let fused = is_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() && m * n * k > 0;
    if !fused {
        return super::gelu_erf(&linear(x, w, Some(b))?);
    }
    let op = Linear {
        m,
        k,
        n,
        out: out.into(),
        gelu: Some(Mutex::new(None)),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// The output dims and `(m, k, n)` of `x [.., K] @ w[N, K]^T + b[N]`, or an error naming the
/// three shapes.
fn checked_dims(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<(Vec<usize>, (usize, usize, usize))> {
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
    Ok((out, (x.elem_count() / k.max(1), k, n)))
}

/// The blocks `[bounds[i], bounds[i + 1])` of `len` rows (or columns) that the forward's and
/// `dx`'s gemms are cut into: two per rayon thread, or more of at most [`MAX_BLOCK`], each at
/// least `MIN_BLOCK - 16` long (edges at multiples of 16, so a block is within 16 of `len / nb`
/// and `nb <= len / MIN_BLOCK`). Each block's gemm
/// packs all of the shared operand (the weight, or `x` for column blocks), so fewer blocks pack
/// less. tiny_w8 at 256 px, batch 8, the linear layers' kernels forward + backward on 2
/// threads (`models/examples/gemm_probe.rs`): 202 ms with the rule before (16 blocks of at
/// least 64), 190 ms with this one; blocks of 1,024 or ~370 rows ran some of gemm's shapes at
/// half speed.
///
/// The thread count only moves the block edges, never a result: each output element is one
/// gemm's dot product over the whole `k`, in gemm's `kc` chunks, which depend on `k` and the
/// CPU's caches alone, unless a block is at most 64 x 64 (gemm's small-matrix path takes `kc =
/// min(k, 512)`). Blocks of at least `MIN_BLOCK - 16 > 64` rows or columns never are, and a
/// dimension too short to cut stays one block whatever the thread count.
fn blocks(len: usize) -> Vec<usize> {
    let per = len
        .div_ceil(2 * rayon::current_num_threads())
        .min(MAX_BLOCK);
    // at least one block, also for len 0 (`clamp` needs its bounds in order)
    let nb = (len / MIN_BLOCK).min(len.div_ceil(per.max(1))).max(1);
    let mut bounds: Vec<usize> = (0..nb).map(|i| i * len / nb / 16 * 16).collect();
    bounds.push(len);
    bounds
}

/// The shortest block [`blocks`] cuts (see there for why it is over 64).
const MIN_BLOCK: usize = 128;
/// The longest block [`blocks`] cuts.
const MAX_BLOCK: usize = 512;

/// Rows per partial sum of `dw` and `db` ([`backward`]): at most 16 partials, each of at least
/// [`MIN_PARTIAL`] rows. A function of `m` alone, never of the thread count: the partials are
/// added in block order, so results are the same with any number of threads.
fn rows_per_partial(m: usize) -> usize {
    m.div_ceil(16).next_multiple_of(16).max(MIN_PARTIAL)
}

/// At least this many rows per partial `dw`: fewer, larger partials cost less to write and add
/// (tiny_w8's stage 3 at 256 px, 2048 rows: 4 partials instead of 16). Small in tests, so that
/// their small shapes sum several partials.
const MIN_PARTIAL: usize = if cfg!(test) { 32 } else { 512 };

/// Whether a `[m, n]` output is cut into row blocks (else column blocks): rows while there are
/// enough of them, so that a few-token stage (m = 512 rows at tiny_w8's last stage at 256 px,
/// against a 3072 x 768 weight) is cut along the weight's larger side.
fn split_rows(m: usize, n: usize) -> bool {
    m >= n || m >= 8 * MIN_BLOCK
}

/// A `[rows, cols]` matrix at `ptr` with row and column strides (in elements).
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Mat<T> {
    /// The contiguous row-major matrix in `s` with `ld` elements per row.
    fn row_major(s: &[T], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of the contiguous row-major matrix in `s` with `ld` elements per row.
    fn transposed(s: &[T], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }

    /// The sub-matrix from row `r` and column `c` on.
    fn at(self, r: usize, c: usize) -> Self {
        let off = r as isize * self.rs + c as isize * self.cs;
        // SAFETY (of later reads): callers only move inside the matrix they were given.
        Self {
            ptr: self.ptr.wrapping_offset(off),
            ..self
        }
    }
}

/// A row-major `[.., ld]` output buffer shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    ld: usize,
}

impl<T> Out<T> {
    /// The output from element `off` on (a method: a closure calling it captures the whole `Out`,
    /// which is Sync, where `dst.ptr` would capture the raw pointer alone).
    fn skip(self, off: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_add(off),
            ..self
        }
    }
}

/// `dst[m, n] (row stride ld) = (dst if read) + a[m, k] @ b[k, n]`, one thread.
///
/// # Safety
/// `dst` addresses `m` rows of `n` elements `ld` apart (initialized if `read`) that no other
/// thread touches meanwhile; `a` and `b` with their strides address `m x k` and `k x n` elements
/// inside live allocations.
unsafe fn gemm1<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: Out<T>,
    read: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        1,
        dst.ld as isize,
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

/// [`gemm1`] cut into row or column [`blocks`] ([`split_rows`]) on rayon; with `bias`, each task
/// first writes the bias into its block of the output (so the fill runs on all threads, and the
/// gemm reads it back while it is still cached) and adds the product to it.
///
/// # Safety
/// As [`gemm1`], for the whole `[m, n]` output (uninitialized is fine: every element is written);
/// `bias` has `n` elements.
unsafe fn par_gemm<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: Out<T>,
    bias: Option<&[T]>,
    a: Mat<T>,
    b: Mat<T>,
) {
    let rows = split_rows(m, n);
    let bounds = blocks(if rows { m } else { n });
    bounds.par_windows(2).for_each(|w| {
        let (at, len) = (w[0], w[1] - w[0]);
        // SAFETY: the block is rows (or columns) `at..at + len` of the output, disjoint from the
        // other tasks' blocks, and of `a` (or `b`) inside the caller's matrices; the bias rows
        // written below are that block's.
        unsafe {
            if rows {
                let d = dst.skip(at * dst.ld);
                if let Some(bias) = bias {
                    fill_rows(d, len, bias);
                }
                gemm1((len, n, k), d, bias.is_some(), a.at(at, 0), b)
            } else {
                let d = dst.skip(at);
                if let Some(bias) = bias {
                    fill_rows(d, m, &bias[at..at + len]);
                }
                gemm1((m, len, k), d, bias.is_some(), a, b.at(0, at))
            }
        }
    });
}

/// Writes `row` into each of `rows` rows of `dst` (from each row's first element on).
///
/// # Safety
/// `dst` addresses `rows` rows of at least `row.len()` elements `ld` apart.
unsafe fn fill_rows<T: Real>(dst: Out<T>, rows: usize, row: &[T]) {
    for r in 0..rows {
        // SAFETY: row `r` of `dst` has room for `row.len()` elements (caller).
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.ptr.add(r * dst.ld), row.len()) }
    }
}

/// `x [m, k] @ w[n, k]^T (+ b) -> [m, n]`, the bias as gemm's initial output (no zero fill
/// without it).
pub(crate) fn forward<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<T> {
    if n == 1 || m == 1 {
        return dot_products(x, w, b, (m, k, n));
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let xm = Mat::row_major(x, k);
    // w^T: (kk, j) at j * k + kk
    let wt = Mat::transposed(w, k);
    let dst = Out {
        ptr: out.as_mut_ptr(),
        ld: n,
    };
    // SAFETY: `out` has room for `m x n`; `x` is the contiguous `[m, k]`, `w` the contiguous
    // `[n, k]`, `b` has `n` elements.
    unsafe {
        par_gemm((m, n, k), dst, b, xm, wt);
        // every element written by a task's bias fill or its gemm (read_dst = false)
        out.set_len(m * n);
    }
    out
}

/// [`forward`] of one output column (`n == 1`) or row (`m == 1`): each output one in-order dot
/// product plus its bias. gemm takes a matrix-vector path there whose summation order follows
/// the block's length, so the thread-count-dependent block edges of [`blocks`] changed the bits
/// (the FCOS head's 1-channel centerness conv on a 1,024-row level: 1 vs 2 threads differed).
fn dot_products<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<T> {
    let mut out = vec![T::zero(); m * n];
    par_items(&mut out, 1, |first, o| {
        for (i, v) in o.iter_mut().enumerate() {
            let e = first + i;
            // n == 1: row e of x against w; m == 1: x against row e of w
            let (xr, wr, j) = if n == 1 {
                (&x[e * k..(e + 1) * k], &w[..k], 0)
            } else {
                (&x[..k], &w[e * k..(e + 1) * k], e)
            };
            *v = b.map_or(T::zero(), |b| b[j]) + lane_dot(xr, wr);
        }
    });
    out
}

/// `(x [m, k], w [n, k], g [m, n]) -> [dx (m*k) | dw (n*k) | db (n, if bias)]`.
pub(crate) fn backward<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    (m, k, n): (usize, usize, usize),
    bias: bool,
) -> Vec<T> {
    let nb = if bias { n } else { 0 };
    let mut out: Vec<T> = Vec::with_capacity(m * k + n * k + nb);
    let xm = Mat::row_major(x, k);
    let wm = Mat::row_major(w, k);
    let gm = Mat::row_major(g, n);
    // g^T: (j, r) at r * n + j
    let gt = Mat::transposed(g, n);
    // dx = g @ w
    // SAFETY: `out` has room for `m x k` more; `g` is the contiguous `[m, n]`, `w` `[n, k]`.
    unsafe {
        par_gemm(
            (m, k, n),
            Out {
                ptr: out.as_mut_ptr(),
                ld: k,
            },
            None,
            gm,
            wm,
        );
        out.set_len(m * k);
    }
    // dw and db go straight after dx in `out`, every element written once: no zero fill, no
    // copy (gemm with read_dst = false overwrites its block)
    // SAFETY (of the writes below): `out` has room for `n * k + nb` more after dx.
    let tail = Out {
        ptr: unsafe { out.as_mut_ptr().add(m * k) },
        ld: k,
    };
    let per = rows_per_partial(m);
    if m > per {
        // many rows: per row block, partial dw = g_rows^T @ x_rows and partial db, added in
        // block order
        let parts: Vec<Vec<T>> = (0..m.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let (at, rows) = (t * per, per.min(m - t * per));
                let mut part = Vec::with_capacity(n * k + nb);
                let d = Out {
                    ptr: part.as_mut_ptr(),
                    ld: k,
                };
                // SAFETY: `part` has room for `n x k`, all written (read_dst = false); `gt`, `xm`
                // at row block `t` are `n x rows` and `rows x k` inside g and x.
                unsafe {
                    gemm1((n, k, rows), d, false, gt.at(0, at), xm.at(at, 0));
                    part.set_len(n * k);
                }
                part.extend(column_sums(&g[at * n..(at + rows) * n], nb));
                part
            })
            .collect();
        // SAFETY: the first partial fills the `n * k + nb` elements after dx, then `out` is full.
        unsafe {
            std::ptr::copy_nonoverlapping(parts[0].as_ptr(), tail.ptr, n * k + nb);
            out.set_len(m * k + n * k + nb);
        }
        super::add_partials(&parts[1..], &mut out[m * k..]);
    } else {
        // few rows: dw = g^T @ x blocked over its own rows or columns
        // SAFETY: `tail` has room for the `n x k` dw, all written (read_dst = false); `gt` is
        // `n x m`, `xm` `m x k`; db's `nb` elements follow, copied in before the length is set.
        unsafe {
            par_gemm((n, k, m), tail, None, gt, xm);
            let db = column_sums(g, nb);
            std::ptr::copy_nonoverlapping(db.as_ptr(), tail.ptr.add(n * k), nb);
            out.set_len(m * k + n * k + nb);
        }
    }
    out
}

/// Sums of the `nb` columns of the rows of `g` (nothing when `nb` is 0).
fn column_sums<T: Real>(g: &[T], nb: usize) -> Vec<T> {
    let mut s = vec![T::zero(); nb];
    if nb > 0 {
        for row in g.chunks_exact(nb) {
            for (a, &v) in s.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
    s
}

struct Linear {
    m: usize,
    k: usize,
    n: usize,
    out: Shape,
    /// `Some` for [`linear_gelu`]: the forward leaves its pre-activation here for the backward.
    gelu: Option<Mutex<Option<Tensor>>>,
}

impl Linear {
    fn dims(&self) -> (usize, usize, usize) {
        (self.m, self.k, self.n)
    }

    /// `[dx, dw, db?]` of the inputs `x`, `w`, (`b`).
    fn grads(&self, x: &Tensor, w: &Tensor, g: &Tensor, b: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let g = match &self.gelu {
            Some(pre) => {
                let pre = pre
                    .lock()
                    .expect("linear-gelu: pre-activation lock")
                    .clone();
                let Some(pre) = pre else {
                    candle_core::bail!("linear-gelu: backward before forward")
                };
                &super::gelu::backward_of(&pre, g)?
            }
            None => g,
        };
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
    let y = forward(x, w, b, op.dims());
    let Some(pre) = &op.gelu else {
        return Ok(storage(y, op.out.clone()));
    };
    let h = super::gelu::of_slice(&y);
    let y = Tensor::from_vec(y, op.out.clone(), &candle_core::Device::Cpu)?;
    *pre.lock().expect("linear-gelu: pre-activation lock") = Some(y);
    Ok(storage(h, op.out.clone()))
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
// tasks only read; an `Out` into an output whose blocks the tasks write disjointly.
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Equals the composed `reshape -> matmul -> broadcast_add -> reshape`, forward and all three
    /// gradients, with and without a bias, for outputs cut into row blocks (300 rows, 24
    /// columns) and into column blocks (40 and 20 rows, 300 columns), `dw` from partial sums
    /// (300 and 40 rows) and from one gemm (20 rows), with a weight that is a row block of a
    /// larger one (as q, k, v of the qkv weight).
    /// `linear_gelu` gives the bits of `gelu_erf(linear(..))`: forward and the gradients of x,
    /// w, b (the same kernels; candle's zero-start accumulation adds exact zeros), also on a
    /// second backward through the same graph (the pre-activation is kept, not taken).
    #[test]
    fn linear_gelu_is_linear_then_gelu() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F64, DType::F32] {
            for (xs, n) in [((3, 7, 5), 4), ((1, 3, 5), 9)] {
                let x = Var::from_tensor(&(Tensor::randn(0f64, 1.0, xs, &dev)?.to_dtype(dt)?))?;
                let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, 5), &dev)?.to_dtype(dt)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, n, &dev)?.to_dtype(dt)?)?;
                let probe = Tensor::randn(0f64, 1.0, (xs.0, xs.1, n), &dev)?.to_dtype(dt)?;
                let fused = linear_gelu(&x, &w, &b)?;
                let plain = crate::ops::gelu_erf(&linear(&x, &w, Some(&b))?)?;
                assert_eq!(fused.dims(), plain.dims());
                assert_eq!(rel_diff(&fused, &plain)?, 0.0, "{dt:?} forward");
                let loss = (&fused * &probe)?.sum_all()?;
                let gp = (&plain * &probe)?.sum_all()?.backward()?;
                for pass in 0..2 {
                    let gf = loss.backward()?;
                    for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                        let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                        assert_eq!(rel_diff(a, b)?, 0.0, "{dt:?} d{name}, backward {pass}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_composed_linear() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-5 };
            let big = Var::from_tensor(&Tensor::randn(0f64, 1.0, (310, 20), &dev)?.to_dtype(dt)?)?;
            for (xs, n) in [((3, 100, 20), 24), ((1, 40, 20), 300), ((1, 20, 20), 300)] {
                let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, xs, &dev)?.to_dtype(dt)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, n, &dev)?.to_dtype(dt)?)?;
                let (m, out) = (xs.0 * xs.1, (xs.0, xs.1, n));
                assert_eq!(split_rows(m, n), n == 24, "both splits under test");
                assert_eq!(m > rows_per_partial(m), m > 20, "both dw paths under test");
                assert!(blocks(m.max(n)).len() > 2, "several blocks under test");
                let probe = Tensor::randn(0f64, 1.0, out, &dev)?.to_dtype(dt)?;
                let w = big.narrow(0, 2, n)?;
                for bias in [Some(b.as_tensor()), None] {
                    let fused = linear(&x, &w, bias)?;
                    let y = x.reshape((m, 20))?.matmul(&w.t()?)?;
                    let y = match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    let plain = y.reshape(out)?;
                    assert_eq!(fused.dims(), [out.0, out.1, out.2]);
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
                        assert!(
                            d < tol,
                            "{dt:?} {xs:?} gradient {d} (bias {})",
                            bias.is_some()
                        );
                    }
                    if bias.is_none() {
                        assert!(gf.get(&b).is_none(), "no bias, no bias gradient");
                    }
                }
            }
        }
        Ok(())
    }

    /// One output column or row (gemm's matrix-vector shapes): the same bits on 1 and 3 threads,
    /// and within f32 rounding of an f64 reference.
    #[test]
    fn one_output_column_or_row_does_not_depend_on_the_thread_count() -> Result<()> {
        for (m, k, n) in [(1024, 576, 1), (1, 576, 1024)] {
            let r = |len: usize, s: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((i * 7919 + s) % 1000) as f32 / 500.0 - 1.0)
                    .collect()
            };
            let (x, w, b) = (r(m * k, 1), r(n * k, 2), r(n, 3));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                pool.install(|| forward(&x, &w, Some(&b), (m, k, n)))
            };
            let y = run(1);
            assert_eq!(y, run(3), "{m}x{k}->{n}");
            for (e, &v) in y.iter().enumerate() {
                let (i, j) = (e / n, e % n);
                let want = b[j] as f64
                    + (0..k)
                        .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                        .sum::<f64>();
                assert!(
                    (v as f64 - want).abs() < 1e-3,
                    "{m}x{k}->{n} [{e}]: {v} vs {want}"
                );
            }
        }
        Ok(())
    }

    /// Forward and backward give the same bits on 1 and on 3 threads (2 and 6 blocks), for row
    /// blocks (800 x 11 outputs: blocks of few columns) and column blocks (20 x 800), over a
    /// `k` that gemm sums in two chunks.
    #[test]
    fn results_do_not_depend_on_the_thread_count() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(800, 600, 11), (20, 600, 800)] {
            let r =
                |len: usize| -> Result<Vec<f32>> { Tensor::randn(0f32, 1.0, len, &dev)?.to_vec1() };
            let (x, w, b, g) = (r(m * k)?, r(n * k)?, r(n)?, r(m * n)?);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                pool.install(|| {
                    let cut = blocks(if split_rows(m, n) { m } else { n }).len() - 1;
                    assert_eq!(
                        cut,
                        2 * threads,
                        "{m}x{k}->{n}: blocks on {threads} threads"
                    );
                    (
                        forward(&x, &w, Some(&b), (m, k, n)),
                        backward(&x, &w, &g, (m, k, n), true),
                    )
                })
            };
            assert_eq!(run(1), run(3), "{m}x{k}->{n}");
        }
        Ok(())
    }

    /// On any thread count, `blocks` covers `0..len` in order with blocks that never take gemm's
    /// small-matrix path (over 64 long) unless `len` is one block, and none over `MAX_BLOCK + 16`.
    #[test]
    fn blocks_cover_the_range_and_stay_over_64() {
        for threads in [1, 2, 3, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                for len in (0..3000).chain([8192, 32768]) {
                    let b = blocks(len);
                    assert_eq!((b[0], *b.last().unwrap()), (0, len), "{len} on {threads}");
                    let lens: Vec<usize> = b.windows(2).map(|w| w[1] - w[0]).collect();
                    if lens.len() > 1 {
                        assert!(
                            lens.iter().all(|&l| l > 64 && l <= MAX_BLOCK + 16),
                            "{lens:?}"
                        );
                        assert!(b.iter().all(|&e| e % 16 == 0 || e == len), "{b:?}");
                    }
                }
            });
        }
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
