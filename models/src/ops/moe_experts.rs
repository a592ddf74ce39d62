//! The two ends of an MoE layer's expert MLP on its sorted layout ([`crate::moe`]), one graph
//! node each.
//!
//! - [`experts_fc1_gelu`]: gathers the routed tokens' rows into the sorted buffer and runs each
//!   expert's fc1 and GELU on its segment (composed: `index_select -> grouped_linear -> gelu`).
//! - [`experts_combine`]: scales each expert output row by its gate and adds a token's rows into
//!   its output row (composed: `broadcast_mul -> zeros -> index_add`).
//!
//! Composed, candle's backward zero-fills and adds a gradient for each of those six nodes and
//! scatters with a serial `index_add`; here each end is one forward pass and one backward op
//! (`dx | dw | db` and `dy | dgate` packed), and the scatter is a gather over each token's own
//! rows, so tokens are independent tasks and a token's rows add in ascending order (the order of
//! the composed `index_add`). The fc1 node keeps the gathered rows and the pre-activation for its
//! backward, the tensors the composed graph kept. Other devices and dtypes run the composed ops.
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor};

use super::grouped_linear::{segment_gemm, segment_sums, weight_grad, WeightLayout};
use super::{dispatch, gelu, grouped_linear, is_fused, lane_dot, par_items, slice, storage};
use super::{unpack, Real};

/// Where an MoE layer's kept assignments sit: row `r` of the sorted buffer holds token `tok[r]`,
/// expert `e` owns rows `offsets[e]..offsets[e + 1]`, and token `t`'s rows (ascending) are
/// `rows[starts[t]..starts[t + 1]]` (none for a token whose assignments were all dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct SortedRows {
    tok: Vec<u32>,
    offsets: Vec<usize>,
    starts: Vec<usize>,
    rows: Vec<u32>,
}

impl SortedRows {
    /// The layout of `tok.len()` rows over `tokens` tokens; `offsets` = E + 1 non-decreasing row
    /// offsets from 0 to the number of rows.
    pub fn new(tokens: usize, tok: Vec<u32>, offsets: Vec<usize>) -> Result<Self> {
        let n = tok.len();
        if offsets.first() != Some(&0)
            || offsets.last() != Some(&n)
            || offsets.windows(2).any(|p| p[0] > p[1])
        {
            candle_core::bail!("moe rows: offsets {offsets:?} do not split {n} rows")
        }
        if let Some(&t) = tok.iter().find(|&&t| t as usize >= tokens) {
            candle_core::bail!("moe rows: token {t} of {tokens}")
        }
        let mut starts = vec![0usize; tokens + 1];
        for &t in &tok {
            starts[t as usize + 1] += 1;
        }
        for t in 0..tokens {
            starts[t + 1] += starts[t];
        }
        let mut fill = starts[..tokens].to_vec();
        let mut rows = vec![0u32; n];
        for (r, &t) in tok.iter().enumerate() {
            rows[fill[t as usize]] = r as u32;
            fill[t as usize] += 1;
        }
        Ok(Self {
            tok,
            offsets,
            starts,
            rows,
        })
    }

    /// Rows of the sorted buffer.
    pub fn len(&self) -> usize {
        self.tok.len()
    }

    /// Whether no assignment was kept.
    pub fn is_empty(&self) -> bool {
        self.tok.is_empty()
    }

    /// Tokens of the layer's input.
    pub fn tokens(&self) -> usize {
        self.starts.len() - 1
    }

    /// The token of each row.
    pub fn tok(&self) -> &[u32] {
        &self.tok
    }

    /// Row offsets of the experts' segments.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The token of each row as a `u32` tensor (for the composed ops).
    pub fn tok_tensor(&self, dev: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.tok, self.len(), dev)
    }

    /// The rows of token `t`.
    fn rows_of(&self, t: usize) -> &[u32] {
        &self.rows[self.starts[t]..self.starts[t + 1]]
    }
}

