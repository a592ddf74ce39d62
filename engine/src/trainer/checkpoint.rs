//! Checkpoints of a run folder and the atomic file writes they rely on.
//!
//! Layout of `RUN_DIR/checkpoints/` after optimizer step N (1-based count of completed steps):
//! - `step_N.safetensors`: the objective's variables, in its own key layout;
//! - `step_N.optim.safetensors`: AdamW moments (`<key>.exp_avg`, `<key>.exp_avg_sq`,
//!   `<key>.step`) and the per-step loss history (`__trainer__.losses`, F64);
//! - `step_N.json`: [`CheckpointMeta`], written LAST: a checkpoint exists only once its JSON does;
//! - `latest`: the text `step_N` of the newest complete checkpoint (for people and scripts; resume
//!   scans the JSON files and takes the highest N).
//!
//! Every file is written as `*.tmp` in the same folder, fsynced, then renamed over the target.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::optim::ScheduleKind;

/// Version of the checkpoint layout written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Key of the loss history inside the optimizer file.
pub const LOSSES_KEY: &str = "__trainer__.losses";

/// Loop position and bookkeeping saved next to the tensors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Completed optimizer steps.
    pub step: u64,
    /// Epoch to continue in.
    pub epoch: usize,
    /// Loader batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// AdamW step count.
    pub optimizer_steps: u64,
    /// lr of the last step taken.
    pub lr: f64,
    /// Run seed.
    pub seed: u64,
    /// Schedule kind in use.
    pub schedule: ScheduleKind,
    /// Length of the loss history stored in the optimizer file.
    pub losses: usize,
    /// Loader batches per epoch when saved (resume refuses a different value).
    pub batches_per_epoch: usize,
    /// Objective name.
    pub objective: String,
}

/// Writes `path` atomically: `f` writes `<path>.tmp`, which is fsynced and renamed over `path`.
/// On any error the tmp file is removed and an existing `path` is left untouched.
pub fn atomic_write_with(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!("{file_name}.tmp"));
    let result = (|| -> Result<()> {
        f(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        fs::File::open(&tmp)
            .and_then(|fh| fh.sync_all())
            .with_context(|| format!("fsync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} -> {}", tmp.display(), path.display()))?;
        if let Some(dir) = path.parent() {
            // Persist the rename; opening a directory for fsync is not possible everywhere.
            if let Ok(d) = fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically (see [`atomic_write_with`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| {
        let mut fh = fs::File::create(tmp)?;
        fh.write_all(bytes)?;
        Ok(())
    })
}

/// Saves tensors as safetensors, atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    atomic_write_with(path, |tmp| {
        Ok(candle_core::safetensors::save(tensors, tmp)?)
    })
}

/// Every variable of a VarMap by key (detached views, no copy).
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    // Invariant: the VarMap mutex is only poisoned if another thread panicked while holding it.
    let data = varmap.data().lock().expect("varmap mutex poisoned");
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect()
}

/// Sets every variable of `varmap` from `tensors` (moved to the variable's device and dtype).
/// Errors name the first missing, mis-shaped or unexpected key, prefixed by `source`.
pub fn load_into_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    // Invariant: the VarMap mutex is only poisoned if another thread panicked while holding it.
    let data = varmap.data().lock().expect("varmap mutex poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = tensors
            .get(name)
            .with_context(|| format!("{source}: missing key `{name}`"))?;
        if t.dims() != var.dims() {
            bail!(
                "{source}: key `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            );
        }
        let t = t
            .to_device(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .with_context(|| format!("{source}: converting `{name}`"))?;
        var.set(&t)
            .with_context(|| format!("{source}: setting `{name}`"))?;
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
    extra.sort();
    if let Some(k) = extra.first() {
        bail!(
            "{source}: unexpected key `{k}` ({} keys the model does not have)",
            extra.len()
        );
    }
    Ok(())
}

/// Paths of checkpoint `step` inside `dir`: (weights, optimizer, meta).
pub fn checkpoint_paths(dir: &Path, step: u64) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("step_{step}.safetensors")),
        dir.join(format!("step_{step}.optim.safetensors")),
        dir.join(format!("step_{step}.json")),
    )
}

