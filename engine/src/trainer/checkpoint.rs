//! Trainer stage (output): the checkpoints of a run folder, and loading tensors into a `VarMap`.
//!
//! Layout of `RUN_DIR/checkpoints/` after optimizer step N (1-based count of completed steps):
//! - `step_N.safetensors`: the objective's variables, in its own key layout;
//! - `step_N.optim.safetensors`: AdamW moments (`<key>.exp_avg`, `<key>.exp_avg_sq`,
//!   `<key>.step`) and the per-step loss history (`__trainer__.losses`, F64);
//! - `step_N.json`: [`CheckpointMeta`], written LAST: a checkpoint exists only once its JSON does;
//! - `latest`: the text `step_N` of the newest complete checkpoint (for people and scripts; resume
//!   scans the JSON files and takes the highest N).
//!
//! Nothing holding a NaN or an infinity is ever written ([`save_checkpoint`] refuses). A kill
//! between two of these writes leaves pieces of a step without its JSON, and a kill inside a
//! write leaves a hidden `*.tmp`: [`prune_checkpoints`] (after every save) deletes every piece
//! that does not belong to a kept complete checkpoint. Resume ([`load_newest_intact`]) takes the
//! newest checkpoint that reads back whole and warns about each newer one it skips.
//!
//! With `run.best_metric` set, `best.json` ([`BestMeta`]) and the pointer `best` name the best
//! checkpoint so far; pruning keeps it beside the newest `run.keep_checkpoints`. Resuming from an
//! earlier step (`--step`) moves the later checkpoints into `superseded-<time>/`
//! ([`supersede_after`]) instead of deleting them.
//!
//! Every file is written with [`crate::fsutil::write_atomic`]. The run folder around
//! `checkpoints/` is [`crate::run_dir::RunDir`].
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, write_atomic_with};
use crate::optim::ScheduleKind;
use crate::run_dir::{checkpoint_paths, list_checkpoints, BEST_FILE, BEST_META_FILE, LATEST_FILE};
use crate::trainer::config::BestMode;

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

/// The best checkpoint so far by an eval metric (`checkpoints/best.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BestMeta {
    /// Its step (`step_N.*` is kept by pruning).
    pub step: u64,
    /// The eval metric (`run.best_metric`).
    pub metric: String,
    /// Whether larger or smaller is better.
    pub mode: BestMode,
    /// The metric's value at that step.
    pub value: f64,
}

impl BestMeta {
    /// True when `value` is strictly better than this one.
    pub fn improved_by(&self, value: f64) -> bool {
        match self.mode {
            BestMode::Max => value > self.value,
            BestMode::Min => value < self.value,
        }
    }
}

/// Writes `best.json` then the pointer `best` (both atomically).
pub fn save_best(dir: &Path, best: &BestMeta) -> Result<()> {
    write_atomic(
        &dir.join(BEST_META_FILE),
        serde_json::to_string_pretty(best)?.as_bytes(),
    )?;
    write_atomic(
        &dir.join(BEST_FILE),
        format!("step_{}\n", best.step).as_bytes(),
    )
}

