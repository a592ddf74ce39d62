//! `mimlab data prepare digits-det|trees [--root DATA_DIR]`: generates a derived dataset under the
//! data root (the datasets also do it on first use). Recipes: `mimlab_engine::data::digits_det`
//! ("real digits, synthetic layout") and `mimlab_engine::data::trees`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use mimlab_engine::data::digits_det::{self, DigitsDetConfig};
use mimlab_engine::data::trees;

/// Data subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCmd {
    /// Generate a derived dataset (nothing is done when its folder exists: delete it to redo).
    Prepare(PrepareArgs),
}

/// The derived datasets.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Derived {
    /// MNIST digits pasted onto crops of the bundled photos (real digits, synthetic layout).
    DigitsDet,
    /// NEON tree-crown images tiled into 320 px tiles.
    Trees,
}

/// Arguments of `mimlab data prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Which dataset.
    pub dataset: Derived,
    /// Data root (where scripts/setup-data.sh put mnist, photos and neon-trees-raw).
    #[arg(long, default_value = "data")]
    pub root: PathBuf,
    /// digits-det: canvas side in pixels.
    #[arg(long, default_value_t = DigitsDetConfig::default().canvas)]
    pub canvas: usize,
    /// digits-det: train canvases (another number than the default goes to
    /// `digits-det-train<N>/`, the folder `data.digits_det_train: N` reads).
    #[arg(long, default_value_t = DigitsDetConfig::default().train)]
    pub train: usize,
    /// digits-det: validation canvases.
    #[arg(long, default_value_t = DigitsDetConfig::default().val)]
    pub val: usize,
    /// digits-det: seed of every draw (same seed, byte-identical files).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs a data subcommand.
pub fn run(cmd: DataCmd) -> Result<()> {
    let DataCmd::Prepare(a) = cmd;
    let start = Instant::now();
    match a.dataset {
        Derived::DigitsDet => {
            let cfg = DigitsDetConfig {
                canvas: a.canvas,
                train: a.train,
                val: a.val,
                seed: a.seed,
                ..Default::default()
            };
            let p = digits_det::prepare(&a.root, &cfg)?;
            let dir = a.root.join(cfg.dir_name());
            if !p.created {
                println!(
                    "{}: present, nothing done (delete it to regenerate)",
                    dir.display()
                );
                return Ok(());
            }
            println!(
                "{} ({}): train {} images / {} boxes, val {} images / {} boxes, {:.1}s",
                dir.display(),
                digits_det::TAGLINE,
                p.train.0,
                p.train.1,
                p.val.0,
                p.val.1,
                start.elapsed().as_secs_f64()
            );
        }
        Derived::Trees => {
            let p = trees::prepare(&a.root, trees::TILE)?;
            let dir = a.root.join(trees::DIR);
            if !p.created {
                println!(
                    "{}: present, nothing done (delete it to redo)",
                    dir.display()
                );
                return Ok(());
            }
            println!(
                "{}: {} source boxes -> train {} tiles / {} boxes, val {} tiles / {} boxes, {:.1}s",
                dir.display(),
                p.source_boxes,
                p.train.0,
                p.train.1,
                p.val.0,
                p.val.1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
