//! Grouped linear layer: the expert MLPs of an MoE layer on a sorted layout.
//!
//! The kept assignments of an MoE layer are laid out expert by expert in one `[N, K]` buffer
//! (rows `offsets[e]..offsets[e + 1]` belong to expert `e`), and [`grouped_linear`] multiplies
//! each segment by its own expert's weight. Compared with padding every expert to the largest
//! load and running one batched matmul, the cost is exactly the N real rows whatever the number
//! of experts, and nothing downstream (GELU, dropout) runs on padding. On the CPU the segments are
//! cut into row tiles that rayon runs in parallel, one single-threaded gemm each, so many small
//! experts keep both cores busy; the backward is one node: two more grouped gemms (`dx`, `dw`) and
//! a segment sum (`db`, rows added in order; candle's `sum_keepdim(0)` over each segment, a
//! strided scalar loop, was 15% of an MoE layer's training step). Other devices use a
//! per-expert loop of candle matmuls (same numbers).
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{add_assign, dispatch, slice, storage, unpack, Real};

/// How the expert weights `w [E, ., .]` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `w[e]` is `[K, M]`: `y = x @ w[e]` (tutel's `batched_fc2_w`).
    InOut,
    /// `w[e]` is `[M, K]`: `y = x @ w[e]^T` (tutel's `batched_fc1_w`, `nn.Linear`'s layout).
    OutIn,
}

