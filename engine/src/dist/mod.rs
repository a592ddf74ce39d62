//! Data parallelism: one process per device (or per CPU node), the same model in each, every
//! global batch split by rank, gradients averaged before clipping and the AdamW step, so that N
//! processes at global batch B train the same model as one process at batch B.
//!
//! The communication is an existing engine's, behind the small [`Communicator`] interface the
//! trainer calls: MPI for CPU processes (`--features mpi`: Open MPI through the `mpi` crate,
//! launched by `mpirun`), NCCL for GPUs (`--features nccl`: through candle's cudarc, launched by
//! `scripts/launch_gpus.sh`), and [`Local`] for one process. [`ThreadGroup`] runs ranks as
//! threads of one process: `run.cpu_ranks` ([`crate::device::with_cpu_ranks`] starts them and
//! [`connect`] answers each its rank), and the tests.
//!
//! What the trainer does with it (engine/src/trainer/fit.rs):
//! - `train.batch_size` is the global batch; rank r takes samples `[B r / N, B (r + 1) / N)` of
//!   each batch ([`shard_range`]), so the sampler order does not depend on N, and a checkpoint
//!   resumes at the same position under any N.
//! - every rank starts from the same seed-derived weights, checked by a hash
//!   ([`check_same_weights`]) before the first step;
//! - the loss and metrics of a step are averaged over ranks ([`Communicator::all_reduce_sum`])
//!   before they are checked for NaN and logged; the gradients are averaged
//!   ([`average_gradients`]) before the clip;
//! - only rank 0 writes the run folder (config, logs, checkpoints, pictures, evaluations);
//!   `RUN/world.jsonl` records the world size of every start.
//!
//! Exactness: the per-rank losses are means over equal shards, so their average is the global
//! mean for mean-reduced losses over a fixed number of terms per sample (classification, SimMIM
//! with a fixed mask ratio). Losses normalized by a batch-dependent count (FCOS's positives,
//! segmentation's valid pixels), per-sample randomness drawn in batch order (drop path,
//! dropout), MoE capacity per batch and padding to the largest image of a batch differ between
//! a shard and the whole batch: such runs are data parallel but not bit-for-bit the
//! one-process run.
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

/// What the trainer needs from a group of processes.
pub trait Communicator: Send + Sync {
    /// `local`, `threads`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn world_size(&self) -> usize;
    /// Whether steps go through the group: more than one rank, or a real backend (a 1-rank NCCL
    /// or MPI group still runs its collectives). [`Local`] alone is not.
    fn parallel(&self) -> bool {
        self.world_size() > 1 || self.backend() != "local"
    }
    /// Element-wise sum over the ranks, in place; every rank gets the same values.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise maximum over the ranks, in place.
    fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()>;
    /// Sum over the ranks of `t` (any shape, f32), a new tensor on `t`'s device. Default:
    /// through host memory with [`Communicator::all_reduce_sum_f32`]; NCCL keeps it on the GPU.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        self.all_reduce_sum_f32(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
    /// [`Communicator::all_reduce_sum`] of f32 values (gradients).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
}

/// One process: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Communicator for Local {
    fn backend(&self) -> &'static str {
        "local"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// Samples `[start, end)` of a batch of `n` that rank `rank` of `world` trains on: contiguous
/// slices, in rank order, sizes differing by at most one.
pub fn shard_range(n: usize, rank: usize, world: usize) -> (usize, usize) {
    let world = world.max(1);
    (n * rank / world, n * (rank + 1) / world)
}

/// [`shard_range`] of a global batch of `n` that must split evenly (every rank trains on the
/// same number of samples): an error naming `train.batch_size` otherwise.
pub fn even_shard(n: usize, rank: usize, world: usize) -> Result<(usize, usize)> {
    let world = world.max(1);
    ensure!(
        n.is_multiple_of(world),
        "data parallel: a batch of {n} samples does not split evenly over {world} processes \
         (train.batch_size is the global batch: make it a multiple of {world})"
    );
    Ok(shard_range(n, rank, world))
}

/// How this process was launched, from the launchers' environment: `mpirun` (Open MPI's
/// `OMPI_COMM_WORLD_SIZE`, or `PMI_SIZE` of MPICH and Slurm), `scripts/launch_gpus.sh`
/// (`MIMLAB_DIST=nccl` with `MIMLAB_RANK` and `MIMLAB_WORLD_SIZE`), or neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A plain process.
    Single,
    /// Under an MPI launcher with this many processes.
    Mpi { world_size: usize },
    /// A NCCL group member.
    Nccl { rank: usize, world_size: usize },
}

