//! Branch-free f32 `exp` and `erf` that the compiler vectorizes (libm's scalar `expf`/`erff` do
//! not), for the GELU kernels. f64 keeps the exact libm functions (see `Real`).
//!
//! `erf` is Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7 in exact arithmetic, 5.2e-7 measured
//! in f32), the formula of PyTorch's own CPU
//! kernel (`Vectorized<float>::erf` in ATen's `vec256_float.h`, around a vectorized `expf`), so
//! mimlab's f32 GELU matches what PyTorch computes on the CPU to the same accuracy.

/// `e^x` for f32 (Cephes `expf`: round-to-nearest range reduction, degree-6 polynomial; relative
/// error < 3e-7 on [-87, 88.37]); below -87.3 it returns ~0, above 88.37 it saturates at
/// e^88.37 ~ 2.4e38 (the clamp keeps n <= 127: at n = 128 the exponent bits would make inf).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2 split in two for an exact n * ln2
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.336_55, 88.37);
    // t = ROUND + round(x log2 e): n sits in t's low mantissa bits (|n| < 2^22)
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * r * r + r + 1.0;
    // 2^n by building the exponent bits (n in [-126, 127] after the clamp). n is read off t's
    // bits with integer ops: `n as i32` is a saturating conversion that LLVM leaves scalar, one
    // lane at a time, which kept the GELU loops from vectorizing.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    y * scale
}

/// `erf(x)` for f32: `sign(x) (1 - (a1 t + ... + a5 t^5) e^{-x^2})`, `t = 1 / (1 + p |x|)`.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    erf_and_gauss_f32(x).0
}

/// `(erf(x), e^{-x^2})`: the formula of [`erf_f32`] computes the Gaussian on the way, which
/// GELU's backward needs as well (its density at `x sqrt 2`).
#[inline(always)]
pub(crate) fn erf_and_gauss_f32(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let gauss = exp_f32(-a * a);
    ((1.0 - poly * gauss).copysign(x), gauss)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 `exp`/libm `erf` on a dense grid: exp relative error < 3e-7 on [-87, 88],
    /// erf absolute error < 6e-7 on [-10, 10], odd symmetry.
    #[test]
    fn exp_and_erf_match_f64_within_their_bounds() {
        let mut worst_exp = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let e = x.exp();
            let got = exp_f32(x as f32) as f64;
            // compare with exp of the f32 input (the input rounding is not the function's error)
            let want = ((x as f32) as f64).exp();
            worst_exp = worst_exp.max(((got - want) / want).abs());
            assert!(e.is_finite());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        let mut worst_erf = 0f64;
        for i in 0..=200_000 {
            let x = (-10.0 + 20.0 * i as f64 / 200_000.0) as f32;
            let want = libm::erf(x as f64);
            worst_erf = worst_erf.max((erf_f32(x) as f64 - want).abs());
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
        // 1.5e-7 of the formula plus f32 rounding of `1 - poly e^{-x^2}` (measured 5.2e-7)
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        // f32 rounding of 1 - poly(1) at 0 (exact: 0); GELU multiplies it by x = 0
        assert!(erf_f32(0.0).abs() < 1e-7);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), exp_f32(-87.336_55));
        // the top of the range stays finite and saturates (it was inf on [88.38, 88.72])
        for x in [88.3f32, 88.37, 88.5, 88.72, 1e4] {
            let e = exp_f32(x);
            assert!(e.is_finite() && e >= exp_f32(88.3), "exp_f32({x}) = {e}");
        }
    }
}
