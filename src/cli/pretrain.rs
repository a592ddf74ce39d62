//! `mimlab pretrain --config C [--set ...] [--resume RUN_DIR]`: SimMIM pretraining.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::data::{build_dataset, DataLoader, LoaderOptions, Split};
use mimlab_engine::device::{parse_device, set_cpu_threads};
use mimlab_engine::trainer::Trainer;
use mimlab_pretrain::objective::SimMimObjective;

use super::ConfigArgs;

/// Arguments of `mimlab pretrain`.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Continue this run folder from its newest checkpoint (its config.yaml is the config; --set
    /// may still change keys such as train.epochs).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
}

/// Loads the experiment (or the resumed run's own config.yaml) and trains SimMIM.
pub fn run(args: PretrainArgs) -> Result<()> {
    let exp = super::load_experiment(&args.config, args.resume.as_deref())?;
    set_cpu_threads(exp.run.threads);
    let device = parse_device(&exp.run.device)?;
    let model_cfg = exp.model.resolve()?;

    let dataset = build_dataset(
        &exp.data,
        Split::Train,
        model_cfg.img_size,
        model_cfg.in_chans,
        true,
    )
    .context("building the pretraining dataset")?;
    eprintln!("data: {}", dataset.describe());
    let loader = DataLoader::new(
        dataset,
        LoaderOptions {
            batch_size: exp.train.batch_size,
            shuffle: true,
            drop_last: true, // as the reference pretraining loader (architecture.md 3.4)
            seed: exp.run.seed,
            workers: exp.data.num_workers,
            prefetch: exp.data.prefetch_batches,
        },
    );
    let mut objective =
        SimMimObjective::new(&model_cfg, &exp.simmim, &exp.data, exp.run.seed, &device)?;
    eprintln!(
        "model: {} params, {:.2} GFLOPs/image (forward)",
        model_cfg.num_params(),
        model_cfg.flops() as f64 / 1e9
    );
    let start = Instant::now();
    let yaml = exp.to_yaml()?;
    let mut trainer = Trainer::new(
        &mut objective,
        &exp.train,
        &exp.run,
        &yaml,
        args.resume.as_deref(),
    )?;
    let summary = trainer.fit(&loader, None)?;
    println!(
        "done: {} steps in {:.1}s, loss {:.4} -> {:.4}; run folder {}",
        summary.steps,
        start.elapsed().as_secs_f64(),
        summary.first_loss,
        summary.last_loss,
        summary.run_dir.display()
    );
    Ok(())
}
