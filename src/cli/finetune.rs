//! `mimlab finetune --config C [--init RUN_DIR|CHECKPOINT] [--resume RUN_DIR]`: image
//! classification, from a pretrained backbone or (without `--init`) from scratch.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use mimlab_engine::data::{build_dataset, DataLoader, Dataset, LoaderOptions, Split};
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_finetune::objective::ClassifyObjective;
use mimlab_models::pretrained::{adapt_to_pretrained, resolve_init, run_model_section, InitSource};

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Arguments of `mimlab finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start from this backbone: a run folder (SimMIM, distillation or classification; its newest
    /// checkpoint) or a weights file (mimlab, official or timm Swin-V2). Sets `finetune.init`.
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Continue this run folder from its newest checkpoint.
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
}

/// Resolves `exp.finetune.init`, checks the architecture against the run it comes from and
/// carries its windows over (printing what changed). None when training from scratch.
pub fn prepare_init(exp: &mut Experiment) -> Result<Option<InitSource>> {
    let Some(path) = exp.finetune.init.clone() else {
        return Ok(None);
    };
    let src = resolve_init(&path).context("finetune.init")?;
    if let Some(cfg) = &src.run_config {
        let pre = run_model_section(cfg)?;
        let notes = adapt_to_pretrained(&mut exp.model, &pre)
            .with_context(|| format!("finetune.init {}", path.display()))?;
        for n in notes {
            eprintln!("init: {n}");
        }
    } else {
        eprintln!(
            "init: {} is not inside a run folder; the model section is taken as is",
            src.weights.display()
        );
    }
    Ok(Some(src))
}

/// The labelled eval split (eval transform, dataset order).
pub fn eval_loader(exp: &Experiment, img_size: usize, in_chans: usize) -> Result<DataLoader> {
    let mut data = exp.data.clone();
    data.label_fraction = 1.0;
    let ds = build_dataset(&data, Split::Eval, img_size, in_chans, false)
        .context("building the eval dataset")?;
    Ok(DataLoader::new(
        ds,
        LoaderOptions {
            batch_size: exp.train.batch_size.max(1) * 2,
            shuffle: false,
            drop_last: false,
            seed: exp.run.seed,
            workers: exp.data.num_workers,
            prefetch: exp.data.prefetch_batches,
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

/// Trains the classifier, then writes the final evaluation (JSON + confusion PNG) to RUN/eval/.
pub fn run(args: FinetuneArgs) -> Result<()> {
    let mut exp = super::load_experiment(&args.config, args.resume.as_deref())?;
    if let Some(init) = &args.init {
        exp.finetune.init = Some(init.clone());
    }
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        // On resume the weights come from the run's checkpoint; the init was already applied.
        let init = if args.resume.is_none() {
            prepare_init(&mut exp)?
        } else {
            None
        };
        let model_cfg = exp.model.clone();

        let train_ds = build_dataset(
            &exp.data,
            Split::Train,
            model_cfg.img_size,
            model_cfg.in_chans,
            true,
        )
        .context("building the finetuning dataset")?;
        eprintln!("data: {}", train_ds.describe());
        let names = class_names(&train_ds, model_cfg.num_classes)?;
        let loader = DataLoader::new(train_ds, super::train_options(&exp));
        anyhow::ensure!(
            loader.batches_per_epoch() > 0,
            "{}: fewer images than train.batch_size = {} (drop_last): lower the batch size",
            loader.dataset().describe(),
            exp.train.batch_size
        );
        let evals = eval_loader(&exp, model_cfg.img_size, model_cfg.in_chans)?;
        eprintln!("eval: {}", evals.dataset().describe());

        let mut objective =
            ClassifyObjective::new(&model_cfg, &exp.finetune, exp.run.seed, &device)?;
        match &init {
            Some(src) => {
                let r = objective.load_backbone(&src.weights)?;
                eprintln!(
                "init: loaded {} backbone tensors from {} ({:?} layout), head {} newly initialized",
                r.loaded,
                src.weights.display(),
                r.layout,
                r.missing_allowed.join(", ")
            );
            }
            None if args.resume.is_none() => eprintln!("init: none (training from scratch)"),
            None => {}
        }
        eprintln!(
            "model: {} params, {} classes, layer decay {}",
            model_cfg.num_params(),
            model_cfg.num_classes,
            exp.finetune.layer_decay
        );
        let summary = super::train_and_report(
            &mut objective,
            &exp,
            args.resume.as_deref(),
            &loader,
            Some(&evals),
        )?;
        let report = objective.report(&evals, &device)?;
        write_report(&report, &summary.run_dir.join("eval"), &names, "final")?;
        println!(
            "eval: top-1 {:.2}% top-5 {:.2}% on {} images",
            report.top1, report.top5, report.samples
        );
        Ok(())
    })
}

/// Writes `DIR/<stem>.json` and `DIR/<stem>_confusion.png` and prints the per-class table.
pub fn write_report(
    report: &mimlab_finetune::metrics::ClassificationReport,
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
    eprintln!(
        "wrote {}",
        dir.join(format!("{stem}_confusion.png")).display()
    );
    Ok(())
}
