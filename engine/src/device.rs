//! The compute device is a config choice (`run.device: cpu | cuda | cuda:N`), never hard-coded.
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
///
/// A CUDA device asked of a binary built without `--features cuda` is an error that says how to
/// build one, not a silent fallback to CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    match spec {
        "cpu" => Ok(Device::Cpu),
        _ if spec == "cuda" || spec.starts_with("cuda:") => {
            let ordinal = match spec.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .with_context(|| format!("run.device: `{spec}` is not cuda:<ordinal>"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "run.device: `{spec}` asked for CUDA, but this mimlab was built without it \
                     (rebuild with `cargo build --release --features cuda`) or no GPU is visible"
                );
            }
            Device::new_cuda(ordinal).with_context(|| format!("run.device: cannot open `{spec}`"))
        }
        other => bail!("run.device: unknown device `{other}` (expected cpu, cuda or cuda:N)"),
    }
}

/// Stack of each compute thread. The step runs on one of them ([`with_cpu_threads`]) and
/// candle's backward walks the graph recursively, so they get the main thread's headroom and more
/// (address space only: untouched pages cost nothing).
const COMPUTE_STACK_BYTES: usize = 64 << 20;

/// Sets the number of CPU threads the math kernels use (0 = leave the default: all cores).
///
/// Call it once at process start: rayon's global pool can only be sized before its first use.
/// A pool that already exists is kept; threads that cannot be started (a memory or process limit)
/// are an error naming `run.threads`.
fn set_cpu_threads(n: usize) -> Result<()> {
    // candle 0.11 runs its elementwise ops on its own pool, whose workers spin 25,000 rounds
    // after each op before they sleep; meanwhile they hold the cores gemm and the fused ops need
    // (rayon's pool). Sleeping at once measured faster with the step on a rayon worker
    // (BENCHMARKS.md, "Structural changes"). Read when candle's pool starts, i.e. at its first op.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(COMPUTE_STACK_BYTES);
    if n > 0 {
        // candle's CPU matmul (gemm) and its rayon-parallel ops both read RAYON_NUM_THREADS.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        pool = pool.num_threads(n);
    }
    check_pool_build(pool.build_global(), n)?;
    // With no count given, candle still asks for one before every matmul and conv: it reads the
    // variable, else counts cores from /proc/cpuinfo each time (7% of a digits-det FCOS step in
    // perf, mostly in the kernel's cpuinfo formatting). The pool's size answers it once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            rayon::current_num_threads().to_string(),
        );
    }
    Ok(())
}

/// The global pool's build result as mimlab reports it: a pool built earlier in the process is
/// fine (it is the one the kernels use), failing to start its threads is not.
fn check_pool_build(built: Result<(), rayon::ThreadPoolBuildError>, n: usize) -> Result<()> {
    match built {
        Ok(()) => Ok(()),
        // Only an I/O error (the threads could not be spawned) has a source; "already
        // initialized" has none.
        Err(e) if std::error::Error::source(&e).is_none() => Ok(()),
        Err(e) => {
            let count = if n == 0 {
                "one per core".to_string()
            } else {
                n.to_string()
            };
            bail!(
                "run.threads: cannot start {count} compute threads ({e}); \
                 lower run.threads or raise the process's memory/thread limits"
            )
        }
    }
}

/// Sizes the CPU compute threads (`n`; 0 = all cores), then runs `f` on one of them and returns
/// its result.
///
/// On the main thread, every parallel kernel (gemm, the fused ops) would wake the pool's workers
/// and sleep until they finish; on a worker, the step's own thread takes part in each kernel
/// (rayon work stealing). Training, finetuning, distillation, evaluation and `mimlab bench` run
/// this way. An error when the compute threads cannot be started.
pub fn with_cpu_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    set_cpu_threads(n)?;
    // Called from outside the pool, `rayon::scope` runs its body on a pool worker and blocks the
    // caller until it returns; called from a worker, it runs inline.
    Ok(rayon::scope(|_| f()))
}

