//! `mimlab eval --weights RUN_DIR|FILE [--step best]`: a classifier's top-1/top-5, per-class
//! accuracy and confusion matrix (JSON + PNG), a detector's 12 COCO numbers, per-class AP and
//! `detections.json`, or a segmentor's mIoU, aAcc, mAcc, per-class IoU/Acc and predicted label
//! maps (`pred/*.png`), on the eval split.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_engine::run_dir::{pick_weights, resolve_init, Pick};
use mimlab_finetune::classify::{eval_loader, evaluate_weights};
use mimlab_finetune::config::Task;
use mimlab_finetune::detect::recipe::evaluate_detection_weights;
use mimlab_finetune::segment::recipe::evaluate_segmentation_weights;

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Arguments of `mimlab eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Experiment config; default: the `config.yaml` of the run the weights belong to.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A classification or detection run folder (newest checkpoint, or the one --step names) or
    /// a weights file with a head (safetensors or PyTorch .pth/.pt/.bin).
    #[arg(long, value_name = "RUN_DIR|FILE")]
    pub weights: PathBuf,
    /// Which checkpoint of the run folder: `last` (default), `best` (by run.best_metric) or a
    /// step number.
    #[arg(long, value_name = "last|best|N")]
    pub step: Option<Pick>,
    /// Folder for `<name>.json` and `<name>_confusion.png`; default: RUN/eval/.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Evaluates and writes the report.
pub fn run(args: EvalArgs) -> Result<()> {
    let weights = match args.step {
        Some(pick) => pick_weights(&args.weights, pick).context("--weights")?,
        None => args.weights.clone(),
    };
    let src = resolve_init(&weights).context("--weights")?;
    let config = match (&args.config.config, &src.run_config) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!(
            "--weights {}: not inside a run folder, so pass the experiment with --config",
            args.weights.display()
        ),
    };
    let exp = Experiment::load(Some(&config), &args.config.sets)?;
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        let cfg = exp.model.clone();
        if exp.finetune.task == Task::Detect {
            evaluate_detection_weights(
                &src,
                &cfg,
                &exp.detect,
                &exp.data,
                exp.train.batch_size,
                exp.run.seed,
                args.out.as_deref(),
                &device,
            )?;
            return Ok(());
        }
        if exp.finetune.task == Task::Segment {
            evaluate_segmentation_weights(
                &src,
                &cfg,
                &exp.segment,
                &exp.data,
                exp.train.batch_size,
                exp.run.seed,
                args.out.as_deref(),
                &device,
            )?;
            return Ok(());
        }
        anyhow::ensure!(
            cfg.num_classes > 0,
            "{}: model.num_classes is 0; `eval` needs a classifier (use `mimlab probe` for a \
             backbone)",
            config.display()
        );
        let loader = eval_loader(
            &exp.data,
            exp.train.batch_size,
            exp.run.seed,
            cfg.img_size,
            cfg.in_chans,
        )?;
        evaluate_weights(&src, &cfg, &loader, args.out.as_deref(), &device)?;
        Ok(())
    })?
}
