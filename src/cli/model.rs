//! `mimlab model info` and `mimlab model run`: model facts, and the eval forward over saved tensors
//! (what researchers use to compare against PyTorch).
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mimlab_engine::device::parse_device;
use mimlab_engine::trainer::checkpoint::save_tensors;
use mimlab_pretrain::backbone::{describe_backbone, load_backbone, run_backbone};

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Parameter count, FLOPs per image and the stage shapes of the configured model.
    Info(#[command(flatten)] ConfigArgs),
    /// Load weights (official, timm or mimlab layout; sharded index too), run the eval forward on
    /// the tensor `input` of --input (any height and width that are multiples of the patch size),
    /// write `logits`, `pre_logits` and `features` (NHWC).
    Run(RunArgs),
}

/// Arguments of `mimlab model run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Weights: `*.safetensors` or `*.safetensors.index.json`.
    #[arg(long)]
    pub weights: PathBuf,
    /// Safetensors file holding `input` [N, C, H, W], already normalized; H and W any multiples
    /// of the patch size (timm `dynamic_img_size=True` semantics).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the outputs.
    #[arg(long)]
    pub output: PathBuf,
}

/// Runs a model subcommand.
pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Info(args) => info(&args),
        ModelCmd::Run(args) => forward(&args),
    }
}

fn info(args: &ConfigArgs) -> Result<()> {
    let exp = Experiment::load(args.config.as_deref(), &args.sets)?;
    for line in describe_backbone(&exp.model) {
        println!("{line}");
    }
    Ok(())
}

fn forward(args: &RunArgs) -> Result<()> {
    let exp = Experiment::load(args.config.config.as_deref(), &args.config.sets)?;
    let device = parse_device(&exp.run.device)?;
    let (model, _, report) = load_backbone(&exp.model, &args.weights, &device)?;
    eprintln!(
        "loaded {} tensors from {} ({:?} layout){}",
        report.loaded,
        args.weights.display(),
        report.layout,
        if report.ignored.is_empty() {
            String::new()
        } else {
            format!(", ignored {}", report.ignored.len())
        }
    );
    let out = run_backbone(&model, &args.input, &device)?;
    save_tensors(&args.output, &out)?;
    eprintln!("wrote {} ({})", args.output.display(), {
        let mut k: Vec<_> = out.keys().cloned().collect();
        k.sort();
        k.join(", ")
    });
    Ok(())
}
