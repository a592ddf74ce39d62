//! Softmax of Swin-V2 window-attention logits, with the per-head logit scale, the position bias
//! and the shifted-window mask fused in, and a one-pass backward.
//!
//! Composed, this is 4 broadcasts and a 5-op softmax over `[B*nW, nH, N, N]`, each a full pass
//! forward and more backward, where the logit scale's gradient goes through candle's scalar
//! leading-dim reduction.
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{
    dispatch, lane_dot, lane_max, lane_sum, par_items, slice, storage, sum_partials, unpack, Real,
};

/// `softmax(attn * scale[h] + bias[h] + mask[w])` over the last dim, Swin-V2 window attention.
///
/// `attn`: `[B_, nH, N, N]` cosine similarities, B_ = B * nW windows (window-major within an
/// image, so row `b` is window `b % nW`); `scale`: `[nH, 1, 1]` (the clamped, exp'ed logit scale);
/// `bias`: `[nH, N, N]` position bias; `mask`: `[nW, N, N]` shifted-window mask, a constant (no
/// gradient). Off the fused path: [`window_logits`] then candle's composed softmax.
pub fn window_softmax(
    attn: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, nh, n, nw) = check(attn, scale, bias, mask)?;
    let dtype = attn.dtype();
    let fused = super::is_fused(attn)
        && [scale, bias]
            .into_iter()
            .chain(mask)
            .all(|t| t.dtype() == dtype);
    if !fused {
        return candle_nn::ops::softmax(&window_logits(attn, scale, bias, mask)?, D::Minus1);
    }
    let op = WindowSoftmax {
        nh,
        n,
        nw,
        mask: mask.map(|m| m.contiguous()).transpose()?,
    };
    attn.contiguous()?
        .apply_op3(&scale.contiguous()?, &bias.contiguous()?, op)
}

/// The logits of [`window_softmax`] composed from candle ops (its fallback, and the reference in
/// tests): `attn * scale + bias`, plus `mask` broadcast over images and heads.
pub fn window_logits(
    attn: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (bw, nh, n, nw) = check(attn, scale, bias, mask)?;
    let z = super::add_bias(&attn.broadcast_mul(scale)?, bias)?;
    match mask {
        None => Ok(z),
        Some(m) => z
            .reshape((bw / nw, nw, nh, n, n))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((bw, nh, n, n)),
    }
}

