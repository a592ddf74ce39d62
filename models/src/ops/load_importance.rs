//! The MoE router's load-importance loss ([`crate::moe::load_importance_loss`], tutel's
//! `load_importance_loss`) as one graph node with gate noise on.
//!
//! Composed it is ~15 candle ops over the `[S, E]` scores (among them candle's scalar `erf`, 6% of
//! an E=32 MoE training step), each with a backward that zero-fills and adds; here the forward is
//! one pass accumulating `Imp` and `Load` per expert (in f64, blocks of tokens in parallel), and the backward one pass writing
//! `dprobs` and `dthreshold`:
//!
//! `L = (cv2(Imp) + cv2(Load)) / 2`, `Imp_e = sum_t p_te`, `Load_e = sum_t Phi((p_te - thr_t) /
//! sigma)`, `cv2(v) = var(v) / (mean(v)^2 + 1e-10)` (unbiased var); with `n = E`, `mu = mean(v)`,
//! `d cv2 / d v_e = 2 (v_e - mu) / ((n - 1) (mu^2 + 1e-10)) - var 2 mu / (n (mu^2 + 1e-10)^2)`,
//! so `dL/dp_te = (cv2'(Imp)_e + cv2'(Load)_e phi_te / sigma) / 2` and `dL/dthr_t = -sum_e
//! cv2'(Load)_e phi_te / (2 sigma)`, `phi` the standard normal density at `(p_te - thr_t) / sigma`.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{dispatch, par_items, slice, storage, unpack, Real};

/// `(cv2(Imp) + cv2(Load)) / 2` of `probs [S, E]` (E >= 2) and `threshold [S, 1]` with the normal
/// CDF of standard deviation `sigma > 0`; a 0-d tensor, differentiable in both inputs. CPU, f32 or
/// f64, both inputs of one dtype (the caller checks: [`crate::moe::load_importance_loss`] composes
/// the same from candle ops elsewhere).
pub fn load_importance(probs: &Tensor, threshold: &Tensor, sigma: f64) -> Result<Tensor> {
    let (s, e) = probs.dims2()?;
    if threshold.dims() != [s, 1] || e < 2 || sigma <= 0.0 {
        candle_core::bail!(
            "load_importance: probs {:?}, threshold {:?}, sigma {sigma}",
            probs.dims(),
            threshold.dims()
        )
    }
    probs
        .contiguous()?
        .apply_op2(&threshold.contiguous()?, LoadImportance { sigma })
}

struct LoadImportance {
    sigma: f64,
}

/// `z = (p - thr) / sigma` -> `(Phi(z), phi(z) / sigma)`.
#[inline(always)]
fn cdf_pdf<T: Real>(p: T, thr: T, inv_sigma_sqrt2: T, pdf_scale: T) -> (T, T) {
    let (erf, gauss) = ((p - thr) * inv_sigma_sqrt2).erf_gauss_fast();
    (
        (erf + T::one()) * T::from_f64(0.5),
        gauss * pdf_scale, // e^{-z^2/2} / (sigma sqrt(2 pi))
    )
}

/// The constants of [`cdf_pdf`] for `sigma`.
fn constants<T: Real>(sigma: f64) -> (T, T) {
    (
        T::from_f64(1.0 / (sigma * std::f64::consts::SQRT_2)),
        T::from_f64(1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt())),
    )
}

/// Tokens per task of [`sums`]: a size-only split, so the partial sums add up in the same order
/// on any machine.
const SUM_ROWS: usize = 512;

/// `(Imp, Load)` per expert in f64: tokens summed in order within blocks of [`SUM_ROWS`], the
/// blocks' partial sums (computed in parallel) added in block order.
fn sums<T: Real>(p: &[T], thr: &[T], e: usize, sigma: f64) -> (Vec<f64>, Vec<f64>) {
    let (a, b) = constants::<T>(sigma);
    let block = |(p, thr): (&[T], &[T])| {
        let (mut imp, mut load) = (vec![0f64; e], vec![0f64; e]);
        for (row, &t) in p.chunks_exact(e).zip(thr) {
            for ((i, l), &v) in imp.iter_mut().zip(load.iter_mut()).zip(row) {
                *i += v.to_f64();
                *l += cdf_pdf(v, t, a, b).0.to_f64();
            }
        }
        (imp, load)
    };
    let parts: Vec<(Vec<f64>, Vec<f64>)> = p
        .par_chunks(SUM_ROWS * e)
        .zip(thr.par_chunks(SUM_ROWS))
        .map(block)
        .collect();
    let (mut imp, mut load) = (vec![0f64; e], vec![0f64; e]);
    for (pi, pl) in parts {
        for j in 0..e {
            imp[j] += pi[j];
            load[j] += pl[j];
        }
    }
    (imp, load)
}

