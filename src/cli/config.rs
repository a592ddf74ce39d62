//! `mimlab config show [CONFIG] [--set ...]`: prints the fully resolved experiment config.
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the resolved config (defaults <- file <- --set) as YAML.
    Show {
        /// Experiment YAML (same as --config).
        file: Option<PathBuf>,
        #[command(flatten)]
        args: ConfigArgs,
    },
}

/// Runs a config subcommand.
pub fn run(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Show { file, args } => {
            let path = file.or(args.config);
            let exp = Experiment::load(path.as_deref(), &args.sets)?;
            print!("{}", exp.to_yaml()?);
            Ok(())
        }
    }
}
