//! Recipe, frozen-feature evaluations (`mimlab probe`): a backbone's pooled features of the
//! train and eval splits, then weighted k-NN and a linear probe trained on class-balanced label
//! fractions of the train split (the images `data.label_fraction` selects for finetuning).
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use mimlab_engine::data::subset::balanced_subset;
use mimlab_engine::data::{build_dataset, DataConfig, DataLoader, LoaderOptions, Split};
use mimlab_engine::fsutil::{ensure_parent, write_atomic};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::run_dir::InitSource;
use mimlab_models::pretrained::Head;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};
use mimlab_pretrain::backbone::load_backbone_weights;

use crate::classify::eval_loader;
use crate::config::FinetuneConfig;
use crate::probe::features::extract_features;
use crate::probe::knn::knn_evaluate;
use crate::probe::linear_probe::{linear_probe, ProbeConfig};

/// What a probe run reads besides the model and its weights.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSetup<'a> {
    /// Dataset and augmentation (the eval transform is used for both splits).
    pub data: &'a DataConfig,
    /// Training batch size of the experiment (the eval split is read in twice that).
    pub train_batch_size: usize,
    /// Run seed: the random init without weights, the probe's minibatches.
    pub seed: u64,
    /// k-NN and linear-probe knobs.
    pub finetune: &'a FinetuneConfig,
    /// Label fractions of the train split, each in (0, 1].
    pub fractions: &'a [f64],
}

/// Runs k-NN and the linear probe on the pooled features of `model` (its head dropped) with the
/// weights of `init` (none: the seeded random init), printing one table row per fraction;
/// returns the results as JSON (also written to `out` when given).
pub fn probe_backbone(
    setup: &ProbeSetup,
    model: &SwinV2Config,
    init: Option<&InitSource>,
    out: Option<&Path>,
    device: &Device,
) -> Result<serde_json::Value> {
    for f in setup.fractions {
        ensure!(*f > 0.0 && *f <= 1.0, "--fractions: {f} is not in (0, 1]");
    }
    let seed = setup.seed;
    let mut cfg = model.clone();
    cfg.num_classes = 0; // the backbone only: pooled features
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
    let net = SwinV2::new(&cfg, false, SharedRng::new(seed), vb)?;
    let what = match init {
        Some(src) => {
            let r = load_backbone_weights(&varmap, &src.weights, Head::Reinit)?;
            eprintln!("probe: {} tensors from {}", r.loaded, src.weights.display());
            src.weights.display().to_string()
        }
        None => format!("random init (seed {seed})"),
    };

    let mut data = setup.data.clone();
    data.label_fraction = 1.0;
    let train_ds = build_dataset(&data, Split::Train, cfg.img_size, cfg.in_chans, false)
        .context("building the probe's train features dataset")?;
    let classes = train_ds
        .num_classes()
        .with_context(|| format!("{}: probing needs labels", train_ds.describe()))?;
    let opts = LoaderOptions {
        batch_size: 256,
        shuffle: false,
        drop_last: false,
        seed,
        workers: data.num_workers,
        prefetch: data.prefetch_batches,
    };
    let train_loader = DataLoader::new(train_ds, opts);
    let test_loader = eval_loader(
        setup.data,
        setup.train_batch_size,
        seed,
        cfg.img_size,
        cfg.in_chans,
    )?;
    let train = extract_features(&net, &train_loader, device, "features train")?;
    let test = extract_features(&net, &test_loader, device, "features eval")?;
    eprintln!(
        "probe: {what}: {} train / {} eval features of width {}",
        train.len(),
        test.len(),
        train.dim
    );
    let ft = setup.finetune;
    let mut rows = vec![];
    println!("label fraction | labels | k-NN top-1 | linear top-1");
    for &f in setup.fractions {
        let idx = balanced_subset(&train.labels, f, data.label_subset_seed());
        let sub = train.subset(&idx);
        let knn = knn_evaluate(&sub, &test, classes, ft.knn_k, ft.knn_temperature);
        let probe_cfg = ProbeConfig {
            epochs: ft.probe_epochs,
            lr: ft.probe_lr,
            weight_decay: ft.probe_weight_decay,
            batch_size: ft.probe_batch_size,
            seed,
        };
        let lin = linear_probe(&sub, &test, classes, &probe_cfg)?;
        println!(
            "{f:>14} | {:>6} | {:>9.2}% | {:>11.2}%",
            sub.len(),
            knn.top1,
            lin.top1
        );
        rows.push(serde_json::json!({
            "label_fraction": f,
            "labels": sub.len(),
            "knn_top1": knn.top1,
            "knn_top5": knn.top5,
            "linear_top1": lin.top1,
            "linear_top5": lin.top5,
        }));
    }
    let json = serde_json::json!({
        "backbone": what,
        "eval_images": test.len(),
        "feature_dim": train.dim,
        "knn_k": ft.knn_k,
        "knn_temperature": ft.knn_temperature,
        "rows": rows,
    });
    if let Some(out) = out {
        ensure_parent(out)?;
        write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(json)
}