/// Reads `best.json`, if there is one.
pub fn load_best(dir: &Path) -> Result<Option<BestMeta>> {
    let p = dir.join(BEST_META_FILE);
    match fs::read_to_string(&p) {
        Ok(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Moves every checkpoint piece after step `step` (and the best pointer when it names one of
/// them) into `dir/superseded-<stamp>/`, so that resuming from an earlier step loses nothing.
/// Returns that folder when something moved.
pub fn supersede_after(dir: &Path, step: u64, stamp: &str) -> Result<Option<PathBuf>> {
    let target = dir.join(format!("superseded-{stamp}"));
    let best_later = load_best(dir)?.is_some_and(|b| b.step > step);
    let mut moved = false;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let later = piece_step(&name).is_some_and(|s| s > step)
            || (best_later && (name == BEST_FILE || name == BEST_META_FILE));
        if later {
            fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            fs::rename(&path, target.join(&name))
                .with_context(|| format!("moving {} into {}", path.display(), target.display()))?;
            moved = true;
        }
    }
    Ok(moved.then_some(target))
}

/// Saves tensors as safetensors, atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic_with(path, |tmp| {
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

/// How [`load_into_varmap`] matches checkpoint tensors to model variables. The default is an
/// exact match: every variable loaded, no key left over (what resuming a run needs).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Prefix taken off checkpoint keys, e.g. the one under which a pretraining objective keeps
    /// its backbone; "" for none. Keys without it are unexpected unless `ignore_unexpected`
    /// covers them.
    pub prefix: String,
    /// Model key prefixes allowed to stay at their init, e.g. `head.`.
    pub allow_missing: Vec<String>,
    /// Checkpoint key prefixes silently skipped, e.g. `decoder.`, `mask_token`.
    pub ignore_unexpected: Vec<String>,
}

/// What [`load_into_varmap`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct VarmapLoad {
    /// Variables overwritten from the checkpoint.
    pub loaded: usize,
    /// Model variables left at init (covered by `allow_missing`), sorted.
    pub missing_allowed: Vec<String>,
    /// Checkpoint keys skipped (covered by `ignore_unexpected`), sorted.
    pub ignored: Vec<String>,
}

/// `` `a`, `b` `` (the first 10, then a count).
fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(10)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        s.push_str(&format!(" and {} more", names.len() - 10));
    }
    s
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Sets the variables of `varmap` from `tensors` (exact keys with the default options). Errors
/// name every missing, unexpected or mis-shaped key (both shapes) and every integer tensor for a
/// float variable or the reverse (both dtypes; never cast); nothing is written unless every
/// check passes. Values are moved to each variable's device and (float) dtype.
pub fn load_into_varmap(
    varmap: &VarMap,
    tensors: HashMap<String, Tensor>,
    opts: &LoadOptions,
) -> Result<VarmapLoad> {
    load_into_varmap_renamed(varmap, tensors, opts, Ok)
}

