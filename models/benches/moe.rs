//! MoE MLP forward cost on the CPU: 8 experts top-1 vs the dense MLP of the same (per-expert) size,
//! then the growth with top_k (1, 2) and with the number of experts (2, 8, 32) at fixed tokens.
//! `padding`: rows of the expert buffer (active experts x largest kept load) per kept assignment;
//! the untrained router here is unbalanced, a trained one (aux loss) brings it towards 1.
//! Run with `cargo bench -p mimlab-models --bench moe`.
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::moe::{MoeConfig, MoeMlp};

/// Runs `f` once to warm up, then until `budget` has passed (at least 5 times); the fastest call
/// in seconds (the minimum is the least noisy estimate on a shared machine).
fn time(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let (mut n, mut best) = (0, f64::INFINITY);
    while n < 5 || start.elapsed() < budget {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    Ok(best)
}

fn main() -> Result<()> {
    // Same allocator setting as the `mimlab` binary.
    mimlab_engine::device::tune_allocator();
    let dev = Device::Cpu;
    // Stage-1 sized tokens of a small Swin-V2: 64 images of 8x8 tokens, C = 96, hidden 4C.
    let (s, c, hid) = (4096, 96, 384);
    let budget = Duration::from_secs(2);
    let x = Tensor::randn(0f32, 1.0, (s, c), &dev)?;
    let rng = SharedRng::new(0);

    // dense MLP: fc1 -> GELU(erf) -> fc2, the Swin-V2 block MLP
    // same init as the experts (std 0.005): GELU(erf)'s cost depends on its inputs
    let w1 = (Tensor::randn(0f32, 1.0, (hid, c), &dev)? * 0.005)?;
    let b1 = Tensor::zeros(hid, DType::F32, &dev)?;
    let w2 = (Tensor::randn(0f32, 1.0, (c, hid), &dev)? * 0.005)?;
    let b2 = Tensor::zeros(c, DType::F32, &dev)?;
    let dense = time(budget, || {
        let h = x.matmul(&w1.t()?)?.broadcast_add(&b1)?.gelu_erf()?;
        h.matmul(&w2.t()?)?.broadcast_add(&b2)?;
        Ok(())
    })?;

    let moe = |e: usize, k: usize| -> Result<(f64, f64, f64)> {
        let cfg = MoeConfig {
            num_experts: e,
            top_k: k,
            ..MoeConfig::default()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
        let m = MoeMlp::new(c, hid, &cfg, 0.0, vb)?;
        let (mut drop, mut pad) = (0.0, 0.0);
        let t = time(budget, || {
            let (_, r, _) = m.forward(&x, &rng, false)?;
            drop = r.drop_fraction();
            // buffer rows (experts x largest kept load) per kept assignment
            let kept: Vec<usize> = r
                .load()
                .iter()
                .map(|l| ((l * (s * k) as f64).round() as usize).min(r.capacity))
                .collect();
            let rows = kept.iter().filter(|&&n| n > 0).count() * kept.iter().max().unwrap_or(&0);
            pad = rows as f64 / kept.iter().sum::<usize>().max(1) as f64;
            Ok(())
        })?;
        Ok((t, drop, pad))
    };

    println!("tokens S = {s}, C = {c}, hidden = {hid}, eval forward (no noise, capacity 1.25)");
    println!(
        "{:<22} {:>10} {:>10} {:>8} {:>8}",
        "layer", "ms/fwd", "vs dense", "dropped", "padding"
    );
    println!(
        "{:<22} {:>10.2} {:>10.2} {:>8} {:>8}",
        "dense MLP",
        dense * 1e3,
        1.0,
        "-",
        "-"
    );
    for (e, k) in [(8, 1), (8, 2), (2, 1), (32, 1)] {
        let (t, drop, pad) = moe(e, k)?;
        println!(
            "{:<22} {:>10.2} {:>10.2} {:>7.1}% {:>8.2}",
            format!("MoE E={e} top-{k}"),
            t * 1e3,
            t / dense,
            drop * 100.0,
            pad
        );
    }
    Ok(())
}
