//! `mimlab visualize --run RUN_DIR [--images DIR] [--n 8]`: reconstruction pictures of a SimMIM run.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::device::parse_device;
use mimlab_engine::trainer::latest_checkpoint;
use mimlab_pretrain::visualize::visualize_run;

use crate::experiment::Experiment;

/// Arguments of `mimlab visualize`.
#[derive(Debug, Args)]
pub struct VisualizeArgs {
    /// A SimMIM run folder (holds config.yaml and checkpoints/).
    #[arg(long)]
    pub run: PathBuf,
    /// Images to reconstruct instead of the run's held-out images (JPEG/PNG, resized and center-cropped).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Number of images.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes RUN_DIR/pictures/reconstruction.png from the newest checkpoint.
pub fn run(a: VisualizeArgs) -> Result<()> {
    let exp = Experiment::load(Some(&a.run.join("config.yaml")), &[])?;
    let cfg = exp.model.clone();
    let device = parse_device(&exp.run.device)?;
    let weights = latest_checkpoint(&a.run)?;
    let out = a.run.join("pictures").join("reconstruction.png");
    let path = visualize_run(
        &cfg,
        &exp.simmim,
        &exp.data,
        &weights,
        a.images.as_deref(),
        a.n,
        a.seed,
        &out,
        &device,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
