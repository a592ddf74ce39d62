//! `mimlab sweep`: a grid of overrides and seeds over a pipeline of stages (see `crate::sweep`).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::sweep::SweepConfig;

/// Arguments of `mimlab sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The sweep file (YAML: name, seeds, grid, stages).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Cells run at the same time (default 1: one after another). Each stage is its own
    /// process: give each `--set run.threads=N` in the sweep so that they share the cores.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Only rewrite the results table and plots from the finished stages.
    #[arg(long)]
    pub report: bool,
}

/// Runs `mimlab sweep`.
pub fn run(args: SweepArgs) -> Result<()> {
    let cfg = SweepConfig::load(&args.config)?;
    if args.report {
        let rows = crate::sweep::collect(&cfg)?;
        crate::sweep::write_results(&cfg, &rows)?;
    } else {
        let bin = std::env::current_exe().context("locating the mimlab binary")?;
        crate::sweep::run_sweep(&cfg, &bin, args.parallel)?;
    }
    let dir = cfg.dir();
    print!(
        "{}",
        std::fs::read_to_string(dir.join("results.md")).unwrap_or_default()
    );
    println!("sweep folder: {}", dir.display());
    Ok(())
}
