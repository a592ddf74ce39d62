//! `mimlab probe --config C [--init RUN_DIR|CHECKPOINT]`: frozen-feature evaluations of a backbone
//! (a pretrained one, or the random init without `--init`): weighted k-NN and a linear probe on
//! pooled features, trained on class-balanced label fractions of the train split (the same images
//! `data.label_fraction` selects for finetuning) and scored on the eval split.
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use clap::Args;
use mimlab_engine::data::subset::balanced_subset;
use mimlab_engine::data::{build_dataset, DataLoader, LoaderOptions, Split};
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_finetune::features::extract_features;
use mimlab_finetune::knn::knn_evaluate;
use mimlab_finetune::linear_probe::{linear_probe, ProbeConfig};
use mimlab_models::pretrained::{load_backbone_weights, Head};
use mimlab_models::swin_v2::SwinV2;

use super::finetune::{eval_loader, prepare_init};
use super::ConfigArgs;

/// Arguments of `mimlab probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Backbone weights: a run folder or a weights file; none = the seeded random init.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Label fractions of the train split to fit k-NN and the probe on.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,1.0")]
    pub fractions: Vec<f64>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Extracts features once, then runs k-NN and the linear probe for every fraction.
pub fn run(args: ProbeArgs) -> Result<()> {
    let mut exp = super::load_experiment(&args.config, None)?;
    if let Some(init) = &args.init {
        exp.finetune.init = Some(init.clone());
    }
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        for f in &args.fractions {
            anyhow::ensure!(*f > 0.0 && *f <= 1.0, "--fractions: {f} is not in (0, 1]");
        }
        let init = prepare_init(&mut exp)?;
        let mut cfg = exp.model.clone();
        cfg.num_classes = 0; // the backbone only: pooled features
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, exp.run.seed, DType::F32, &device);
        let model = SwinV2::new(&cfg, false, SharedRng::new(exp.run.seed), vb)?;
        let what = match &init {
            Some(src) => {
                let r = load_backbone_weights(&varmap, &src.weights, Head::Reinit)?;
                eprintln!("probe: {} tensors from {}", r.loaded, src.weights.display());
                src.weights.display().to_string()
            }
            None => format!("random init (seed {})", exp.run.seed),
        };

        let mut data = exp.data.clone();
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
            seed: exp.run.seed,
            workers: exp.data.num_workers,
            prefetch: exp.data.prefetch_batches,
        };
        let train_loader = DataLoader::new(train_ds, opts);
        let test_loader = eval_loader(&exp, cfg.img_size, cfg.in_chans)?;
        let train = extract_features(&model, &train_loader, &device, "features train")?;
        let test = extract_features(&model, &test_loader, &device, "features eval")?;
        eprintln!(
            "probe: {what}: {} train / {} eval features of width {}",
            train.len(),
            test.len(),
            train.dim
        );
        let ft = &exp.finetune;
        let mut rows = vec![];
        println!("label fraction | labels | k-NN top-1 | linear top-1");
        for &f in &args.fractions {
            let idx = balanced_subset(&train.labels, f);
            let sub = train.subset(&idx);
            let knn = knn_evaluate(&sub, &test, classes, ft.knn_k, ft.knn_temperature);
            let probe_cfg = ProbeConfig {
                epochs: ft.probe_epochs,
                lr: ft.probe_lr,
                weight_decay: ft.probe_weight_decay,
                batch_size: ft.probe_batch_size,
                seed: exp.run.seed,
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
        if let Some(out) = &args.out {
            let json = serde_json::json!({
                "backbone": what,
                "eval_images": test.len(),
                "feature_dim": train.dim,
                "knn_k": ft.knn_k,
                "knn_temperature": ft.knn_temperature,
                "rows": rows,
            });
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(out, serde_json::to_string_pretty(&json)?)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Ok(())
    })
}
