//! Running a sweep: each stage of each cell as a child `mimlab` process (its own thread pools,
//! device and precision, and the same resume as by hand), cells one after another or `parallel`
//! at a time, finished stages skipped on a restart.
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::log::Progress;
use mimlab_engine::run_dir::RunDir;

use super::results::{stage_results, StageDone};
use super::{Cell, Command, Stage, SweepConfig};
use crate::experiment::Experiment;

/// File of the sweep folder holding the sweep as it was started.
pub const SWEEP_FILE: &str = "sweep.yaml";

/// Runs (or finishes) the sweep `cfg` with the mimlab binary `bin`, `parallel` cells at a time,
/// then writes its results.
pub fn run_sweep(cfg: &SweepConfig, bin: &Path, parallel: usize) -> Result<()> {
    let dir = cfg.dir();
    std::fs::create_dir_all(dir.join("cells"))
        .with_context(|| format!("{}: cannot create", dir.display()))?;
    let yaml = serde_yaml_ng::to_string(cfg)?;
    let saved = dir.join(SWEEP_FILE);
    if saved.exists() {
        let before: SweepConfig = serde_yaml_ng::from_str(&std::fs::read_to_string(&saved)?)
            .with_context(|| format!("{}", saved.display()))?;
        if &before != cfg {
            bail!(
                "{} holds another sweep ({}): change `name`, or delete the folder to start over",
                dir.display(),
                saved.display()
            );
        }
    } else {
        write_atomic(&saved, yaml.as_bytes())?;
    }
    let cells = cfg.cells()?;
    check_configs(cfg, &cells)?;
    let total = (cells.len() * cfg.stages.len()) as u64;
    let done = cells
        .iter()
        .flat_map(|c| cfg.stages.iter().map(move |s| (c, s)))
        .filter(|(c, s)| done_file(&cell_dir(cfg, c), s).exists())
        .count() as u64;
    eprintln!(
        "sweep {}: {} grid points x {} seeds x {} stages, {done} of {total} done; folder {}",
        cfg.name,
        cells.len() / cfg.seeds.len(),
        cfg.seeds.len(),
        cfg.stages.len(),
        dir.display()
    );
    let progress = Mutex::new(Progress::new(&format!("sweep {}", cfg.name), total, done));
    let queue = Mutex::new(cells.iter().collect::<VecDeque<_>>());
    let failed: Mutex<Vec<anyhow::Error>> = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let Some(cell) = queue.lock().expect("queue").pop_front() else {
                    return;
                };
                if let Err(e) = run_cell(cfg, cell, bin, &progress) {
                    failed.lock().expect("errors").push(e);
                    // stop handing out cells; those running finish
                    queue.lock().expect("queue").clear();
                }
            });
        }
    });
    progress.into_inner().expect("progress").finish("");
    if let Some(e) = failed.into_inner().expect("errors").into_iter().next() {
        return Err(e.context(format!(
            "sweep {}: stopped (run it again to continue where it stopped)",
            cfg.name
        )));
    }
    let rows = super::collect(cfg)?;
    super::write_results(cfg, &rows)
}

/// Every stage's config with every grid point's overrides resolves (unknown keys, bad values),
/// before anything runs.
pub(crate) fn check_configs(cfg: &SweepConfig, cells: &[Cell]) -> Result<()> {
    for c in cells.iter().filter(|c| c.seed == cfg.seeds[0]) {
        for s in &cfg.stages {
            Experiment::load(Some(&s.config), &sets(s, c))
                .with_context(|| format!("stage `{}` at grid point {}", s.name, c.point.label()))?;
        }
    }
    Ok(())
}

/// A cell's folder.
pub fn cell_dir(cfg: &SweepConfig, cell: &Cell) -> PathBuf {
    cfg.dir().join("cells").join(cell.id())
}

/// The marker (and results) of a finished stage.
pub fn done_file(cell_dir: &Path, stage: &Stage) -> PathBuf {
    cell_dir.join(format!("{}.done.json", stage.name))
}

/// The `--set` overrides of `stage` in `cell`: the stage's own, then the grid point's (they win),
/// then the seed.
fn sets(stage: &Stage, cell: &Cell) -> Vec<String> {
    let mut out = stage.set.clone();
    if stage.grid {
        out.extend(cell.point.sets());
    }
    out.push(format!("run.seed={}", cell.seed));
    out
}

/// The command line of `stage` in the cell folder `cdir`; `resume`: continue its run folder.
pub fn stage_args(stage: &Stage, cell: &Cell, cdir: &Path, resume: bool) -> Vec<String> {
    let run = cdir.join(&stage.name);
    let path = |p: &Path| p.display().to_string();
    let mut a = vec![stage.command.name().to_string()];
    if resume {
        a.extend(["--resume".into(), path(&run)]);
        return a;
    }
    a.extend(["--config".into(), path(&stage.config)]);
    for s in sets(stage, cell) {
        a.extend(["--set".into(), s]);
    }
    if stage.command.trains() {
        a.extend([
            "--set".into(),
            format!("run.output_dir={}", path(cdir)),
            "--set".into(),
            format!("run.name={}", stage.name),
        ]);
    }
    if let Some(i) = &stage.init {
        a.extend(["--init".into(), path(&cdir.join(i))]);
    }
    if let Some(t) = &stage.teacher {
        a.extend(["--teacher".into(), path(&cdir.join(t))]);
    }
    if stage.command == Command::Probe {
        if let Some(f) = &stage.fractions {
            let f: Vec<String> = f.iter().map(|x| x.to_string()).collect();
            a.extend(["--fractions".into(), f.join(",")]);
        }
        a.extend(["--out".into(), path(&run)]);
    }
    a
}