impl Launch {
    /// Reads the launch from `var` (the process environment in [`Launch::from_env`]).
    pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("environment: {name}={v:?} is not a count"))
                })
                .transpose()
        };
        if let Some(d) = var("MIMLAB_DIST") {
            ensure!(
                d == "nccl",
                "environment: MIMLAB_DIST={d:?}: the only backend set this way is `nccl` (MPI \
                 runs are recognized from mpirun's variables)"
            );
            let (Some(rank), Some(world_size)) = (num("MIMLAB_RANK")?, num("MIMLAB_WORLD_SIZE")?)
            else {
                bail!("environment: MIMLAB_DIST=nccl needs MIMLAB_RANK and MIMLAB_WORLD_SIZE");
            };
            ensure!(
                rank < world_size,
                "environment: MIMLAB_RANK={rank} is not below MIMLAB_WORLD_SIZE={world_size}"
            );
            return Ok(Self::Nccl { rank, world_size });
        }
        match num("OMPI_COMM_WORLD_SIZE")?.or(num("PMI_SIZE")?) {
            Some(world_size) => Ok(Self::Mpi { world_size }),
            None => Ok(Self::Single),
        }
    }

    /// [`Launch::detect`] on the process environment.
    pub fn from_env() -> Result<Self> {
        Self::detect(|k| std::env::var(k).ok())
    }
}

/// The process's MPI group, set up by [`init`].
static PROCESS_GROUP: OnceLock<Arc<dyn Communicator>> = OnceLock::new();

/// MPI's finalizer, taken by [`finalize`].
#[cfg(feature = "mpi")]
static FINALIZE: Mutex<Option<mpi::Finalize>> = Mutex::new(None);

/// Keeps the process group alive; MPI is finalized when it is dropped (at the end of `main`).
#[must_use = "the process group ends when the guard is dropped"]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        finalize();
    }
}

/// Finalizes MPI if this process joined an MPI group (once; later calls do nothing).
pub fn finalize() {
    #[cfg(feature = "mpi")]
    drop(FINALIZE.lock().map(|mut f| f.take()));
}

/// Ends a rank > 0 of a launched data-parallel run after training: rank 0 alone evaluates,
/// reports and writes what follows, so the others leave (MPI finalized, exit status 0); a rank
/// thread of an in-process group gets [`WorkerDone`] to return instead. Does nothing on rank 0
/// or in a single process.
pub fn leave_if_worker(comm_rank: usize) -> Result<()> {
    if comm_rank > 0 && THREAD_GROUP.with(|g| g.borrow().is_some()) {
        return Err(WorkerDone.into());
    }
    if comm_rank > 0 && Launch::from_env().is_ok_and(|l| l != Launch::Single) {
        eprintln!("data parallel: rank {comm_rank} done");
        finalize();
        std::process::exit(0);
    }
    Ok(())
}

/// Call once at the start of `main`: joins the MPI group when launched by `mpirun` (an error,
/// naming the build flag, when this binary was built without MPI). NCCL groups are joined later,
/// by the trainer, on the run's GPU ([`connect`]).
pub fn init() -> Result<Guard> {
    match Launch::from_env()? {
        Launch::Mpi { world_size } => {
            #[cfg(feature = "mpi")]
            {
                let (comm, fin) = mpi::init()?;
                ensure!(
                    comm.world_size() == world_size,
                    "MPI: the launcher says {world_size} processes, MPI_Comm_size {}",
                    comm.world_size()
                );
                let _ = PROCESS_GROUP.set(comm);
                *FINALIZE.lock().expect("MPI finalizer poisoned") = Some(fin);
                Ok(Guard(()))
            }
            #[cfg(not(feature = "mpi"))]
            {
                ensure!(
                    world_size <= 1,
                    "launched by an MPI launcher with {world_size} processes, but this mimlab was \
                     built without MPI: build it with `cargo build --release --features mpi` \
                     (needs Open MPI: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`)"
                );
                Ok(Guard(()))
            }
        }
        _ => Ok(Guard(())),
    }
}