/// [`with_cpu_threads`] for a command that trains: with `ranks` > 1 (`run.cpu_ranks`), `f` runs
/// once per rank of an in-process data-parallel group ([`crate::dist::ThreadGroup`]), each rank on
/// a thread of its own inside its own pool of `threads / ranks` compute threads (`threads` 0 =
/// all cores), where [`crate::dist::connect`] answers that rank. The result is rank 0's; the
/// other ranks end with [`crate::dist::WorkerDone`] after training, which is not an error. A rank
/// that fails breaks the group, so that the others stop at their next reduction instead of
/// waiting, and its error is returned (the first failing rank's, rank order).
pub fn with_cpu_ranks<R: Send>(
    threads: usize,
    ranks: usize,
    f: impl Fn() -> Result<R> + Sync,
) -> Result<R> {
    if ranks <= 1 {
        return with_cpu_threads(threads, &f)?;
    }
    let total = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let per_rank = (total / ranks).max(1);
    // before any thread is started: glibc fixes its heap limit at the first thread's first malloc
    arena_per_thread();
    // Sizes candle's pool and gemm's split (RAYON_NUM_THREADS) and the global pool for one rank.
    set_cpu_threads(per_rank)?;
    let groups = crate::dist::ThreadGroup::new(ranks);
    // a rank whose thread cannot start would leave the others waiting: break the group then
    let breaker = groups[0].clone();
    let results: Vec<Result<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(rank, group)| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("mimlab-rank-{rank}"))
                    .stack_size(COMPUTE_STACK_BYTES)
                    .spawn_scoped(scope, move || -> Result<R> {
                        let group = std::sync::Arc::new(group);
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(per_rank)
                            .stack_size(COMPUTE_STACK_BYTES)
                            .thread_name(move |i| format!("mimlab-rank-{rank}-{i}"))
                            .build()
                            .with_context(|| {
                                format!(
                                    "run.cpu_ranks: starting the compute threads of rank {rank}"
                                )
                            });
                        let out = pool.and_then(|pool| {
                            let g = group.clone();
                            let run = std::panic::AssertUnwindSafe(|| {
                                pool.install(|| {
                                    crate::dist::enter_thread_group(g);
                                    f()
                                })
                            });
                            std::panic::catch_unwind(run).unwrap_or_else(|p| {
                                group.abort();
                                std::panic::resume_unwind(p)
                            })
                        });
                        if out.as_ref().is_err_and(|e| !crate::dist::is_worker_done(e)) {
                            group.abort();
                        }
                        out
                    })
                    .with_context(|| format!("run.cpu_ranks: starting rank {rank}'s thread"))
                    .inspect_err(|_| breaker.abort())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(e) => Err(e),
            })
            .collect()
    });
    let mut rank0 = None;
    let mut errors = vec![];
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) if rank == 0 => rank0 = Some(v),
            Ok(_) => {}
            Err(e) if crate::dist::is_worker_done(&e) => {}
            Err(e) => errors.push(e.context(format!("data parallel rank {rank}"))),
        }
    }
    // a rank stopped by another's failure says only that; the failure itself is the news
    let first = errors
        .iter()
        .position(|e| !crate::dist::is_group_broken(e))
        .unwrap_or(0);
    match (errors.into_iter().nth(first), rank0) {
        (Some(e), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => bail!("run.cpu_ranks: rank 0 ended as a worker"),
    }
}

/// Keeps freed tensor buffers in the process instead of returning them to the OS on every op.
///
/// glibc hands allocations above its mmap threshold (128 KiB, adapting upwards) back to the kernel
/// on `free`, so each step page-faults its activations in again. Raising the threshold to glibc's
/// maximum (32 MiB, [`crate::alloc::LARGE`]: blocks from there up are the binary's
/// `CachingAlloc`'s to keep) and disabling trimming measured 19.3 s -> 16.2 s for 60 steps of
/// `configs/simmim/swinv2_nano_fmnist.yaml` on 2 cores (sys time 5.0 s -> 1.4 s), same losses.
/// Call it at process start, before other threads allocate.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, crate::alloc::LARGE as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One heap for all threads: the step runs on a rayon worker (`with_cpu_threads`), whose
        // own glibc arena would keep a second set of freed activations (tiny_w8 256 px SimMIM
        // peak: 3,732-3,843 MiB with per-thread arenas, 3,680-3,686 MiB with one, same speed).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Lets every thread started from now on get a glibc heap of its own (undoes the one shared
/// heap of [`tune_allocator`]) for data-parallel ranks: on one heap, the blocks one rank frees
/// are handed to the other while still in the first core's cache, and the allocator's lock is
/// shared. Measured on the 2-core Zen 4 machine, digits-det FCOS recipe, `run.cpu_ranks: 2`
/// (median images/s of steps 30-120, three runs each, alternating): one heap 55.8-71.0, a heap
/// per thread 76.0-78.6 (one rank on two threads: 66-69).
fn arena_per_thread() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX only bounds how many heaps
    // threads that have not allocated yet may create.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 64);
    }
}

/// Arithmetic of the matrix products (`run.precision`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Linear layers and attention products in bfloat16 on a GPU (f32 in and out, f32 weights).
    Bf16,
}