/// `(B_, nH, N, nW)` after checking the shapes (nW = 1 without a mask).
fn check(
    attn: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(usize, usize, usize, usize)> {
    let (bw, nh, n, n2) = attn.dims4()?;
    let nw = match mask {
        Some(m) => m.dim(0)?,
        None => 1,
    };
    let mask_ok = mask.is_none_or(|m| m.dims() == [nw, n, n] && nw > 0 && bw % nw == 0);
    if n != n2 || scale.dims() != [nh, 1, 1] || bias.dims() != [nh, n, n] || !mask_ok {
        candle_core::bail!(
            "window-softmax: attn {:?}, scale {:?}, bias {:?}, mask {:?}: expected [B_, nH, N, N], \
             [nH, 1, 1], [nH, N, N], [nW, N, N] with nW dividing B_",
            attn.dims(),
            scale.dims(),
            bias.dims(),
            mask.map(|m| m.dims().to_vec())
        )
    }
    Ok((bw, nh, n, nw))
}

struct WindowSoftmax {
    nh: usize,
    n: usize,
    nw: usize,
    /// `[nW, N, N]` contiguous, the dtype of `attn`.
    mask: Option<Tensor>,
}

/// One `(window, head)` map: `y = softmax(a * s + bias (+ mask))` row by row.
fn softmax_map<T: Real>(y: &mut [T], a: &[T], s: T, bias: &[T], mask: Option<&[T]>, n: usize) {
    for (i, (yr, ar)) in y.chunks_exact_mut(n).zip(a.chunks_exact(n)).enumerate() {
        let br = &bias[i * n..][..n];
        for ((o, &v), &b) in yr.iter_mut().zip(ar).zip(br) {
            *o = v * s + b;
        }
        if let Some(m) = mask {
            for (o, &mv) in yr.iter_mut().zip(&m[i * n..][..n]) {
                *o += mv;
            }
        }
        softmax_row(yr);
    }
}

mimlab_engine::wide_kernel! {
/// `y = softmax(y)` in place: 8-lane max and sum, f32 with the vectorizable `exp_f32`
/// (relative error < 3e-7; libm's scalar `expf` was ~2% of a micro SimMIM step).
/// Probabilities below the normal range are exactly 0 ([`Real::flush_subnormal`]): the shifted
/// windows' -100 mask made 8-16% of tiny_w8's attention entries ~1e-44, which slow every product
/// they enter on Intel cores. Each flushed entry was below 1.2e-38, so a row loses less than
/// N * 1.2e-38 of its mass: nothing an f32 output can show.
fn softmax_row<T: Real>(y: &mut [T]) {
    let max = lane_max(y);
    for o in y.iter_mut() {
        *o = (*o - max).exp_fast();
    }
    let sum = lane_sum(y, |v| v);
    for o in y.iter_mut() {
        *o = (*o / sum).flush_subnormal();
    }
}
}

fn forward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    op: &WindowSoftmax,
) -> Result<(CpuStorage, Shape)> {
    let name = "window-softmax";
    let a = slice::<T>(s1, l1, name)?;
    let scale = slice::<T>(s2, l2, name)?;
    let bias = slice::<T>(s3, l3, name)?;
    let (nh, n, nw) = (op.nh, op.n, op.nw);
    let nn = n * n;
    // Invariant: `window_softmax` made the mask contiguous, in attn's dtype.
    let guard = op.mask.as_ref().map(|m| m.storage_and_layout());
    let mask = match &guard {
        Some((s, l)) => match &**s {
            candle_core::Storage::Cpu(s) => Some(slice::<T>(s, l, name)?),
            _ => candle_core::bail!("{name}: the mask is not on the CPU"),
        },
        None => None,
    };
    let mut y = vec![T::zero(); a.len()];
    // items: one (window, head) map of N*N
    par_items(&mut y, nn, |first, out| {
        for (k, ym) in out.chunks_exact_mut(nn).enumerate() {
            let (b, h) = ((first + k) / nh, (first + k) % nh);
            let am = &a[(first + k) * nn..][..nn];
            let mm = mask.map(|m| &m[(b % nw) * nn..][..nn]);
            softmax_map(ym, am, scale[h], &bias[h * nn..][..nn], mm, n);
        }
    });
    Ok(storage(y, l1.shape().clone()))
}

