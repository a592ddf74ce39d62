//! `mimlab sweep`: a grid of `--set` overrides and a list of seeds over a pipeline of stages
//! (e.g. SimMIM pretraining, then a probe and a finetuning of that pretraining), each cell in its
//! own run folders, resumable, with a results table and plots.
//!
//! A sweep is a YAML file, checked as strictly as the experiment configs:
//! ```yaml
//! name: avgdist_fmnist              # the sweep folder: <output_dir>/<name>
//! output_dir: runs/sweeps           # default
//! seeds: [0, 1]                     # run.seed of every stage of a cell (default [0])
//! grid:                             # every combination is a grid point, keys in file order
//!   simmim.mask_patch_size: [4, 8, 16]
//!   simmim.mask_ratio: [0.3, 0.6, 0.8]
//! stages:                           # each cell runs them in order
//!   - name: pretrain
//!     command: pretrain             # pretrain | distill | finetune | probe
//!     config: configs/simmim/swinv2_nano_fmnist.yaml
//!     set: [train.epochs=2]         # extra overrides of this stage
//!     grid: true                    # the grid's overrides apply here (default true)
//!   - name: probe
//!     command: probe
//!     config: configs/finetune/swinv2_nano_fmnist.yaml
//!     init: pretrain                # --init the run folder of that earlier stage
//!     grid: false
//!     fractions: [0.01, 1.0]
//! ```
//! Layout: `SWEEP/sweep.yaml` (the file as run), `SWEEP/cells/<point>-s<seed>/` with one run
//! folder per stage (a probe's `probe.json` folder), `<stage>.log` (the command's output) and
//! `<stage>.done.json` (minutes and results, written when the stage finished); `SWEEP/results.csv`
//! (a row per cell), `results.md` (mean ± sd over seeds per grid point) and `plot_*.png`.
//! Restarted, a sweep skips finished stages, resumes an interrupted training stage from its
//! newest checkpoint (exactly, as `--resume` does) and starts over one that wrote none.
mod results;
mod run;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

pub use results::{collect, write_results};
pub use run::run_sweep;

/// The sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The sweep folder's name, in `output_dir`.
    pub name: String,
    /// Parent of the sweep folder.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// `run.seed` of each cell; every grid point runs once per seed.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// `--set` keys and the values each takes; the grid is their product, keys in file order.
    #[serde(default)]
    pub grid: serde_yaml_ng::Mapping,
    /// What each cell runs, in order.
    pub stages: Vec<Stage>,
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs/sweeps")
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

fn default_true() -> bool {
    true
}

/// One command of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Its folder in the cell and the prefix of its results.
    pub name: String,
    /// The mimlab command.
    pub command: Command,
    /// Its experiment config.
    pub config: PathBuf,
    /// Extra `--set` overrides of this stage.
    #[serde(default)]
    pub set: Vec<String>,
    /// Whether the grid's overrides apply to this stage.
    #[serde(default = "default_true")]
    pub grid: bool,
    /// An earlier stage whose run folder is this one's `--init` (finetune, probe).
    #[serde(default)]
    pub init: Option<String>,
    /// An earlier stage whose run folder is this one's `--teacher` (distill).
    #[serde(default)]
    pub teacher: Option<String>,
    /// Label fractions of a probe (`--fractions`).
    #[serde(default)]
    pub fractions: Option<Vec<f64>>,
}

/// The commands a stage can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// `mimlab pretrain` (SimMIM).
    Pretrain,
    /// `mimlab distill` (feature distillation).
    Distill,
    /// `mimlab finetune` (classification, detection, segmentation).
    Finetune,
    /// `mimlab probe` (k-NN and linear probe; not a training run).
    Probe,
}

impl Command {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pretrain => "pretrain",
            Self::Distill => "distill",
            Self::Finetune => "finetune",
            Self::Probe => "probe",
        }
    }

    /// Whether the stage is a training run (a run folder with checkpoints, resumable).
    pub fn trains(self) -> bool {
        self != Self::Probe
    }
}

/// One grid point: its index and its `key=value` overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Position in the grid, row-major over the keys in file order.
    pub index: usize,
    /// `(key, value as YAML)`, in key order.
    pub values: Vec<(String, String)>,
}

