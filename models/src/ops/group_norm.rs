//! GroupNorm over channels-first maps, optionally followed by ReLU, with a one-pass backward.
//!
//! candle_nn's `GroupNorm` is composed of ~12 elementwise ops and reductions (each a pass over
//! the map, each with its own backward and gradient accumulation), and the ReLU after it of two
//! more; the FCOS towers and UPerNet's ConvModules run it after every convolution.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::layer_norm::moments;
use super::{dispatch, lane_dot, lane_sum, par_items, slice, storage, sum_partials, unpack, Real};

/// `torch.nn.GroupNorm(groups, C, eps)` of `x [B, C, *]` (per image and group of `C / groups`
/// channels: `(x - mean) / sqrt(var + eps)`, biased variance, two passes; then `* w[c] + b[c]`),
/// followed by ReLU when `relu`. Off the fused path: candle_nn's composed `GroupNorm` (+ `relu`).
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let c = dims.get(1).copied().unwrap_or(0);
    if dims.len() < 3 || groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group-norm: x {dims:?} in {groups} groups")
    }
    if w.dims1()? != c || b.dims1()? != c {
        candle_core::bail!(
            "group-norm: x {dims:?} with weight {:?} and bias {:?}",
            w.dims(),
            b.dims()
        )
    }
    let fused = super::is_fused(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype();
    if !fused {
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)?;
        let y = candle_core::Module::forward(&gn, x)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let spatial = dims[2..].iter().product();
    let op = GroupNorm {
        groups,
        channels: c,
        spatial,
        eps,
        relu,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

#[derive(Debug, Clone, Copy)]
struct GroupNorm {
    groups: usize,
    channels: usize,
    /// Elements per channel of one image (`H W`).
    spatial: usize,
    eps: f64,
    relu: bool,
}

impl GroupNorm {
    /// Elements of one (image, group) block: `C / groups` channels of `spatial` values each.
    fn block(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// The output of one channel's values `x` (normalized by `mean`, `rstd`, then `* w + b`, ReLU).
#[inline(always)]
fn normalize_channel<T: Real>(x: &[T], out: &mut [T], mean: T, rstd: T, w: T, b: T, relu: bool) {
    // (x - mean) * (rstd * w) + b: one multiply-add per value
    let (scale, shift) = (rstd * w, b - mean * rstd * w);
    if relu {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v * scale + shift).fmax(T::zero());
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}

fn forward<T: Real>(
    op: &GroupNorm,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "group-norm")?;
    let w = slice::<T>(s2, l2, "group-norm")?;
    let b = slice::<T>(s3, l3, "group-norm")?;
    let (block, hw, cg) = (op.block(), op.spatial, op.channels / op.groups);
    let eps = T::from_f64(op.eps);
    let mut y = vec![T::zero(); x.len()];
    // one item = one (image, group) block, contiguous in NCHW
    par_items(&mut y, block, |first, out| {
        for (i, yb) in out.chunks_exact_mut(block).enumerate() {
            let xb = &x[(first + i) * block..][..block];
            let (mean, rstd) = moments(xb, eps);
            let c0 = (first + i) % op.groups * cg;
            let rows = yb.chunks_exact_mut(hw).zip(xb.chunks_exact(hw));
            for (j, (yc, xc)) in rows.enumerate() {
                normalize_channel(xc, yc, mean, rstd, w[c0 + j], b[c0 + j], op.relu);
            }
        }
    });
    Ok(storage(y, l1.shape().clone()))
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
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
        dispatch!(self.name(), s1, forward(self, (s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // the bias rides along for the ReLU mask (recomputed with the forward's arithmetic)
        let wb = Tensor::cat(&[w, b], 0)?;
        let packed = x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &GroupNormBwd(*self))?;
        let mut g = unpack(&packed, &[x.shape(), w.shape(), b.shape()])?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

/// `(x, [w | b], grad)` -> packed `[dx | dw | db]`.
struct GroupNormBwd(GroupNorm);

fn backward<T: Real>(
    op: &GroupNorm,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "group-norm-bwd")?;
    let wb = slice::<T>(s2, l2, "group-norm-bwd")?;
    let g = slice::<T>(s3, l3, "group-norm-bwd")?;
    let c = op.channels;
    let (w, b) = wb.split_at(c);
    let (block, hw, cg) = (op.block(), op.spatial, c / op.groups);
    let eps = T::from_f64(op.eps);
    let inv_n = T::one() / T::from_f64(block as f64);
    let mut out = vec![T::zero(); x.len() + 2 * c];
    let (dx, dwb) = out.split_at_mut(x.len());
    // per block, with xh = (x - mean) rstd and gy the gradient past the ReLU (0 where the
    // output was clamped): gw = gy w[c]; dx = (gw - mean(gw) - xh mean(gw xh)) rstd;
    // dw[c] = sum gy xh, db[c] = sum gy over the channel's values in every image
    let parts = par_items(dx, block, |first, dx| {
        let mut part = vec![T::zero(); 2 * c];
        let (mut xh, mut gw, mut y) = (vec![T::zero(); block], vec![T::zero(); block], vec![]);
        if op.relu {
            y = vec![T::zero(); hw];
        }
        for (i, dxb) in dx.chunks_exact_mut(block).enumerate() {
            let at = (first + i) * block;
            let (xb, gb) = (&x[at..][..block], &g[at..][..block]);
            let (mean, rstd) = moments(xb, eps);
            let c0 = (first + i) % op.groups * cg;
            for j in 0..cg {
                let ch = c0 + j;
                let r = j * hw..(j + 1) * hw;
                let (xc, gc) = (&xb[r.clone()], &gb[r.clone()]);
                let (xhc, gwc) = (&mut xh[r.clone()], &mut gw[r]);
                for (h, &v) in xhc.iter_mut().zip(xc) {
                    *h = (v - mean) * rstd;
                }
                let (mut sw, mut sb) = (T::zero(), T::zero());
                if op.relu {
                    normalize_channel(xc, &mut y, mean, rstd, w[ch], b[ch], true);
                    for (((o, &gv), &yv), &h) in gwc.iter_mut().zip(gc).zip(&y).zip(xhc.iter()) {
                        let gy = if yv > T::zero() { gv } else { T::zero() };
                        *o = gy * w[ch];
                        sw += gy * h;
                        sb += gy;
                    }
                } else {
                    for ((o, &gv), &h) in gwc.iter_mut().zip(gc).zip(xhc.iter()) {
                        *o = gv * w[ch];
                        sw += gv * h;
                        sb += gv;
                    }
                }
                part[ch] += sw;
                part[c + ch] += sb;
            }
            let m1 = lane_sum(&gw, |v| v) * inv_n;
            let m2 = lane_dot(&gw, &xh) * inv_n;
            for ((d, &a), &h) in dxb.iter_mut().zip(&gw).zip(&xh) {
                *d = (a - m1 - h * m2) * rstd;
            }
        }
        part
    });
    sum_partials(&parts, dwb);
    Ok(storage(out, x.len() + 2 * c))
}

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "group-norm-bwd"
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
            backward(&self.0, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// (fused, composed) outputs and the gradients of x, w, b under a random linear loss.
    fn both(
        dtype: DType,
        dims: &[usize],
        groups: usize,
        relu: bool,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let dev = Device::Cpu;
        let c = dims[1];
        let x = Var::from_tensor(&(Tensor::randn(0f64, 2.0, dims, &dev)? + 0.5)?.to_dtype(dtype)?)?;
        let w = Var::from_tensor(&(Tensor::randn(1f64, 0.5, c, &dev)?.to_dtype(dtype)?))?;
        let b = Var::from_tensor(&(Tensor::randn(0f64, 0.5, c, &dev)?.to_dtype(dtype)?))?;
        let r = Tensor::randn(0f64, 1.0, dims, &dev)?.to_dtype(dtype)?;
        let fused = group_norm(&x, &w, &b, groups, 1e-5, relu)?;
        let gn = candle_nn::GroupNorm::new(
            w.as_tensor().clone(),
            b.as_tensor().clone(),
            c,
            groups,
            1e-5,
        )?;
        let mut plain = candle_core::Module::forward(&gn, x.as_tensor())?;
        if relu {
            plain = plain.relu()?;
        }
        let gf = (&fused * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        let mut out = vec![(fused, plain)];
        for v in [&x, &w, &b] {
            out.push((gf.get(v).unwrap().clone(), gp.get(v).unwrap().clone()));
        }
        Ok(out)
    }

    /// Against candle_nn's composed GroupNorm (+ ReLU), forward and the three gradients: several
    /// blocks per task and several tasks (tests use 64-scalar tasks), odd spatial sizes, one
    /// group, one channel per group.
    #[test]
    fn group_norm_matches_candle_nn() -> Result<()> {
        for (dims, groups) in [
            (vec![3usize, 8, 5, 7], 4usize),
            (vec![2, 6, 9], 1),
            (vec![2, 4, 3, 3], 4),
        ] {
            for relu in [false, true] {
                for (dtype, fwd_tol, grad_tol) in
                    [(DType::F64, 1e-12, 1e-11), (DType::F32, 1e-6, 1e-5)]
                {
                    for (i, (f, p)) in both(dtype, &dims, groups, relu)?.iter().enumerate() {
                        let d = rel_diff(f, p)?;
                        let tol = if i == 0 { fwd_tol } else { grad_tol };
                        assert!(
                            d < tol,
                            "{dims:?} g{groups} relu {relu} {dtype:?} #{i}: {d}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The gradients of GN + ReLU against central differences in f64 (away from the ReLU's kink:
    /// no output within 1e-3 of 0).
    #[test]
    fn group_norm_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let dims = (2, 4, 3);
        let x0: Vec<f64> = (0..24)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) * 0.31 + (i as f64).sin())
            .collect();
        let w0 = vec![0.7, -1.2, 0.3, 1.5];
        let b0 = vec![0.1, 0.2, -0.3, 0.05];
        let r = Tensor::randn(0f64, 1.0, dims, &dev)?;
        let out = |x: &[f64], w: &[f64], b: &[f64], relu: bool| -> Result<Tensor> {
            group_norm(
                &Tensor::from_slice(x, dims, &dev)?,
                &Tensor::from_slice(w, 4, &dev)?,
                &Tensor::from_slice(b, 4, &dev)?,
                2,
                1e-5,
                relu,
            )
        };
        let pre: Vec<f64> = out(&x0, &w0, &b0, false)?.flatten_all()?.to_vec1()?;
        assert!(
            pre.iter().all(|v| v.abs() > 1e-3),
            "a value sits on the ReLU's kink: {pre:?}"
        );
        assert!(pre.iter().any(|&v| v < 0.0) && pre.iter().any(|&v| v > 0.0));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> Result<f64> {
            (out(x, w, b, true)? * &r)?.sum_all()?.to_scalar::<f64>()
        };
        let x = Var::from_slice(&x0, dims, &dev)?;
        let w = Var::from_slice(&w0, 4, &dev)?;
        let b = Var::from_slice(&b0, 4, &dev)?;
        let g = (group_norm(&x, &w, &b, 2, 1e-5, true)? * &r)?
            .sum_all()?
            .backward()?;
        let h = 1e-6;
        for (which, v) in [&x, &w, &b].into_iter().enumerate() {
            let grad: Vec<f64> = g.get(v).unwrap().flatten_all()?.to_vec1()?;
            for (k, &an) in grad.iter().enumerate() {
                let mut p = [x0.clone(), w0.clone(), b0.clone()];
                p[which][k] += h;
                let up = loss(&p[0], &p[1], &p[2])?;
                p[which][k] -= 2.0 * h;
                let down = loss(&p[0], &p[1], &p[2])?;
                let num = (up - down) / (2.0 * h);
                assert!(
                    (num - an).abs() < 1e-7 * (1.0 + an.abs()),
                    "{which}[{k}]: {num} vs {an}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(6, DType::F32, &dev).unwrap();
        let err = group_norm(&x, &w, &w, 4, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 6, 4] in 4 groups"), "{err}");
        let w5 = Tensor::ones(5, DType::F32, &dev).unwrap();
        let err = group_norm(&x, &w5, &w5, 3, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight [5]"), "{err}");
    }
}
