//! Recipes, classification (`mimlab finetune`, `mimlab eval`): the eval loader, the class names,
//! the finetuning run and the evaluation of saved weights, with their reports in `RUN/eval/`.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use mimlab_engine::data::{build_dataset, DataConfig, DataLoader, Dataset, LoaderOptions, Split};
use mimlab_engine::run_dir::{InitSource, RunDir};
use mimlab_engine::trainer::TrainSession;
use mimlab_models::swin_v2::SwinV2Config;
use mimlab_pretrain::backbone::load_backbone;

use crate::classify::metrics::ClassificationReport;
use crate::classify::objective::{evaluate_classifier, ClassifyObjective};
use crate::config::FinetuneConfig;

/// The labelled eval split (eval transform, dataset order), in batches of twice the training
/// batch size.
pub fn eval_loader(
    data: &DataConfig,
    train_batch_size: usize,
    seed: u64,
    img_size: usize,
    in_chans: usize,
) -> Result<DataLoader> {
    let mut data = data.clone();
    data.label_fraction = 1.0;
    let ds = build_dataset(&data, Split::Eval, img_size, in_chans, false)
        .context("building the eval dataset")?;
    Ok(DataLoader::new(
        ds,
        LoaderOptions {
            batch_size: train_batch_size.max(1) * 2,
            shuffle: false,
            drop_last: false,
            seed,
            workers: data.num_workers,
            prefetch: data.prefetch_batches,
        },
    ))
}

/// The dataset's class count must match the head; names for reports.
pub fn class_names(ds: &Arc<dyn Dataset>, num_classes: usize) -> Result<Vec<String>> {
    let Some(n) = ds.num_classes() else {
        bail!("{}: classification needs a labelled dataset", ds.describe());
    };
    if n != num_classes {
        bail!(
            "model.num_classes is {num_classes} but {} has {n} classes: set model.num_classes: {n}",
            ds.describe()
        );
    }
    Ok(ds
        .class_names()
        .unwrap_or_else(|| (0..n).map(|k| k.to_string()).collect()))
}

/// Writes `DIR/<stem>.json` and `DIR/<stem>_confusion.png` and prints the per-class table.
pub fn write_report(
    report: &ClassificationReport,
    dir: &Path,
    names: &[String],
    stem: &str,
) -> Result<()> {
    let title = format!(
        "confusion: % of each true class (row) predicted as each class (column); top-1 {:.2}%",
        report.top1
    );
    report.write(dir, stem, names, &title)?;
    eprint!("{}", report.summary(names));
    mimlab_engine::rank0_eprintln!(
        "wrote {}",
        dir.join(format!("{stem}_confusion.png")).display()
    );
    Ok(())
}

/// `mimlab finetune`: trains the classifier `model` (from `init`'s backbone, or from scratch),
/// evaluating on the eval split, then writes the final report to `RUN/eval/final.*`.
pub fn finetune_classifier(
    session: &TrainSession,
    model: &SwinV2Config,
    cfg: &FinetuneConfig,
    init: Option<&InitSource>,
    device: &Device,
) -> Result<ClassificationReport> {
    let train_ds = session
        .train_dataset(model.img_size, model.in_chans)
        .context("building the finetuning dataset")?;
    mimlab_engine::rank0_eprintln!("data: {}", train_ds.describe());
    let names = class_names(&train_ds, model.num_classes)?;
    // train_loader refuses a split smaller than one batch
    let loader = session.train_loader(train_ds)?;
    let evals = eval_loader(
        session.data,
        session.train.batch_size,
        session.run.seed,
        model.img_size,
        model.in_chans,
    )?;
    mimlab_engine::rank0_eprintln!("eval: {}", evals.dataset().describe());

    let mut objective = ClassifyObjective::new(model, cfg, session.run.seed, device)?;
    match init {
        Some(src) => {
            let r = objective.load_backbone(&src.weights)?;
            mimlab_engine::rank0_eprintln!(
                "init: loaded {} backbone tensors from {} ({:?} layout), head {} newly initialized",
                r.loaded,
                src.weights.display(),
                r.layout,
                r.missing_allowed.join(", ")
            );
        }
        None if session.start.resumed().is_none() => {
            mimlab_engine::rank0_eprintln!("init: none (training from scratch)")
        }
        None => {}
    }
    mimlab_engine::rank0_eprintln!(
        "model: {} params, {} classes, layer decay {}",
        model.num_params(),
        model.num_classes,
        cfg.layer_decay
    );
    let summary = session.fit(&mut objective, &loader, Some(&evals))?;
    let report = objective.report(&evals, device)?;
    write_report(
        &report,
        &RunDir::at(&summary.run_dir).eval(),
        &names,
        "final",
    )?;
    println!(
        "eval: top-1 {:.2}% top-5 {:.2}% on {} images",
        report.top1, report.top5, report.samples
    );
    Ok(report)
}

/// `mimlab eval`: the classifier `model` with the weights of `src` (it must carry a head) over
/// `loader`; the report goes to `out`, else the run's `eval/` (else `./eval`), as
/// `eval_<weights stem>.*`. Prints the accuracies and the mean loss.
pub fn evaluate_weights(
    src: &InitSource,
    model: &SwinV2Config,
    loader: &DataLoader,
    out: Option<&Path>,
    device: &Device,
) -> Result<ClassificationReport> {
    let names = class_names(loader.dataset(), model.num_classes)?;
    let (net, _, report) = load_backbone(model, &src.weights, device)?;
    ensure!(
        report
            .missing_allowed
            .iter()
            .all(|k| !k.starts_with("head.")),
        "{}: no classification head (`head.weight`) in the weights; evaluate a finetuned run, \
         or use `mimlab probe` for a backbone",
        src.weights.display()
    );
    mimlab_engine::rank0_eprintln!(
        "eval: {} with {}",
        loader.dataset().describe(),
        src.weights.display()
    );
    let (r, loss) = evaluate_classifier(&net, model.num_classes, loader, device)?;
    let stem = src
        .weights
        .file_stem()
        .map(|s| format!("eval_{}", s.to_string_lossy()))
        .unwrap_or_else(|| "eval".into());
    let out_dir = match (out, &src.run_config) {
        (Some(o), _) => o.to_path_buf(),
        (None, Some(c)) => c
            .parent()
            .map(|run| RunDir::at(run).eval())
            .unwrap_or_default(),
        (None, None) => PathBuf::from("eval"),
    };
    write_report(&r, &out_dir, &names, &stem)?;
    println!(
        "top-1 {:.2}%  top-5 {:.2}%  loss {loss:.4}  ({} images)",
        r.top1, r.top5, r.samples
    );
    Ok(r)
}
