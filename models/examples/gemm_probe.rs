//! GFLOP/s of a linear layer's gemms on the shapes of `swinv2_tiny_window8_256` at 128 px, batch 8
//! (tokens x in -> out; the first three rows: stage 1 at 256 px): candle's matmul for the forward `x @ w^T` and the backward's `g @ w` and
//! `g^T @ x`, against [`mimlab_models::ops::linear`]'s forward (bias included). Run:
//! `cargo run --release -p mimlab-models --example gemm_probe -- [THREADS]` (default 2).
use candle_core::{Device, Result, Tensor};
use std::time::Instant;

/// As in the `mimlab` binary: outputs of >= 32 MiB (the 32768-row shapes) reuse freed blocks
/// instead of faulting in fresh pages every call.
#[global_allocator]
static ALLOC: mimlab_engine::alloc::CachingAlloc = mimlab_engine::alloc::CachingAlloc;

fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
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
        println!("{threads} threads; GFLOP/s (m x k -> n)");
        println!(
            "{:>16} {:>8} {:>8} {:>8} {:>12}",
            "shape", "x@w^T", "g@w", "g^T@x", "ops::linear"
        );
        for (m, k, n) in [
            (32768, 96, 384),
            (32768, 384, 96),
            (32768, 96, 288),
            (8192, 96, 384),
            (8192, 384, 96),
            (8192, 96, 96),
            (2048, 192, 768),
            (2048, 768, 192),
            (512, 384, 1536),
            (512, 1536, 384),
            (128, 3072, 768),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
            let b = Tensor::zeros(n, candle_core::DType::F32, &d)?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &d)?;
            let gf = 2.0 * (m * k * n) as f64 / 1e9;
            let it = 10;
            let fwd = time(it, || x.matmul(&w.t()?).map(drop))?;
            let dx = time(it, || g.matmul(&w).map(drop))?;
            let dw = time(it, || g.t()?.matmul(&x).map(drop))?;
            let lin = time(it, || {
                mimlab_models::ops::linear(&x, &w, Some(&b)).map(drop)
            })?;
            println!(
                "{:>16} {:>8.1} {:>8.1} {:>8.1} {:>12.1}",
                format!("{m}x{k}->{n}"),
                gf / fwd,
                gf / dx,
                gf / dw,
                gf / lin
            );
        }
        Ok(())
    })
}
