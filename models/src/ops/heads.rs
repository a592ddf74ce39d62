//! The two matmuls of window attention, per window and head, on token-major operands.
//!
//! q, k and v come out of their linears as `[B_, N, C]` with head `h` in columns
//! `h*hd..(h+1)*hd`. Composed, each is reshaped to `[B_, N, nH, hd]`, transposed to
//! `[B_, nH, N, hd]` and copied contiguous before a batched matmul, and the output goes back the
//! same way: views and copies that candle's backward pays for again (every node's input gradient
//! starts as zeros and is added into). candle's batched matmul also hands each 64x64x32 product to
//! a rayon-parallel gemm, which runs it on one thread while the others wait. Here the head
//! matrices are read and written in place through their strides, one single-threaded gemm per
//! (window, head), windows split over the rayon threads; the backward is the same kernel with
//! other strides.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{dispatch, is_fused, slice, storage, Real};

/// `scores[b, h] = q[b, :, h] @ k[b, :, h]^T`: `q`, `k` `[B_, N, C]` (C = nH * hd) ->
/// `[B_, nH, N, N]`. Differentiable.
pub fn heads_qk(q: &Tensor, k: &Tensor, nh: usize) -> Result<Tensor> {
    let (bw, n, c) = q.dims3()?;
    check(
        "heads-qk",
        q,
        k,
        k.dims() == [bw, n, c] && nh > 0 && c % nh == 0,
        nh,
    )?;
    let hd = c / nh;
    if !is_fused(q) || q.dtype() != k.dtype() {
        let split = |t: &Tensor| t.reshape((bw, n, nh, hd))?.transpose(1, 2)?.contiguous();
        return super::matmul(&split(q)?, &split(k)?.t()?);
    }
    q.contiguous()?.apply_op2(
        &k.contiguous()?,
        HeadsMatmul {
            kind: Kind::Qk,
            bw,
            n,
            nh,
            hd,
        },
    )
}

/// `out[b, :, h] = attn[b, h] @ v[b, :, h]`: `attn` `[B_, nH, N, N]`, `v` `[B_, N, C]` ->
/// `[B_, N, C]`, heads concatenated in the columns (the layout the projection reads).
/// Differentiable.
pub fn heads_av(attn: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (bw, nh, n, _) = attn.dims4()?;
    let c = v.dim(2)?;
    let ok = attn.dims() == [bw, nh, n, n] && v.dims() == [bw, n, c] && c % nh == 0;
    check("heads-av", attn, v, ok, nh)?;
    let hd = c / nh;
    if !is_fused(attn) || attn.dtype() != v.dtype() {
        let v = v.reshape((bw, n, nh, hd))?.transpose(1, 2)?.contiguous()?;
        return super::matmul(attn, &v)?
            .transpose(1, 2)?
            .reshape((bw, n, c));
    }
    attn.contiguous()?.apply_op2(
        &v.contiguous()?,
        HeadsMatmul {
            kind: Kind::Av,
            bw,
            n,
            nh,
            hd,
        },
    )
}

fn check(op: &str, a: &Tensor, b: &Tensor, ok: bool, nh: usize) -> Result<()> {
    if !ok {
        candle_core::bail!(
            "{op}: {:?} and {:?} with {nh} heads: expected q, k [B_, N, C] (heads-qk) or attn \
             [B_, nH, N, N], v [B_, N, C] (heads-av), C divisible by nH",
            a.dims(),
            b.dims()
        )
    }
    Ok(())
}

/// Where head `h` of window `b` of an operand starts (`b * per_window + h * per_head`) and how
/// its matrix is strided.
#[derive(Clone, Copy)]
struct Operand {
    per_window: usize,
    per_head: usize,
    rs: isize,
    cs: isize,
}

