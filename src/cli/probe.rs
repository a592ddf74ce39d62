//! `mimlab probe --config C [--init RUN_DIR|FILE]`: frozen-feature evaluations of a backbone
//! (a pretrained one, or the random init without `--init`): weighted k-NN and a linear probe on
//! pooled features, trained on class-balanced label fractions of the train split (the same images
//! `data.label_fraction` selects for finetuning) and scored on the eval split.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_finetune::probe::{probe_backbone, ProbeSetup};

use super::ConfigArgs;

/// Arguments of `mimlab probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Backbone weights: a run folder or a weights file (safetensors or PyTorch .pth/.pt/.bin);
    /// none = the seeded random init.
    #[arg(long, value_name = "RUN_DIR|FILE")]
    pub init: Option<PathBuf>,
    /// Label fractions of the train split to fit k-NN and the probe on.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,1.0")]
    pub fractions: Vec<f64>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Extracts features once, then runs k-NN and the linear probe for every fraction.
pub fn run(args: ProbeArgs) -> Result<()> {
    let mut exp = super::load_experiment(&args.config, None)?;
    if let Some(init) = &args.init {
        exp.finetune.init = Some(init.clone());
    }
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
        probe_backbone(&setup, &model, init.as_ref(), args.out.as_deref(), &device)?;
        Ok(())
    })?
}
