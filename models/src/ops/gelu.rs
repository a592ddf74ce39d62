//! Exact (erf) GELU with a one-pass backward.
//!
//! candle's `gelu_erf` forward is one pass, but its backward is ~12 tensor ops, one of them a
//! second `erf` pass, and uses `1/sqrt(2 pi)` rounded to 0.398942 (relative error 7e-7). In f32
//! the erf and exp here are the vectorizable ones of `fast_math` (erf within 6e-7, the formula of
//! PyTorch's CPU GELU) instead of scalar libm calls, which were 16% of a SimMIM step; f64 is exact.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{dispatch, par_items, slice, storage, Real};

/// `0.5 x (1 + erf(x / sqrt(2)))` in candle's order: f64 with libm's erf (bitwise candle's
/// `gelu_erf`), f32 with `fast_math::erf_f32`. Backward: `g * (Phi(x) + x phi(x))`, Phi the normal CDF, phi its density. Off the
/// fused path: candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !super::is_fused(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluErf)
}

struct GeluErf;

/// Items (scalars) per rayon task: erf costs tens of instructions.
const ITEM: usize = 16;

mimlab_engine::wide_kernel! {
/// `out[i] = gelu(x[i])`.
fn fwd_kernel<T: Real>(x: &[T], out: &mut [T]) {
    let half = T::from_f64(0.5);
    let r2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    for (o, &v) in out.iter_mut().zip(x) {
        // candle's formula, in its order; f32 with the vectorizable erf (fast_math)
        *o = ((v * r2).erf_fast() + T::one()) * half * v;
    }
}
}

fn forward<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "gelu-erf")?;
    Ok(storage(of_slice(x), l.shape().clone()))
}

/// `gelu(x)` elementwise, on rayon's pool.
pub(crate) fn of_slice<T: Real>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    // items of ITEM scalars: a tail shorter than an item is done after
    let body = y.len() / ITEM * ITEM;
    let (yb, yt) = y.split_at_mut(body);
    par_items(yb, ITEM, |first, out| fwd_kernel(&x[first * ITEM..], out));
    fwd_kernel(&x[body..], yt);
    y
}

/// `g * gelu'(x)` (no graph): the backward of [`gelu_erf`] at `x`, for fused ops that end in it.
pub(crate) fn backward_of(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfBwd)
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, forward(s, l))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward_of(x, grad)?))
    }
}

/// `(x, grad)` -> `dx`.
struct GeluErfBwd;

mimlab_engine::wide_kernel! {
/// `out[i] = g[i] gelu'(x[i])`.
fn bwd_kernel<T: Real>(x: &[T], g: &[T], out: &mut [T]) {
    let half = T::from_f64(0.5);
    let r2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    for (o, (&v, &gv)) in out.iter_mut().zip(x.iter().zip(g)) {
        // erf(v / sqrt 2) and e^{-v^2 / 2} from one exp
        let (erf, gauss) = (v * r2).erf_gauss_fast();
        let cdf = half * (erf + T::one());
        let pdf = gauss * inv_sqrt_2pi;
        *o = gv * (cdf + v * pdf);
    }
}
}

