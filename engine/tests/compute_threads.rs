//! `device::with_cpu_threads` in a process of its own: rayon's global pool is built once, so this
//! test must be the first (and only) user of it.
use mimlab_engine::device::with_cpu_threads;

mod common;

#[test]
fn with_cpu_threads_runs_on_a_compute_thread_with_a_deep_stack() {
    assert_eq!(
        rayon::current_thread_index(),
        None,
        "the test starts off the pool"
    );
    let (index, depth) = with_cpu_threads(2, || {
        // 8 MiB of frames: more than rayon's default 2 MiB stack holds (candle's backward walks
        // the graph recursively on this thread).
        (
            rayon::current_thread_index(),
            common::deep_recursion(8 * 1024),
        )
    })
    .unwrap();
    assert!(index.is_some(), "the closure ran off the pool");
    assert_eq!(depth, 8 * 1024);
    assert_eq!(rayon::current_num_threads(), 2);
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").ok().as_deref(),
        Some("2")
    );
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT")
            .ok()
            .as_deref(),
        Some("0")
    );
}
