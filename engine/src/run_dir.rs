//! Output stage: the run folder, the one place that knows its layout.
//!
//! ```text
//! RUN_DIR/
//!   config.yaml                     the fully resolved experiment config
//!   checkpoints/step_N.*, latest    see `trainer::checkpoint` (step_N.json marks a complete one)
//!   checkpoints/best, best.json     the best checkpoint by `run.best_metric` (kept by pruning)
//!   checkpoints/superseded-<time>/  checkpoints after the step a run was resumed from (`--step`)
//!   events.out.tfevents.*           TensorBoard (the run folder itself is the log dir)
//!   metrics.jsonl                   one JSON object per logged step or evaluation
//!   pictures/                       PNGs (reconstructions, ...)
//!   eval/                           reports of `finetune` and `eval`
//!   .lock                           held by the run writing the folder (its pid inside)
//! ```
//! One run at a time writes a run folder: a training run holds an exclusive lock on `.lock`
//! ([`RunDir::lock`]) from before it writes anything until it ends; the lock is the operating
//! system's file lock, so it dies with the process (a `kill -9` leaves no stale lock behind).
//! A weights path given to `--init`, `--teacher`, `--weights` is a run folder (its newest
//! complete checkpoint) or a file, which may sit in a run's `checkpoints/` ([`resolve_init`]);
//! the pointer files `checkpoints/latest` and `checkpoints/best` stand for the checkpoint they
//! name. A [`Pick`] (`--step last|best|N`) chooses another checkpoint of a run folder.
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

/// File in `checkpoints/` naming the best checkpoint by `run.best_metric` (`step_N`).
pub const BEST_FILE: &str = "best";
/// File in `checkpoints/` with the best checkpoint's metric, mode and value.
pub const BEST_META_FILE: &str = "best.json";

/// File of the resolved config.
pub const CONFIG_FILE: &str = "config.yaml";
/// Folder of the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// File in `checkpoints/` naming the newest complete checkpoint (`step_N`).
pub const LATEST_FILE: &str = "latest";
/// Folder of the pictures.
pub const PICTURES_DIR: &str = "pictures";
/// File of the metric lines.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Folder of the evaluation reports.
pub const EVAL_DIR: &str = "eval";
/// File locked by the run writing the folder.
pub const LOCK_FILE: &str = ".lock";

/// The three files of checkpoint N.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    /// `step_N.safetensors`: the objective's variables.
    pub weights: PathBuf,
    /// `step_N.optim.safetensors`: AdamW state and the loss history.
    pub optim: PathBuf,
    /// `step_N.json`: the meta, written last.
    pub meta: PathBuf,
}

/// The exclusive lock on a run folder ([`RunDir::lock`]); released when dropped (or when the
/// process dies).
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // best effort: a released lock names no holder (the lock itself goes with the file)
        let _ = self.file.set_len(0);
    }
}