/// The communicator a run on `device` uses: the MPI group of [`init`], a NCCL group on the GPU
/// when launched for one, else [`Local`].
pub fn connect(device: &Device) -> Result<Arc<dyn Communicator>> {
    if let Some(g) = THREAD_GROUP.with(|g| g.borrow().clone()) {
        return Ok(g);
    }
    if let Some(c) = PROCESS_GROUP.get() {
        return Ok(c.clone());
    }
    match Launch::from_env()? {
        Launch::Nccl { rank, world_size } => {
            #[cfg(feature = "nccl")]
            {
                Ok(Arc::new(nccl::NcclGroup::join(device, rank, world_size)?))
            }
            #[cfg(not(feature = "nccl"))]
            {
                let _ = device;
                bail!(
                    "MIMLAB_DIST=nccl (rank {rank} of {world_size}), but this mimlab was built \
                     without NCCL: build it with `--features nccl`"
                )
            }
        }
        Launch::Mpi { world_size } if world_size > 1 => {
            bail!("launched by mpirun with {world_size} processes, but mimlab_engine::dist::init was not called")
        }
        _ => Ok(Arc::new(Local)),
    }
}

/// An order-fixed hash (CRC-32C) of the variables' values, by name.
pub fn weights_hash(named: &[(String, Tensor)]) -> Result<u32> {
    let mut named: Vec<&(String, Tensor)> = named.iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = 0u32;
    for (name, t) in named {
        crc = crc32c::crc32c_append(crc, name.as_bytes());
        let v = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        for x in v {
            crc = crc32c::crc32c_append(crc, &x.to_le_bytes());
        }
    }
    Ok(crc)
}

/// Errors on every rank unless all ranks hold the same weights (by [`weights_hash`]).
pub fn check_same_weights(comm: &dyn Communicator, named: &[(String, Tensor)]) -> Result<u32> {
    let h = weights_hash(named)? as f64;
    // max of h and of -h: equal everywhere iff max == min == h
    let mut v = [h, -h];
    comm.all_reduce_max(&mut v)?;
    ensure!(
        v[0] == h && -v[1] == h,
        "data parallel: the ranks start from different weights (hash of rank {}: {:08x}; \
         over the ranks: {:08x}..{:08x}); every rank needs the same config, seed and --init",
        comm.rank(),
        h as u32,
        (-v[1]) as u32,
        v[0] as u32
    );
    Ok(h as u32)
}

/// Replaces the gradients of `vars` in `grads` by their mean over the ranks. A variable with a
/// gradient on some rank only gets zeros from the others (it still gets one everywhere, so the
/// optimizer steps it on every rank alike).
pub fn average_gradients(
    comm: &dyn Communicator,
    vars: &[Var],
    grads: &mut GradStore,
) -> Result<()> {
    if !comm.parallel() {
        return Ok(());
    }
    let w = comm.world_size();
    let mut present: Vec<f64> = vars
        .iter()
        .map(|v| f64::from(u8::from(grads.get(v.as_tensor()).is_some())))
        .collect();
    comm.all_reduce_max(&mut present)?;
    let mut flat = vec![];
    let mut parts = vec![];
    for (v, p) in vars.iter().zip(&present) {
        if *p == 0.0 {
            continue;
        }
        let g = match grads.remove(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32)?,
            None => Tensor::zeros(v.shape(), DType::F32, v.device())?,
        };
        parts.push((v, g.elem_count()));
        flat.push(g.flatten_all()?);
    }
    if flat.is_empty() {
        return Ok(());
    }
    // one collective for all of them
    let all = Tensor::cat(&flat, 0)?;
    let mean = comm
        .all_reduce_sum_tensor(&all)
        .context("data parallel: averaging the gradients")?
        .affine(1.0 / w as f64, 0.0)?;
    let mut at = 0;
    for (v, n) in parts {
        let g = mean
            .narrow(0, at, n)?
            .reshape(v.shape())?
            .to_dtype(v.dtype())?;
        grads.insert(v.as_tensor(), g);
        at += n;
    }
    Ok(())
}

/// Ranks as threads of one process (`run.cpu_ranks`, tests): `ThreadGroup::new(n)` gives one
/// communicator per rank, each to be moved to its own thread (a clone is the same rank's handle,
/// e.g. to [`ThreadGroup::abort`] the group from outside). Sums run in rank order, so every rank
/// gets bit-identical results.
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<ThreadShared>,
}

struct ThreadShared {
    world: usize,
    slots: Mutex<Vec<Vec<f64>>>,
    /// Each rank's f32 buffer of the tensor reduction in progress.
    tensors: Mutex<Vec<Arc<Vec<f32>>>>,
    barrier: AbortableBarrier,
}

