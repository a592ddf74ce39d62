//! NCCL backend (`--features nccl`): one process per GPU, the reductions on the GPU through
//! candle's cudarc, on the stream candle's own kernels use. `scripts/launch_gpus.sh N CMD...`
//! starts the N processes with `MIMLAB_DIST=nccl`, `MIMLAB_RANK`, `MIMLAB_WORLD_SIZE`,
//! `MIMLAB_NCCL_ID` (a file through which rank 0 hands out NCCL's unique id) and
//! `CUDA_VISIBLE_DEVICES` = the rank, so that each process's `cuda` is its own GPU.
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::Communicator;

/// How long ranks > 0 wait for rank 0's id file.
const ID_WAIT: Duration = Duration::from_secs(300);

/// A NCCL communicator on this process's GPU.
pub struct NcclGroup {
    comm: Mutex<Comm>,
    device: Device,
    rank: usize,
    world: usize,
}

// SAFETY: the NCCL communicator is used by one thread at a time (the mutex); NCCL allows a
// communicator to be used from any thread as long as calls are not concurrent.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Joins the group as `rank` of `world` on `device` (a CUDA device).
    pub fn join(device: &Device, rank: usize, world: usize) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            bail!("MIMLAB_DIST=nccl: NCCL needs run.device cuda, the run is on {device:?}");
        };
        let id = if world == 1 {
            Id::new().map_err(|e| anyhow::anyhow!("NCCL: ncclGetUniqueId: {e:?}"))?
        } else {
            exchange_id(rank)?
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id).map_err(|e| {
            anyhow::anyhow!("NCCL: ncclCommInitRank (rank {rank} of {world}): {e:?}")
        })?;
        eprintln!(
            "data parallel: NCCL rank {rank} of {world} on {}",
            super::super::device::device_name(device)
        );
        Ok(Self {
            comm: Mutex::new(comm),
            device: device.clone(),
            rank,
            world,
        })
    }

    /// Sum over the ranks of a contiguous f32 or f64 tensor on this GPU.
    fn reduce_on_gpu(&self, t: &Tensor, op: ReduceKind) -> Result<Tensor> {
        let comm = self.comm.lock().expect("NCCL communicator poisoned");
        let t = t.to_device(&self.device)?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllReduce { comm: &comm, op })?)
    }

    fn reduce_host(&self, buf: &mut [f64], op: ReduceKind) -> Result<()> {
        let t = Tensor::from_slice(buf, buf.len(), &self.device)?;
        let out = self.reduce_on_gpu(&t, op)?.to_vec1::<f64>()?;
        buf.copy_from_slice(&out);
        Ok(())
    }
}

/// Rank 0 writes a new unique id to `MIMLAB_NCCL_ID` (atomically); the others wait for it.
fn exchange_id(rank: usize) -> Result<Id> {
    let path = PathBuf::from(
        std::env::var("MIMLAB_NCCL_ID")
            .context("MIMLAB_DIST=nccl with several ranks needs MIMLAB_NCCL_ID (a file path)")?,
    );
    if rank == 0 {
        let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        crate::fsutil::write_atomic(&path, &bytes)?;
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.len() == 128 {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (o, b) in internal.iter_mut().zip(bytes) {
                    *o = b as std::ffi::c_char;
                }
                return Ok(Id::uninit(internal));
            }
        }
        if start.elapsed() > ID_WAIT {
            bail!(
                "NCCL rank {rank}: no id from rank 0 in {} after {} s",
                path.display(),
                ID_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Clone, Copy)]
enum ReduceKind {
    Sum,
    Max,
}

/// `ncclAllReduce` of a contiguous f32/f64 tensor into a new one, on the communicator's stream
/// (candle's stream of the device).
struct AllReduce<'a> {
    comm: &'a Comm,
    op: ReduceKind,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce: the tensor is on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl-all-reduce: not contiguous")
        };
        let op = match self.op {
            ReduceKind::Sum => ReduceOp::Sum,
            ReduceKind::Max => ReduceOp::Max,
        };
        let err = |e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}"));
        let dev = s.device.clone();
        let out = match s.dtype() {
            DType::F32 => {
                let src = s.as_cuda_slice::<f32>()?.slice(start..end);
                // SAFETY: every element is written by the all-reduce.
                let mut dst = unsafe { dev.alloc::<f32>(n) }?;
                self.comm.all_reduce(&src, &mut dst, &op).map_err(err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::F64 => {
                let src = s.as_cuda_slice::<f64>()?.slice(start..end);
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<f64>(n) }?;
                self.comm.all_reduce(&src, &mut dst, &op).map_err(err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            other => candle_core::bail!("nccl-all-reduce: {other:?} (f32 and f64 only)"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Communicator for NcclGroup {
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce_host(buf, ReduceKind::Sum)
    }
    fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce_host(buf, ReduceKind::Max)
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.reduce_on_gpu(&t.to_dtype(DType::F32)?, ReduceKind::Sum)?;
        Ok(out.to_device(t.device())?)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let t = Tensor::from_slice(buf, buf.len(), &self.device)?;
        let out = self.reduce_on_gpu(&t, ReduceKind::Sum)?.to_vec1::<f32>()?;
        buf.copy_from_slice(&out);
        Ok(())
    }
}