/// For `bw` windows of `nh` heads: `out(b, h) [m, n] = a(b, h) [m, k] @ b(b, h) [k, n]`, `out` a
/// new `bw * out.per_window` buffer whose heads together cover every element. Windows are split
/// over rayon; one single-threaded gemm per head.
fn per_head<T: Real>(
    (bw, nh): (usize, usize),
    (m, n, k): (usize, usize, usize),
    (a, ao): (&[T], Operand),
    (b, bo): (&[T], Operand),
    oo: Operand,
) -> Vec<T> {
    let len = bw * oo.per_window;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let windows = bw.div_ceil(32).max(1); // per task; at most 32 tasks
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(windows * oo.per_window)
        .enumerate()
        .for_each(|(t, dst)| {
            for w in 0..dst.len() / oo.per_window {
                let win = t * windows + w;
                for h in 0..nh {
                    let d = &mut dst[w * oo.per_window + h * oo.per_head..];
                    // SAFETY: `d` starts head h of window `win` in the output, whose `m x n`
                    // matrix lies inside this task's chunk by the output strides; `a` and `b`
                    // address `m x k` and `k x n` elements of the contiguous inputs; gemm only
                    // writes `d` (read_dst = false).
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            d.as_mut_ptr().cast::<T>(),
                            oo.cs,
                            oo.rs,
                            false,
                            a.as_ptr().add(win * ao.per_window + h * ao.per_head),
                            ao.cs,
                            ao.rs,
                            b.as_ptr().add(win * bo.per_window + h * bo.per_head),
                            bo.cs,
                            bo.rs,
                            T::zero(),
                            T::one(),
                            false,
                            false,
                            false,
                            Parallelism::None,
                        )
                    }
                }
            }
        });
    // SAFETY: the heads of every window cover its whole output (checked by the callers' shapes),
    // and every element was written by a gemm.
    unsafe { out.set_len(len) };
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `q [B_, N, C], k [B_, N, C] -> [B_, nH, N, N]`.
    Qk,
    /// `attn [B_, nH, N, N], v [B_, N, C] -> [B_, N, C]`.
    Av,
    /// Backward of `Qk`/`Av`: see [`HeadsMatmul::products`].
    Grad(u8),
}

struct HeadsMatmul {
    kind: Kind,
    bw: usize,
    n: usize,
    nh: usize,
    hd: usize,
}

impl HeadsMatmul {
    /// A head's `[N, hd]` matrix in a `[B_, N, C]` tensor, optionally transposed.
    fn tokens(&self, t: bool) -> Operand {
        let c = self.nh * self.hd;
        let (rs, cs) = if t { (1, c as isize) } else { (c as isize, 1) };
        Operand {
            per_window: self.n * c,
            per_head: self.hd,
            rs,
            cs,
        }
    }

    /// A head's `[N, N]` matrix in a `[B_, nH, N, N]` tensor, optionally transposed.
    fn scores(&self, t: bool) -> Operand {
        let n = self.n;
        let (rs, cs) = if t { (1, n as isize) } else { (n as isize, 1) };
        Operand {
            per_window: self.nh * n * n,
            per_head: n * n,
            rs,
            cs,
        }
    }

    /// The product for `kind` of inputs `a`, `b`: `(m, n, k)`, the operands and the output.
    /// Gradients (`g` the output gradient): `Qk` (q, k): `dq = g @ k` (Grad 0), `dk = g^T @ q`
    /// (Grad 1); `Av` (attn, v): `dattn = g @ v^T` (Grad 2), `dv = attn^T @ g` (Grad 3).
    fn products(&self) -> ((usize, usize, usize), Operand, Operand, Operand) {
        let (n, hd) = (self.n, self.hd);
        match self.kind {
            Kind::Qk => (
                (n, n, hd),
                self.tokens(false),
                self.tokens(true),
                self.scores(false),
            ),
            Kind::Av => (
                (n, hd, n),
                self.scores(false),
                self.tokens(false),
                self.tokens(false),
            ),
            // (g, k) -> dq
            Kind::Grad(0) => (
                (n, hd, n),
                self.scores(false),
                self.tokens(false),
                self.tokens(false),
            ),
            // (g, q) -> dk
            Kind::Grad(1) => (
                (n, hd, n),
                self.scores(true),
                self.tokens(false),
                self.tokens(false),
            ),
            // (g, v) -> dattn
            Kind::Grad(2) => (
                (n, n, hd),
                self.tokens(false),
                self.tokens(true),
                self.scores(false),
            ),
            // (attn, g) -> dv
            Kind::Grad(_) => (
                (n, hd, n),
                self.scores(true),
                self.tokens(false),
                self.tokens(false),
            ),
        }
    }

