//! `mimlab pretrain --config C [--set ...] [--resume RUN_DIR]`: SimMIM pretraining.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::data::{build_dataset, DataLoader, Split};
use mimlab_engine::device::{parse_device, with_cpu_threads};
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
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        let model_cfg = exp.model.clone();

        let dataset = build_dataset(
            &exp.data,
            Split::Train,
            model_cfg.img_size,
            model_cfg.in_chans,
            true,
        )
        .context("building the pretraining dataset")?;
        eprintln!("data: {}", dataset.describe());
        let loader = DataLoader::new(dataset, super::train_options(&exp));
        let mut objective =
            SimMimObjective::new(&model_cfg, &exp.simmim, &exp.data, exp.run.seed, &device)?;
        eprintln!(
            "model: {} params, {:.2} GFLOPs/image (forward)",
            model_cfg.num_params(),
            model_cfg.flops() as f64 / 1e9
        );
        super::train_and_report(&mut objective, &exp, args.resume.as_deref(), &loader, None)?;
        Ok(())
    })
}
