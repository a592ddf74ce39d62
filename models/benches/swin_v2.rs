//! Swin-V2 CPU throughput: forward (eval) and forward+backward (train) images/s.
//! Run with `cargo bench -p mimlab-models` (optional filter: a preset name).
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

/// Runs `f` once to warm up, then until `budget` has passed (at least twice); seconds per call.
fn time(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let mut n = 0;
    while n < 2 || start.elapsed() < budget {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

fn main() -> Result<()> {
    // Same allocator setting as the `mimlab` binary.
    mimlab_engine::device::tune_allocator();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let dev = Device::Cpu;
    let cases: &[(&str, usize, usize)] = &[
        ("swinv2_nano", 64, 8),
        ("swinv2_micro", 128, 4),
        ("swinv2_tiny_window8_256", 256, 1),
    ];
    println!(
        "{:<26} {:>5} {:>5} {:>10} {:>8} {:>12} {:>14}",
        "preset", "img", "batch", "params(M)", "GFLOPs", "fwd img/s", "fwd+bwd img/s"
    );
    for &(name, img, batch) in cases {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let cfg = SwinV2Config::preset(name)?;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
        let model = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, img, img), &dev)?;
        let budget = Duration::from_secs(5);
        let fwd = time(budget, || {
            model.forward(&x, false)?;
            Ok(())
        })?;
        let vars = vm.all_vars();
        let bwd = time(budget, || {
            let loss = model.forward(&x, true)?.0.sqr()?.mean_all()?;
            let g = loss.backward()?;
            assert!(g.get(vars[0].as_tensor()).is_some());
            Ok(())
        })?;
        println!(
            "{:<26} {:>5} {:>5} {:>10.2} {:>8.2} {:>12.1} {:>14.1}",
            name,
            img,
            batch,
            cfg.num_params() as f64 / 1e6,
            cfg.flops() as f64 / 1e9,
            batch as f64 / fwd,
            batch as f64 / bwd
        );
    }
    Ok(())
}
