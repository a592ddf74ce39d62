//! `device::with_cpu_ranks` (`run.cpu_ranks`) in a process of its own: it sizes rayon's global
//! pool and RAYON_NUM_THREADS for one rank, so this test file must be their only user.
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Result};
use candle_core::Device;
use mimlab_engine::device::with_cpu_ranks;
use mimlab_engine::dist::{connect, is_worker_done, WorkerDone};

mod common;

/// Two ranks of one thread each on a 2-thread budget: each runs `f` on a compute thread of its
/// own pool (one thread, deep stack), where `connect` answers its rank of a 2-rank "threads"
/// group whose reductions work; rank 0's value is returned and rank 1's `WorkerDone` is not an
/// error. Then a failing rank: rank 1 errors while rank 0 waits in a reduction; the call returns
/// rank 1's error (not rank 0's "another rank failed") instead of hanging. A rank's ordinary
/// error that is not `WorkerDone` on rank 0 is returned too.
#[test]
fn ranks_run_on_their_own_threads_and_a_failure_stops_them_all() -> Result<()> {
    let calls = AtomicUsize::new(0);
    let got = with_cpu_ranks(2, 2, || -> Result<(usize, usize, String, f64)> {
        calls.fetch_add(1, Ordering::Relaxed);
        let comm = connect(&Device::Cpu)?;
        assert_eq!(comm.backend(), "threads");
        assert_eq!(comm.world_size(), 2);
        assert_eq!(rayon::current_num_threads(), 1);
        assert!(
            rayon::current_thread_index().is_some(),
            "off the rank's pool"
        );
        // deep recursion, as candle's backward does on this thread
        assert_eq!(common::deep_recursion(8 * 1024), 8 * 1024);
        let mut v = [comm.rank() as f64 + 1.0];
        comm.all_reduce_sum(&mut v)?;
        let name = std::thread::current().name().unwrap_or("").to_string();
        if comm.rank() > 0 {
            return Err(WorkerDone.into());
        }
        Ok((comm.rank(), rayon::current_num_threads(), name, v[0]))
    })?;
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert_eq!(got, (0, 1, "mimlab-rank-0-0".to_string(), 3.0));
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").ok().as_deref(),
        Some("1")
    );

    let e = with_cpu_ranks(2, 2, || -> Result<()> {
        let comm = connect(&Device::Cpu)?;
        if comm.rank() == 1 {
            bail!("labels.json: annotation 7 names category 99");
        }
        let mut v = [1.0];
        comm.all_reduce_sum(&mut v)?;
        Ok(())
    })
    .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("data parallel rank 1")
            && text.contains("annotation 7 names category 99")
            && !text.contains("another rank failed"),
        "{text}"
    );
    assert!(!is_worker_done(&e));

    // one rank: the plain compute-thread path, no group
    let backend = with_cpu_ranks(2, 1, || Ok(connect(&Device::Cpu)?.backend()))?;
    assert_eq!(backend, "local");
    Ok(())
}