/// `gelu_erf(x[tok[r]] @ w[e]^T + b[e])` for each row `r` of expert `e`'s segment: `x [S, C]`,
/// `w [E, hC, C]` (`nn.Linear`'s layout, tutel's `batched_fc1_w`), `b [E, 1, hC]` -> `[N, hC]`.
/// Differentiable in `x`, `w` and `b`.
pub fn experts_fc1_gelu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    rows: &Arc<SortedRows>,
) -> Result<Tensor> {
    let (s, c) = x.dims2()?;
    let (e, h, cw) = w.dims3()?;
    if cw != c || b.dims() != [e, 1, h] || e != rows.experts() || s != rows.tokens() {
        candle_core::bail!(
            "experts_fc1_gelu: x {:?}, w {:?}, b {:?} do not fit {} experts over {} tokens",
            x.dims(),
            w.dims(),
            b.dims(),
            rows.experts(),
            rows.tokens()
        )
    }
    let fused = is_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype();
    if !fused || rows.is_empty() {
        return composed_fc1_gelu(x, w, b, rows);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Fc1Gelu {
            rows: rows.clone(),
            saved: Mutex::new(None),
        },
    )
}

/// `out[t] = sum over token t's rows r of gates[r] * y[r]`: `y [N, C]`, `gates [N]` -> `[S, C]`
/// (zero rows for tokens with no kept assignment). Differentiable in `y` and `gates`.
pub fn experts_combine(y: &Tensor, gates: &Tensor, rows: &Arc<SortedRows>) -> Result<Tensor> {
    let (n, _) = y.dims2()?;
    if n != rows.len() || gates.dims() != [n] {
        candle_core::bail!(
            "experts_combine: y {:?} and gates {:?} do not fit {} rows",
            y.dims(),
            gates.dims(),
            rows.len()
        )
    }
    if !is_fused(y) || gates.dtype() != y.dtype() || rows.is_empty() {
        return composed_combine(y, gates, rows);
    }
    y.contiguous()?
        .apply_op2(&gates.contiguous()?, Combine { rows: rows.clone() })
}

/// [`experts_fc1_gelu`] from candle ops (any device).
fn composed_fc1_gelu(x: &Tensor, w: &Tensor, b: &Tensor, rows: &SortedRows) -> Result<Tensor> {
    let xs = x.index_select(&rows.tok_tensor(x.device())?, 0)?;
    let h = grouped_linear(&xs, w, b, rows.offsets(), WeightLayout::OutIn)?;
    super::gelu_erf(&h)
}

/// [`experts_combine`] from candle ops (any device).
fn composed_combine(y: &Tensor, gates: &Tensor, rows: &SortedRows) -> Result<Tensor> {
    let c = y.dim(1)?;
    let scaled = y.broadcast_mul(&gates.unsqueeze(1)?)?;
    Tensor::zeros((rows.tokens(), c), y.dtype(), y.device())?.index_add(
        &rows.tok_tensor(y.device())?,
        &scaled,
        0,
    )
}

/// `dst[r] = x[tok[r]]` (`c` columns).
fn gather<T: Real>(dst: &mut [T], x: &[T], tok: &[u32], c: usize) {
    par_items(dst, c, |first, out| {
        for (row, &t) in out.chunks_exact_mut(c).zip(&tok[first..]) {
            row.copy_from_slice(&x[t as usize * c..(t as usize + 1) * c]);
        }
    });
}

