//! Linear probe on frozen features: standardize with the training rows' mean and std (MAE's
//! affine-free BatchNorm before the head), then a linear softmax classifier trained by AdamW with
//! a cosine lr over shuffled minibatches.
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use mimlab_engine::optim::{AdamW, LrSchedule, ParamGroup, ScheduleKind};
use mimlab_engine::rng::rng_for;
use rand::seq::SliceRandom;

use crate::classify::loss::soft_target_cross_entropy;
use crate::classify::metrics::{ClassificationReport, Confusion};
use crate::classify::mixup::mix_targets;
use crate::probe::features::FeatureSet;

/// Linear-probe training knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// Passes over the training rows.
    pub epochs: usize,
    /// Peak lr (cosine to 0, no warmup).
    pub lr: f64,
    /// AdamW weight decay of the weight matrix (none on the bias).
    pub weight_decay: f64,
    /// Rows per step.
    pub batch_size: usize,
    /// Seed of the row shuffles.
    pub seed: u64,
}

fn standardize(rows: &[f32], dim: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    rows.chunks(dim)
        .flat_map(|r| r.iter().zip(mean).zip(std).map(|((v, m), s)| (v - m) / s))
        .collect()
}

/// Trains on `train`, reports on `test`.
pub fn linear_probe(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ClassificationReport> {
    ensure!(!train.is_empty(), "linear probe: no training features");
    ensure!(
        train.dim == test.dim,
        "linear probe: train/test feature widths differ"
    );
    let (n, d) = (train.len(), train.dim);
    let mut mean = vec![0f32; d];
    let mut var = vec![0f32; d];
    for r in train.features.chunks(d) {
        r.iter()
            .zip(&mut mean)
            .for_each(|(v, m)| *m += v / n as f32);
    }
    for r in train.features.chunks(d) {
        for ((v, m), s) in r.iter().zip(&mean).zip(&mut var) {
            *s += (v - m) * (v - m) / n as f32;
        }
    }
    let std: Vec<f32> = var.iter().map(|v| (v + 1e-5).sqrt()).collect();
    let xtr = standardize(&train.features, d, &mean, &std);
    let xte = standardize(&test.features, d, &mean, &std);

    let dev = Device::Cpu;
    let w = Var::zeros((classes, d), DType::F32, &dev)?;
    let b = Var::zeros(classes, DType::F32, &dev)?;
    let groups = vec![
        ParamGroup {
            name: "head.weight".into(),
            var: w.clone(),
            weight_decay: cfg.weight_decay,
            lr_scale: 1.0,
        },
        ParamGroup {
            name: "head.bias".into(),
            var: b.clone(),
            weight_decay: 0.0,
            lr_scale: 1.0,
        },
    ];
    let mut opt = AdamW::new(groups, (0.9, 0.999), 1e-8)?;
    let bs = cfg.batch_size.max(1).min(n);
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let sched = LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: cfg.lr,
        warmup_lr: 0.0,
        min_lr: 0.0,
        warmup_steps: 0,
        total_steps: cfg.epochs as u64 * steps_per_epoch,
        milestones: vec![],
        gamma: 1.0,
    };
    let mut step = 0;
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng_for(cfg.seed, &[epoch as u64]));
        for idx in order.chunks(bs) {
            let x: Vec<f32> = idx
                .iter()
                .flat_map(|&i| xtr[i * d..(i + 1) * d].to_vec())
                .collect();
            let x = Tensor::from_vec(x, (idx.len(), d), &dev)?;
            let y: Vec<u32> = idx.iter().map(|&i| train.labels[i]).collect();
            let t = Tensor::from_vec(
                mix_targets(&y, classes, 1.0, 0.0)?,
                (idx.len(), classes),
                &dev,
            )?;
            let logits = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            let loss = soft_target_cross_entropy(&logits, &t)?;
            let grads = loss.backward()?;
            opt.step(&grads, sched.lr(step))?;
            step += 1;
        }
    }
    let mut m = Confusion::new(classes);
    for (chunk, labels) in xte.chunks(d * 1024).zip(test.labels.chunks(1024)) {
        let x = Tensor::from_vec(chunk.to_vec(), (labels.len(), d), &dev)?;
        let logits = x
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        m.add(&logits, labels)?;
    }
    Ok(m.report())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn separable_blobs_are_learned_and_noise_is_not() -> Result<()> {
        // Three Gaussian blobs in 4-D with a large offset on a shared axis (needs standardizing).
        let mut rng = rng_for(7, &[]);
        let mut make = |n: usize, sep: f32| {
            let mut f = vec![];
            let mut l = vec![];
            for i in 0..n {
                let c = (i % 3) as u32;
                for k in 0..4 {
                    let centre = if k == c as usize { sep } else { 0.0 };
                    f.push(1000.0 + centre + rng.random_range(-1.0f32..1.0));
                }
                l.push(c);
            }
            FeatureSet {
                features: f,
                dim: 4,
                labels: l,
            }
        };
        let (train, test) = (make(300, 4.0), make(90, 4.0));
        let cfg = ProbeConfig {
            epochs: 30,
            lr: 0.05,
            weight_decay: 0.0,
            batch_size: 64,
            seed: 1,
        };
        let r = linear_probe(&train, &test, 3, &cfg)?;
        assert_eq!(r.top1, 100.0, "separable blobs");
        let (train, test) = (make(300, 0.0), make(300, 0.0));
        let r = linear_probe(&train, &test, 3, &cfg)?;
        assert!(r.top1 < 50.0, "pure noise stays near chance: {}", r.top1);
        Ok(())
    }
}
