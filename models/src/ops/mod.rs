//! Fused ops where candle's composed ones are slow on the CPU.
//!
//! candle 0.11's fused softmax/LayerNorm kernels have no backward, so training composes them from
//! ~8 elementwise ops each, and its backward of a broadcast sums over leading dims with a scalar
//! strided loop. Each op here is a custom op with one forward pass and a hand-written one-pass
//! backward, on the CPU in f32 and f64; other devices and dtypes fall back to the composed ops.
//! One op per file; each file's tests compare it with the composed version.
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

mod add_bias;
mod fast_math;
mod gelu;
mod group_norm;
mod grouped_linear;
mod heads;
mod im2col;
mod layer_norm;
mod linear;
mod load_importance;
mod mask_token;
mod moe_experts;
mod normalize;
mod pixel_cross_entropy;
mod residual;
mod softmax;
mod window_softmax;
mod windows;

pub use add_bias::add_bias;
pub use gelu::gelu_erf;
pub use group_norm::group_norm;
pub use grouped_linear::{grouped_linear, WeightLayout};
pub use heads::{heads_av, heads_qk};
pub use im2col::{channels_first, channels_last, im2col};
pub use layer_norm::layer_norm;
pub use linear::{linear, linear_gelu};
pub use load_importance::load_importance;
pub use moe_experts::{experts_combine, experts_fc1_gelu, SortedRows};

/// The f32 kernels behind [`linear`] without a graph, for `models/examples/gemm_probe.rs`.
#[doc(hidden)]
pub mod probe {
    /// `x [m, k] @ w[n, k]^T (+ b)`.
    pub fn linear_forward(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        mkn: (usize, usize, usize),
    ) -> Vec<f32> {
        super::linear::forward(x, w, b, mkn)
    }

    /// `[dx | dw | db]` of `g [m, n]` at `x`, `w`.
    pub fn linear_backward(
        x: &[f32],
        w: &[f32],
        g: &[f32],
        mkn: (usize, usize, usize),
        bias: bool,
    ) -> Vec<f32> {
        super::linear::backward(x, w, g, mkn, bias)
    }
}
pub use mask_token::mask_token;
pub use normalize::{normalize, normalize_groups};
pub use pixel_cross_entropy::pixel_cross_entropy;
pub use residual::residual;
pub use softmax::softmax_last;
pub use window_softmax::{window_logits, window_softmax};
pub use windows::{
    merge_windows, merge_windows_cropped, partition_windows, partition_windows_padded,
    window_partition, window_reverse,
};

/// Whether ops on `x` take the fused path: on the CPU, in f32 or f64.
pub fn is_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `a @ b` of the composed path (other devices), in bf16 under `run.precision: bf16`
/// ([`mimlab_engine::device::matmul_dtype`]): both operands cast down, the product cast back to
/// `a`'s dtype, so the weights, their gradients (through the casts) and everything outside the
/// products stay f32, as PyTorch's autocast does for `F.linear` and `matmul`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_in(a, b, mimlab_engine::device::matmul_dtype(a.device()))
}

/// `a @ b` with f32 operands computed in `dt` (None: as they are).
fn matmul_in(a: &Tensor, b: &Tensor, dt: Option<DType>) -> Result<Tensor> {
    match dt {
        Some(dt) if a.dtype() == DType::F32 && b.dtype() == DType::F32 => a
            .to_dtype(dt)?
            .matmul(&b.to_dtype(dt)?)?
            .to_dtype(DType::F32),
        _ => a.matmul(b),
    }
}

/// The float math the kernels need, for f32 and f64.
pub(crate) trait Real: WithDType {
    fn sqrt(self) -> Self;
    fn fmax(self, other: Self) -> Self;
    /// Error function. f32: the vectorizable [`fast_math::erf_f32`]; f64: exact (libm `erf`).
    fn erf_fast(self) -> Self;
    /// f32: the vectorizable [`fast_math::exp_f32`]; f64: exact.
    fn exp_fast(self) -> Self;
    /// `(erf(x), e^{-x^2})`, as [`Real::erf_fast`] and [`Real::exp_fast`] (f32: one `exp`).
    fn erf_gauss_fast(self) -> (Self, Self);
    /// The smallest positive normal value (`MIN_POSITIVE`): below it a value is subnormal.
    const MIN_NORMAL: Self;
    /// `self`, or exactly 0 where it is subnormal (`|self| < MIN_NORMAL`), so that no product
    /// downstream meets a subnormal operand: Intel cores take a microcode assist per such
    /// operation (a 64x64x32 window product ran at 10 GFLOP/s with them, 50 without; issue 22).
    #[inline(always)]
    fn flush_subnormal(self) -> Self {
        if self.fmax(Self::zero() - self) < Self::MIN_NORMAL {
            Self::zero()
        } else {
            self
        }
    }
}

