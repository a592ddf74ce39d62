//! `mimlab finetune --config C [--init RUN_DIR|FILE] [--resume RUN_DIR]`: image
//! classification, from a pretrained backbone or (without `--init`) from scratch.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_finetune::classify::finetune_classifier;

use super::ConfigArgs;

/// Arguments of `mimlab finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start from this backbone: a run folder (SimMIM, distillation or classification; its newest
    /// checkpoint) or a weights file (mimlab, official or timm Swin-V2; safetensors or PyTorch
    /// .pth/.pt/.bin). Sets `finetune.init`.
    #[arg(long, conflicts_with = "resume", value_name = "RUN_DIR|FILE")]
    pub init: Option<PathBuf>,
    /// Continue this run folder from its newest checkpoint.
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
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
            exp.apply_init()?
        } else {
            None
        };
        let model = exp.model.clone();
        let session = super::session(&exp, args.resume.as_deref())?;
        finetune_classifier(&session, &model, &exp.finetune, init.as_ref(), &device)?;
        Ok(())
    })?
}