fn backward<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "gelu-erf-bwd")?;
    let g = slice::<T>(s2, l2, "gelu-erf-bwd")?;
    let mut dx = vec![T::zero(); x.len()];
    let body = dx.len() / ITEM * ITEM;
    let (db, dt) = dx.split_at_mut(body);
    par_items(db, ITEM, |first, out| {
        let at = first * ITEM;
        bwd_kernel(&x[at..], &g[at..], out)
    });
    bwd_kernel(&x[body..], &g[body..], dt);
    Ok(storage(dx, l1.shape().clone()))
}

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, backward((s1, l1), (s2, l2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::rel_diff;
    use candle_core::{DType, Device, Var};

    /// `[6, 16, 37]` (37: a tail after the rayon items) spread over [-12, 12], with exact 0s.
    fn input(dtype: DType) -> Result<Tensor> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 3.0, (6, 16, 37), &dev)?.clamp(-12f64, 12f64))?;
        let keep = x.abs()?.ge(0.05)?.to_dtype(DType::F64)?; // some exact zeros
        (x * keep)?.to_dtype(dtype)
    }

    /// `Phi(x) + x phi(x)` from candle's `erf` tensor op, with the exact `1/sqrt(2 pi)`.
    fn exact_derivative(x: &Tensor) -> Result<Tensor> {
        let cdf = ((x / 2f64.sqrt())?.erf()? + 1.0)? * 0.5;
        let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
        cdf? + (x * pdf?)?
    }

    #[test]
    fn gelu_erf_matches_candle() -> Result<()> {
        for (dtype, grad_tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let x = Var::from_tensor(&input(dtype)?)?;
            let r = Tensor::randn(0f64, 1.0, x.shape(), &Device::Cpu)?.to_dtype(dtype)?;
            let fused = gelu_erf(&x)?;
            let plain = x.gelu_erf()?;
            if dtype == DType::F64 {
                // the same formula and erf: bitwise equal
                let d = (&fused - &plain)?.abs()?.max_all()?.to_dtype(DType::F64)?;
                assert_eq!(d.to_scalar::<f64>()?, 0.0, "{dtype:?} forward");
            } else {
                // erf within 6e-7 absolute: |dy| <= 0.5 |x| 6e-7 (+ rounding) over |x| <= 12
                let d = rel_diff(&fused, &plain)?;
                assert!(d < 5e-7, "f32 forward vs libm erf: {d}");
            }
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let dx = gf.get(&x).unwrap();
            let exact = (exact_derivative(&x)? * &r)?;
            let d = rel_diff(dx, &exact)?;
            assert!(d < grad_tol, "{dtype:?} grad vs exact derivative: {d}");
            // candle's backward differs by its rounded 1/sqrt(2 pi) only
            let gp = (&plain * &r)?.sum_all()?.backward()?;
            let d = rel_diff(dx, gp.get(&x).unwrap())?;
            assert!(d < 2e-6, "{dtype:?} grad vs candle's: {d}");
        }
        Ok(())
    }

    /// The kernels run 8 or 16 lanes wide (AVX2, AVX-512) where the CPU has it; every copy must
    /// give each element the bits of the scalar formula computed one element at a time.
    #[test]
    fn wide_kernels_give_the_scalar_bits() {
        for level in mimlab_engine::simd::levels() {
            mimlab_engine::simd::with_max_level(level, kernels_give_the_scalar_bits);
        }
    }

    fn kernels_give_the_scalar_bits() {
        let x: Vec<f32> = (0..1037)
            .map(|i| -12.0 + 24.0 * i as f32 / 1036.0)
            .collect();
        let g: Vec<f32> = (0..1037).map(|i| 1.0 - i as f32 / 500.0).collect();
        let (mut y, mut dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        fwd_kernel(&x, &mut y);
        bwd_kernel(&x, &g, &mut dx);
        let r2 = std::f32::consts::FRAC_1_SQRT_2;
        let inv_sqrt_2pi = (1.0 / (2.0 * std::f64::consts::PI).sqrt()) as f32;
        for i in 0..x.len() {
            // black_box: one element at a time, not vectorized
            let v = std::hint::black_box(x[i]);
            let want = ((v * r2).erf_fast() + 1.0) * 0.5 * v;
            assert_eq!(y[i].to_bits(), want.to_bits(), "forward at x = {v}");
            let (erf, gauss) = (v * r2).erf_gauss_fast();
            let cdf = 0.5 * (erf + 1.0);
            let pdf = gauss * inv_sqrt_2pi;
            let want = g[i] * (cdf + v * pdf);
            assert_eq!(dx[i].to_bits(), want.to_bits(), "backward at x = {v}");
        }
    }
}
