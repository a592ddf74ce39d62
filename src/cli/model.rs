//! `mimlab model info` and `mimlab model run`: model facts, and the eval forward over saved tensors
//! (what researchers use to compare against PyTorch).
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use mimlab_engine::device::parse_device;
use mimlab_models::checkpoint::read_safetensors;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

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
    let cfg = exp.model.clone();
    println!(
        "preset            {}",
        exp.model.preset.as_deref().unwrap_or("-")
    );
    println!("img_size          {}", cfg.img_size);
    println!("parameters        {}", cfg.num_params());
    println!(
        "GFLOPs / image    {:.3} (multiply-adds, forward)",
        cfg.flops() as f64 / 1e9
    );
    println!(
        "inputs            any multiple of {} px (the windows of img_size, padded)",
        cfg.size_multiple()
    );
    let mut res = cfg.img_size / cfg.patch_size;
    for (i, (&d, &h)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
        let dim = cfg.embed_dim << i;
        let (win, shift) = cfg.stage_window(i);
        println!(
            "stage {i}           {d} blocks, dim {dim}, heads {h}, map {res}x{res}, window {win}, \
             shift {shift}"
        );
        res /= 2;
    }
    println!(
        "features          {} channels at stride {}",
        cfg.num_features(),
        cfg.out_stride()
    );
    Ok(())
}

/// Builds the configured backbone and loads weights of any supported layout into it.
fn load_backbone(
    cfg: &SwinV2Config,
    weights: &std::path::Path,
    device: &candle_core::Device,
) -> Result<SwinV2> {
    let (model, _, report) = mimlab_pretrain::backbone::load_backbone(cfg, weights, device)?;
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
    Ok(model)
}

fn forward(args: &RunArgs) -> Result<()> {
    let exp = Experiment::load(args.config.config.as_deref(), &args.config.sets)?;
    let cfg = exp.model.clone();
    let device = parse_device(&exp.run.device)?;
    let model = load_backbone(&cfg, &args.weights, &device)?;
    let inputs = read_safetensors(&args.input)?;
    let x = inputs
        .get("input")
        .with_context(|| format!("{}: no tensor named `input`", args.input.display()))?
        .to_dtype(DType::F32)?
        .to_device(&device)?;
    let feats = model.forward_features(&x, None, false)?;
    let pre = model.pre_logits(&feats)?;
    let last = feats.stages.last().context("model has no stages")?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("pre_logits".into(), pre.clone());
    out.insert("features".into(), last.permute((0, 2, 3, 1))?.contiguous()?);
    if cfg.num_classes > 0 {
        out.insert("logits".into(), model.forward(&x, false)?.0);
    }
    let out: HashMap<String, Tensor> = out
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    mimlab_engine::trainer::checkpoint::save_tensors(&args.output, &out)?;
    eprintln!("wrote {} ({})", args.output.display(), {
        let mut k: Vec<_> = out.keys().cloned().collect();
        k.sort();
        k.join(", ")
    });
    Ok(())
}
