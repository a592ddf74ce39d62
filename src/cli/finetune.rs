//! `mimlab finetune --config C [--init RUN_DIR|FILE [--step best]] [--resume RUN_DIR [--step N]]`:
//! image classification, object detection or semantic segmentation (`finetune.task`), from a pretrained backbone or
//! (without `--init`) from scratch.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_ranks};
use mimlab_engine::run_dir::pick_weights;
use mimlab_finetune::classify::finetune_classifier;
use mimlab_finetune::config::Task;
use mimlab_finetune::detect::recipe::finetune_detector;
use mimlab_finetune::segment::recipe::finetune_segmentor;

use super::{ConfigArgs, ResumeArgs};

/// Arguments of `mimlab finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start from this backbone: a run folder (SimMIM, distillation, classification, detection or
    /// segmentation; its newest checkpoint, or the one --step names) or a weights file (mimlab,
    /// official or timm Swin-V2; safetensors or PyTorch .pth/.pt/.bin). Sets `finetune.init`.
    #[arg(long, value_name = "RUN_DIR|FILE", conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

/// Trains the classifier, then writes the final evaluation (JSON + confusion PNG) to RUN/eval/.
pub fn run(args: FinetuneArgs) -> Result<()> {
    let mut exp = super::load_experiment(
        &args.config,
        args.resume.resume.as_deref(),
        &["classify", "detect", "segment"],
    )?;
    if let Some(init) = &args.init {
        exp.finetune.init = Some(match args.resume.step {
            Some(pick) => pick_weights(init, pick).context("--init")?,
            None => init.clone(),
        });
    }
    with_cpu_ranks(
        exp.run.threads,
        exp.run.ranks_to_start(),
        || -> Result<()> {
            // each rank of a data-parallel run applies the init to its own copy
            let mut exp = exp.clone();
            let device = parse_device(&exp.run.device)?;
            // On resume the weights come from the run's checkpoint; the init was already applied.
            let init = if args.resume.resume.is_none() {
                exp.apply_init()?
            } else {
                None
            };
            let model = exp.model.clone();
            let session = super::session(&exp, "finetune", &args.resume)?;
            match exp.finetune.task {
                Task::Classify => {
                    finetune_classifier(&session, &model, &exp.finetune, init.as_ref(), &device)?;
                }
                Task::Detect => {
                    let ft = &exp.finetune;
                    finetune_detector(&session, &model, &exp.detect, ft, init.as_ref(), &device)?;
                }
                Task::Segment => {
                    let ft = &exp.finetune;
                    let seg = &exp.segment;
                    finetune_segmentor(&session, &model, seg, ft, init.as_ref(), &device)?;
                }
            }
            Ok(())
        },
    )
}
