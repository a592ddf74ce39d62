//! Kernels compiled for the CPU they run on.
//!
//! The build targets baseline x86-64 (SSE2), so a loop that LLVM vectorizes does 4 lanes at a
//! time. A kernel defined with [`wide_kernel!`](crate::wide_kernel) is compiled three times: as
//! is, inside a function with AVX2 enabled (8 lanes) and inside one with AVX-512F enabled (16
//! lanes). The widest copy the CPU has (checked at run time) runs, so the binary still runs on
//! any x86-64. All copies give the same bits: Rust never contracts `a * b + c` into an FMA, and
//! lane width does not change the order of operations in an elementwise loop (reductions in the
//! kernels keep their own fixed number of partial sums).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// The copies of a [`wide_kernel!`](crate::wide_kernel), narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Baseline x86-64 (SSE2), or the target's own baseline elsewhere.
    Baseline = 0,
    Avx2 = 1,
    Avx512 = 2,
}

/// The widest level kernels may use ([`with_max_level`]); the CPU may allow less.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Avx512 as u8);

/// Whether this CPU has the x86 feature named by the literal (false off x86-64; std caches the
/// check).
macro_rules! cpu_has {
    ($feature:tt) => {{
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!($feature);
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has
    }};
}

/// Whether [`with_max_level`] lets kernels use `level` now.
#[inline(always)]
fn allowed(level: Level) -> bool {
    MAX_LEVEL.load(Ordering::Relaxed) >= level as u8
}

/// Whether the AVX2 copies of the kernels run.
#[inline(always)]
pub fn has_avx2() -> bool {
    allowed(Level::Avx2) && cpu_has!("avx2")
}

/// Whether the AVX-512F copies of the kernels run.
#[inline(always)]
pub fn has_avx512() -> bool {
    allowed(Level::Avx512) && cpu_has!("avx512f")
}

/// The levels this CPU can run, narrowest first (for tests that compare the copies).
pub fn levels() -> Vec<Level> {
    [
        (Level::Baseline, true),
        (Level::Avx2, cpu_has!("avx2")),
        (Level::Avx512, cpu_has!("avx512f")),
    ]
    .into_iter()
    .filter_map(|(level, has)| has.then_some(level))
    .collect()
}

/// Runs `f` with kernels limited to `level`, for comparing a kernel's copies. Calls are
/// serialized (so they must not nest), and the limit is process-wide: kernels that other
/// threads run meanwhile take the narrower copy too, which gives the same bits.
pub fn with_max_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = MAX_LEVEL.swap(level as u8, Ordering::Relaxed);
    // restored on unwind too, so a failing test leaves the others at full width
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            MAX_LEVEL.store(self.0, Ordering::Relaxed);
        }
    }
    let _restore = Restore(before);
    f()
}

/// `fn name<T: Bound>(args) { body }`, whose body runs compiled for AVX-512F or AVX2 where the
/// CPU has it.
/// The math the body calls must be `#[inline(always)]` (as the float traits' methods in
/// `mimlab_models::ops` are), else it keeps the baseline code. A closure body would not do:
/// LLVM need not inline a closure, or `FnOnce::call_once`, into the AVX2 function (seen for
/// the GELU backward). Tests compare the copies through [`simd::levels`](crate::simd::levels) and
/// [`simd::with_max_level`](crate::simd::with_max_level).
#[macro_export]
macro_rules! wide_kernel {
    ($(#[$doc:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) {
            #[inline(always)]
            fn kernel<$t: $bound>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<$t: $bound>($($arg: $ty),*) {
                kernel($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<$t: $bound>($($arg: $ty),*) {
                kernel($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx512() {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx2() {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            kernel($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::{Add, Div, Mul};

    trait Arith: Copy + Add<Output = Self> + Mul<Output = Self> + Div<Output = Self> {}
    impl Arith for f32 {}

    crate::wide_kernel! {
    /// `out[i] = a[i] * b[i] + a[i] / b[i]`, a loop LLVM vectorizes at every width.
    fn mul_add_div<T: Arith>(a: &[T], b: &[T], out: &mut [T]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y + x / y;
        }
    }
    }

    #[test]
    fn every_level_gives_the_same_bits_and_the_limit_is_restored() {
        let a: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let b: Vec<f32> = (0..1001).map(|i| 1.5 + (i as f32 * 0.11).cos()).collect();
        let levels = levels();
        assert_eq!(levels[0], Level::Baseline);
        let mut outs = Vec::new();
        for &l in &levels {
            let mut out = vec![0f32; a.len()];
            with_max_level(l, || {
                assert_eq!(has_avx2(), l >= Level::Avx2);
                assert_eq!(has_avx512(), l >= Level::Avx512);
                mul_add_div(&a, &b, &mut out)
            });
            outs.push(out);
        }
        let want: Vec<u32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x * y + x / y).to_bits())
            .collect();
        for (l, out) in levels.iter().zip(&outs) {
            let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{l:?}");
        }
        // the limit is lifted again afterwards
        let top = *levels.last().unwrap();
        assert_eq!(
            (has_avx2(), has_avx512()),
            (top >= Level::Avx2, top >= Level::Avx512)
        );
    }
}