/// `y[r] = x[r] @ W_e + b[e]` for the rows `r` of segment `e`: `x [N, K]`, `w [E, K, M]` or
/// `[E, M, K]` (see [`WeightLayout`]), `b [E, 1, M]`, `offsets` = E + 1 non-decreasing row
/// offsets from 0 to N. Returns `[N, M]`; differentiable in `x`, `w` and `b`.
pub fn grouped_linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    offsets: &[usize],
    layout: WeightLayout,
) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (e, d1, d2) = w.dims3()?;
    let (kw, m) = match layout {
        WeightLayout::InOut => (d1, d2),
        WeightLayout::OutIn => (d2, d1),
    };
    if kw != k || b.dims() != [e, 1, m] {
        candle_core::bail!(
            "grouped_linear: x {:?}, w {:?} ({layout:?}) and b {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    if offsets.len() != e + 1
        || offsets[0] != 0
        || offsets[e] != n
        || offsets.windows(2).any(|p| p[0] > p[1])
    {
        candle_core::bail!("grouped_linear: offsets {offsets:?} do not split {n} rows into {e}")
    }
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype();
    if !fused {
        return composed(x, w, b, offsets, layout);
    }
    if n == 0 {
        return Tensor::zeros((0, m), x.dtype(), x.device());
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        GroupedLinear {
            offsets: offsets.to_vec(),
            layout,
        },
    )
}

/// The same product from candle ops (any device): a matmul per non-empty segment.
fn composed(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    offsets: &[usize],
    layout: WeightLayout,
) -> Result<Tensor> {
    let m = b.dim(2)?;
    let mut parts = vec![];
    for (e, seg) in offsets.windows(2).enumerate() {
        let rows = seg[1] - seg[0];
        if rows == 0 {
            continue;
        }
        let we = w.get(e)?;
        let we = match layout {
            WeightLayout::InOut => we,
            WeightLayout::OutIn => we.t()?,
        };
        let y = x.narrow(0, seg[0], rows)?.matmul(&we)?;
        parts.push(y.broadcast_add(&b.get(e)?)?);
    }
    if parts.is_empty() {
        return Tensor::zeros((0, m), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

/// Rows per parallel tile of the forward / `dx` gemms: large enough that packing the expert's
/// weight once per tile is negligible, small enough to split a few big experts over the cores.
const TILE_ROWS: usize = 128;

/// Row-major strides `(row, col)` of expert `e`'s weight as a `[K, M]` matrix, and its offset.
fn weight_view(layout: WeightLayout, k: usize, m: usize) -> (isize, isize) {
    match layout {
        WeightLayout::InOut => (m as isize, 1),
        WeightLayout::OutIn => (1, k as isize),
    }
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// `dst [N, M] (= bias rows if given) += x [N, K] @ W_e` per segment. `w` holds E matrices of
/// K*M elements viewed through `layout`.
pub(super) fn segment_gemm<T: WithDType>(
    dst: &mut [T],
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    offsets: &[usize],
    (k, m): (usize, usize),
    layout: WeightLayout,
) {
    let (w_rs, w_cs) = weight_view(layout, k, m);
    // tiles: (expert, first row, rows), in row order, so they tile `dst` front to back
    let n = *offsets.last().unwrap_or(&0);
    let tile = TILE_ROWS.max(n.div_ceil(4 * threads())).min(TILE_ROWS * 4);
    let mut tiles = vec![];
    for (e, seg) in offsets.windows(2).enumerate() {
        // equal tiles per segment (no thin remainder tile)
        let len = seg[1] - seg[0];
        let parts = len.div_ceil(tile);
        for p in 0..parts {
            let (a, b) = (seg[0] + p * len / parts, seg[0] + (p + 1) * len / parts);
            tiles.push((e, a, b - a));
        }
    }
    let mut jobs = Vec::with_capacity(tiles.len());
    let mut rest = dst;
    for &(e, r, rows) in &tiles {
        let (head, tail) = rest.split_at_mut(rows * m);
        jobs.push((e, r, rows, head));
        rest = tail;
    }
    jobs.into_par_iter().for_each(|(e, r, rows, out)| {
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(m) {
                row.copy_from_slice(&b[e * m..(e + 1) * m]);
            }
        }
        // SAFETY: `out` is `rows x m` row-major; `x[r..r + rows]` is `rows x k` row-major and
        // `w[e]` holds k*m elements read through the strides of `weight_view`.
        unsafe {
            gemm::gemm(
                rows,
                m,
                k,
                out.as_mut_ptr(),
                1,
                m as isize,
                bias.is_some(),
                x[r * k..].as_ptr(),
                1,
                k as isize,
                w[e * k * m..].as_ptr(),
                w_cs,
                w_rs,
                T::one(),
                T::one(),
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    });
}

/// `dst[e] = a_seg^T @ b_seg` for each segment: `a [N, P]`, `b [N, Q]`, `dst [E, P, Q]`
/// (an empty segment gives zeros).
pub(super) fn segment_outer<T: WithDType>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    offsets: &[usize],
    p: usize,
    q: usize,
) {
    let busy = offsets.windows(2).filter(|s| s[1] > s[0]).count();
    // few experts: parallelize inside each gemm; many: one expert per task
    let inner = busy < threads();
    let run = |e: usize, out: &mut [T]| {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        if r1 == r0 {
            out.fill(T::zero());
            return;
        }
        let par = if inner && threads() > 1 {
            Parallelism::Rayon(threads())
        } else {
            Parallelism::None
        };
        // the gemm's output rows are the smaller side, so its packed lhs panel is the smaller
        // operand (tried against gemm's packing, 6% of an E=32 training step in perf: no
        // measurable change; kept, as it never packs more)
        let (m, n, lhs, lhs_s, rhs, rhs_s, dst_s) = if p <= q {
            // out = a^T @ b: lhs a^T (`p x rows`), rhs b (`rows x q`), out row-major
            (
                p,
                q,
                a,
                (p as isize, 1),
                b,
                (1, q as isize),
                (1, q as isize),
            )
        } else {
            // out^T = b^T @ a: lhs b^T (`q x rows`), rhs a (`rows x p`), out read column-major
            (
                q,
                p,
                b,
                (q as isize, 1),
                a,
                (1, p as isize),
                (q as isize, 1),
            )
        };
        // SAFETY: `out` holds p*q elements addressed through `dst_s` (column, row strides) as an
        // `m x n` matrix; lhs = rows r0..r1 of its operand read transposed (`m x rows`), rhs =
        // rows r0..r1 of the other as `rows x n`; both operands have r1 rows of their width.
        unsafe {
            gemm::gemm(
                m,
                n,
                r1 - r0,
                out.as_mut_ptr(),
                dst_s.0,
                dst_s.1,
                false,
                lhs[r0 * m..].as_ptr(),
                lhs_s.0,
                lhs_s.1,
                rhs[r0 * n..].as_ptr(),
                rhs_s.0,
                rhs_s.1,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                par,
            )
        }
    };
    if inner {
        dst.chunks_exact_mut(p * q)
            .enumerate()
            .for_each(|(e, out)| run(e, out));
    } else {
        dst.par_chunks_exact_mut(p * q)
            .enumerate()
            .for_each(|(e, out)| run(e, out));
    }
}

struct GroupedLinear {
    offsets: Vec<usize>,
    layout: WeightLayout,
}

fn linear_fwd<T: WithDType>(
    op: &GroupedLinear,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, k) = l1.shape().dims2()?;
    let m = l3.shape().dims3()?.2;
    let (x, w, b) = (
        slice::<T>(s1, l1, "grouped-linear")?,
        slice::<T>(s2, l2, "grouped-linear")?,
        slice::<T>(s3, l3, "grouped-linear")?,
    );
    let mut out = vec![T::zero(); n * m];
    segment_gemm(&mut out, x, w, Some(b), &op.offsets, (k, m), op.layout);
    Ok(storage(out, (n, m)))
}

impl CustomOp3 for GroupedLinear {
    fn name(&self) -> &'static str {
        "grouped-linear"
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
        dispatch!(self.name(), s1, linear_fwd(self, s1, l1, s2, l2, s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let bwd = GroupedLinearBwd {
            offsets: self.offsets.clone(),
            layout: self.layout,
            experts: w.dim(0)?,
        };
        let packed = grad.contiguous()?.apply_op3_no_bwd(x, w, &bwd)?;
        let mut d = unpack(&packed, &[x.shape(), w.shape(), b.shape()])?.into_iter();
        Ok((d.next(), d.next(), d.next()))
    }
}

/// `W_e^T` as a matrix is the other layout of the same storage.
pub(super) fn flipped(layout: WeightLayout) -> WeightLayout {
    match layout {
        WeightLayout::InOut => WeightLayout::OutIn,
        WeightLayout::OutIn => WeightLayout::InOut,
    }
}

/// `dst[e] = sum of the rows of segment e of g [N, M]` (`dst [E, M]`; an empty segment gives
/// zeros): a bias gradient. Rows are added in order, so the result does not depend on the
/// thread count.
pub(super) fn segment_sums<T: Real>(dst: &mut [T], g: &[T], offsets: &[usize], m: usize) {
    let run = |e: usize, out: &mut [T]| {
        out.fill(T::zero());
        for row in g[offsets[e] * m..offsets[e + 1] * m].chunks_exact(m) {
            add_assign(out, row);
        }
    };
    if offsets.len() > 2 && threads() > 1 {
        dst.par_chunks_exact_mut(m)
            .enumerate()
            .for_each(|(e, out)| run(e, out));
    } else {
        dst.chunks_exact_mut(m)
            .enumerate()
            .for_each(|(e, out)| run(e, out));
    }
}

/// `(g, x, w)` -> packed `[dx | dw | db]`: `dx = g @ W_e^T` per segment, `dw[e] = x_seg^T @
/// g_seg` (`InOut`, `[K, M]`) or `g_seg^T @ x_seg` (`OutIn`, `[M, K]`), `db[e]` = the segment's
/// gradient rows summed. One node, so candle's backward adds nothing per gradient.
struct GroupedLinearBwd {
    offsets: Vec<usize>,
    layout: WeightLayout,
    experts: usize,
}

/// `dw` of `g [N, M]` and `x [N, K]` into `dst` (`E * K * M` elements, laid out as `layout`).
pub(super) fn weight_grad<T: WithDType>(
    dst: &mut [T],
    x: &[T],
    g: &[T],
    offsets: &[usize],
    (k, m): (usize, usize),
    layout: WeightLayout,
) {
    match layout {
        WeightLayout::InOut => segment_outer(dst, x, g, offsets, k, m),
        WeightLayout::OutIn => segment_outer(dst, g, x, offsets, m, k),
    }
}

fn linear_bwd<T: Real>(
    op: &GroupedLinearBwd,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (n, m) = l1.shape().dims2()?;
    let (_, k) = l2.shape().dims2()?;
    let (g, x, w) = (
        slice::<T>(s1, l1, "grouped-linear-bwd")?,
        slice::<T>(s2, l2, "grouped-linear-bwd")?,
        slice::<T>(s3, l3, "grouped-linear-bwd")?,
    );
    let e = op.experts;
    let mut out = vec![T::zero(); n * k + e * k * m + e * m];
    let (dx, rest) = out.split_at_mut(n * k);
    let (dw, db) = rest.split_at_mut(e * k * m);
    segment_gemm(dx, g, w, None, &op.offsets, (m, k), flipped(op.layout));
    weight_grad(dw, x, g, &op.offsets, (k, m), op.layout);
    segment_sums(db, g, &op.offsets, m);
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for GroupedLinearBwd {
    fn name(&self) -> &'static str {
        "grouped-linear-bwd"
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
            linear_bwd(self, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Forward and all three gradients equal the per-expert candle matmuls, for both layouts,
    /// with empty segments (first, middle, last) and segments longer than one tile.
    #[test]
    fn matches_per_expert_matmuls_with_empty_segments() -> Result<()> {
        let dev = Device::Cpu;
        let (k, m) = (7, 5);
        let offsets = [0, 0, 3, 3, 300, 301, 301];
        let (e, n) = (offsets.len() - 1, offsets[offsets.len() - 1]);
        for dt in [DType::F64, DType::F32] {
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let wshape = match layout {
                    WeightLayout::InOut => (e, k, m),
                    WeightLayout::OutIn => (e, m, k),
                };
                let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (n, k), &dev)?.to_dtype(dt)?)?;
                let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, wshape, &dev)?.to_dtype(dt)?)?;
                let b =
                    Var::from_tensor(&Tensor::randn(0f64, 1.0, (e, 1, m), &dev)?.to_dtype(dt)?)?;
                let probe = Tensor::randn(0f64, 1.0, (n, m), &dev)?.to_dtype(dt)?;
                let fused = grouped_linear(&x, &w, &b, &offsets, layout)?;
                let plain = composed(&x, &w, &b, &offsets, layout)?;
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
                assert_eq!(fused.dims(), [n, m]);
                assert!(max_diff(&fused, &plain) < tol, "{dt:?} {layout:?} forward");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gp = (plain * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    let (a, c) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                    assert_eq!(a.dims(), v.dims(), "{name}");
                    let d = max_diff(a, c);
                    assert!(d < tol * 10.0, "{dt:?} {layout:?} d{name}: {d}");
                }
                // the empty experts get exactly zero weight and bias gradients
                for empty in [0, 2, 5] {
                    let dw = gf.get(&w).unwrap().get(empty)?;
                    assert_eq!(max_diff(&dw, &dw.zeros_like()?), 0.0);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_offsets_and_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((2, 3, 5), DType::F32, &dev)?;
        let b = Tensor::zeros((2, 1, 5), DType::F32, &dev)?;
        let err = grouped_linear(&x, &w, &b, &[0, 1, 3], WeightLayout::InOut).unwrap_err();
        assert!(
            err.to_string().contains("do not split 4 rows into 2"),
            "{err}"
        );
        let err = grouped_linear(&x, &w, &b, &[0, 5, 4], WeightLayout::InOut).unwrap_err();
        assert!(err.to_string().contains("offsets [0, 5, 4]"), "{err}");
        let err = grouped_linear(&x, &w, &b, &[0, 2, 4], WeightLayout::OutIn).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        Ok(())
    }
}