macro_rules! real {
    ($t:ty, $erf_fast:path, $exp_fast:path, $erf_gauss:path) => {
        impl Real for $t {
            const MIN_NORMAL: Self = <$t>::MIN_POSITIVE;
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn fmax(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn erf_fast(self) -> Self {
                $erf_fast(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
            #[inline(always)]
            fn erf_gauss_fast(self) -> (Self, Self) {
                $erf_gauss(self)
            }
        }
    };
}
real!(
    f32,
    fast_math::erf_f32,
    fast_math::exp_f32,
    fast_math::erf_and_gauss_f32
);
real!(f64, libm::erf, f64::exp, erf_gauss_f64);

/// `(erf(x), e^{-x^2})` in f64, exact (libm).
fn erf_gauss_f64(x: f64) -> (f64, f64) {
    (libm::erf(x), (-x * x).exp())
}

/// The contiguous data of a custom op's input.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: non-contiguous input")
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Runs a kernel generic over [`Real`] on the dtype of `s` (f32 or f64).
macro_rules! dispatch {
    ($op:expr, $s:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $s {
            candle_core::CpuStorage::F32(_) => $f::<f32>($($arg),*),
            candle_core::CpuStorage::F64(_) => $f::<f64>($($arg),*),
            other => candle_core::bail!(
                "{}: f32 or f64 expected, got {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch;

/// A tensor of `shape` owning `data`.
fn storage<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(data), shape.into())
}

/// The pieces of a backward op's packed 1-d output, in order, reshaped to `shapes`.
fn unpack(packed: &Tensor, shapes: &[&Shape]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for s in shapes {
        let n = s.elem_count();
        out.push(packed.narrow(0, at, n)?.reshape(*s)?);
        at += n;
    }
    Ok(out)
}

/// Scalar operations below which a task is not worth handing to rayon (tiny in tests, so that
/// their small shapes run the multi-task paths and the partial sums).
const MIN_TASK_WORK: usize = if cfg!(test) { 64 } else { 16 * 1024 };
/// At most this many tasks per kernel: enough for any core count here, few partial sums.
const MAX_TASKS: usize = 32;

/// Items per task for `items` items of `work` scalars each. Depends on the sizes only (never on
/// the thread count), so partial sums combine in the same order on any machine: results are
/// reproducible.
fn items_per_task(items: usize, work: usize) -> usize {
    let by_count = items.div_ceil(MAX_TASKS);
    let by_work = MIN_TASK_WORK.div_ceil(work.max(1));
    by_count.max(by_work).clamp(1, items.max(1))
}

/// Calls `f(first_item, chunk)` on `out` cut into tasks of whole items (`item` scalars each), on
/// rayon's pool when there are several tasks and threads (else in order on this thread: no
/// hand-off to a lone worker), and returns the tasks' results in order.
fn par_items<T, P, F>(out: &mut [T], item: usize, f: F) -> Vec<P>
where
    T: Send,
    P: Send,
    F: Fn(usize, &mut [T]) -> P + Sync + Send,
{
    if out.is_empty() || item == 0 {
        return Vec::new();
    }
    let per = items_per_task(out.len() / item, item);
    let chunk = per * item;
    if chunk >= out.len() || rayon::current_num_threads() == 1 {
        let tasks = out.chunks_mut(chunk).enumerate();
        return tasks.map(|(t, c)| f(t * per, c)).collect();
    }
    out.par_chunks_mut(chunk)
        .enumerate()
        .map(|(t, chunk)| f(t * per, chunk))
        .collect()
}

/// `sum f(x_i)` with 8 interleaved accumulators, so that it vectorizes (a plain fold is one
/// serial chain of adds under IEEE rules); the rounding is pairwise-like, no worse than a fold.
#[inline(always)]
fn lane_sum<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut s = T::zero();
    for &v in chunks.remainder() {
        s += f(v);
    }
    acc.into_iter().fold(s, |s, a| s + a)
}

/// `max x_i` with 8 lanes, as [`lane_sum`] (max is exact in any order); -inf when empty.
#[inline(always)]
fn lane_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::from_f64(f64::NEG_INFINITY); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.fmax(v);
        }
    }
    let m = chunks.remainder().iter().fold(acc[0], |m, &v| m.fmax(v));
    acc[1..].iter().fold(m, |m, &a| m.fmax(a))
}

/// `sum a_i b_i`, as [`lane_sum`].
#[inline(always)]
fn lane_dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    let mut s = T::zero();
    for (&u, &v) in ca.remainder().iter().zip(cb.remainder()) {
        s += u * v;
    }
    acc.into_iter().fold(s, |s, a| s + a)
}

/// Sums equal-length partial sums in order.
fn sum_partials<T: Real>(parts: &[Vec<T>], into: &mut [T]) {
    into.fill(T::zero());
    add_partials(parts, into);
}

/// Adds equal-length partial sums to `into`, in order, on rayon's pool: each element gets the
/// same adds in the same order whatever the task split, so the result does not depend on the
/// thread count. (A weight gradient: tiny_w8's stage-3 fc1 at 256 px sums 16 partials of 590 k
/// elements. On one thread, this loop was the largest item of the time where only one core
/// worked, `perf record -a`.)
fn add_partials<T: Real>(parts: &[Vec<T>], into: &mut [T]) {
    par_items(into, 1, |at, chunk| {
        for p in parts {
            add_assign(chunk, &p[at..at + chunk.len()]);
        }
    });
}

