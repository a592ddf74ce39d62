//! MoE MLP forward cost on the CPU: 8 experts top-1 vs the dense MLP of the same (per-expert) size,
//! then the growth with top_k (1, 2) and with the number of experts (2, 8, 32) at fixed tokens.
//! `padding`: rows of the expert buffer (active experts x largest kept load) per kept assignment;
//! the untrained router here is unbalanced, a trained one (aux loss) brings it towards 1.
//! Variants are timed in interleaved rounds (medians), so drift of a shared machine cancels.
//! Run with `cargo bench -p mimlab-models --bench moe`.
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::moe::{MoeConfig, MoeMlp};

/// Rounds of interleaved timing: in every round each variant runs `CALLS` times and keeps its
/// fastest call, so a slow phase of the (shared, virtual) machine hits all variants alike; the
/// result per variant is the median over rounds.
const ROUNDS: usize = 15;
const CALLS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // Same allocator setting as the `mimlab` binary.
    mimlab_engine::device::tune_allocator();
    let dev = Device::Cpu;
    // Stage-1 sized tokens of a small Swin-V2: 64 images of 8x8 tokens, C = 96, hidden 4C.
    let (s, c, hid) = (4096, 96, 384);
    let x = Tensor::randn(0f32, 1.0, (s, c), &dev)?;
    let rng = SharedRng::new(0);

    // dense MLP: fc1 -> GELU(erf) -> fc2, the Swin-V2 block MLP
    // same init as the experts (std 0.005): GELU(erf)'s cost depends on its inputs
    let w1 = (Tensor::randn(0f32, 1.0, (hid, c), &dev)? * 0.005)?;
    let b1 = Tensor::zeros(hid, DType::F32, &dev)?;
    let w2 = (Tensor::randn(0f32, 1.0, (c, hid), &dev)? * 0.005)?;
    let b2 = Tensor::zeros(c, DType::F32, &dev)?;
    let dense = || -> Result<()> {
        let h = x.matmul(&w1.t()?)?.broadcast_add(&b1)?.gelu_erf()?;
        h.matmul(&w2.t()?)?.broadcast_add(&b2)?;
        Ok(())
    };
    let variants = [(8, 1), (8, 2), (2, 1), (32, 1)];
    let layers: Vec<MoeMlp> = variants
        .iter()
        .map(|&(e, k)| {
            let cfg = MoeConfig {
                num_experts: e,
                top_k: k,
                ..MoeConfig::default()
            };
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
            // the VarMap owns nothing the layer needs after construction (tensors are shared)
            MoeMlp::new(c, hid, &cfg, 0.0, vb)
        })
        .collect::<candle_core::Result<_>>()?;
    // drop fraction and padding (buffer rows = active experts x largest kept load, per kept
    // assignment) of each layer on this input
    let mut stats = vec![];
    for (m, &(_, k)) in layers.iter().zip(&variants) {
        let (_, r, _) = m.forward(&x, &rng, false)?;
        let kept: Vec<usize> = r
            .load()
            .iter()
            .map(|l| ((l * (s * k) as f64).round() as usize).min(r.capacity))
            .collect();
        let rows = kept.iter().filter(|&&n| n > 0).count() * kept.iter().max().unwrap_or(&0);
        stats.push((
            r.drop_fraction(),
            rows as f64 / kept.iter().sum::<usize>().max(1) as f64,
        ));
    }
    let best_of = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..CALLS {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    // warm-up, then interleaved rounds
    dense()?;
    for m in &layers {
        m.forward(&x, &rng, false)?;
    }
    let mut dense_t = vec![];
    let mut moe_t = vec![vec![]; layers.len()];
    let mut ratios = vec![vec![]; layers.len()];
    for _ in 0..ROUNDS {
        let d = best_of(&mut || dense())?;
        dense_t.push(d);
        for (i, m) in layers.iter().enumerate() {
            let t = best_of(&mut || m.forward(&x, &rng, false).map(|_| ()).map_err(Into::into))?;
            moe_t[i].push(t);
            ratios[i].push(t / d);
        }
    }
    let dense = median(dense_t.clone());

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
    for (i, &(e, k)) in variants.iter().enumerate() {
        let t = median(moe_t[i].clone());
        println!(
            "{:<22} {:>10.2} {:>10.2} {:>7.1}% {:>8.2}",
            format!("MoE E={e} top-{k}"),
            t * 1e3,
            median(ratios[i].clone()),
            stats[i].0 * 100.0,
            stats[i].1
        );
    }
    let (lo, hi) = dense_t
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
    println!(
        "(medians over {ROUNDS} interleaved rounds, best of {CALLS} calls each; `vs dense` is the \
         median of the per-round ratios; dense ranged {:.2}-{:.2} ms)",
        lo * 1e3,
        hi * 1e3
    );
    Ok(())
}
