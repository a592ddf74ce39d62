//! `mimlab probe --config C [--init RUN_DIR|FILE [--step best]] [--out DIR]`: frozen-feature
//! evaluations of a backbone
//! (a pretrained one, or the random init without `--init`): weighted k-NN and a linear probe on
//! pooled features, trained on class-balanced label fractions of the train split (the same images
//! `data.label_fraction` selects for finetuning) and scored on the eval split.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_engine::run_dir::{pick_weights, Pick};
use mimlab_finetune::probe::{probe_backbone, ProbeSetup};

use super::ConfigArgs;

/// Arguments of `mimlab probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Backbone weights: a run folder (newest checkpoint, or the one --step names) or a weights
    /// file (safetensors or PyTorch .pth/.pt/.bin); none = the seeded random init.
    #[arg(long, value_name = "RUN_DIR|FILE")]
    pub init: Option<PathBuf>,
    /// Which checkpoint of the run folder given to --init: `last` (default), `best` or a step.
    #[arg(long, value_name = "last|best|N", requires = "init")]
    pub step: Option<Pick>,
    /// Label fractions of the train split to fit k-NN and the probe on.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,1.0")]
    pub fractions: Vec<f64>,
    /// Folder for the results as JSON (`DIR/probe.json`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Extracts features once, then runs k-NN and the linear probe for every fraction.
pub fn run(args: ProbeArgs) -> Result<()> {
    let mut exp =
        crate::experiment::Experiment::load(args.config.config.as_deref(), &args.config.sets)?;
    if let Some(init) = &args.init {
        exp.finetune.init = Some(match args.step {
            Some(pick) => pick_weights(init, pick).context("--init")?,
            None => init.clone(),
        });
    }
    let out = args.out.as_ref().map(|d| d.join("probe.json"));
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        let init = exp.apply_init()?;
        let setup = ProbeSetup {
            data: &exp.data,
            train_batch_size: exp.train.batch_size,
            seed: exp.run.seed,
            finetune: &exp.finetune,
            fractions: &args.fractions,
        };
        let model = exp.model.clone();
        probe_backbone(&setup, &model, init.as_ref(), out.as_deref(), &device)?;
        Ok(())
    })?
}