/// `dst[t] = sum over token t's rows r of scale(r) * y[r]` (`c` columns), rows in ascending
/// order from zero (the composed `index_add`'s order).
fn scatter<T: Real>(dst: &mut [T], y: &[T], rows: &SortedRows, c: usize, gates: Option<&[T]>) {
    par_items(dst, c, |first, out| {
        for (i, o) in out.chunks_exact_mut(c).enumerate() {
            o.fill(T::zero());
            for &r in rows.rows_of(first + i) {
                let r = r as usize;
                let src = &y[r * c..(r + 1) * c];
                match gates {
                    Some(g) => {
                        let gr = g[r];
                        for (a, &v) in o.iter_mut().zip(src) {
                            *a += v * gr;
                        }
                    }
                    None => super::add_assign(o, src),
                }
            }
        }
    });
}

/// The fused [`experts_fc1_gelu`]; `saved` = (gathered rows, pre-activation) for the backward.
struct Fc1Gelu {
    rows: Arc<SortedRows>,
    saved: Mutex<Option<(Tensor, Tensor)>>,
}

fn fc1_fwd<T: Real>(
    op: &Fc1Gelu,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (_, c) = l1.shape().dims2()?;
    let (_, h, _) = l2.shape().dims3()?;
    let (x, w, b) = (
        slice::<T>(s1, l1, "experts-fc1-gelu")?,
        slice::<T>(s2, l2, "experts-fc1-gelu")?,
        slice::<T>(s3, l3, "experts-fc1-gelu")?,
    );
    let n = op.rows.len();
    let mut xs = vec![T::zero(); n * c];
    gather(&mut xs, x, &op.rows.tok, c);
    let mut pre = vec![T::zero(); n * h];
    segment_gemm(
        &mut pre,
        &xs,
        w,
        Some(b),
        op.rows.offsets(),
        (c, h),
        WeightLayout::OutIn,
    );
    let act = gelu::of_slice(&pre);
    let cpu = Device::Cpu;
    *op.saved.lock().expect("experts-fc1-gelu: saved lock") = Some((
        Tensor::from_vec(xs, (n, c), &cpu)?,
        Tensor::from_vec(pre, (n, h), &cpu)?,
    ));
    Ok(storage(act, (n, h)))
}

impl CustomOp3 for Fc1Gelu {
    fn name(&self) -> &'static str {
        "experts-fc1-gelu"
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
        dispatch!(self.name(), s1, fc1_fwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .expect("experts-fc1-gelu: saved lock")
            .clone();
        let Some((xs, pre)) = saved else {
            candle_core::bail!("experts-fc1-gelu: backward before forward")
        };
        let dpre = gelu::backward_of(&pre, g)?;
        let bwd = Fc1Bwd {
            rows: self.rows.clone(),
        };
        let packed = dpre.apply_op3_no_bwd(&xs, w, &bwd)?;
        let mut d = unpack(&packed, &[x.shape(), w.shape(), b.shape()])?.into_iter();
        Ok((d.next(), d.next(), d.next()))
    }
}

/// `(dpre [N, hC], xs [N, C], w [E, hC, C])` -> packed `[dx [S, C] | dw [E, hC, C] | db [E, hC]]`.
struct Fc1Bwd {
    rows: Arc<SortedRows>,
}