/// A run folder (a path; nothing is read or created until asked).
#[derive(Debug, Clone, PartialEq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run folder at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// A fresh run folder for `objective`, created and locked: `output_dir/name`, or
    /// `output_dir/<objective>-<UTC stamp>[-k]` for an unnamed run (created with `create_dir`,
    /// so two runs started in the same second never share one). Refuses a named folder that
    /// another run holds, or that already holds checkpoints (resume it instead).
    pub fn new_run(
        output_dir: &Path,
        name: Option<&str>,
        objective: &str,
    ) -> Result<(Self, RunLock)> {
        if let Some(name) = name {
            let dir = Self::at(output_dir.join(name));
            dir.create()?;
            let lock = dir.lock()?;
            if !dir.checkpoint_steps()?.is_empty() {
                bail!(
                    "run folder {} already holds checkpoints: resume it, or pick another run.name",
                    dir.root.display()
                );
            }
            return Ok((dir, lock));
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!("{objective}-{}", utc_stamp(secs));
        Self::create_unique(output_dir, &base)
    }

    /// Creates and locks `parent/base`, or `parent/base-k` for the first k >= 2 not taken.
    fn create_unique(parent: &Path, base: &str) -> Result<(Self, RunLock)> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        for k in 1u32.. {
            let name = if k == 1 {
                base.to_string()
            } else {
                format!("{base}-{k}")
            };
            let dir = Self::at(parent.join(name));
            match std::fs::create_dir(&dir.root) {
                Ok(()) => {
                    let lock = dir.lock()?;
                    return Ok((dir, lock));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating run folder {}", dir.root.display()))
                }
            }
        }
        unreachable!("u32 suffixes exhausted")
    }

    /// Takes the run folder's exclusive lock (`.lock`, created if needed, with this process's
    /// pid written in) for as long as the returned value lives. The folder must exist. Fails at
    /// once, naming the folder and the holder's pid, when another run holds it.
    pub fn lock(&self) -> Result<RunLock> {
        let path = self.root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the run folder lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The holder writes its pid right after taking the lock: give it a moment.
                let mut text = String::new();
                for _ in 0..20 {
                    text.clear();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut text);
                    if !text.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                let holder = match text.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                bail!(
                    "run folder {} is in use by another run ({holder}, holding {}): wait for it \
                     to end, or pick another run.name",
                    self.root.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RunLock { file })
    }

    /// The run folder that holds `file` as `RUN/checkpoints/<file>`, if it sits in one.
    pub fn of_checkpoint_file(file: &Path) -> Option<Self> {
        file.parent()
            .filter(|d| d.file_name().is_some_and(|n| n == CHECKPOINTS_DIR))
            .and_then(Path::parent)
            .map(Self::at)
    }

    /// Creates the folder (and its parents).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating run folder {}", self.root.display()))
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.yaml`.
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }

    /// The files of checkpoint `step`.
    pub fn checkpoint(&self, step: u64) -> CheckpointFiles {
        let (weights, optim, meta) = checkpoint_paths(&self.checkpoints(), step);
        CheckpointFiles {
            weights,
            optim,
            meta,
        }
    }

    /// `checkpoints/latest`.
    pub fn latest_file(&self) -> PathBuf {
        self.checkpoints().join(LATEST_FILE)
    }

    /// `checkpoints/best`.
    pub fn best_file(&self) -> PathBuf {
        self.checkpoints().join(BEST_FILE)
    }

    /// `checkpoints/best.json`.
    pub fn best_meta_file(&self) -> PathBuf {
        self.checkpoints().join(BEST_META_FILE)
    }

    /// The step `checkpoints/best` names, if the file exists.
    pub fn best_step(&self) -> Result<Option<u64>> {
        read_pointer(&self.best_file())
    }

    /// The step of the checkpoint `pick` chooses; an error naming the folder and the steps it
    /// holds when there is no such complete checkpoint.
    pub fn pick(&self, pick: Pick) -> Result<u64> {
        let steps = self.checkpoint_steps()?;
        let have = || match steps.as_slice() {
            [] => "it holds no complete checkpoint".to_string(),
            s => format!(
                "it holds {}",
                s.iter()
                    .map(|n| format!("step_{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let step = match pick {
            Pick::Last => steps.last().copied(),
            Pick::Best => match self.best_step()? {
                Some(s) => Some(s),
                None => bail!(
                    "{}: no best checkpoint (a run keeps one when run.best_metric is set); {}",
                    self.checkpoints().display(),
                    have()
                ),
            },
            Pick::Step(n) => Some(n),
        };
        match step.filter(|s| steps.contains(s)) {
            Some(s) => Ok(s),
            None => bail!(
                "{}: no complete checkpoint {}; {}",
                self.checkpoints().display(),
                step.map_or_else(|| "at all".to_string(), |s| format!("step_{s}")),
                have()
            ),
        }
    }

    /// Steps of the complete checkpoints, ascending (empty when there are none).
    pub fn checkpoint_steps(&self) -> Result<Vec<u64>> {
        list_checkpoints(&self.checkpoints())
    }

    /// The newest complete checkpoint's step, if any.
    pub fn latest_step(&self) -> Result<Option<u64>> {
        Ok(self.checkpoint_steps()?.last().copied())
    }

    /// Weights file of the newest complete checkpoint; an error naming the folder if none.
    pub fn latest_weights(&self) -> Result<PathBuf> {
        match self.latest_step()? {
            Some(s) => Ok(self.checkpoint(s).weights),
            None => bail!(
                "{}: no complete checkpoint (step_N.json) in this run folder",
                self.checkpoints().display()
            ),
        }
    }

    /// `pictures/`.
    pub fn pictures(&self) -> PathBuf {
        self.root.join(PICTURES_DIR)
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// Folder of the TensorBoard event files (the run folder itself, as TensorBoard's logdir).
    pub fn events(&self) -> &Path {
        &self.root
    }

    /// `eval/`.
    pub fn eval(&self) -> PathBuf {
        self.root.join(EVAL_DIR)
    }
}

/// Which checkpoint of a run folder (`--step`): the newest complete one, the best by
/// `run.best_metric`, or a step number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The newest complete checkpoint (`last` or `latest`).
    Last,
    /// The best by `run.best_metric` (`best`).
    Best,
    /// `step_N`.
    Step(u64),
}

impl std::str::FromStr for Pick {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" | "latest" => Ok(Self::Last),
            "best" => Ok(Self::Best),
            n => n
                .strip_prefix("step_")
                .unwrap_or(n)
                .parse()
                .map(Self::Step)
                .map_err(|_| anyhow::anyhow!("`{s}`: expected last, best or a step number")),
        }
    }
}

/// The step a pointer file (`checkpoints/latest`, `checkpoints/best`: `step_N`) names; None
/// when the file does not exist.
fn read_pointer(path: &Path) -> Result<Option<u64>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match text
        .trim()
        .strip_prefix("step_")
        .and_then(|n| n.parse().ok())
    {
        Some(n) => Ok(Some(n)),
        None => bail!(
            "{}: expected `step_N`, found {:?}",
            path.display(),
            text.trim()
        ),
    }
}

/// The weights file of checkpoint `pick` of the run folder `run` (`--init RUN --step best`).
pub fn pick_weights(run: &Path, pick: Pick) -> Result<PathBuf> {
    if !run.is_dir() {
        bail!(
            "{}: --step chooses a checkpoint of a run folder, and this is not a folder",
            run.display()
        );
    }
    let run = RunDir::at(run);
    Ok(run.checkpoint(run.pick(pick)?).weights)
}

/// What a `--init` / `--teacher` / `--weights` path resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct InitSource {
    /// The safetensors file (or sharded index) to read.
    pub weights: PathBuf,
    /// The run's resolved `config.yaml`, when the path was a run folder or a file inside one.
    pub run_config: Option<PathBuf>,
}

/// A run folder -> its newest complete checkpoint and its `config.yaml`; a file -> itself (and
/// the `config.yaml` of the run it sits in, `RUN/checkpoints/step_N.safetensors`, if any).
pub fn resolve_init(path: &Path) -> Result<InitSource> {
    if path.is_dir() {
        let run = RunDir::at(path);
        let weights = run
            .latest_weights()
            .with_context(|| format!("{}: not a run folder with checkpoints", path.display()))?;
        let cfg = run.config();
        return Ok(InitSource {
            weights,
            run_config: cfg.is_file().then_some(cfg),
        });
    }
    if !path.is_file() {
        bail!("{}: no such run folder or weights file", path.display());
    }
    // checkpoints/latest and checkpoints/best stand for the checkpoint they name
    if let Some(run) = RunDir::of_checkpoint_file(path).filter(|_| {
        path.file_name()
            .is_some_and(|n| n == LATEST_FILE || n == BEST_FILE)
    }) {
        let step = read_pointer(path)?.unwrap_or_default();
        let weights = run.checkpoint(run.pick(Pick::Step(step))?).weights;
        let cfg = run.config();
        return Ok(InitSource {
            weights,
            run_config: cfg.is_file().then_some(cfg),
        });
    }
    let run_config = RunDir::of_checkpoint_file(path)
        .map(|run| run.config())
        .filter(|c| c.is_file());
    Ok(InitSource {
        weights: path.to_path_buf(),
        run_config,
    })
}

/// One top-level section (`model:`, `data:`, ...) of a run's `config.yaml`, deserialized.
pub fn read_config_section<T: DeserializeOwned>(config_yaml: &Path, section: &str) -> Result<T> {
    let text = std::fs::read_to_string(config_yaml)
        .with_context(|| format!("reading {}", config_yaml.display()))?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{}: not valid YAML", config_yaml.display()))?;
    let value = doc
        .get(section)
        .with_context(|| format!("{}: no `{section}:` section", config_yaml.display()))?;
    serde_yaml_ng::from_value(value.clone()).with_context(|| {
        format!(
            "{}: reading the `{section}:` section",
            config_yaml.display()
        )
    })
}

/// Paths of checkpoint `step` inside `dir`: (weights, optimizer, meta).
pub fn checkpoint_paths(dir: &Path, step: u64) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("step_{step}.safetensors")),
        dir.join(format!("step_{step}.optim.safetensors")),
        dir.join(format!("step_{step}.json")),
    )
}

/// Steps of the complete checkpoints in `dir` (those with a JSON), ascending; empty if no dir.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<u64>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut steps = vec![];
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step_")
            .and_then(|s| s.strip_suffix(".json"))
        {
            if let Ok(n) = n.parse::<u64>() {
                steps.push(n);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// `YYYYmmdd-HHMMSS` in UTC for seconds since the Unix epoch (no date crate needed).
pub fn utc_stamp(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::RunConfig;

    #[test]
    fn layout_names_match_the_documented_ones() {
        let r = RunDir::at("runs/x");
        assert_eq!(r.config(), Path::new("runs/x/config.yaml"));
        assert_eq!(r.metrics(), Path::new("runs/x/metrics.jsonl"));
        assert_eq!(r.pictures(), Path::new("runs/x/pictures"));
        assert_eq!(r.eval(), Path::new("runs/x/eval"));
        assert_eq!(r.events(), Path::new("runs/x"));
        assert_eq!(r.latest_file(), Path::new("runs/x/checkpoints/latest"));
        assert_eq!(
            r.checkpoint(7),
            CheckpointFiles {
                weights: "runs/x/checkpoints/step_7.safetensors".into(),
                optim: "runs/x/checkpoints/step_7.optim.safetensors".into(),
                meta: "runs/x/checkpoints/step_7.json".into(),
            }
        );
        let f = Path::new("runs/x/checkpoints/step_7.safetensors");
        assert_eq!(RunDir::of_checkpoint_file(f), Some(r));
        assert_eq!(
            RunDir::of_checkpoint_file(Path::new("w/a.safetensors")),
            None
        );
    }

    #[test]
    fn newest_checkpoint_init_resolution_and_new_run_names() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = RunDir::at(dir.path().join("r"));
        let err = run.latest_weights().unwrap_err().to_string();
        assert!(err.contains("no complete checkpoint"), "{err}");
        std::fs::create_dir_all(run.checkpoints())?;
        std::fs::write(run.config(), "model:\n  img_size: 32\n")?;
        for s in [5u64, 12] {
            std::fs::write(run.checkpoint(s).weights, "w")?;
            std::fs::write(run.checkpoint(s).meta, "{}")?;
        }
        // weights without a JSON are not a complete checkpoint
        std::fs::write(run.checkpoint(20).weights, "w")?;
        assert_eq!(run.checkpoint_steps()?, vec![5, 12]);
        assert_eq!(run.latest_weights()?, run.checkpoint(12).weights);

        let src = resolve_init(run.root())?;
        assert_eq!(src.weights, run.checkpoint(12).weights);
        assert_eq!(src.run_config, Some(run.config()));
        let file = resolve_init(&run.checkpoint(5).weights)?;
        assert_eq!(file.run_config, Some(run.config()));
        let err = resolve_init(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("no such run folder"),
            "{err}"
        );
        #[derive(serde::Deserialize)]
        struct M {
            img_size: usize,
        }
        let m: M = read_config_section(&run.config(), "model")?;
        assert_eq!(m.img_size, 32);
        let err = read_config_section::<M>(&run.config(), "data")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.yaml: no `data:` section"), "{err}");

        // a named run folder with checkpoints is refused; unnamed runs never collide
        let mut cfg = RunConfig {
            output_dir: dir.path().to_path_buf(),
            name: Some("r".into()),
            ..RunConfig::default()
        };
        let err = RunDir::new_run(&cfg.output_dir, cfg.name.as_deref(), "toy")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already holds checkpoints"), "{err}");
        cfg.name = None;
        let (a, _la) = RunDir::new_run(&cfg.output_dir, cfg.name.as_deref(), "toy")?;
        let (b, _lb) = RunDir::new_run(&cfg.output_dir, cfg.name.as_deref(), "toy")?;
        assert_ne!(a, b);
        assert!(a.root().is_dir() && b.root().is_dir());
        let name = a.root().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("toy-") && name.len() == "toy-20231114-221320".len());
        Ok(())
    }

    #[test]
    fn unnamed_runs_of_the_same_second_get_their_own_folders() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let stamp = "toy-20231114-221320";
        let (a, _la) = RunDir::create_unique(dir.path(), stamp)?;
        let (b, _lb) = RunDir::create_unique(dir.path(), stamp)?;
        let (c, _lc) = RunDir::create_unique(dir.path(), stamp)?;
        assert_eq!(a.root(), dir.path().join(stamp));
        assert_eq!(b.root(), dir.path().join(format!("{stamp}-2")));
        assert_eq!(c.root(), dir.path().join(format!("{stamp}-3")));
        Ok(())
    }

    #[test]
    fn a_locked_run_folder_refuses_a_second_run_until_released() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = RunDir::at(dir.path().join("conc"));
        run.create()?;
        let held = run.lock()?;
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(run.root().join(".lock"))?,
            format!("{pid}\n")
        );
        let err = run.lock().unwrap_err().to_string();
        let folder = run.root().display();
        assert_eq!(
            err,
            format!(
                "run folder {folder} is in use by another run (pid {pid}, holding \
                 {folder}/.lock): wait for it to end, or pick another run.name"
            )
        );
        // a named new run on the held folder is refused the same way
        let cfg = RunConfig {
            output_dir: dir.path().to_path_buf(),
            name: Some("conc".into()),
            ..RunConfig::default()
        };
        assert_eq!(
            RunDir::new_run(&cfg.output_dir, cfg.name.as_deref(), "toy")
                .unwrap_err()
                .to_string(),
            err
        );
        drop(held);
        assert_eq!(std::fs::read_to_string(run.root().join(".lock"))?, "");
        let (again, _l) = RunDir::new_run(&cfg.output_dir, cfg.name.as_deref(), "toy")?;
        assert_eq!(again, run);
        Ok(())
    }

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000"); // leap day 2000
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
    }
}