/// [`load_into_varmap`] with the keys (prefix already taken off) renamed first by `rename`, e.g.
/// from another checkpoint layout to the model's.
pub fn load_into_varmap_renamed(
    varmap: &VarMap,
    tensors: HashMap<String, Tensor>,
    opts: &LoadOptions,
    rename: impl FnOnce(HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>>,
) -> Result<VarmapLoad> {
    let matches = |k: &str, prefixes: &[String]| prefixes.iter().any(|p| k.starts_with(p.as_str()));
    let mut ignored = Vec::new();
    let mut unexpected = Vec::new();
    let mut taken = HashMap::new();
    for (k, t) in tensors {
        match k.strip_prefix(opts.prefix.as_str()) {
            Some(rest) => {
                taken.insert(rest.to_string(), t);
            }
            None if matches(&k, &opts.ignore_unexpected) => ignored.push(k),
            None => unexpected.push(k),
        }
    }
    let taken = rename(taken)?;
    // Invariant: the VarMap mutex is only poisoned if another thread panicked while holding it.
    let data = varmap.data().lock().expect("varmap mutex poisoned");
    let mut mismatched = Vec::new();
    let mut wrong_kind = Vec::new();
    let mut to_set = Vec::new();
    for (k, t) in taken {
        match data.get(&k) {
            // an integer tensor for a float variable (or the reverse) is not a weight of it:
            // casting would silently load indices or counts as values
            Some(var)
                if var.shape() == t.shape() && var.dtype().is_float() != t.dtype().is_float() =>
            {
                wrong_kind.push((k, t.dtype(), var.dtype()))
            }
            Some(var) if var.shape() == t.shape() => to_set.push((var.clone(), k, t)),
            Some(var) => mismatched.push((k, t.dims().to_vec(), var.dims().to_vec())),
            None if matches(&k, &opts.ignore_unexpected) => {
                ignored.push(format!("{}{k}", opts.prefix))
            }
            None => unexpected.push(format!("{}{k}", opts.prefix)),
        }
    }
    let seen: std::collections::BTreeSet<&str> = to_set
        .iter()
        .map(|(_, k, _)| k.as_str())
        .chain(mismatched.iter().map(|(k, _, _)| k.as_str()))
        .chain(wrong_kind.iter().map(|(k, _, _)| k.as_str()))
        .collect();
    let mut missing = Vec::new();
    let mut missing_allowed = Vec::new();
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    for k in keys.into_iter().filter(|k| !seen.contains(k.as_str())) {
        if matches(k, &opts.allow_missing) {
            missing_allowed.push(k.clone());
        } else {
            missing.push(k.clone());
        }
    }
    unexpected.sort();
    mismatched.sort();
    wrong_kind.sort_by(|a, b| a.0.cmp(&b.0));
    let mut errors = Vec::new();
    // "N dtype mismatches `a`, `b` (a: checkpoint X vs model Y, ...)", the same for shapes
    let mut differ = |items: &[(String, String, String)], what: &str, note: &str| {
        if items.is_empty() {
            return;
        }
        let names: Vec<String> = items.iter().map(|(k, _, _)| k.clone()).collect();
        let pairs: Vec<String> = items
            .iter()
            .take(10)
            .map(|(k, c, m)| format!("{k}: checkpoint {c} vs model {m}"))
            .collect();
        errors.push(format!(
            "{} {} ({}{note})",
            count(names.len(), what),
            list(&names),
            pairs.join(", ")
        ));
    };
    let kinds: Vec<(String, String, String)> = wrong_kind
        .iter()
        .map(|(k, c, m)| (k.clone(), format!("{c:?}"), format!("{m:?}")))
        .collect();
    differ(&kinds, "dtype mismatch", "; not cast");
    let shapes: Vec<(String, String, String)> = mismatched
        .iter()
        .map(|(k, c, m)| (k.clone(), format!("{c:?}"), format!("{m:?}")))
        .collect();
    differ(&shapes, "shape mismatch", "");
    if !missing.is_empty() {
        errors.push(format!(
            "{} {}",
            count(missing.len(), "missing key"),
            list(&missing)
        ));
    }
    if !unexpected.is_empty() {
        errors.push(format!(
            "{} {}",
            count(unexpected.len(), "unexpected key"),
            list(&unexpected)
        ));
    }
    if !errors.is_empty() {
        bail!("checkpoint does not fit the model: {}", errors.join("; "));
    }
    let loaded = to_set.len();
    for (var, k, t) in to_set {
        let t = t
            .to_device(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .with_context(|| format!("converting `{k}`"))?;
        var.set(&t).with_context(|| format!("setting `{k}`"))?;
    }
    ignored.sort();
    Ok(VarmapLoad {
        loaded,
        missing_allowed,
        ignored,
    })
}

/// The name of the first tensor (in name order) that holds a NaN or an infinity, if any.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> Result<Option<String>> {
    let mut floats: Vec<(&String, &Tensor)> = tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .collect();
    floats.sort_by(|a, b| a.0.cmp(b.0));
    // x - x is 0 for a finite x and NaN otherwise; the sum keeps a NaN (no overflow possible).
    let sums = floats
        .iter()
        .map(|(_, t)| t.sub(t)?.sum_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let one_device = sums
        .windows(2)
        .all(|w| w[0].device().same_device(w[1].device()));
    let values: Vec<f32> = if one_device && !sums.is_empty() {
        Tensor::stack(&sums, 0)?.to_vec1()? // one device sync for all
    } else {
        sums.iter()
            .map(|t| t.to_scalar::<f32>())
            .collect::<candle_core::Result<_>>()?
    };
    Ok(floats
        .iter()
        .zip(values)
        .find(|(_, v)| !v.is_finite())
        .map(|((k, _), _)| (*k).clone()))
}

/// Writes one complete checkpoint (tensors first, JSON last, then `latest`). Refuses, before
/// writing anything, a checkpoint whose tensors or lr are not finite.
pub fn save_checkpoint(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    optim: &HashMap<String, Tensor>,
    losses: &[f64],
    meta: &CheckpointMeta,
) -> Result<()> {
    let bad = match first_non_finite(weights)? {
        Some(k) => Some(format!("weight `{k}`")),
        None => first_non_finite(optim)?.map(|k| format!("optimizer state `{k}`")),
    };
    let bad = bad.or_else(|| (!meta.lr.is_finite()).then(|| format!("lr {}", meta.lr)));
    if let Some(what) = bad {
        bail!(
            "step {}: {what} is not finite (NaN or infinity); checkpoint not written, the \
             previous one in {} stays",
            meta.step,
            dir.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (w, o, j) = checkpoint_paths(dir, meta.step);
    let pieces = || -> Result<()> {
        save_tensors(&w, weights)?;
        let mut optim = optim.clone();
        if !losses.is_empty() {
            let t = Tensor::from_slice(losses, losses.len(), &Device::Cpu)?;
            optim.insert(LOSSES_KEY.to_string(), t);
        }
        save_tensors(&o, &optim)?;
        write_atomic(&j, serde_json::to_string_pretty(meta)?.as_bytes())
    };
    if let Err(e) = pieces() {
        // A failed write (disk full) takes the pieces of this step it wrote with it: nothing
        // half-made stays behind, and the previous checkpoint is untouched.
        for p in [&j, &o, &w] {
            let _ = fs::remove_file(p);
        }
        return Err(e);
    }
    write_atomic(
        &dir.join(LATEST_FILE),
        format!("step_{}\n", meta.step).as_bytes(),
    )
}

/// The objective that wrote the newest complete checkpoint of `dir` (from its JSON), if any:
/// commands check it before resuming a run with a different objective.
pub fn newest_objective(dir: &Path) -> Result<Option<String>> {
    let Some(&step) = list_checkpoints(dir)?.last() else {
        return Ok(None);
    };
    let (_, _, j) = checkpoint_paths(dir, step);
    let text = fs::read_to_string(&j).with_context(|| format!("reading {}", j.display()))?;
    #[derive(Deserialize)]
    struct Objective {
        objective: String,
    }
    let o: Objective =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", j.display()))?;
    Ok(Some(o.objective))
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

/// The newest checkpoint in `dir` that reads back whole (JSON, both tensor files, finite
/// values), newest first. Each newer checkpoint that does not is named on stderr with the reason,
/// loudly, since the run then goes back to an older step. None if `dir` has no complete one;
/// an error naming every checkpoint and its fault if none reads back.
pub fn load_newest_intact(dir: &Path) -> Result<Option<LoadedCheckpoint>> {
    let steps = list_checkpoints(dir)?;
    let mut faults = vec![];
    for &step in steps.iter().rev() {
        let read = load_checkpoint(dir, step).and_then(|ck| {
            match first_non_finite(ck.weights.iter().chain(ck.optim.iter()))? {
                Some(k) => bail!("`{k}` is not finite (NaN or infinity)"),
                None => Ok(ck),
            }
        });
        match read {
            Ok(ck) => {
                if let Some(&newest) = steps.last().filter(|&&n| n != step) {
                    eprintln!(
                        "WARNING: resuming {} from step_{step}, not from the newest step_{newest} \
                         (see above); the newer checkpoint files will be replaced",
                        dir.display()
                    );
                }
                return Ok(Some(ck));
            }
            Err(e) => {
                let fault = format!("step_{step} is corrupt: {e:#}");
                eprintln!(
                    "WARNING: {}: {fault}; trying the previous checkpoint",
                    dir.display()
                );
                faults.push(fault);
            }
        }
    }
    if faults.is_empty() {
        return Ok(None);
    }
    bail!(
        "{}: no checkpoint reads back whole: {}",
        dir.display(),
        faults.join("; ")
    )
}

/// Keeps the newest `keep` (at least 1) complete checkpoints at or before step `newest`, and
/// `protect` (the best checkpoint), and deletes every other piece of a checkpoint in `dir`: older checkpoints (JSON first, so a
/// half-deleted one is never taken for a complete one), pieces a crash left without their JSON,
/// checkpoints after `newest` (a corrupt future a resume fell back from) and leftover `*.tmp`
/// files. Only the run that holds the run folder's lock may call it (a `*.tmp` of another
/// writer would be taken for a leftover).
pub fn prune_checkpoints(dir: &Path, keep: usize, newest: u64, protect: Option<u64>) -> Result<()> {
    let complete: Vec<u64> = list_checkpoints(dir)?
        .into_iter()
        .filter(|&s| s <= newest)
        .collect();
    let mut kept = complete[complete.len().saturating_sub(keep.max(1))..].to_vec();
    kept.extend(protect.filter(|s| complete.contains(s)));
    let mut doomed: Vec<(u8, PathBuf)> = vec![];
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            doomed.push((1, path));
        } else if let Some(step) = piece_step(&name) {
            if !kept.contains(&step) {
                doomed.push((u8::from(!name.ends_with(".json")), path));
            }
        }
    }
    doomed.sort(); // every JSON before any tensor file
    for (_, p) in doomed {
        fs::remove_file(&p).with_context(|| format!("deleting {}", p.display()))?;
    }
    Ok(())
}

/// N of a checkpoint piece `step_N.json`, `step_N.safetensors`, `step_N.optim.safetensors`.
fn piece_step(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("step_")?;
    let (n, ext) = rest.split_once('.')?;
    let n = n.parse().ok()?;
    matches!(ext, "json" | "safetensors" | "optim.safetensors").then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_save_takes_the_pieces_it_wrote_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        vm.get(
            (2, 2),
            "w",
            candle_nn::Init::Const(1.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let meta = toy_meta(7);
        // The optimizer file cannot be written (a folder holds its name), as on a full disk
        // after the weights went through.
        let (w, o, j) = checkpoint_paths(dir.path(), 7);
        fs::create_dir(&o).unwrap();
        let err = save_checkpoint(
            dir.path(),
            &varmap_tensors(&vm),
            &HashMap::new(),
            &[],
            &meta,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("step_7.optim.safetensors"),
            "{err:#}"
        );
        assert!(
            !w.exists() && !j.exists(),
            "the weights of the failed step stayed"
        );
        assert!(!dir.path().join(LATEST_FILE).exists());
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
                batch_in_epoch: step as usize,
                losses: step as usize,
                ..toy_meta(step)
            };
            let losses: Vec<f64> = (0..step).map(|i| i as f64 * 0.5).collect();
            save_checkpoint(dir.path(), &weights, &HashMap::new(), &losses, &meta).unwrap();
            prune_checkpoints(dir.path(), 2, step, None).unwrap();
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
        let err = load_into_varmap(&other, ck.weights.clone(), &LoadOptions::default())
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
        let err = load_into_varmap(&other, ck.weights.clone(), &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing key `v`"), "{err}");
    }

    fn toy_meta(step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format_version: FORMAT_VERSION,
            step,
            epoch: 0,
            batch_in_epoch: 0,
            optimizer_steps: step,
            lr: 0.1,
            seed: 0,
            schedule: ScheduleKind::Cosine,
            losses: 0,
            batches_per_epoch: 10,
            objective: "toy".into(),
        }
    }

    use crate::fsutil::dir_names as names;

    /// `{"w": [1, 2]}`.
    fn one_tensor() -> HashMap<String, Tensor> {
        HashMap::from([(
            "w".to_string(),
            Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap(),
        )])
    }

    #[test]
    fn pruning_deletes_orphan_pieces_and_temp_files_of_any_step() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let w = one_tensor();
        for step in [2u64, 3] {
            save_checkpoint(d, &w, &HashMap::new(), &[], &toy_meta(step)).unwrap();
        }
        // what kills left behind: weights without a JSON (after and before the kept ones), an
        // optimizer file alone, a half-pruned old step, temp files of a dead writer
        for f in [
            "step_4.safetensors",
            "step_1.safetensors",
            "step_1.optim.safetensors",
            "step_0.optim.safetensors",
            ".step_4.json.4242.0.tmp",
            ".step_4.optim.safetensors.4242.1.tmp",
        ] {
            fs::write(d.join(f), b"x").unwrap();
        }
        fs::write(d.join("README"), b"not ours").unwrap();
        assert_eq!(list_checkpoints(d).unwrap(), vec![2, 3]);
        prune_checkpoints(d, 2, 3, None).unwrap();
        let kept = [
            "README",
            "latest",
            "step_2.json",
            "step_2.optim.safetensors",
            "step_2.safetensors",
            "step_3.json",
            "step_3.optim.safetensors",
            "step_3.safetensors",
        ];
        assert_eq!(names(d), kept);
        // a checkpoint after the current step (a corrupt one resume fell back from) goes too
        save_checkpoint(d, &w, &HashMap::new(), &[], &toy_meta(5)).unwrap();
        prune_checkpoints(d, 1, 3, None).unwrap();
        assert_eq!(list_checkpoints(d).unwrap(), vec![3]);
        assert_eq!(
            names(d),
            [
                "README",
                "latest",
                "step_3.json",
                "step_3.optim.safetensors",
                "step_3.safetensors"
            ]
        );
    }

    #[test]
    fn a_non_finite_checkpoint_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let good = HashMap::from([("a".to_string(), t(&[1., 2.])), ("b".to_string(), t(&[3.]))]);
        save_checkpoint(d, &good, &HashMap::new(), &[], &toy_meta(1)).unwrap();
        let before = names(d);
        let nan_w = HashMap::from([
            ("a".to_string(), t(&[1., f32::NAN])),
            ("b".to_string(), t(&[3.])),
        ]);
        let err = save_checkpoint(d, &nan_w, &HashMap::new(), &[], &toy_meta(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "step 2: weight `a` is not finite (NaN or infinity); checkpoint not written, the \
                 previous one in {} stays",
                d.display()
            )
        );
        let inf_m = HashMap::from([("b.exp_avg_sq".to_string(), t(&[f32::INFINITY]))]);
        let err = save_checkpoint(d, &good, &inf_m, &[], &toy_meta(2)).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("step 2: optimizer state `b.exp_avg_sq` is not finite"));
        let mut meta = toy_meta(2);
        meta.lr = f64::NAN;
        let err = save_checkpoint(d, &good, &HashMap::new(), &[], &meta).unwrap_err();
        assert!(
            err.to_string().starts_with("step 2: lr NaN is not finite"),
            "{err}"
        );
        assert_eq!(names(d), before);
        assert_eq!(fs::read_to_string(d.join("latest")).unwrap(), "step_1\n");
        // bf16 weights are checked too; integer tensors are skipped
        let bf = t(&[f32::NEG_INFINITY]).to_dtype(DType::BF16).unwrap();
        let ints = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        let mixed = HashMap::from([("z".to_string(), bf), ("i".to_string(), ints)]);
        assert_eq!(first_non_finite(&mixed).unwrap(), Some("z".to_string()));
        assert_eq!(first_non_finite(&good).unwrap(), None);
    }

    #[test]
    fn resume_reads_the_newest_intact_checkpoint_and_names_each_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let w = one_tensor();
        assert!(load_newest_intact(d).unwrap().is_none());
        for step in 1..=3u64 {
            save_checkpoint(d, &w, &HashMap::new(), &[], &toy_meta(step)).unwrap();
        }
        let (w3, o2, _) = (checkpoint_paths(d, 3).0, checkpoint_paths(d, 2).1, ());
        let len = fs::metadata(&w3).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&w3)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        fs::remove_file(&o2).unwrap();
        assert_eq!(load_newest_intact(d).unwrap().unwrap().meta.step, 1);
        fs::write(checkpoint_paths(d, 1).2, b"{\"step\": ").unwrap();
        let err = format!("{:#}", load_newest_intact(d).err().unwrap());
        for part in [
            "no checkpoint reads back whole: step_3 is corrupt: reading ",
            "step_3.safetensors",
            "; step_2 is corrupt: reading ",
            "step_2.optim.safetensors",
            "; step_1 is corrupt: parsing ",
        ] {
            assert!(err.contains(part), "{part} not in {err}");
        }
    }
}