impl Point {
    /// The overrides as `--set` arguments.
    pub fn sets(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// `key=value, key=value` (`-` for the grid's only point).
    pub fn label(&self) -> String {
        if self.values.is_empty() {
            "-".into()
        } else {
            self.sets().join(", ")
        }
    }
}

/// One cell: a grid point and a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The grid point.
    pub point: Point,
    /// Its `run.seed`.
    pub seed: u64,
}

impl Cell {
    /// The cell's folder name: `p<point>-s<seed>`.
    pub fn id(&self) -> String {
        format!("p{:02}-s{}", self.point.index, self.seed)
    }
}

impl SweepConfig {
    /// Reads and checks a sweep file: unknown keys, empty or non-scalar grid values, duplicate
    /// or unknown stage references are errors naming the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        let cfg: SweepConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            anyhow::anyhow!("{}: {} (at `{}`)", path.display(), e.inner(), e.path())
        })?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    /// The checks of [`SweepConfig::load`].
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty() && !self.name.contains(['/', '\\']) && self.name != "..",
            "name: `{}` is not a folder name",
            self.name
        );
        ensure!(!self.seeds.is_empty(), "seeds: give at least one");
        ensure!(!self.stages.is_empty(), "stages: give at least one");
        for (k, v) in &self.grid {
            let key = k.as_str().context("grid: keys are `section.key` strings")?;
            ensure!(
                key.contains('.'),
                "grid.{key}: expected a `section.key` name"
            );
            let list = v
                .as_sequence()
                .with_context(|| format!("grid.{key}: expected a list of values"))?;
            ensure!(!list.is_empty(), "grid.{key}: the list of values is empty");
            for x in list {
                ensure!(
                    !x.is_mapping(),
                    "grid.{key}: values are scalars or lists, not mappings"
                );
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}] `{}`", s.name);
            ensure!(
                !s.name.is_empty()
                    && s.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{at}: name must be letters, digits, `_` or `-`"
            );
            ensure!(
                !self.stages[..i].iter().any(|p| p.name == s.name),
                "{at}: a second stage of that name"
            );
            for (what, r) in [("init", &s.init), ("teacher", &s.teacher)] {
                if let Some(r) = r {
                    let Some(src) = self.stages[..i].iter().find(|p| &p.name == r) else {
                        bail!("{at}: {what}: `{r}` is not an earlier stage");
                    };
                    ensure!(
                        src.command.trains(),
                        "{at}: {what}: `{r}` is a probe, which writes no weights"
                    );
                }
            }
            ensure!(
                s.teacher.is_none() || s.command == Command::Distill,
                "{at}: teacher is for distill stages"
            );
            ensure!(
                s.command != Command::Distill || s.teacher.is_some(),
                "{at}: a distill stage needs `teacher: <earlier stage>`"
            );
            ensure!(
                s.init.is_none() || matches!(s.command, Command::Finetune | Command::Probe),
                "{at}: init is for finetune and probe stages"
            );
            ensure!(
                s.fractions.is_none() || s.command == Command::Probe,
                "{at}: fractions are for probe stages"
            );
        }
        Ok(())
    }

    /// The grid points, row-major over the keys in file order (the last key varies fastest).
    pub fn points(&self) -> Result<Vec<Point>> {
        let mut axes: Vec<(String, Vec<String>)> = vec![];
        for (k, v) in &self.grid {
            let key = k.as_str().context("grid key")?.to_string();
            let vals = v
                .as_sequence()
                .context("grid values")?
                .iter()
                .map(yaml_scalar)
                .collect::<Result<Vec<_>>>()?;
            axes.push((key, vals));
        }
        let total: usize = axes.iter().map(|(_, v)| v.len()).product();
        Ok((0..total)
            .map(|index| {
                let mut rest = index;
                let mut values = vec![(String::new(), String::new()); axes.len()];
                for (a, (k, vals)) in axes.iter().enumerate().rev() {
                    values[a] = (k.clone(), vals[rest % vals.len()].clone());
                    rest /= vals.len();
                }
                Point { index, values }
            })
            .collect())
    }

    /// Every cell: each grid point with each seed, points first.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        Ok(self
            .points()?
            .into_iter()
            .flat_map(|p| {
                self.seeds.iter().map(move |&seed| Cell {
                    point: p.clone(),
                    seed,
                })
            })
            .collect())
    }

    /// The sweep folder.
    pub fn dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }
}