/// A barrier that a failing rank can break: every wait then returns an error instead of
/// blocking forever on a rank that will not come.
struct AbortableBarrier {
    world: usize,
    /// (threads arrived in this round, round number, aborted)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl AbortableBarrier {
    fn new(world: usize) -> Self {
        Self {
            world,
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<()> {
        let broken = || anyhow::Error::new(GroupBroken);
        let mut st = self.state.lock().expect("thread group poisoned");
        if st.2 {
            return Err(broken());
        }
        st.0 += 1;
        if st.0 == self.world {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let round = st.1;
        while st.1 == round && !st.2 {
            st = self.cv.wait(st).expect("thread group poisoned");
        }
        if st.1 == round {
            return Err(broken());
        }
        Ok(())
    }

    fn abort(&self) {
        self.state.lock().expect("thread group poisoned").2 = true;
        self.cv.notify_all();
    }
}

impl ThreadGroup {
    /// The `world` members of a new group, rank 0 first.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(ThreadShared {
            world,
            slots: Mutex::new(vec![vec![]; world]),
            tensors: Mutex::new((0..world).map(|_| Arc::new(vec![])).collect()),
            barrier: AbortableBarrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn reduce(&self, buf: &mut [f64], op: fn(f64, f64) -> f64) -> Result<()> {
        let s = &self.shared;
        s.slots.lock().expect("thread group poisoned")[self.rank] = buf.to_vec();
        s.barrier.wait()?;
        {
            let slots = s.slots.lock().expect("thread group poisoned");
            ensure!(
                slots.iter().all(|v| v.len() == buf.len()),
                "thread group: ranks reduce buffers of different lengths"
            );
            for (i, x) in buf.iter_mut().enumerate() {
                *x = slots[1..].iter().fold(slots[0][i], |acc, v| op(acc, v[i]));
            }
        }
        // nobody overwrites a slot before everyone has read them all
        s.barrier.wait()
    }

    /// Breaks the group: every rank's next (or current) reduction fails instead of waiting for
    /// this one. A rank that fails calls it, so that the others stop too.
    pub fn abort(&self) {
        self.shared.barrier.abort();
    }
}

thread_local! {
    /// The group of a rank thread ([`enter_thread_group`]); [`connect`] answers it.
    static THREAD_GROUP: std::cell::RefCell<Option<Arc<ThreadGroup>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes `group` this thread's communicator: [`connect`] on this thread returns it, and
/// [`leave_if_worker`] ends a rank > 0 with [`WorkerDone`] instead of exiting the process.
pub fn enter_thread_group(group: Arc<ThreadGroup>) {
    THREAD_GROUP.with(|g| *g.borrow_mut() = Some(group));
}

/// Whether this thread is a rank > 0 of an in-process group ([`enter_thread_group`]): its setup
/// lines would repeat rank 0's ([`crate::rank0_eprintln`]).
pub fn is_worker_thread() -> bool {
    THREAD_GROUP.with(|g| g.borrow().as_ref().is_some_and(|g| g.rank > 0))
}

/// `eprintln!` except on the ranks > 0 of an in-process data-parallel group (`run.cpu_ranks`),
/// whose setup lines (data, model, init) would repeat rank 0's.
#[macro_export]
macro_rules! rank0_eprintln {
    ($($arg:tt)*) => {
        if !$crate::dist::is_worker_thread() {
            eprintln!($($arg)*);
        }
    };
}

/// What a rank > 0 of an in-process group ([`ThreadGroup`]) returns after training, where a
/// launched rank would exit: rank 0 alone evaluates and reports. Not a failure.
#[derive(Debug, Clone, Copy)]
pub struct WorkerDone;

impl std::fmt::Display for WorkerDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("data parallel: this rank's training is done (rank 0 reports)")
    }
}

impl std::error::Error for WorkerDone {}

/// What a rank of an in-process group gets from a reduction after another rank failed.
#[derive(Debug, Clone, Copy)]
pub struct GroupBroken;

impl std::fmt::Display for GroupBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("data parallel: another rank failed, so this one stopped")
    }
}

impl std::error::Error for GroupBroken {}

/// Whether `e` (or an error it wraps) is [`WorkerDone`].
pub fn is_worker_done(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<WorkerDone>())
}

/// Whether `e` (or an error it wraps) is [`GroupBroken`].
pub fn is_group_broken(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<GroupBroken>())
}