fn fc1_bwd<T: Real>(
    op: &Fc1Bwd,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (n, h) = l1.shape().dims2()?;
    let (_, c) = l2.shape().dims2()?;
    let (dpre, xs, w) = (
        slice::<T>(s1, l1, "experts-fc1-bwd")?,
        slice::<T>(s2, l2, "experts-fc1-bwd")?,
        slice::<T>(s3, l3, "experts-fc1-bwd")?,
    );
    let (rows, offsets) = (&op.rows, op.rows.offsets());
    let (s, e) = (rows.tokens(), rows.experts());
    // dx of the sorted rows: dpre @ w[e] (w[e] read as [hC, C])
    let mut dxs = vec![T::zero(); n * c];
    segment_gemm(
        &mut dxs,
        dpre,
        w,
        None,
        offsets,
        (h, c),
        WeightLayout::InOut,
    );
    let mut out = vec![T::zero(); s * c + e * h * c + e * h];
    let (dx, rest) = out.split_at_mut(s * c);
    let (dw, db) = rest.split_at_mut(e * h * c);
    scatter(dx, &dxs, rows, c, None);
    weight_grad(dw, xs, dpre, offsets, (c, h), WeightLayout::OutIn);
    segment_sums(db, dpre, offsets, h);
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for Fc1Bwd {
    fn name(&self) -> &'static str {
        "experts-fc1-bwd"
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
        dispatch!(self.name(), s1, fc1_bwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }
}

/// The fused [`experts_combine`].
struct Combine {
    rows: Arc<SortedRows>,
}

fn combine_fwd<T: Real>(
    op: &Combine,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (_, c) = l1.shape().dims2()?;
    let (y, gates) = (
        slice::<T>(s1, l1, "experts-combine")?,
        slice::<T>(s2, l2, "experts-combine")?,
    );
    let s = op.rows.tokens();
    let mut out = vec![T::zero(); s * c];
    scatter(&mut out, y, &op.rows, c, Some(gates));
    Ok(storage(out, (s, c)))
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "experts-combine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, combine_fwd(self, (s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        y: &Tensor,
        gates: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = CombineBwd {
            rows: self.rows.clone(),
        };
        let packed = g.contiguous()?.apply_op3_no_bwd(y, gates, &bwd)?;
        let mut d = unpack(&packed, &[y.shape(), gates.shape()])?.into_iter();
        Ok((d.next(), d.next()))
    }
}

/// `(g [S, C], y [N, C], gates [N])` -> packed `[dy [N, C] | dgates [N]]`: `dy[r] = gates[r] *
/// g[tok[r]]`, `dgates[r] = y[r] . g[tok[r]]`.
struct CombineBwd {
    rows: Arc<SortedRows>,
}