/// A grid value as `--set` writes it (YAML flow style, one line).
fn yaml_scalar(v: &serde_yaml_ng::Value) -> Result<String> {
    Ok(serde_yaml_ng::to_string(v)?.trim_end().replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepConfig> {
        let cfg: SweepConfig = serde_yaml_ng::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    const TWO_STAGES: &str = "name: s\nseeds: [0, 1]\ngrid:\n  simmim.mask_patch_size: [4, 8]\n  \
         simmim.mask_ratio: [0.3, 0.6, 0.8]\nstages:\n  - {name: pre, command: pretrain, config: a.yaml}\n  \
         - {name: probe, command: probe, config: b.yaml, init: pre, grid: false, fractions: [0.01]}\n";

    #[test]
    fn cells_are_the_grid_times_the_seeds_in_file_order() -> Result<()> {
        let cfg = parse(TWO_STAGES)?;
        let points = cfg.points()?;
        assert_eq!(points.len(), 6);
        assert_eq!(
            points[1].sets(),
            vec!["simmim.mask_patch_size=4", "simmim.mask_ratio=0.6"]
        );
        assert_eq!(
            points[5].label(),
            "simmim.mask_patch_size=8, simmim.mask_ratio=0.8"
        );
        let cells = cfg.cells()?;
        assert_eq!(cells.len(), 12);
        assert_eq!(
            (cells[3].id(), cells[3].seed, cells[3].point.index),
            ("p01-s1".to_string(), 1, 1)
        );
        assert_eq!(cfg.dir(), PathBuf::from("runs/sweeps/s"));
        assert_eq!(cfg.stages[1].fractions, Some(vec![0.01]));
        // no grid: one point, no overrides
        let one = parse("name: s\nstages:\n  - {name: a, command: pretrain, config: a.yaml}\n")?;
        assert_eq!(one.cells()?.len(), 1);
        assert_eq!(one.points()?[0].label(), "-");
        Ok(())
    }

    /// Every sweep in configs/sweeps loads, and each stage's config resolves with every grid
    /// point's overrides.
    #[test]
    fn shipped_sweeps_resolve() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sweeps");
        let mut n = 0;
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let cfg = SweepConfig::load(&p)?;
            // stage configs are named from the checkout's root
            let cfg = SweepConfig {
                stages: cfg
                    .stages
                    .into_iter()
                    .map(|s| Stage {
                        config: Path::new(env!("CARGO_MANIFEST_DIR")).join(&s.config),
                        ..s
                    })
                    .collect(),
                ..cfg
            };
            run::check_configs(&cfg, &cfg.cells()?).with_context(|| p.display().to_string())?;
            n += 1;
        }
        assert!(n >= 1);
        Ok(())
    }

    #[test]
    fn bad_sweeps_are_refused_naming_the_key() {
        let e = |t: &str| format!("{:#}", parse(t).unwrap_err());
        let stage = "stages:\n  - {name: a, command: pretrain, config: a.yaml}\n";
        assert!(e(&format!("name: s\ngrdi: {{}}\n{stage}")).contains("unknown field `grdi`"));
        assert!(e(&format!("name: s\ngrid:\n  model.depth: []\n{stage}"))
            .contains("grid.model.depth: the list of values is empty"));
        assert!(e(&format!("name: s\ngrid:\n  lr: [1]\n{stage}"))
            .contains("grid.lr: expected a `section.key` name"));
        assert!(e(&format!("name: s\nseeds: []\n{stage}")).contains("seeds: give at least one"));
        assert!(e(&format!("name: s\ngrid:\n  a.b: 3\n{stage}"))
            .contains("grid.a.b: expected a list of values"));
        assert!(
            e("name: s\nstages:\n  - {name: a, command: finetune, config: a.yaml, init: b}\n")
                .contains("init: `b` is not an earlier stage")
        );
        assert!(
            e("name: s\nstages:\n  - {name: a, command: distill, config: a.yaml}\n")
                .contains("a distill stage needs `teacher: <earlier stage>`")
        );
        assert!(e(
            "name: s\nstages:\n  - {name: a, command: pretrain, config: a.yaml}\n  \
                   - {name: a, command: probe, config: a.yaml}\n"
        )
        .contains("a second stage of that name"));
        assert!(
            e("name: s\nstages:\n  - {name: a, command: train, config: a.yaml}\n")
                .contains("unknown variant `train`")
        );
        assert!(e(
            "name: s\nstages:\n  - {name: p, command: probe, config: a.yaml}\n  \
                   - {name: f, command: finetune, config: a.yaml, init: p}\n"
        )
        .contains("`p` is a probe, which writes no weights"));
    }
}