impl Communicator for ThreadGroup {
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(buf, |a, b| a + b)
    }
    fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(buf, f64::max)
    }
    /// The gradients' reduction without the f64 round trip of [`Self::all_reduce_sum_f32`]: each
    /// rank shares its f32 buffer and sums all of them in rank order (the same f32 values).
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mine = Arc::new(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let n = mine.len();
        let s = &self.shared;
        s.tensors.lock().expect("thread group poisoned")[self.rank] = mine;
        s.barrier.wait()?;
        let all: Vec<Arc<Vec<f32>>> = s.tensors.lock().expect("thread group poisoned").clone();
        ensure!(
            all.iter().all(|v| v.len() == n),
            "thread group: ranks reduce tensors of different sizes"
        );
        let mut sum = all[0].as_ref().clone();
        for other in &all[1..] {
            for (a, b) in sum.iter_mut().zip(other.iter()) {
                *a += *b;
            }
        }
        drop(all);
        // nobody replaces a buffer before everyone has summed them all
        s.barrier.wait()?;
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        // f32 sums in rank order, as an f32 all-reduce does (each partial sum rounded to f32)
        let mut wide: Vec<f64> = buf.iter().map(|&x| f64::from(x)).collect();
        self.reduce(&mut wide, |a, b| f64::from(a as f32 + b as f32))?;
        for (o, x) in buf.iter_mut().zip(wide) {
            *o = x as f32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_rank_order() {
        assert_eq!(shard_range(8, 0, 2), (0, 4));
        assert_eq!(shard_range(8, 1, 2), (4, 8));
        assert_eq!(shard_range(8, 0, 1), (0, 8));
        // uneven: sizes 2, 3, 2 cover 0..7
        let r: Vec<_> = (0..3).map(|k| shard_range(7, k, 3)).collect();
        assert_eq!(r, vec![(0, 2), (2, 4), (4, 7)]);
    }

    #[test]
    fn launch_is_read_from_the_launchers_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Launch::detect(env(&[])).unwrap(), Launch::Single);
        assert_eq!(
            Launch::detect(env(&[("OMPI_COMM_WORLD_SIZE", "2")])).unwrap(),
            Launch::Mpi { world_size: 2 }
        );
        assert_eq!(
            Launch::detect(env(&[("PMI_SIZE", "4")])).unwrap(),
            Launch::Mpi { world_size: 4 }
        );
        assert_eq!(
            Launch::detect(env(&[
                ("MIMLAB_DIST", "nccl"),
                ("MIMLAB_RANK", "1"),
                ("MIMLAB_WORLD_SIZE", "2")
            ]))
            .unwrap(),
            Launch::Nccl {
                rank: 1,
                world_size: 2
            }
        );
        let e = Launch::detect(env(&[("MIMLAB_DIST", "nccl"), ("MIMLAB_RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs MIMLAB_RANK and MIMLAB_WORLD_SIZE"), "{e}");
        let e = Launch::detect(env(&[
            ("MIMLAB_DIST", "nccl"),
            ("MIMLAB_RANK", "2"),
            ("MIMLAB_WORLD_SIZE", "2"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MIMLAB_RANK=2 is not below MIMLAB_WORLD_SIZE=2"),
            "{e}"
        );
        let e = Launch::detect(env(&[("OMPI_COMM_WORLD_SIZE", "two")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("OMPI_COMM_WORLD_SIZE=\"two\" is not a count"),
            "{e}"
        );
        let e = Launch::detect(env(&[("MIMLAB_DIST", "gloo")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MIMLAB_DIST=\"gloo\""), "{e}");
    }

    /// Three thread ranks: sums and maxima in rank order, the same on every rank; gradients
    /// averaged, with a variable that only one rank has a gradient for averaged against zeros.
    /// What each rank of the reduction test sees: sums, maxima, the two averaged gradients.
    type Seen = (Vec<f64>, Vec<f64>, Vec<f32>, Vec<f32>);

    #[test]
    fn thread_group_reduces_and_averages_gradients() -> Result<()> {
        let handles: Vec<_> = ThreadGroup::new(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Result<Seen> {
                    let r = c.rank() as f64;
                    let mut s = vec![r, 1.0, -r];
                    c.all_reduce_sum(&mut s)?;
                    let mut m = vec![r, -r];
                    c.all_reduce_max(&mut m)?;
                    let dev = Device::Cpu;
                    let a = Var::zeros(2, DType::F32, &dev)?;
                    let b = Var::zeros((1, 2), DType::F32, &dev)?;
                    // loss: (r + 1) * sum(a) [+ sum(b) on rank 1 only]
                    let mut loss = (a.as_tensor().sum_all()? * (r + 1.0))?;
                    if c.rank() == 1 {
                        loss = (loss + b.as_tensor().sum_all()?)?;
                    }
                    let mut grads = loss.backward()?;
                    let vars = [a.clone(), b.clone()];
                    average_gradients(&c, &vars, &mut grads)?;
                    let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
                    let gb = grads
                        .get(b.as_tensor())
                        .unwrap()
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    Ok((s, m, ga, gb))
                })
            })
            .collect();
        for h in handles {
            let (s, m, ga, gb) = h.join().unwrap()?;
            assert_eq!(s, vec![3.0, 3.0, -3.0]);
            assert_eq!(m, vec![2.0, 0.0]);
            // mean of 1, 2, 3
            assert_eq!(ga, vec![2.0, 2.0]);
            // mean of 0, 1, 0
            assert_eq!(gb, vec![1.0 / 3.0; 2]);
        }
        Ok(())
    }

    /// The tensor reduction of thread ranks is the f32 sum in rank order, bit for bit what the
    /// f64-buffer path gives, on every rank, for values whose sum depends on the order.
    #[test]
    fn thread_group_tensor_sum_is_the_rank_order_f32_sum() -> Result<()> {
        let values = |rank: usize| -> Vec<f32> {
            (0..1000)
                .map(|i| {
                    ((i * 7919 + rank * 104_729) % 1000) as f32 * 1.0e-3 - 0.4 + rank as f32 * 1.0e7
                })
                .collect()
        };
        let handles: Vec<_> = ThreadGroup::new(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Result<(Vec<f32>, Vec<f32>)> {
                    let mine = values(c.rank());
                    let t = Tensor::from_vec(mine.clone(), (10, 100), &Device::Cpu)?;
                    let summed = c.all_reduce_sum_tensor(&t)?;
                    assert_eq!(summed.dims(), &[10, 100]);
                    let mut flat = mine;
                    c.all_reduce_sum_f32(&mut flat)?;
                    Ok((summed.flatten_all()?.to_vec1::<f32>()?, flat))
                })
            })
            .collect();
        let want: Vec<f32> = (0..1000)
            .map(|i| (values(0)[i] + values(1)[i]) + values(2)[i])
            .collect();
        for h in handles {
            let (tensor, buffer) = h.join().unwrap()?;
            assert_eq!(tensor, want);
            assert_eq!(buffer, want);
        }
        Ok(())
    }

    /// A rank that fails breaks the group: the ranks already waiting in a reduction and those
    /// that reach one later get [`GroupBroken`] instead of waiting forever.
    #[test]
    fn an_aborted_group_stops_the_waiting_ranks() {
        let mut group = ThreadGroup::new(3);
        let failing = group.pop().unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut v = vec![1.0];
                    let first = c.all_reduce_sum(&mut v);
                    let later = c.all_reduce_max(&mut v);
                    (first, later)
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        failing.abort();
        for h in handles {
            let (first, later) = h.join().unwrap();
            for r in [first, later] {
                let e = r.unwrap_err();
                assert!(is_group_broken(&e), "{e:#}");
                assert!(!is_worker_done(&e));
                assert!(e.to_string().contains("another rank failed"), "{e}");
            }
        }
        let e = failing.all_reduce_sum(&mut [0.0]).unwrap_err();
        assert!(
            is_group_broken(&e.context("step 3")),
            "the chain is searched"
        );
    }

    #[test]
    fn different_weights_are_caught() -> Result<()> {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Result<(u32, String)> {
                    let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
                    let same = check_same_weights(&c, &[("w".into(), t.clone())])?;
                    let other = (t + c.rank() as f64)?;
                    let e = check_same_weights(&c, &[("w".into(), other)])
                        .unwrap_err()
                        .to_string();
                    Ok((same, e))
                })
            })
            .collect();
        for h in handles {
            let (same, e) = h.join().unwrap()?;
            assert_eq!(
                same,
                weights_hash(&[("w".into(), Tensor::new(&[1f32, 2.0], &Device::Cpu)?)])?
            );
            assert!(e.contains("the ranks start from different weights"), "{e}");
        }
        Ok(())
    }
}
