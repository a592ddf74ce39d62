//! Subcommands of the `mimlab` binary, one file each.
pub mod avgdist;
pub mod bench;
pub mod config;
pub mod model;
pub mod pretrain;
pub mod visualize;

use std::path::PathBuf;

use clap::Args;

/// `--config FILE` and repeatable `--set key=value`, shared by every subcommand that takes a config.
#[derive(Debug, Clone, Args, Default)]
pub struct ConfigArgs {
    /// Experiment YAML (may name a `base:` file it inherits from).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override any key, value parsed as YAML: `--set train.base_lr=1e-3 --set 'model.depths=[2,2,2]'`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}
