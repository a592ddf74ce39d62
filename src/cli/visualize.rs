//! `mimlab visualize --run RUN_DIR [--images DIR] [--n 8] [--set run.seed=N]`: reconstruction
//! pictures of a SimMIM run.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::device::parse_device;
use mimlab_engine::run_dir::RunDir;
use mimlab_pretrain::simmim::visualize::visualize_run_dir;

use crate::experiment::Experiment;

/// Arguments of `mimlab visualize`.
#[derive(Debug, Args)]
pub struct VisualizeArgs {
    /// A SimMIM run folder (holds config.yaml and checkpoints/).
    #[arg(long, value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Images to reconstruct instead of the run's held-out images (JPEG/PNG, resized and center-cropped).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Number of images.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Override keys of the run's config.yaml, e.g. `--set run.seed=3` (the seed of the masks).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Writes RUN_DIR/pictures/reconstruction.png from the newest checkpoint.
pub fn run(a: VisualizeArgs) -> Result<()> {
    let run = RunDir::at(&a.run);
    let exp = Experiment::load(Some(&run.config()), &a.sets)?;
    let cfg = exp.model.clone();
    let device = parse_device(&exp.run.device)?;
    let path = visualize_run_dir(
        &run,
        &cfg,
        &exp.simmim,
        &exp.data,
        a.images.as_deref(),
        a.n,
        exp.run.seed,
        &device,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
