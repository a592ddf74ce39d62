//! `mimlab pretrain --config C [--set ...] [--resume RUN_DIR [--step N]]`: SimMIM pretraining.
use anyhow::Result;
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_ranks};
use mimlab_pretrain::simmim::recipe::pretrain_simmim;

use super::{ConfigArgs, ResumeArgs};

/// Arguments of `mimlab pretrain`.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

/// Loads the experiment (or the resumed run's own config.yaml) and trains SimMIM.
pub fn run(args: PretrainArgs) -> Result<()> {
    let exp = super::load_experiment(&args.config, args.resume.resume.as_deref(), &["simmim"])?;
    with_cpu_ranks(
        exp.run.threads,
        exp.run.ranks_to_start(),
        || -> Result<()> {
            let device = parse_device(&exp.run.device)?;
            let model = exp.model.clone();
            let session = super::session(&exp, "simmim", &args.resume)?;
            pretrain_simmim(&session, &model, &exp.simmim, &device)?;
            Ok(())
        },
    )
}
