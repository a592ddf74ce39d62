//! MPI backend (`--features mpi`): Open MPI (or any MPI) through the `mpi` crate (rsmpi), for CPU
//! processes on one or several machines, launched by `mpirun -np N mimlab ...`.
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives};
use mpi::Threading;

use super::Communicator;

/// Finalizes MPI when dropped.
pub struct Finalize(#[allow(dead_code)] mpi::environment::Universe);

/// `MPI_COMM_WORLD`. Calls are serialized by the mutex: the trainer calls from its compute thread
/// (a rayon worker), not the thread that initialized MPI, which `MPI_THREAD_SERIALIZED` allows.
pub struct MpiGroup {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is a handle to MPI_COMM_WORLD, valid until MPI_Finalize (at the end of
// `main`, after every trainer is gone); every use goes through the mutex, one thread at a time,
// as MPI_THREAD_SERIALIZED requires.
unsafe impl Send for MpiGroup {}
unsafe impl Sync for MpiGroup {}

/// Initializes MPI (`MPI_THREAD_SERIALIZED`); the group and its finalizer.
pub fn init() -> Result<(Arc<dyn Communicator>, Finalize)> {
    let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
        .context("MPI: MPI_Init_thread failed or MPI was initialized twice")?;
    ensure!(
        level >= Threading::Serialized,
        "MPI: the library gives thread level {level:?}, mimlab needs Serialized (calls come from \
         the compute thread)"
    );
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let group = MpiGroup {
        world: Mutex::new(world),
        rank,
        size,
    };
    Ok((Arc::new(group), Finalize(universe)))
}

impl MpiGroup {
    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let w = self.world.lock().expect("MPI communicator poisoned");
        f(&w)
    }
}

impl Communicator for MpiGroup {
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::max()));
        Ok(())
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
}
