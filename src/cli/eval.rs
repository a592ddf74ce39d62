//! `mimlab eval --weights RUN_DIR|CHECKPOINT`: top-1/top-5, per-class accuracy and the confusion
//! matrix (JSON + PNG) of a classifier on the eval split.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_finetune::objective::evaluate_classifier;
use mimlab_models::pretrained::{load_backbone, resolve_init};

use super::finetune::{class_names, eval_loader, write_report};
use super::ConfigArgs;
use crate::experiment::Experiment;

/// Arguments of `mimlab eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Experiment config; default: the `config.yaml` of the run the weights belong to.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A classification run folder (newest checkpoint) or a weights file with a head.
    #[arg(long)]
    pub weights: PathBuf,
    /// Folder for `<name>.json` and `<name>_confusion.png`; default: RUN/eval/.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Evaluates and writes the report.
pub fn run(args: EvalArgs) -> Result<()> {
    let src = resolve_init(&args.weights).context("--weights")?;
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
        anyhow::ensure!(
        cfg.num_classes > 0,
        "{}: model.num_classes is 0; `eval` needs a classifier (use `mimlab probe` for a backbone)",
        config.display()
    );
        let loader = eval_loader(&exp, cfg.img_size, cfg.in_chans)?;
        let names = class_names(loader.dataset(), cfg.num_classes)?;
        let (model, _, report) = load_backbone(&cfg, &src.weights, &device)?;
        anyhow::ensure!(
            report
                .missing_allowed
                .iter()
                .all(|k| !k.starts_with("head.")),
            "{}: no classification head (`head.weight`) in the weights; evaluate a finetuned run, \
         or use `mimlab probe` for a backbone",
            src.weights.display()
        );
        eprintln!(
            "eval: {} with {}",
            loader.dataset().describe(),
            src.weights.display()
        );
        let (r, loss) = evaluate_classifier(&model, cfg.num_classes, &loader, &device)?;
        let stem = src
            .weights
            .file_stem()
            .map(|s| format!("eval_{}", s.to_string_lossy()))
            .unwrap_or_else(|| "eval".into());
        let out_dir = match (&args.out, &src.run_config) {
            (Some(o), _) => o.clone(),
            (None, Some(c)) => c.parent().map(|p| p.join("eval")).unwrap_or_default(),
            (None, None) => PathBuf::from("eval"),
        };
        write_report(&r, &out_dir, &names, &stem)?;
        println!(
            "top-1 {:.2}%  top-5 {:.2}%  loss {loss:.4}  ({} images)",
            r.top1, r.top5, r.samples
        );
        Ok(())
    })
}
