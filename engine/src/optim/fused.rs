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

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw: non-contiguous operand")
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

fn slice_mut<'a, T: WithDType>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw: non-contiguous operand")
    };
    let all: &mut [T] = match s {
        CpuStorage::F32(v) => bytemuck_f32(v)?,
        CpuStorage::F64(v) => bytemuck_f64(v)?,
        _ => candle_core::bail!("adamw: f32 or f64 expected"),
    };
    Ok(&mut all[a..b])
}

// Typed views of the storage vectors (the only dtypes `applies` lets through).
fn bytemuck_f32<T: WithDType>(v: &mut [f32]) -> Result<&mut [T]> {
    if T::DTYPE != DType::F32 {
        candle_core::bail!("adamw: dtype mismatch")
    }
    // SAFETY: T is f32 (checked above), so the slice is reinterpreted as itself.
    Ok(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut T, v.len()) })
}

fn bytemuck_f64<T: WithDType>(v: &mut [f64]) -> Result<&mut [T]> {
    if T::DTYPE != DType::F64 {
        candle_core::bail!("adamw: dtype mismatch")
    }
    // SAFETY: T is f64 (checked above), so the slice is reinterpreted as itself.
    Ok(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut T, v.len()) })
}

impl Ema {
    fn run<T: WithDType>(&self, dst: &mut [T], g: &[T]) {
        let (b, c) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta));
        let square = self.square;
        dst.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(d, g)| {
                for (d, &g) in d.iter_mut().zip(g) {
                    let g = if square { g * g } else { g };
                    *d = *d * b + g * c;
                }
            });
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
        match dst.dtype() {
            DType::F32 => self.run::<f32>(slice_mut(dst, dst_l)?, slice(g, g_l)?),
            DType::F64 => self.run::<f64>(slice_mut(dst, dst_l)?, slice(g, g_l)?),
            dt => candle_core::bail!("adamw-ema: f32 or f64 expected, got {dt:?}"),
        }
        Ok(())
    }
}

impl Update {
    fn run<T: WithDType>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let decay = self.decay.map(T::from_f64);
        let (inv, eps, step) = (
            T::from_f64(self.inv_bc2_sqrt),
            T::from_f64(self.eps),
            T::from_f64(self.step_size),
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let q = match decay {
                        Some(d) => *p * d,
                        None => *p,
                    };
                    let denom = v.sqrt_() * inv + eps;
                    *p = q - (m / denom) * step;
                }
            });
    }
}

/// `sqrt` for the two float dtypes the kernels take.
trait Sqrt {
    fn sqrt_(self) -> Self;
}

impl<T: WithDType> Sqrt for T {
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
        match dst.dtype() {
            DType::F32 => self.run::<f32>(slice_mut(dst, dst_l)?, slice(m, m_l)?, slice(v, v_l)?),
            DType::F64 => self.run::<f64>(slice_mut(dst, dst_l)?, slice(m, m_l)?, slice(v, v_l)?),
            dt => candle_core::bail!("adamw-update: f32 or f64 expected, got {dt:?}"),
        }
        Ok(())
    }
}
