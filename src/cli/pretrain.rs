//! `mimlab pretrain --config C [--set ...] [--resume RUN_DIR]`: SimMIM pretraining.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_pretrain::simmim::recipe::pretrain_simmim;

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
        let model = exp.model.clone();
        let session = super::session(&exp, args.resume.as_deref())?;
        pretrain_simmim(&session, &model, &exp.simmim, &device)?;
        Ok(())
    })?
}
