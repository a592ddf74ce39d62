//! In-place CPU kernels of the AdamW update: one pass over memory per buffer instead of ~12
//! allocating tensor ops per parameter. Each kernel does exactly the f32/f64 operations of the
//! composed tensor path in `adamw.rs`, in the same order (Rust does not contract `a * b + c` into
//! an FMA), so both paths give bit-identical parameters and moments.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel chunk (small parameters run on one thread).
const CHUNK: usize = 1 << 15;

/// Whether the fused kernels apply: CPU, f32/f64, every tensor contiguous and of one dtype.
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    ts.iter().all(|t| {
        t.device().is_cpu()
            && t.dtype() == dt
            && t.is_contiguous()
            && t.layout().start_offset() == 0
    }) && matches!(dt, DType::F32 | DType::F64)
}

/// `dst = dst * beta + src * (1 - beta)` (exp_avg), or with `src * src` (exp_avg_sq).
pub(crate) struct Ema {
    pub beta: f64,
    pub square: bool,
}

/// `p = p * decay (if decay != 1) - (m / (sqrt(v) * inv_bc2_sqrt + eps)) * step_size`.
pub(crate) struct Update {
    pub decay: Option<f64>,
    pub inv_bc2_sqrt: f64,
    pub eps: f64,
    pub step_size: f64,
}

/// The element range of a contiguous operand in its storage.
fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("adamw: non-contiguous operand"),
    }
}

impl Ema {
    fn run<T: WithDType>(&self, dst: &mut [T], g: &[T]) {
        let (b, c) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta));
        let square = self.square;
        dst.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(d, g)| ema(d, g, b, c, square));
    }
}

crate::wide_kernel! {
/// `d = d * b + g' * c`, `g' = g * g` if `square` else `g` (the branch is loop-invariant: LLVM
/// unswitches it).
fn ema<T: WithDType>(d: &mut [T], g: &[T], b: T, c: T, square: bool) {
    for (d, &g) in d.iter_mut().zip(g) {
        let g = if square { g * g } else { g };
        *d = *d * b + g * c;
    }
}
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "adamw-ema"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let (d, r) = (range(dst_l)?, range(g_l)?);
        match dst {
            CpuStorage::F32(p) => self.run(&mut p[d], &f32::cpu_storage_as_slice(g)?[r]),
            CpuStorage::F64(p) => self.run(&mut p[d], &f64::cpu_storage_as_slice(g)?[r]),
            _ => candle_core::bail!("adamw-ema: f32 or f64 expected, got {:?}", dst.dtype()),
        }
        Ok(())
    }
}

impl Update {
    fn run<T: WithDType>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let decay = T::from_f64(self.decay.unwrap_or(1.0));
        let (inv, eps, step) = (
            T::from_f64(self.inv_bc2_sqrt),
            T::from_f64(self.eps),
            T::from_f64(self.step_size),
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| update(p, m, v, [decay, inv, eps, step]));
    }
}

crate::wide_kernel! {
/// `p = p * decay - (m / (sqrt(v) * inv + eps)) * step` (`decay` 1 without weight decay:
/// `p * 1 = p` exactly, so the bits equal the tensor path's, which skips the product).
fn update<T: WithDType>(p: &mut [T], m: &[T], v: &[T], k: [T; 4]) {
    let [decay, inv, eps, step] = k;
    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
        let denom = v.sqrt_() * inv + eps;
        *p = *p * decay - (m / denom) * step;
    }
}
}

/// `sqrt` for the two float dtypes the kernels take.
trait Sqrt {
    fn sqrt_(self) -> Self;
}

impl<T: WithDType> Sqrt for T {
    #[inline(always)]
    fn sqrt_(self) -> Self {
        // exact for f32 and f64: f32 -> f64 -> sqrt -> f32 is correctly rounded (double rounding
        // of a square root cannot differ, as f64 has more than 2 * 24 + 2 bits)
        T::from_f64(self.to_f64().sqrt())
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let (d, rm, rv) = (range(dst_l)?, range(m_l)?, range(v_l)?);
        match dst {
            CpuStorage::F32(p) => self.run(
                &mut p[d],
                &f32::cpu_storage_as_slice(m)?[rm],
                &f32::cpu_storage_as_slice(v)?[rv],
            ),
            CpuStorage::F64(p) => self.run(
                &mut p[d],
                &f64::cpu_storage_as_slice(m)?[rm],
                &f64::cpu_storage_as_slice(v)?[rv],
            ),
            _ => candle_core::bail!("adamw-update: f32 or f64 expected, got {:?}", dst.dtype()),
        }
        Ok(())
    }
}
