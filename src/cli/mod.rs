//! Subcommands of the `mimlab` binary, one file each.
pub mod avgdist;
pub mod bench;
pub mod config;
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
use mimlab_engine::data::{DataLoader, LoaderOptions};
use mimlab_engine::trainer::{Objective, TrainSummary, Trainer};

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
            let p = dir.join("config.yaml");
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

/// The training loader's options: shuffled, last incomplete batch dropped (as the reference
/// loaders), seeded by the run seed.
pub fn train_options(exp: &Experiment) -> LoaderOptions {
    LoaderOptions {
        batch_size: exp.train.batch_size,
        shuffle: true,
        drop_last: true,
        seed: exp.run.seed,
        workers: exp.data.num_workers,
        prefetch: exp.data.prefetch_batches,
    }
}

/// Runs the one trainer for `objective` (a new run, or `resume`), writing the resolved config into
/// the run folder, and prints the summary line.
pub fn train_and_report<O: Objective>(
    objective: &mut O,
    exp: &Experiment,
    resume: Option<&Path>,
    loader: &DataLoader,
    eval: Option<&DataLoader>,
) -> Result<TrainSummary> {
    let start = std::time::Instant::now();
    let yaml = exp.to_yaml()?;
    let mut trainer = Trainer::new(objective, &exp.train, &exp.run, &yaml, resume)?;
    let summary = trainer.fit(loader, eval)?;
    println!(
        "done: {} steps in {:.1}s, loss {:.4} -> {:.4}; run folder {}",
        summary.steps,
        start.elapsed().as_secs_f64(),
        summary.first_loss,
        summary.last_loss,
        summary.run_dir.display()
    );
    Ok(summary)
}
