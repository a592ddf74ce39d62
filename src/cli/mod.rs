//! Subcommands of the `mimlab` binary, one file each.
pub mod avgdist;
pub mod bench;
pub mod config;
pub mod data;
pub mod distill;
pub mod eval;
pub mod finetune;
pub mod model;
pub mod pretrain;
pub mod probe;
pub mod visualize;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use mimlab_engine::run_dir::RunDir;
use mimlab_engine::trainer::TrainSession;

use crate::experiment::Experiment;

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

/// The experiment of a command: `--resume RUN_DIR` takes that run's own `config.yaml` (with
/// `--set` still applied), else `--config`.
pub fn load_experiment(args: &ConfigArgs, resume: Option<&Path>) -> Result<Experiment> {
    let config_path = match resume {
        Some(dir) => {
            let p = RunDir::at(dir).config();
            anyhow::ensure!(
                p.is_file(),
                "--resume {}: no config.yaml in that folder",
                dir.display()
            );
            Some(p)
        }
        None => args.config.clone(),
    };
    Experiment::load(config_path.as_deref(), &args.sets)
}

/// The training run of a command: the experiment's shared sections, its resolved YAML (written
/// into the run folder) and the folder to resume.
pub fn session<'a>(exp: &'a Experiment, resume: Option<&'a Path>) -> Result<TrainSession<'a>> {
    Ok(TrainSession {
        data: &exp.data,
        train: &exp.train,
        run: &exp.run,
        config_yaml: exp.to_yaml()?,
        resume,
    })
}
