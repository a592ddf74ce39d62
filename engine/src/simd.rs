//! Kernels compiled for the CPU they run on.
//!
//! The build targets baseline x86-64 (SSE2), so a loop that LLVM vectorizes does 4 lanes at a
//! time. A kernel defined with [`wide_kernel!`](crate::wide_kernel) is compiled twice, as is and inside a function
//! with AVX2 enabled (8 lanes), and the AVX2 copy runs when the CPU has it (checked at run
//! time), so the binary still runs on any x86-64. Both copies give the same bits: Rust never
//! contracts `a * b + c` into an FMA, and lane width does not change the order of operations in
//! an elementwise loop.

/// Whether the AVX2 copies of the kernels can run (cached by std after the first call).
#[inline(always)]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `fn name<T: Bound>(args) { body }`, whose body runs compiled for AVX2 where the CPU has it.
/// The math the body calls must be `#[inline(always)]` (as the float traits' methods in
/// `mimlab_models::ops` are), else it keeps the baseline code. A closure body would not do:
/// LLVM need not inline a closure, or `FnOnce::call_once`, into the AVX2 function (seen for
/// the GELU backward).
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
            if $crate::simd::has_avx2() {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            kernel($($arg),*)
        }
    };
}