/// Writes one complete checkpoint (tensors first, JSON last, then `latest`).
pub fn save_checkpoint(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    optim: &HashMap<String, Tensor>,
    losses: &[f64],
    meta: &CheckpointMeta,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (w, o, j) = checkpoint_paths(dir, meta.step);
    save_tensors(&w, weights)?;
    let mut optim = optim.clone();
    if !losses.is_empty() {
        let t = Tensor::from_slice(losses, losses.len(), &Device::Cpu)?;
        optim.insert(LOSSES_KEY.to_string(), t);
    }
    save_tensors(&o, &optim)?;
    atomic_write(&j, serde_json::to_string_pretty(meta)?.as_bytes())?;
    atomic_write(
        &dir.join("latest"),
        format!("step_{}\n", meta.step).as_bytes(),
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

/// A checkpoint read back: weights, optimizer tensors (loss history removed), losses, meta.
pub struct LoadedCheckpoint {
    /// The objective's variables.
    pub weights: HashMap<String, Tensor>,
    /// AdamW state tensors.
    pub optim: HashMap<String, Tensor>,
    /// Loss of every optimizer step so far.
    pub losses: Vec<f64>,
    /// Loop position.
    pub meta: CheckpointMeta,
}

/// Reads checkpoint `step` of `dir` onto the CPU.
pub fn load_checkpoint(dir: &Path, step: u64) -> Result<LoadedCheckpoint> {
    let (w, o, j) = checkpoint_paths(dir, step);
    let text = fs::read_to_string(&j).with_context(|| format!("reading {}", j.display()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", j.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this mimlab reads {FORMAT_VERSION})",
            j.display(),
            meta.format_version
        );
    }
    let weights = candle_core::safetensors::load(&w, &Device::Cpu)
        .with_context(|| format!("reading {}", w.display()))?;
    let mut optim = candle_core::safetensors::load(&o, &Device::Cpu)
        .with_context(|| format!("reading {}", o.display()))?;
    let losses = match optim.remove(LOSSES_KEY) {
        Some(t) => t.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => vec![],
    };
    if losses.len() != meta.losses {
        bail!(
            "{}: {} losses stored, meta says {}",
            o.display(),
            losses.len(),
            meta.losses
        );
    }
    Ok(LoadedCheckpoint {
        weights,
        optim,
        losses,
        meta,
    })
}

/// Deletes all but the newest `keep` (at least 1) checkpoints; the JSON goes first so a
/// half-deleted checkpoint is never taken for a complete one.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<()> {
    let steps = list_checkpoints(dir)?;
    let keep = keep.max(1);
    if steps.len() <= keep {
        return Ok(());
    }
    for &s in &steps[..steps.len() - keep] {
        let (w, o, j) = checkpoint_paths(dir, s);
        for p in [j, w, o] {
            if p.exists() {
                fs::remove_file(&p).with_context(|| format!("deleting {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Weights file of the newest complete checkpoint of a run folder (`RUN_DIR/checkpoints`).
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints");
    let steps = list_checkpoints(&dir)?;
    match steps.last() {
        Some(&s) => Ok(checkpoint_paths(&dir, s).0),
        None => bail!(
            "{}: no complete checkpoint (step_N.json) in this run folder",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_atomic_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"old").unwrap();
        let err = atomic_write_with(&p, |tmp| {
            fs::write(tmp, b"half")?;
            bail!("disk full (injected)")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("injected"), "{err:#}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "tmp file left behind"
        );
        // A target in a folder that does not exist fails without creating anything.
        let missing = dir.path().join("nope").join("b.json");
        assert!(atomic_write(&missing, b"x").is_err());
        assert!(!dir.path().join("nope").exists());
        atomic_write(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn prune_keeps_newest_and_load_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        vm.get(
            (2, 3),
            "w",
            candle_nn::Init::Const(1.5),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let weights = varmap_tensors(&vm);
        for step in 1..=4u64 {
            let meta = CheckpointMeta {
                format_version: FORMAT_VERSION,
                step,
                epoch: 0,
                batch_in_epoch: step as usize,
                optimizer_steps: step,
                lr: 0.1,
                seed: 0,
                schedule: ScheduleKind::Cosine,
                losses: step as usize,
                batches_per_epoch: 10,
                objective: "toy".into(),
            };
            let losses: Vec<f64> = (0..step).map(|i| i as f64 * 0.5).collect();
            save_checkpoint(dir.path(), &weights, &HashMap::new(), &losses, &meta).unwrap();
            prune_checkpoints(dir.path(), 2).unwrap();
        }
        assert_eq!(list_checkpoints(dir.path()).unwrap(), vec![3, 4]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2 * 3 + 1);
        assert_eq!(
            fs::read_to_string(dir.path().join("latest")).unwrap(),
            "step_4\n"
        );
        let ck = load_checkpoint(dir.path(), 4).unwrap();
        assert_eq!(ck.losses, vec![0.0, 0.5, 1.0, 1.5]);
        assert_eq!(ck.meta.batch_in_epoch, 4);

        let other = VarMap::new();
        other
            .get(
                (3, 2),
                "w",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let err = load_into_varmap(&other, &ck.weights, "ck")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w`") && err.contains("[2, 3]"), "{err}");
        let other = VarMap::new();
        other
            .get(
                (2, 3),
                "v",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let err = load_into_varmap(&other, &ck.weights, "ck")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing key `v`"), "{err}");
    }
}