impl CustomOp3 for WindowSoftmax {
    fn name(&self) -> &'static str {
        "window-softmax"
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
        dispatch!(self.name(), s1, forward((s1, l1), (s2, l2), (s3, l3), self))
    }

    fn bwd(
        &self,
        attn: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let bwd = WindowSoftmaxBwd {
            nh: self.nh,
            n: self.n,
            scale: scale.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        };
        let packed = attn.apply_op3_no_bwd(y, &grad.contiguous()?, &bwd)?;
        let mut g = unpack(&packed, &[attn.shape(), scale.shape(), bias.shape()])?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

/// `(attn, y, grad)` -> packed `[d_attn | d_scale | d_bias]`.
struct WindowSoftmaxBwd {
    nh: usize,
    n: usize,
    /// The forward's scale per head (exact: f32 and f64 widen to f64 losslessly).
    scale: Vec<f64>,
}

fn backward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    op: &WindowSoftmaxBwd,
) -> Result<(CpuStorage, Shape)> {
    let name = "window-softmax-bwd";
    let a = slice::<T>(s1, l1, name)?;
    let y = slice::<T>(s2, l2, name)?;
    let g = slice::<T>(s3, l3, name)?;
    let (nh, n) = (op.nh, op.n);
    let nn = n * n;
    let scale: Vec<T> = op.scale.iter().map(|&s| T::from_f64(s)).collect();
    let mut out = vec![T::zero(); a.len() + nh + nh * nn];
    let (d_attn, tail) = out.split_at_mut(a.len());
    // Softmax backward dz = y * (g - sum_j g y); then through z = a * s + bias + mask:
    // d_attn = dz * s[h], d_scale[h] = sum dz * a, d_bias[h] = sum over windows of dz.
    // Each task returns its partial (d_scale in f64 | d_bias).
    let parts = par_items(d_attn, nn, |first, da| {
        let mut ds = vec![0f64; nh];
        let mut db = vec![T::zero(); nh * nn];
        for (k, dm) in da.chunks_exact_mut(nn).enumerate() {
            let h = (first + k) % nh;
            let at = (first + k) * nn;
            let (am, ym, gm) = (&a[at..][..nn], &y[at..][..nn], &g[at..][..nn]);
            let dbm = &mut db[h * nn..][..nn];
            let mut dsh = T::zero();
            for i in 0..n {
                let r = i * n..(i + 1) * n;
                let (ar, yr, gr) = (&am[r.clone()], &ym[r.clone()], &gm[r.clone()]);
                let dot = lane_dot(yr, gr);
                let (dr, br) = (&mut dm[r.clone()], &mut dbm[r]);
                for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                    // dz, 0 where y was flushed; subnormal dz flushed as y is in the forward
                    *d = (yv * (gv - dot)).flush_subnormal();
                }
                dsh += lane_dot(dr, ar);
                for (b, &d) in br.iter_mut().zip(dr.iter()) {
                    *b += d;
                }
                for d in dr.iter_mut() {
                    *d *= scale[h];
                }
            }
            ds[h] += dsh.to_f64();
        }
        (ds, db)
    });
    let (ts, tb) = tail.split_at_mut(nh);
    let mut ds = vec![0f64; nh];
    for (p, _) in &parts {
        for (a, &b) in ds.iter_mut().zip(p) {
            *a += b;
        }
    }
    for (t, &v) in ts.iter_mut().zip(&ds) {
        *t = T::from_f64(v);
    }
    let dbs: Vec<Vec<T>> = parts.into_iter().map(|(_, db)| db).collect();
    sum_partials(&dbs, tb);
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for WindowSoftmaxBwd {
    fn name(&self) -> &'static str {
        "window-softmax-bwd"
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
            backward((s1, l1), (s2, l2), (s3, l3), self)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{Device, Var};

    /// Random inputs `(attn, scale, bias, mask)`: B_ = 6, nW = 3, nH = 2, N = 16; attn in [-1, 1]
    /// like cosine similarities, a logit scale up to 100 as in training, a -100 mask.
    fn inputs(dtype: DType) -> Result<(Var, Var, Var, Tensor)> {
        let dev = Device::Cpu;
        let (bw, nw, nh, n) = (6, 3, 2, 16);
        let attn = Tensor::rand(-1f64, 1.0, (bw, nh, n, n), &dev)?;
        let scale = Tensor::new(&[3.0f64, 11.0], &dev)?.reshape((nh, 1, 1))?;
        let bias = (Tensor::rand(0f64, 16.0, (nh, n, n), &dev)?).to_dtype(dtype)?;
        let m: Vec<f64> = (0..nw * n * n)
            .map(|k| {
                if (k * 7 + k / 5) % 3 == 0 {
                    -100.0
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(m, (nw, n, n), &dev)?.to_dtype(dtype)?;
        Ok((
            Var::from_tensor(&attn.to_dtype(dtype)?)?,
            Var::from_tensor(&scale.to_dtype(dtype)?)?,
            Var::from_tensor(&bias)?,
            mask,
        ))
    }

    /// Forward and gradients against the composed candle ops computed in f64 from the same
    /// inputs. f32 tolerances: the vectorized `exp_f32` (relative error < 3e-7) and 8-lane sums;
    /// `d_scale` is a sum over every logit with cancellation (softmax rows' gradients sum to
    /// zero). Over 200 random draws the worst f32 errors were 1.6e-6 (d_attn), 1.7e-5 (d_scale)
    /// and 9.3e-7 (d_bias); candle's composed f32 ops gave 1.1e-6, 7.1e-6 and 8.8e-7.
    #[test]
    fn window_softmax_matches_composed_ops() -> Result<()> {
        let f64_tol = [1e-12; 4];
        let f32_tol = [2e-6, 5e-6, 6e-5, 3e-6]; // forward, d_attn, d_scale, d_bias
        for (dtype, tol) in [(DType::F64, f64_tol), (DType::F32, f32_tol)] {
            for with_mask in [true, false] {
                let (attn, scale, bias, mask) = inputs(dtype)?;
                let r = Tensor::randn(0f64, 1.0, attn.shape(), &Device::Cpu)?;
                let fused = window_softmax(&attn, &scale, &bias, with_mask.then_some(&mask))?;
                let gf = (&fused * &r.to_dtype(dtype)?)?.sum_all()?.backward()?;
                // the reference: composed ops in f64 on the same (rounded) inputs
                let up = |v: &Var| -> Result<Var> { Var::from_tensor(&v.to_dtype(DType::F64)?) };
                let (a, s, b) = (up(&attn)?, up(&scale)?, up(&bias)?);
                let m = mask.to_dtype(DType::F64)?;
                let logits = window_logits(&a, &s, &b, with_mask.then_some(&m))?;
                let plain = candle_nn::ops::softmax(&logits, D::Minus1)?;
                let d = rel_diff(&fused, &plain)?;
                assert!(d < tol[0], "{dtype:?} mask {with_mask}: forward {d}");
                let gp = (&plain * &r)?.sum_all()?.backward()?;
                let pairs = [
                    ("attn", &attn, &a),
                    ("scale", &scale, &s),
                    ("bias", &bias, &b),
                ];
                for (i, (name, v, v64)) in pairs.into_iter().enumerate() {
                    let d = rel_diff(gf.get(v).unwrap(), gp.get(v64).unwrap())?;
                    assert!(d < tol[i + 1], "{dtype:?} mask {with_mask}: d_{name} {d}");
                }
            }
        }
        Ok(())
    }

    /// Issue 22: with the shifted-window mask (-100) and a large logit scale, candle's composed
    /// softmax gives subnormal probabilities (the case this guards against is really there);
    /// the fused op gives none, forward or backward, and its probabilities differ from the
    /// composed f64 ones by less than 1.2e-38 * N absolute (the flushed mass), its gradients
    /// by the usual f32 tolerance.
    #[test]
    fn no_subnormal_reaches_the_attention_products() -> Result<()> {
        let (attn, scale, bias, mask) = inputs(DType::F32)?;
        // scale 11 on cosines in [-1, 1] and -100 on masked logits: e^-100 ~ 4e-44 < 1.2e-38
        let subnormal = |t: &Tensor| -> Result<usize> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .filter(|v| **v != 0.0 && v.abs() < f32::MIN_POSITIVE)
                .count())
        };
        let composed =
            candle_nn::ops::softmax_last_dim(&window_logits(&attn, &scale, &bias, Some(&mask))?)?;
        let seen = subnormal(&composed)?;
        assert!(
            seen > 100,
            "the inputs make only {seen} subnormal probabilities"
        );
        let y = window_softmax(&attn, &scale, &bias, Some(&mask))?;
        assert_eq!(subnormal(&y)?, 0);
        let want = candle_nn::ops::softmax_last_dim(&window_logits(
            &attn.to_dtype(DType::F64)?,
            &scale.to_dtype(DType::F64)?,
            &bias.to_dtype(DType::F64)?,
            Some(&mask.to_dtype(DType::F64)?),
        )?)?;
        let d = (y.to_dtype(DType::F64)? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        // exp_f32 (3e-7 relative) on probabilities up to 1, plus the flushed mass
        assert!(d < 1e-6, "probabilities differ by {d}");
        let r = Tensor::randn(0f32, 1.0, y.shape(), y.device())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let da = grads.get(&attn).unwrap();
        assert_eq!(subnormal(da)?, 0);
        // where y is 0 the logit gets no gradient, as softmax's own backward gives there
        let zero_y: Vec<bool> = y
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| *v == 0.0)
            .collect();
        let dav = da.flatten_all()?.to_vec1::<f32>()?;
        assert!(zero_y.iter().zip(&dav).all(|(z, d)| !z || *d == 0.0));
        assert!(zero_y.iter().filter(|z| **z).count() >= seen);
        Ok(())
    }

    #[test]
    fn window_softmax_eval_equals_fused_softmax_kernel() -> Result<()> {
        // f32 forward as the model ran it outside training: composed logits + candle's kernel
        let (attn, scale, bias, mask) = inputs(DType::F32)?;
        let fused = window_softmax(&attn, &scale, &bias, Some(&mask))?;
        let z = window_logits(&attn, &scale, &bias, Some(&mask))?;
        let kernel = candle_nn::ops::softmax_last_dim(&z)?;
        let d = rel_diff(&fused, &kernel)?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    #[test]
    fn window_softmax_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (bw, nw, nh, n) = (4, 2, 2, 3);
        let a0: Vec<f64> = Tensor::rand(-1f64, 1.0, bw * nh * n * n, &dev)?.to_vec1()?;
        let s0 = vec![2.0, 0.7];
        let b0: Vec<f64> = Tensor::rand(0f64, 3.0, nh * n * n, &dev)?.to_vec1()?;
        let m: Vec<f64> = (0..nw * n * n)
            .map(|k| -((k % 4 == 1) as u8 as f64))
            .collect();
        let mask = Tensor::from_vec(m, (nw, n, n), &dev)?;
        let r = Tensor::randn(0f64, 1.0, (bw, nh, n, n), &dev)?;
        let shapes: [&[usize]; 3] = [&[bw, nh, n, n], &[nh, 1, 1], &[nh, n, n]];
        let loss = |p: &[Vec<f64>; 3]| -> Result<f64> {
            let t: Vec<Tensor> = (0..3)
                .map(|k| Tensor::from_slice(&p[k], shapes[k], &dev))
                .collect::<Result<_>>()?;
            let y = window_softmax(&t[0], &t[1], &t[2], Some(&mask))?;
            (y * &r)?.sum_all()?.to_scalar::<f64>()
        };
        let p0 = [a0, s0, b0];
        let vars: Vec<Var> = (0..3)
            .map(|k| Var::from_slice(&p0[k], shapes[k], &dev))
            .collect::<Result<_>>()?;
        let y = window_softmax(&vars[0], &vars[1], &vars[2], Some(&mask))?;
        let g = (y * &r)?.sum_all()?.backward()?;
        let h = 1e-6;
        for (which, v) in vars.iter().enumerate() {
            let grad: Vec<f64> = g.get(v).unwrap().flatten_all()?.to_vec1()?;
            for (k, &an) in grad.iter().enumerate() {
                let mut p = p0.clone();
                p[which][k] += h;
                let up = loss(&p)?;
                p[which][k] -= 2.0 * h;
                let down = loss(&p)?;
                let num = (up - down) / (2.0 * h);
                assert!(
                    (num - an).abs() < 1e-7 * (1.0 + an.abs()),
                    "{which}[{k}]: {num} vs {an}"
                );
            }
        }
        Ok(())
    }
}