mimlab_engine::wide_kernel! {
/// `into[i] += p[i]`.
fn add_assign<T: Real>(into: &mut [T], p: &[T]) {
    for (a, &b) in into.iter_mut().zip(p) {
        *a += b;
    }
}
}

#[cfg(test)]
pub(crate) mod testing {
    //! Comparisons shared by the ops' tests.
    use candle_core::{Result, Tensor};

    /// Max |a - b| relative to max |b| (the tensor's scale).
    pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(candle_core::DType::F64)?;
        let b = b.to_dtype(candle_core::DType::F64)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let s = b.abs()?.max_all()?.to_scalar::<f64>()?;
        Ok(d / s.max(1e-300))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 autocast of a product (`run.precision: bf16`, GPU only; the cast path itself runs
    /// on any device): f32 out, within bf16's rounding (8 mantissa bits: ~4e-3 relative per
    /// operand) of the f32 product, and f32 gradients of the f32 operands within the same.
    /// A CPU product is never cast, whatever the setting.
    #[test]
    fn bf16_products_stay_f32_outside_and_round_as_bf16() -> Result<()> {
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 96), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (96, 48), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (64, 48), &dev)?;
        let full = matmul_in(&a, &b, None)?;
        let half = matmul_in(&a, &b, Some(DType::BF16))?;
        assert_eq!(half.dtype(), DType::F32);
        let d = testing::rel_diff(&half, &full)?;
        assert!(d > 0.0 && d < 2e-2, "forward {d}");
        let gf = (&full * &r)?.sum_all()?.backward()?;
        let gh = (&half * &r)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            let (f, h) = (gf.get(v).unwrap(), gh.get(v).unwrap());
            assert_eq!(h.dtype(), DType::F32);
            let d = testing::rel_diff(h, f)?;
            assert!(d > 0.0 && d < 2e-2, "gradient {d}");
        }
        mimlab_engine::device::set_matmul_precision(mimlab_engine::device::Precision::Bf16);
        let cpu = matmul(&a, &b);
        mimlab_engine::device::set_matmul_precision(mimlab_engine::device::Precision::F32);
        assert_eq!(testing::rel_diff(&cpu?, &full)?, 0.0);
        Ok(())
    }

    /// The dense heads' fused ops (GroupNorm + ReLU, im2col and its col2im backward) give the
    /// same bits, forward and every gradient, on 1 and on 3 threads (their task splits depend on
    /// the sizes only).
    #[test]
    fn dense_head_ops_do_not_depend_on_the_thread_count() -> Result<()> {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (3, 32, 19, 17), &dev)?;
        let w0 = Tensor::randn(1f32, 0.5, 32, &dev)?;
        let b0 = Tensor::randn(0f32, 0.5, 32, &dev)?;
        let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let (x, w, b) = (
                    Var::from_tensor(&x0)?,
                    Var::from_tensor(&w0)?,
                    Var::from_tensor(&b0)?,
                );
                let y = group_norm(&x, &w, &b, 8, 1e-5, true)?;
                let cols = im2col(&y, 3, 2, 1)?;
                let probe = Tensor::ones(cols.shape(), DType::F32, &dev)?.broadcast_mul(
                    &Tensor::arange(0f32, cols.dims()[cols.rank() - 1] as f32, &dev)?.sin()?,
                )?;
                let g = (&cols * probe)?.sum_all()?.backward()?;
                let mut out = vec![cols.flatten_all()?.to_vec1::<f32>()?];
                for v in [&x, &w, &b] {
                    out.push(
                        g.get(v)
                            .expect("gradient")
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    );
                }
                Ok(out)
            })
        };
        let (one, three) = (run(1)?, run(3)?);
        for (i, (a, b)) in one.iter().zip(&three).enumerate() {
            assert!(
                a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "output {i} differs"
            );
        }
        Ok(())
    }

    /// `add_partials` cuts `into` into tasks (several here: tests use 64-scalar tasks); each
    /// element still gets its partials added in order, so the sums are the bits of a plain
    /// in-order loop on one thread or two.
    #[test]
    fn add_partials_sums_in_order_on_any_thread_count() {
        let parts: Vec<Vec<f32>> = (0..5)
            .map(|p| {
                (0..1000)
                    .map(|i| ((i * 37 + p * 11) % 97) as f32 * 0.37 - 17.0)
                    .collect()
            })
            .collect();
        let start: Vec<f32> = (0..1000).map(|i| (i as f32).sin() * 1e3).collect();
        let mut want = start.clone();
        for p in &parts {
            for (a, &b) in want.iter_mut().zip(p) {
                *a += b;
            }
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut got = start.clone();
            pool.install(|| add_partials(&parts, &mut got));
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads");
        }
        let mut summed = vec![f32::NAN; 1000];
        sum_partials(&parts, &mut summed);
        let mut in_order = vec![0f32; 1000];
        add_partials(&parts, &mut in_order);
        assert_eq!(summed, in_order);
    }
}