    fn grad(&self, i: u8, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let op = HeadsMatmul {
            kind: Kind::Grad(i),
            bw: self.bw,
            n: self.n,
            nh: self.nh,
            hd: self.hd,
        };
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op)
    }
}

fn run<T: Real>(
    op: &HeadsMatmul,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let a = slice::<T>(s1, l1, "heads-matmul")?;
    let b = slice::<T>(s2, l2, "heads-matmul")?;
    let (mnk, ao, bo, oo) = op.products();
    let out = per_head((op.bw, op.nh), mnk, (a, ao), (b, bo), oo);
    let (bw, n, nh, hd) = (op.bw, op.n, op.nh, op.hd);
    let shape = if matches!(op.kind, Kind::Qk | Kind::Grad(2)) {
        Shape::from((bw, nh, n, n))
    } else {
        Shape::from((bw, n, nh * hd))
    };
    Ok(storage(out, shape))
}

impl CustomOp2 for HeadsMatmul {
    fn name(&self) -> &'static str {
        "heads-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!("heads-matmul", s1, run(self, (s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self.kind {
            Kind::Qk => (Some(self.grad(0, g, b)?), Some(self.grad(1, g, a)?)),
            Kind::Av => (Some(self.grad(2, g, b)?), Some(self.grad(3, a, g)?)),
            Kind::Grad(_) => candle_core::bail!("heads-matmul: no second derivative"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// Both ops equal the composed split-heads -> matmul (-> merge-heads), forward and the
    /// gradients of both inputs, in f64 and f32, with more windows than tasks.
    #[test]
    fn match_composed_attention_matmuls() -> Result<()> {
        let dev = Device::Cpu;
        let (bw, n, nh, hd) = (70, 5, 3, 4);
        let c = nh * hd;
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-5 };
            let var = |s: &[usize]| -> Result<Var> {
                Var::from_tensor(&Tensor::randn(0f64, 1.0, s, &dev)?.to_dtype(dt)?)
            };
            let (q, k, v) = (var(&[bw, n, c])?, var(&[bw, n, c])?, var(&[bw, n, c])?);
            let split = |t: &Tensor| t.reshape((bw, n, nh, hd))?.transpose(1, 2)?.contiguous();
            let fused = heads_av(&heads_qk(&q, &k, nh)?, &v)?;
            let scores = split(&q)?.matmul(&split(&k)?.t()?)?;
            let plain = scores
                .matmul(&split(&v)?)?
                .transpose(1, 2)?
                .reshape((bw, n, c))?;
            assert!(
                rel_diff(&heads_qk(&q, &k, nh)?, &scores)? < tol,
                "{dt:?} scores"
            );
            assert!(rel_diff(&fused, &plain)? < tol, "{dt:?} output");
            let probe = Tensor::randn(0f64, 1.0, (bw, n, c), &dev)?.to_dtype(dt)?;
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gp = (plain * &probe)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let d = rel_diff(gf.get(x).unwrap(), gp.get(x).unwrap())?;
                assert!(d < tol, "{dt:?} d{name}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 6), DType::F32, &dev)?;
        let e = heads_qk(&q, &q, 4).unwrap_err().to_string();
        assert!(
            e.contains("heads-qk: [2, 4, 6] and [2, 4, 6] with 4 heads"),
            "{e}"
        );
        Ok(())
    }
}
