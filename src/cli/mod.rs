//! Subcommands of the `mimlab` binary, one file each.
pub mod avgdist;
pub mod bench;
pub mod config;
pub mod data;
pub mod distill;
pub mod eval;
pub mod finetune;
pub mod metrics;
pub mod model;
pub mod pretrain;
pub mod probe;
pub mod sweep;
pub mod visualize;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::run_dir::{Pick, RunDir};
use mimlab_engine::trainer::checkpoint::newest_objective;
use mimlab_engine::trainer::{RunStart, TrainSession};

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

/// `--resume RUN_DIR [--step last|best|N]`, shared by the training commands.
#[derive(Debug, Clone, Args, Default)]
pub struct ResumeArgs {
    /// Continue this run folder (its config.yaml is the config; --set may still change keys such
    /// as train.epochs) from its newest intact checkpoint, or the one --step names.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Which checkpoint of the run folder given to --resume (or --init): `last` (default), `best`
    /// (by run.best_metric) or a step number. Resuming from an earlier step moves the later
    /// checkpoints into checkpoints/superseded-<time>/.
    #[arg(long, value_name = "last|best|N")]
    pub step: Option<Pick>,
}

/// The training commands and the objective each one writes and resumes.
const COMMAND_OF: [(&str, &str); 5] = [
    ("simmim", "mimlab pretrain"),
    ("distill", "mimlab distill"),
    ("classify", "mimlab finetune"),
    ("detect", "mimlab finetune"),
    ("segment", "mimlab finetune"),
];

/// The experiment of a command: `--resume RUN_DIR` takes that run's own `config.yaml` (with
/// `--set` still applied), else `--config`. `objectives` are what the command trains: a run
/// folder written by another objective is refused up front, naming the command that resumes it.
pub fn load_experiment(
    args: &ConfigArgs,
    resume: Option<&Path>,
    objectives: &[&str],
) -> Result<Experiment> {
    let config_path = match resume {
        Some(dir) => {
            let run = RunDir::at(dir);
            let p = run.config();
            anyhow::ensure!(
                p.is_file(),
                "--resume {}: no config.yaml in that folder",
                dir.display()
            );
            if let Some(other) = newest_objective(&run.checkpoints())
                .with_context(|| format!("--resume {}", dir.display()))?
                .filter(|o| !objectives.contains(&o.as_str()))
            {
                let cmd = |o: &str| {
                    COMMAND_OF
                        .iter()
                        .find(|(k, _)| *k == o)
                        .map_or("another command", |(_, c)| c)
                };
                anyhow::bail!(
                    "--resume {}: that run was written by `{other}` ({}); `{}` resumes only its \
                     own `{}` runs (to start from that run's weights, pass it to --init)",
                    dir.display(),
                    cmd(&other),
                    cmd(objectives[0]),
                    objectives.join("`/`")
                );
            }
            Some(p)
        }
        None => args.config.clone(),
    };
    Experiment::load(config_path.as_deref(), &args.sets)
}

/// The training run of a command: the experiment's shared sections, its resolved YAML (written
/// into the run folder) and the folder: resumed (`--resume`, `--step`), or new and named
/// `<task>-<model>-<dataset>-<UTC time>` (e.g. `simmim-swinv2_nano-fashion-mnist-20261203-181500`).
pub fn session<'a>(
    exp: &'a Experiment,
    task: &str,
    resume: &'a ResumeArgs,
) -> Result<TrainSession<'a>> {
    let start = match &resume.resume {
        Some(dir) => RunStart::Resume {
            dir,
            pick: resume.step.unwrap_or(Pick::Last),
        },
        None => RunStart::New {
            label: format!(
                "{task}-{}-{}",
                exp.model.preset.as_deref().unwrap_or("swinv2"),
                exp.data.dataset
            ),
        },
    };
    Ok(TrainSession {
        data: &exp.data,
        train: &exp.train,
        run: &exp.run,
        config_yaml: exp.to_yaml()?,
        start,
    })
}