fn combine_bwd<T: Real>(
    op: &CombineBwd,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (_, c) = l1.shape().dims2()?;
    let (g, y, gates) = (
        slice::<T>(s1, l1, "experts-combine-bwd")?,
        slice::<T>(s2, l2, "experts-combine-bwd")?,
        slice::<T>(s3, l3, "experts-combine-bwd")?,
    );
    let n = op.rows.len();
    let mut out = vec![T::zero(); n * c + n];
    let (dy, dgates) = out.split_at_mut(n * c);
    let dots = par_items(dy, c, |first, chunk| {
        let mut dots = Vec::with_capacity(chunk.len() / c);
        for (i, d) in chunk.chunks_exact_mut(c).enumerate() {
            let r = first + i;
            let t = op.rows.tok[r] as usize;
            let gt = &g[t * c..(t + 1) * c];
            let gr = gates[r];
            for (a, &v) in d.iter_mut().zip(gt) {
                *a = v * gr;
            }
            dots.push(lane_dot(&y[r * c..(r + 1) * c], gt));
        }
        dots
    });
    for (o, v) in dgates.iter_mut().zip(dots.into_iter().flatten()) {
        *o = v;
    }
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for CombineBwd {
    fn name(&self) -> &'static str {
        "experts-combine-bwd"
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
            combine_bwd(self, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Var};

    /// A top-2 layout over 7 tokens and 4 experts: expert 0 empty, token 3 routed twice (to
    /// experts 1 and 3), tokens 2 and 5 dropped everywhere, expert 2 longer than the others.
    fn layout() -> Arc<SortedRows> {
        // expert 1: tokens 0, 3; expert 2: tokens 1, 4, 6, 0; expert 3: tokens 3, 6
        let tok = vec![0, 3, 1, 4, 6, 0, 3, 6];
        Arc::new(SortedRows::new(7, tok, vec![0, 0, 2, 6, 8]).unwrap())
    }

    fn randn(shape: &[usize], dt: DType) -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dt)?)
    }

    #[test]
    fn rows_of_each_token_are_ascending_and_bad_layouts_are_errors() -> Result<()> {
        let r = layout();
        assert_eq!(r.rows_of(0), [0, 5]);
        assert_eq!(r.rows_of(3), [1, 6]);
        assert!(r.rows_of(2).is_empty() && r.rows_of(5).is_empty());
        assert_eq!((r.len(), r.tokens(), r.experts()), (8, 7, 4));
        let err = SortedRows::new(7, vec![0, 1], vec![0, 1]).unwrap_err();
        assert!(err.to_string().contains("do not split 2 rows"), "{err}");
        let err = SortedRows::new(3, vec![0, 3], vec![0, 2]).unwrap_err();
        assert!(err.to_string().contains("token 3 of 3"), "{err}");
        let x = Tensor::zeros((6, 5), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((4, 3, 5), DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros((4, 1, 3), DType::F32, &Device::Cpu)?;
        let err = experts_fc1_gelu(&x, &w, &b, &r).unwrap_err();
        assert!(err.to_string().contains("over 7 tokens"), "{err}");
        let y = Tensor::zeros((8, 5), DType::F32, &Device::Cpu)?;
        let err = experts_combine(&y, &y.sum(1)?.narrow(0, 0, 7)?, &r).unwrap_err();
        assert!(err.to_string().contains("do not fit 8 rows"), "{err}");
        Ok(())
    }

    /// Both nodes against the composed candle ops: the forward and every gradient, f64 and f32.
    /// The combine's forward adds a token's rows in the composed order, so it is bit-identical.
    #[test]
    fn fused_nodes_match_the_composed_ops() -> Result<()> {
        let r = layout();
        let (c, h) = (5, 9);
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let x = randn(&[7, c], dt)?;
            let w = randn(&[4, h, c], dt)?;
            let b = randn(&[4, 1, h], dt)?;
            let y = randn(&[8, c], dt)?;
            let gates = randn(&[8], dt)?;
            let probe_h = Tensor::randn(0f64, 1.0, (8, h), &Device::Cpu)?.to_dtype(dt)?;
            let probe_o = Tensor::randn(0f64, 1.0, (7, c), &Device::Cpu)?.to_dtype(dt)?;

            let fused = experts_fc1_gelu(&x, &w, &b, &r)?;
            let plain = composed_fc1_gelu(&x, &w, &b, &r)?;
            assert_eq!(fused.dims(), [8, h]);
            assert!(rel_diff(&fused, &plain)? < tol, "{dt:?} fc1 forward");
            let gf = (fused * &probe_h)?.sum_all()?.backward()?;
            let gp = (plain * &probe_h)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let (a, e) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert_eq!(a.dims(), v.dims(), "{name}");
                let d = rel_diff(a, e)?;
                assert!(d < tol, "{dt:?} fc1 d{name}: {d}");
            }
            // dropped tokens get exactly zero input gradient, the empty expert zero dw and db
            let dx = gf.get(&x).unwrap();
            for t in [2, 5] {
                assert_eq!(
                    dx.get(t)?
                        .abs()?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                    0.0
                );
            }
            let dw0 = gf.get(&w).unwrap().get(0)?;
            assert_eq!(
                dw0.abs()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
                0.0
            );

            let fused = experts_combine(&y, &gates, &r)?;
            let plain = composed_combine(&y, &gates, &r)?;
            assert_eq!(fused.dims(), [7, c]);
            assert_eq!(rel_diff(&fused, &plain)?, 0.0, "{dt:?} combine forward");
            let gf = (fused * &probe_o)?.sum_all()?.backward()?;
            let gp = (plain * &probe_o)?.sum_all()?.backward()?;
            for (name, v) in [("y", &y), ("gates", &gates)] {
                let (a, e) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert_eq!(a.dims(), v.dims(), "{name}");
                let d = rel_diff(a, e)?;
                assert!(d < tol, "{dt:?} combine d{name}: {d}");
            }
        }
        Ok(())
    }
}
