//! `mimlab model info`, `model list`, `model run` and `model convert`: model facts, the presets,
//! the eval forward over saved tensors (what researchers use to compare against PyTorch) and
//! weights in another key layout.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mimlab_engine::device::parse_device;
use mimlab_engine::run_dir::resolve_init;
use mimlab_engine::trainer::checkpoint::save_tensors;
use mimlab_models::checkpoint::Layout;
use mimlab_pretrain::backbone::{describe_backbone, describe_presets, load_backbone, run_backbone};
use mimlab_pretrain::convert::convert_weights;

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Parameter count, FLOPs per image and the stage shapes of the configured model.
    Info(#[command(flatten)] ConfigArgs),
    /// The model presets: image size, window, widths, exact parameter count and GMACs per image.
    List,
    /// Load weights (official, timm or mimlab layout; sharded index too), run the eval forward on
    /// the tensor `input` of --input (any height and width that are multiples of the patch size),
    /// write `logits`, `pre_logits` and `features` (NHWC).
    Run(RunArgs),
    /// Write the backbone (and head, when present) of a run folder or weights file in one key
    /// layout, as safetensors with the model config in its metadata.
    Convert(ConvertArgs),
}

/// Arguments of `mimlab model run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A run folder (newest checkpoint) or weights file: `*.safetensors`,
    /// `*.safetensors.index.json`, or a PyTorch `*.pth` / `*.pt` / `*.bin` (state dict under
    /// `model`, `state_dict`, `module` or at the top level).
    #[arg(long, value_name = "RUN_DIR|FILE")]
    pub weights: PathBuf,
    /// Safetensors file holding `input` [N, C, H, W], already normalized; H and W any multiples
    /// of the patch size (timm `dynamic_img_size=True` semantics).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the outputs.
    #[arg(long)]
    pub output: PathBuf,
}

/// Key layout written by `mimlab model convert`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LayoutArg {
    /// timm's `SwinTransformerV2` names (downsample at the start of a stage, `head.fc`).
    Timm,
    /// microsoft/Swin-Transformer names, with the buffers the official model registers.
    Official,
    /// What mimlab's own checkpoints hold (official names, no buffers).
    Mimlab,
}

/// Arguments of `mimlab model convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The architecture, when the weights have no run `config.yaml` beside them and no `config`
    /// metadata (an official `.pth`): `--set model.preset=swinv2_tiny_window8_256`.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A run folder (newest checkpoint) or weights file, any format and layout `--weights` takes.
    #[arg(value_name = "RUN_DIR|FILE")]
    pub input: PathBuf,
    /// The safetensors file to write.
    #[arg(value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Key layout of the output.
    #[arg(long, value_enum, default_value = "timm")]
    pub layout: LayoutArg,
}

/// Runs a model subcommand.
pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Info(args) => info(&args),
        ModelCmd::List => {
            for line in describe_presets()? {
                println!("{line}");
            }
            Ok(())
        }
        ModelCmd::Run(args) => forward(&args),
        ModelCmd::Convert(args) => convert(&args),
    }
}

fn convert(args: &ConvertArgs) -> Result<()> {
    let given = if args.config.config.is_some() || !args.config.sets.is_empty() {
        Some(Experiment::load(args.config.config.as_deref(), &args.config.sets)?.model)
    } else {
        None
    };
    let layout = match args.layout {
        LayoutArg::Timm => Layout::Timm,
        LayoutArg::Official => Layout::Official,
        LayoutArg::Mimlab => Layout::Mimlab,
    };
    let r = convert_weights(&args.input, given.as_ref(), &args.output, layout)?;
    eprintln!(
        "read {} ({:?} layout{}), architecture from {}; wrote {} tensors to {} ({layout:?} \
         layout{})",
        r.weights.display(),
        r.from,
        if r.prefix.is_empty() {
            String::new()
        } else {
            format!(", backbone under `{}`", r.prefix)
        },
        r.config_source,
        r.tensors,
        args.output.display(),
        if r.config.num_classes > 0 {
            format!(", {}-class head", r.config.num_classes)
        } else {
            ", no head".to_string()
        }
    );
    Ok(())
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
    let weights = resolve_init(&args.weights).context("--weights")?.weights;
    let (model, _, report) = load_backbone(&exp.model, &weights, &device)?;
    eprintln!(
        "loaded {} tensors from {} ({:?} layout){}",
        report.loaded,
        weights.display(),
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
