//! GFLOP/s of the linear layers' gemms on the shapes of `swinv2_tiny_window8_256` at 256 px,
//! batch 8 (tokens x in -> out; stage 1 to 4 and the SimMIM head): candle's matmul for the
//! forward `x @ w^T` and the backward's `g @ w` and `g^T @ x`, against the kernels of
//! [`mimlab_models::ops::linear`] (forward with the bias; backward: `dx`, `dw`, `db`). Medians
//! of 8 calls after one warm-up; the last line sums `ops::linear`'s milliseconds. Run:
//! `cargo run --release -p mimlab-models --example gemm_probe -- [THREADS]` (default 2).
use candle_core::{Device, Result, Tensor};
use mimlab_models::ops::probe;
use std::time::Instant;

/// As in the `mimlab` binary: outputs of >= 32 MiB (the 32768-row shapes) reuse freed blocks
/// instead of faulting in fresh pages every call.
#[global_allocator]
static ALLOC: mimlab_engine::alloc::CachingAlloc = mimlab_engine::alloc::CachingAlloc;

/// Median seconds of `iters` calls after one warm-up call.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f().map(|()| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[iters / 2])
}

fn main() -> Result<()> {
    let threads = std::env::args()
        .nth(1)
        .map_or(Ok(2), |s| s.parse())
        .expect("THREADS");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    pool.install(|| {
        let d = Device::Cpu;
        println!("{threads} threads; GFLOP/s (m x k -> n), ops::linear also in ms");
        println!(
            "{:>16} {:>8} {:>8} {:>8} {:>18} {:>18}",
            "shape", "x@w^T", "g@w", "g^T@x", "linear fwd", "linear bwd"
        );
        let (mut fwd_ms, mut bwd_ms) = (0.0, 0.0);
        for (m, k, n) in [
            (32768, 96, 96),
            (32768, 96, 384),
            (32768, 384, 96),
            (8192, 384, 192),
            (8192, 192, 192),
            (8192, 192, 768),
            (8192, 768, 192),
            (2048, 768, 384),
            (2048, 384, 384),
            (2048, 384, 1536),
            (2048, 1536, 384),
            (512, 1536, 768),
            (512, 768, 768),
            (512, 768, 3072),
            (512, 3072, 768),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
            let b = Tensor::zeros(n, candle_core::DType::F32, &d)?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &d)?;
            let gf = 2.0 * (m * k * n) as f64 / 1e9;
            let it = 8;
            let mm = time(it, || x.matmul(&w.t()?).map(drop))?;
            let dx = time(it, || g.matmul(&w).map(drop))?;
            let dw = time(it, || g.t()?.matmul(&x).map(drop))?;
            let (xs, ws) = (x.flatten_all()?.to_vec1()?, w.flatten_all()?.to_vec1()?);
            let (bs, gs) = (b.to_vec1()?, g.flatten_all()?.to_vec1()?);
            let fwd = time(it, || {
                drop(probe::linear_forward(&xs, &ws, Some(&bs), (m, k, n)));
                Ok(())
            })?;
            let bwd = time(it, || {
                drop(probe::linear_backward(&xs, &ws, &gs, (m, k, n), true));
                Ok(())
            })?;
            (fwd_ms, bwd_ms) = (fwd_ms + fwd * 1e3, bwd_ms + bwd * 1e3);
            println!(
                "{:>16} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6.2} ms {:>8.1} {:>6.2} ms",
                format!("{m}x{k}->{n}"),
                gf / mm,
                gf / dx,
                gf / dw,
                gf / fwd,
                fwd * 1e3,
                2.0 * gf / bwd,
                bwd * 1e3
            );
        }
        println!("ops::linear in all: forward {fwd_ms:.1} ms, backward {bwd_ms:.1} ms");
        Ok(())
    })
}