/// Runs the unfinished stages of `cell`, in order.
fn run_cell(cfg: &SweepConfig, cell: &Cell, bin: &Path, progress: &Mutex<Progress>) -> Result<()> {
    let cdir = cell_dir(cfg, cell);
    std::fs::create_dir_all(&cdir).with_context(|| format!("{}: cannot create", cdir.display()))?;
    let about = serde_json::json!({
        "point": cell.point.index,
        "overrides": cell.point.sets(),
        "seed": cell.seed,
    });
    write_atomic(
        &cdir.join("cell.json"),
        serde_json::to_string_pretty(&about)?.as_bytes(),
    )?;
    for stage in &cfg.stages {
        let done = done_file(&cdir, stage);
        if done.exists() {
            continue;
        }
        let run = cdir.join(&stage.name);
        // a training stage that wrote a checkpoint continues from it; anything else starts over
        let resume = stage.command.trains()
            && run.is_dir()
            && RunDir::at(&run).latest_step().ok().flatten().is_some();
        if run.exists() && !resume {
            std::fs::remove_dir_all(&run)
                .with_context(|| format!("{}: cannot remove the unfinished run", run.display()))?;
        }
        let args = stage_args(stage, cell, &cdir, resume);
        let log_path = cdir.join(format!("{}.log", stage.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("{}: cannot open", log_path.display()))?;
        let started = Instant::now();
        let status = std::process::Command::new(bin)
            .args(&args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("starting {}", bin.display()))?;
        let secs = started.elapsed().as_secs_f64();
        // every attempt's wall time, so a resumed stage reports the whole
        let wall = cdir.join(format!("{}.wall_s", stage.name));
        let mut prior = std::fs::read_to_string(&wall).unwrap_or_default();
        prior.push_str(&format!("{secs:.1}\n"));
        write_atomic(&wall, prior.as_bytes())?;
        if !status.success() {
            bail!(
                "cell {} ({}), stage `{}`: `mimlab {}` failed ({status}); its output is in {}",
                cell.id(),
                cell.point.label(),
                stage.name,
                args.join(" "),
                log_path.display()
            );
        }
        let minutes = prior
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .sum::<f64>()
            / 60.0;
        let results = stage_results(stage, &run)
            .with_context(|| format!("cell {}, stage `{}`", cell.id(), stage.name))?;
        let record = StageDone { minutes, results };
        write_atomic(&done, serde_json::to_string_pretty(&record)?.as_bytes())?;
        let p = progress.lock().expect("progress");
        p.set_message(&format!("{} {} done", cell.id(), stage.name));
        p.inc(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::Point;

    #[test]
    fn stage_command_lines() {
        let cfg: SweepConfig = serde_yaml_ng::from_str(
            "name: s\ngrid:\n  simmim.mask_ratio: [0.3]\nstages:\n  \
             - {name: pre, command: pretrain, config: a.yaml, set: [train.epochs=2]}\n  \
             - {name: ft, command: finetune, config: b.yaml, init: pre, grid: false}\n  \
             - {name: pr, command: probe, config: b.yaml, init: pre, fractions: [0.01, 1.0]}\n",
        )
        .unwrap();
        let cell = Cell {
            point: Point {
                index: 0,
                values: vec![("simmim.mask_ratio".into(), "0.3".into())],
            },
            seed: 7,
        };
        let d = Path::new("S/cells/p00-s7");
        assert_eq!(
            stage_args(&cfg.stages[0], &cell, d, false).join(" "),
            "pretrain --config a.yaml --set train.epochs=2 --set simmim.mask_ratio=0.3 \
             --set run.seed=7 --set run.output_dir=S/cells/p00-s7 --set run.name=pre"
        );
        assert_eq!(
            stage_args(&cfg.stages[1], &cell, d, false).join(" "),
            "finetune --config b.yaml --set run.seed=7 --set run.output_dir=S/cells/p00-s7 \
             --set run.name=ft --init S/cells/p00-s7/pre"
        );
        assert_eq!(
            stage_args(&cfg.stages[1], &cell, d, true).join(" "),
            "finetune --resume S/cells/p00-s7/ft"
        );
        assert_eq!(
            stage_args(&cfg.stages[2], &cell, d, false).join(" "),
            "probe --config b.yaml --set simmim.mask_ratio=0.3 --set run.seed=7 \
             --init S/cells/p00-s7/pre --fractions 0.01,1 --out S/cells/p00-s7/pr"
        );
    }
}