/// `cv2(v)` and its gradient.
fn cv2_and_grad(v: &[f64]) -> (f64, Vec<f64>) {
    let n = v.len() as f64;
    let mu = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / (n - 1.0);
    let den = mu * mu + 1e-10;
    let grad = v
        .iter()
        .map(|x| 2.0 * (x - mu) / ((n - 1.0) * den) - var * 2.0 * mu / (n * den * den))
        .collect();
    (var / den, grad)
}

fn fwd<T: Real>(
    op: &LoadImportance,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (_, e) = l1.shape().dims2()?;
    let p = slice::<T>(s1, l1, "load-importance")?;
    let thr = slice::<T>(s2, l2, "load-importance")?;
    let (imp, load) = sums(p, thr, e, op.sigma);
    let loss = (cv2_and_grad(&imp).0 + cv2_and_grad(&load).0) / 2.0;
    Ok(storage(vec![T::from_f64(loss)], ()))
}

impl CustomOp2 for LoadImportance {
    fn name(&self) -> &'static str {
        "load-importance"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, fwd(self, (s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        probs: &Tensor,
        thr: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = LoadImportanceBwd { sigma: self.sigma };
        let packed = probs.apply_op3_no_bwd(thr, &g.contiguous()?, &bwd)?;
        let mut d = unpack(&packed, &[probs.shape(), thr.shape()])?.into_iter();
        Ok((d.next(), d.next()))
    }
}

/// `(probs, threshold, g)` -> packed `[dprobs [S, E] | dthreshold [S, 1]]`.
struct LoadImportanceBwd {
    sigma: f64,
}

fn bwd<T: Real>(
    op: &LoadImportanceBwd,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (s, e) = l1.shape().dims2()?;
    let p = slice::<T>(s1, l1, "load-importance-bwd")?;
    let thr = slice::<T>(s2, l2, "load-importance-bwd")?;
    let g = slice::<T>(s3, l3, "load-importance-bwd")?[0].to_f64();
    let (imp, load) = sums(p, thr, e, op.sigma);
    // dL/dImp_e and dL/dLoad_e, times the upstream gradient
    let di: Vec<T> = cv2_and_grad(&imp)
        .1
        .iter()
        .map(|d| T::from_f64(g * d / 2.0))
        .collect();
    let dl: Vec<T> = cv2_and_grad(&load)
        .1
        .iter()
        .map(|d| T::from_f64(g * d / 2.0))
        .collect();
    let (a, b) = constants::<T>(op.sigma);
    let mut out = vec![T::zero(); s * e + s];
    let (dp, dthr) = out.split_at_mut(s * e);
    let per_task = par_items(dp, e, |first, chunk| {
        let mut dt = Vec::with_capacity(chunk.len() / e);
        for (i, row) in chunk.chunks_exact_mut(e).enumerate() {
            let t = first + i;
            let mut acc = T::zero();
            for (j, o) in row.iter_mut().enumerate() {
                let pdf = cdf_pdf(p[t * e + j], thr[t], a, b).1;
                let d = dl[j] * pdf;
                *o = di[j] + d;
                acc += d;
            }
            dt.push(T::zero() - acc);
        }
        dt
    });
    for (o, v) in dthr.iter_mut().zip(per_task.into_iter().flatten()) {
        *o = v;
    }
    let len = out.len();
    Ok(storage(out, len))
}

impl CustomOp3 for LoadImportanceBwd {
    fn name(&self) -> &'static str {
        "load-importance-bwd"
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
        dispatch!(self.name(), s1, bwd(self, (s1, l1), (s2, l2), (s3, l3)))
    }
}