/// The process-wide matmul precision (0 = f32, 1 = bf16), read by the models' composed products.
static MATMUL_PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of the matrix products of every model in the process (the trainer sets
/// `run.precision`, `mimlab bench --precision` its rows').
pub fn set_matmul_precision(p: Precision) {
    MATMUL_PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The dtype f32 matrix products on a GPU are computed in: `Some(BF16)` under
/// [`Precision::Bf16`], else `None` (as they are). CPU products are never cast.
pub fn matmul_dtype(dev: &Device) -> Option<candle_core::DType> {
    (!dev.is_cpu() && MATMUL_PRECISION.load(Ordering::Relaxed) == Precision::Bf16 as u8)
        .then_some(candle_core::DType::BF16)
}

/// What `dev` is, for reports: `cpu`, or `cuda:N` and the GPU's name (`cuda:0 NVIDIA H200`).
pub fn device_name(dev: &Device) -> String {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            let ctx = stream.context();
            let name = ctx
                .name()
                .unwrap_or_else(|e| format!("(name unknown: {e})"));
            format!("cuda:{} {name}", ctx.ordinal())
        }
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

/// Device memory in use at its peak since the last [`reset_peak_device_memory`], MiB: the
/// high-water mark of the GPU's default memory pool, which candle's CUDA allocations come from
/// (cudarc allocates with `cuMemAllocAsync`), the counterpart of PyTorch's
/// `torch.cuda.max_memory_allocated`. `None` on the CPU (the process's peak resident set,
/// [`crate::bench::peak_rss_mib`], is the figure there) and in a build without CUDA.
pub fn peak_device_memory_mib(dev: &Device) -> Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_pool::default_pool(dev)? {
        return Ok(Some(cuda_pool::used_high(pool)? as f64 / (1024.0 * 1024.0)));
    }
    let _ = dev;
    Ok(None)
}

/// Starts a new peak for [`peak_device_memory_mib`] (waits for the device first); a no-op on the
/// CPU.
pub fn reset_peak_device_memory(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_pool::default_pool(dev)? {
        cuda_pool::reset_used_high(pool)?;
    }
    Ok(())
}

/// The default memory pool of a CUDA device, through the driver API candle's cudarc exposes.
#[cfg(feature = "cuda")]
mod cuda_pool {
    use anyhow::{Context, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    const USED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    /// `dev`'s default pool; `None` on other devices or where the GPU has no memory pools (then
    /// cudarc allocates with plain `cuMemAlloc` and there is no high-water mark to read).
    pub fn default_pool(dev: &Device) -> Result<Option<sys::CUmemoryPool>> {
        let Device::Cuda(cuda) = dev else {
            return Ok(None);
        };
        let stream = cuda.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().context("binding the CUDA context")?;
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a device handle of a live context and a valid out pointer.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .context("cuDeviceGetDefaultMemPool")?;
        Ok(Some(pool))
    }

    pub fn used_high(pool: sys::CUmemoryPool) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t, written through a valid pointer.
        unsafe { sys::cuMemPoolGetAttribute(pool, USED_HIGH, (&mut v as *mut u64).cast()) }
            .result()
            .context("cuMemPoolGetAttribute(USED_MEM_HIGH)")?;
        Ok(v)
    }

    pub fn reset_used_high(pool: sys::CUmemoryPool) -> Result<()> {
        // the driver accepts only 0 for a high-water mark: "reset to the current use"
        let mut zero: u64 = 0;
        // SAFETY: as above.
        unsafe { sys::cuMemPoolSetAttribute(pool, USED_HIGH, (&mut zero as *mut u64).cast()) }
            .result()
            .context("cuMemPoolSetAttribute(USED_MEM_HIGH)")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_unknown_is_named() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("run.device") && err.contains("tpu"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
    }

    #[test]
    fn a_pool_whose_threads_cannot_start_is_an_error_naming_run_threads() {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(200)
            .spawn_handler(|_| Err(std::io::Error::other("Resource temporarily unavailable")))
            .build()
            .map(|_| ());
        let err = check_pool_build(built, 200).unwrap_err().to_string();
        assert_eq!(
            err,
            "run.threads: cannot start 200 compute threads (Resource temporarily unavailable); \
             lower run.threads or raise the process's memory/thread limits"
        );
    }

    #[test]
    fn a_global_pool_built_earlier_is_kept() {
        // Whichever of these builds comes second finds the pool there already.
        let _ = rayon::ThreadPoolBuilder::new().build_global();
        let again = rayon::ThreadPoolBuilder::new().build_global();
        assert!(again.is_err());
        check_pool_build(again, 3).unwrap();
    }
}
