//! The training loop: one implementation for every objective.
//!
//! Step numbering: "step N" is the N-th optimizer step (1-based) everywhere: in errors, logs,
//! `set_seed(mix_seed(seed, [N]))` and `checkpoints/step_N.*` (saved after step N). The schedule
//! is indexed from 0, so step N runs at `schedule.lr(N - 1)` (the official code lags one step
//! behind because it updates the lr after `optimizer.step()`; we do not reproduce that).
//! Micro-batch k > 0 of an accumulated step is seeded with `mix_seed(seed, [N, k])`.
//!
//! An epoch has `batches_per_epoch / accum_steps` optimizer steps; trailing batches that do not
//! fill a whole accumulation group are skipped, so a step never straddles two epochs.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::{self, BestMeta, CheckpointMeta, FORMAT_VERSION};
use super::{Objective, RunConfig, TrainConfig};
use crate::data::{Batch, DataLoader};
use crate::dist::{self, Communicator};
use crate::fsutil::write_atomic;
use crate::log::{yaml_hparams, MetricsLog, Progress, TbWriter};
use crate::optim::{clip_grad_norm, grad_norm, param_groups, AdamW, LrSchedule};
use crate::rng::mix_seed;
use crate::run_dir::{utc_stamp, Pick, RunDir, RunLock};

/// How a training run starts: a new run folder, or an existing one resumed.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStart<'a> {
    /// A new folder in `run.output_dir`: `run.name`, else `<label>-<UTC time>` (label e.g.
    /// `simmim-swinv2_nano-fashion-mnist`; empty: the objective's name).
    New {
        /// What the run is: objective, model, dataset.
        label: String,
    },
    /// Continue the run folder `dir` from checkpoint `pick` (`Last`: the newest that reads back
    /// whole, falling back loudly past corrupt ones).
    Resume {
        /// The run folder.
        dir: &'a Path,
        /// Which checkpoint.
        pick: Pick,
    },
}

impl<'a> RunStart<'a> {
    /// A new run folder named after the objective.
    pub fn fresh() -> Self {
        Self::New {
            label: String::new(),
        }
    }

    /// Resume `dir` from its newest intact checkpoint.
    pub fn resume(dir: &'a Path) -> Self {
        Self::Resume {
            dir,
            pick: Pick::Last,
        }
    }

    /// The folder resumed, if any.
    pub fn resumed(&self) -> Option<&'a Path> {
        match self {
            Self::New { .. } => None,
            Self::Resume { dir, .. } => Some(dir),
        }
    }
}

/// What the loop needs from a training loader ([`DataLoader`] implements it; tests and tools
/// may feed in-memory batches).
pub trait BatchSource {
    /// Batches in one epoch.
    fn batches_per_epoch(&self) -> usize;
    /// The batches of `epoch`, starting at batch `start_batch` (same batches as a full epoch
    /// from that point on: this is what makes resume exact).
    fn epoch_batches(
        &self,
        epoch: usize,
        start_batch: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_>;
    /// Rank `rank`'s share of each batch of [`BatchSource::epoch_batches`] among `world`
    /// data-parallel ranks ([`dist::shard_range`]). Default: each whole batch, narrowed.
    fn epoch_shard(
        &self,
        epoch: usize,
        start_batch: usize,
        rank: usize,
        world: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        Box::new(
            self.epoch_batches(epoch, start_batch)
                .map(move |b| b.and_then(|b| shard_of(b, rank, world))),
        )
    }
}

/// Samples [`dist::even_shard`] of a loaded batch.
fn shard_of(batch: Batch, rank: usize, world: usize) -> Result<Batch> {
    let (start, end) = dist::even_shard(batch.indices.len(), rank, world)?;
    batch.narrow(start, end)
}

impl BatchSource for DataLoader {
    fn batches_per_epoch(&self) -> usize {
        DataLoader::batches_per_epoch(self)
    }

    fn epoch_batches(
        &self,
        epoch: usize,
        start_batch: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        Box::new(self.epoch(epoch, start_batch))
    }

    fn epoch_shard(
        &self,
        epoch: usize,
        start_batch: usize,
        rank: usize,
        world: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        Box::new(DataLoader::epoch_shard(
            self,
            epoch,
            start_batch,
            rank,
            world,
        ))
    }
}

/// What a finished (or max_steps-stopped) `fit` reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps completed (resumed steps included).
    pub steps: u64,
    /// Epochs completed.
    pub epochs: usize,
    /// Loss of step 1 (NaN if no step ran).
    pub first_loss: f64,
    /// Loss of the last step (NaN if no step ran).
    pub last_loss: f64,
    /// Every optimizer step's loss (mean over its accumulated batches), resumed steps included.
    pub losses: Vec<f64>,
    /// Wall time of this `fit` call.
    pub wall_seconds: f64,
}

/// The one training loop, driving an [`Objective`].
pub struct Trainer<'a, O: Objective> {
    objective: &'a mut O,
    train: TrainConfig,
    run: RunConfig,
    run_dir: RunDir,
    /// Held until the trainer is dropped: no other run writes this folder meanwhile (rank 0).
    _lock: Option<RunLock>,
    /// Ranks > 0 of a data-parallel run log to a scratch folder, removed at the end.
    _scratch: Option<Scratch>,
    device: Device,
    /// The data-parallel group ([`dist::Local`] for one process).
    comm: Arc<dyn Communicator>,
    optimizer: AdamW,
    vars: Vec<Var>,
    /// The optimized variables by name (for naming a non-finite one).
    named_vars: Vec<(String, Tensor)>,
    /// Completed optimizer steps.
    step: u64,
    /// Current epoch and the loader batches of it already consumed.
    epoch: usize,
    batch_in_epoch: usize,
    losses: Vec<f64>,
    last_lr: f64,
    last_checkpoint: Option<u64>,
    /// Step of the last picture logged (the end of `fit` does not repeat it).
    last_picture: Option<u64>,
    /// The best checkpoint so far by `run.best_metric`.
    best: Option<BestMeta>,
    resumed_batches_per_epoch: Option<usize>,
    /// Loader batches per epoch of the current `fit` (stored in checkpoints).
    batches_per_epoch: usize,
    tb: TbWriter,
    metrics: MetricsLog,
}

impl<'a, O: Objective> Trainer<'a, O> {
    /// `resolved_config_yaml` is written to RUN_DIR/config.yaml; `start` says which folder.
    /// Data parallel when the process was launched so ([`dist::connect`]).
    pub fn new(
        objective: &'a mut O,
        train: &TrainConfig,
        run: &RunConfig,
        resolved_config_yaml: &str,
        start: &RunStart<'_>,
    ) -> Result<Self> {
        let device = crate::device::parse_device(&run.device)?;
        let comm = dist::connect(&device)?;
        Self::with_communicator(objective, train, run, resolved_config_yaml, start, comm)
    }

    /// [`Trainer::new`] as one rank of `comm`'s group (see [`crate::dist`]): rank 0 writes the
    /// run folder, the others only train.
    pub fn with_communicator(
        objective: &'a mut O,
        train: &TrainConfig,
        run: &RunConfig,
        resolved_config_yaml: &str,
        start: &RunStart<'_>,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        train.validate()?;
        run.validate()?;
        let device = crate::device::parse_device(&run.device)?;
        crate::device::set_matmul_precision(run.precision);
        let resume = start.resumed();
        let writer = comm.rank() == 0;
        // Ranks > 0 of a data-parallel run write only to a scratch folder of their own (logs;
        // removed at the end); rank 0 alone writes the run folder.
        let scratch = if writer {
            None
        } else {
            Some(Scratch::new(comm.rank())?)
        };
        // The run folder's lock is taken before anything in it is read or written (by rank 0;
        // the other ranks of a data-parallel run only read a resumed folder's checkpoint).
        let (run_dir, lock) = match start {
            RunStart::Resume { dir, .. } => {
                let run_dir = RunDir::at(dir);
                if !run_dir.root().is_dir() {
                    bail!(
                        "resume: no complete checkpoint in {} (no such folder)",
                        run_dir.checkpoints().display()
                    );
                }
                let lock = if writer { Some(run_dir.lock()?) } else { None };
                (run_dir, lock)
            }
            RunStart::New { .. } if let Some(s) = &scratch => (s.run_dir(), None),
            RunStart::New { label } => {
                let label = if label.is_empty() {
                    objective.name()
                } else {
                    label.as_str()
                };
                let (dir, lock) = RunDir::new_run(&run.output_dir, run.name.as_deref(), label)?;
                eprintln!("run folder: {}", dir.root().display());
                (dir, Some(lock))
            }
        };
        if writer {
            write_atomic(&run_dir.config(), resolved_config_yaml.as_bytes())?;
        }

        let keywords = objective.no_decay_keywords();
        let groups = {
            let obj: &O = objective;
            param_groups(obj.varmap(), train.weight_decay, &keywords, &|n| {
                obj.lr_scale(n)
            })
        };
        if groups.is_empty() {
            bail!(
                "objective `{}` has no trainable variables",
                objective.name()
            );
        }
        let mut optimizer = AdamW::new(groups, (train.betas[0], train.betas[1]), train.eps)?;
        let vars = optimizer.vars();
        let named_vars: Vec<(String, Tensor)> = {
            let ids: std::collections::HashSet<_> =
                vars.iter().map(|v| v.as_tensor().id()).collect();
            // Invariant: the VarMap mutex is only poisoned if another thread panicked holding it.
            let data = objective
                .varmap()
                .data()
                .lock()
                .expect("varmap mutex poisoned");
            data.iter()
                .filter(|(_, v)| ids.contains(&v.as_tensor().id()))
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect()
        };

        let ckpt_dir = run_dir.checkpoints();
        let (mut step, mut epoch, mut batch_in_epoch, mut losses, mut last_lr) =
            (0, 0, 0, vec![], 0.0);
        let mut resumed_batches_per_epoch = None;
        let mut best = None;
        if let RunStart::Resume { pick, .. } = start {
            let ck = match pick {
                Pick::Last => checkpoint::load_newest_intact(&ckpt_dir)
                    .with_context(|| format!("resume: {}", run_dir.root().display()))?,
                &pick => Some(Self::load_picked(&run_dir, pick)?),
            };
            let Some(ck) = ck else {
                bail!("resume: no complete checkpoint in {}", ckpt_dir.display());
            };
            eprintln!(
                "resuming {} from step_{}",
                run_dir.root().display(),
                ck.meta.step
            );
            let files = run_dir.checkpoint(ck.meta.step);
            checkpoint::load_into_varmap(
                objective.varmap(),
                ck.weights,
                &checkpoint::LoadOptions::default(),
            )
            .with_context(|| format!("resume: {}", files.weights.display()))?;
            optimizer
                .load_state(&ck.optim, ck.meta.optimizer_steps)
                .with_context(|| format!("resume: {}", files.optim.display()))?;
            if ck.meta.objective != objective.name() {
                bail!(
                    "resume: {} was written by objective `{}`, not `{}`",
                    ckpt_dir.display(),
                    ck.meta.objective,
                    objective.name()
                );
            }
            step = ck.meta.step;
            epoch = ck.meta.epoch;
            batch_in_epoch = ck.meta.batch_in_epoch;
            last_lr = ck.meta.lr;
            losses = ck.losses;
            resumed_batches_per_epoch = Some(ck.meta.batches_per_epoch);
            best = checkpoint::load_best(&ckpt_dir)?.filter(|b| {
                let same = run.best_metric.as_deref() == Some(b.metric.as_str())
                    && run.best_mode == b.mode;
                if !same {
                    eprintln!(
                        "note: the run's best checkpoint was by `{}` ({:?}); run.best_metric is \
                         now {:?}, so the best is picked afresh",
                        b.metric, b.mode, run.best_metric
                    );
                }
                same
            });
        }
        // from here on a rank > 0 writes its scratch folder (a resumed run's was only read)
        let run_dir = match &scratch {
            Some(s) => s.run_dir(),
            None => run_dir,
        };
        if comm.parallel() {
            let hash = dist::check_same_weights(&*comm, &named_vars)
                .context("data parallel: checking the starting weights")?;
            if writer {
                eprintln!(
                    "data parallel: {} processes ({}), global batch split by rank, same start \
                     weights on every rank (hash {hash:08x})",
                    comm.world_size(),
                    comm.backend()
                );
                record_world(&run_dir, step, &*comm)?;
            }
        } else if resume.is_some() && run_dir.root().join(WORLD_FILE).exists() {
            // a data-parallel run resumed by one process
            record_world(&run_dir, step, &*comm)?;
        }
        let mut tb = TbWriter::create(run_dir.events())?;
        // The resolved config as text (indented: a markdown code block) and as hparams.
        let text: String = resolved_config_yaml
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        tb.add_text("config", &text, step)?;
        tb.add_hparams(&yaml_hparams(resolved_config_yaml)?)?;
        let metrics = MetricsLog::open(&run_dir.metrics(), resume.is_some().then_some(step))?;
        Ok(Self {
            objective,
            train: train.clone(),
            run: run.clone(),
            run_dir,
            _lock: lock,
            _scratch: scratch,
            device,
            comm,
            optimizer,
            vars,
            named_vars,
            step,
            epoch,
            batch_in_epoch,
            losses,
            last_lr,
            last_checkpoint: resume.is_some().then_some(step),
            last_picture: None,
            best,
            resumed_batches_per_epoch,
            batches_per_epoch: 0,
            tb,
            metrics,
        })
    }

    /// Checkpoint `pick` (not the newest) for a resume: later checkpoints are moved into
    /// `checkpoints/superseded-<time>/` first, loudly, so that nothing is lost.
    fn load_picked(run_dir: &RunDir, pick: Pick) -> Result<checkpoint::LoadedCheckpoint> {
        let step = run_dir.pick(pick).context("resume")?;
        let dir = run_dir.checkpoints();
        let ck = checkpoint::load_checkpoint(&dir, step)
            .with_context(|| format!("resume: {} step_{step}", run_dir.root().display()))?;
        if let Some(k) = checkpoint::first_non_finite(ck.weights.iter().chain(ck.optim.iter()))? {
            bail!(
                "resume: {} step_{step}: `{k}` is not finite (NaN or infinity)",
                run_dir.root().display()
            );
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(moved) = checkpoint::supersede_after(&dir, step, &utc_stamp(secs))? {
            eprintln!(
                "WARNING: resuming from step_{step}: the later checkpoints were moved to {}",
                moved.display()
            );
        }
        write_atomic(&run_dir.latest_file(), format!("step_{step}\n").as_bytes())?;
        Ok(ck)
    }

    /// This process's rank in its data-parallel group (0 in a single process).
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The run folder (a rank > 0 of a data-parallel run: its scratch folder).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.root()
    }

    /// `pictures/curves.png`: every step's loss (resumed ones included), the schedule's lr and
    /// the evaluations logged so far ([`crate::log::curves`]).
    fn write_curves(&self, sched: &LrSchedule) -> Result<()> {
        let lrs: Vec<f64> = (0..self.losses.len() as u64).map(|s| sched.lr(s)).collect();
        let evals: Vec<_> = crate::log::read_metrics(&self.run_dir.metrics())?
            .into_iter()
            .filter(|r| r.get("split").and_then(|s| s.as_str()) == Some("eval"))
            .collect();
        crate::log::write_curves(
            &self.run_dir.pictures().join("curves.png"),
            self.objective.name(),
            self.objective.loss_name(),
            &self.losses,
            &lrs,
            &evals,
        )
        .context("writing pictures/curves.png")
    }

    /// Whether this process writes the run folder (rank 0).
    fn writer(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Trains on `train_loader` until `train.epochs` (or `train.max_steps`), evaluating on
    /// `eval_loader` every `run.eval_every_epochs`.
    pub fn fit(
        &mut self,
        train_loader: &DataLoader,
        eval_loader: Option<&DataLoader>,
    ) -> Result<TrainSummary> {
        self.fit_source(train_loader, eval_loader)
    }

    /// [`Trainer::fit`] over any [`BatchSource`].
    pub fn fit_source(
        &mut self,
        train_src: &dyn BatchSource,
        eval_loader: Option<&DataLoader>,
    ) -> Result<TrainSummary> {
        let started = Instant::now();
        let bpe = train_src.batches_per_epoch();
        let accum = self.train.accum_steps;
        let steps_per_epoch = bpe / accum;
        if steps_per_epoch == 0 {
            bail!("the train loader has {bpe} batches per epoch, fewer than train.accum_steps ({accum})");
        }
        if let Some(saved) = self.resumed_batches_per_epoch {
            if saved != bpe {
                bail!(
                    "resume: the checkpoint was written with {saved} batches per epoch, the loader \
                     now has {bpe} (same data and train.batch_size are needed to continue exactly)"
                );
            }
        }
        self.batches_per_epoch = bpe;
        let sched = self.train.schedule(steps_per_epoch as u64);
        let total = self.train.epochs as u64 * steps_per_epoch as u64;
        let stop_at = self.train.max_steps.map_or(total, |m| m.min(total));
        let used_batches = steps_per_epoch * accum;
        let mut window = LogWindow::new();

        while self.step < stop_at && self.epoch < self.train.epochs {
            {
                // One bar per epoch: this epoch's steps (fewer when max_steps ends it early).
                let epoch_start = (self.epoch * steps_per_epoch) as u64;
                let progress = Progress::new(
                    &format!(
                        "{} epoch {}/{}",
                        self.objective.name(),
                        self.epoch + 1,
                        self.train.epochs
                    ),
                    (steps_per_epoch as u64).min(stop_at - epoch_start),
                    self.step - epoch_start,
                );
                // one bar per run: rank 0's
                let progress = if self.writer() {
                    progress
                } else {
                    progress.silent()
                };
                let (rank, world) = (self.comm.rank(), self.comm.world_size());
                let mut batches = if world > 1 {
                    train_src.epoch_shard(self.epoch, self.batch_in_epoch, rank, world)
                } else {
                    train_src.epoch_batches(self.epoch, self.batch_in_epoch)
                };
                while self.batch_in_epoch + accum <= used_batches && self.step < stop_at {
                    let (loss, norm, lr, metrics, images) =
                        self.one_step(batches.as_mut(), &sched, bpe)?;
                    window.images += images;
                    self.after_step(loss, norm, lr, &metrics, &mut window)?;
                    progress.set_message(&format!("loss {loss:.4} lr {lr:.2e}"));
                    progress.inc(1);
                }
                progress.finish(&format!(
                    "loss {:.4}",
                    self.losses.last().unwrap_or(&f64::NAN)
                ));
            }
            if self.batch_in_epoch + accum > used_batches {
                self.end_epoch(eval_loader)?;
            }
        }
        if self.last_checkpoint != Some(self.step) && self.step > 0 {
            self.save_checkpoint()?;
        }
        if self.step > 0 && self.last_picture != Some(self.step) && self.writer() {
            self.objective
                .log_images(self.step, self.run_dir.root(), &mut self.tb)?;
            self.last_picture = Some(self.step);
        }
        if self.step > 0 && self.writer() {
            self.write_curves(&sched)?;
        }
        self.tb.flush()?;
        if self.writer() {
            eprintln!(
                "{}: {} steps in {:.1}s, run folder {}",
                self.objective.name(),
                self.step,
                started.elapsed().as_secs_f64(),
                self.run_dir.root().display()
            );
        }
        Ok(TrainSummary {
            run_dir: self.run_dir.root().to_path_buf(),
            steps: self.step,
            epochs: self.epoch,
            first_loss: self.losses.first().copied().unwrap_or(f64::NAN),
            last_loss: self.losses.last().copied().unwrap_or(f64::NAN),
            losses: self.losses.clone(),
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One optimizer step over `accum_steps` batches: (loss, pre-clip grad norm, lr, mean
    /// metrics, images seen).
    #[allow(clippy::type_complexity)]
    fn one_step(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        sched: &LrSchedule,
        bpe: usize,
    ) -> Result<(f64, f64, f64, Vec<(String, f64)>, usize)> {
        let n = self.step + 1;
        let accum = self.train.accum_steps;
        let lr = sched.lr(self.step);
        let mut grads = GradStore::default();
        let mut loss_sum = 0.0;
        let mut metrics: Vec<(String, f64)> = vec![];
        let mut images = 0;
        for k in 0..accum {
            let batch = batches
                .next()
                .with_context(|| {
                    format!(
                        "step {n}: the train loader ended after {} of {bpe} batches of epoch {}",
                        self.batch_in_epoch, self.epoch
                    )
                })?
                .with_context(|| {
                    format!(
                        "step {n}: loading batch {} of epoch {}",
                        self.batch_in_epoch, self.epoch
                    )
                })?;
            let seed = if k == 0 {
                mix_seed(self.run.seed, &[n])
            } else {
                mix_seed(self.run.seed, &[n, k as u64])
            };
            self.objective.set_seed(seed);
            let out = self
                .objective
                .train_step(&batch, &self.device)
                .with_context(|| format!("step {n}: {} train_step", self.objective.name()))?;
            if out.loss.elem_count() != 1 {
                bail!(
                    "step {n}: the loss has shape {:?}, expected a scalar",
                    out.loss.dims()
                );
            }
            for (i, a) in out.aux.iter().enumerate() {
                if a.value.elem_count() != 1 {
                    bail!(
                        "step {n}: auxiliary loss {i} has shape {:?}, expected a scalar",
                        a.value.dims()
                    );
                }
            }
            // the one place auxiliary losses (MoE load balancing) join the task loss
            let loss = out
                .total_loss()
                .with_context(|| format!("step {n}: adding the auxiliary losses"))?;
            let value = loss
                .to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .with_context(|| format!("step {n}: reading the loss"))?[0];
            // (data parallel: checked once reduced over the ranks, below, so all stop together)
            if !value.is_finite() && !self.comm.parallel() {
                bail!(
                    "step {n}: loss is {} (lr {lr:.3e}); stopping without writing a checkpoint",
                    if value.is_nan() { "NaN" } else { "infinite" }
                );
            }
            let scaled = if accum > 1 {
                loss.affine(1.0 / accum as f64, 0.0)?
            } else {
                loss
            };
            let mut g = scaled
                .backward()
                .with_context(|| format!("step {n}: backward"))?;
            // Keep only the variables' gradients (the store also holds every intermediate's).
            for v in &self.vars {
                if let Some(gv) = g.remove(v.as_tensor()) {
                    // Detached: a leaf gradient may still reference this step's graph.
                    let gv = gv.detach();
                    let sum = match grads.remove(v.as_tensor()) {
                        Some(prev) => (prev + gv)?,
                        None => gv,
                    };
                    grads.insert(v.as_tensor(), sum);
                }
            }
            loss_sum += value;
            for (name, x) in out.into_metrics() {
                match metrics.iter_mut().find(|(m, _)| *m == name) {
                    Some((_, acc)) => *acc += x,
                    None => metrics.push((name, x)),
                }
            }
            images += batch.images.dims().first().copied().unwrap_or(0);
            self.batch_in_epoch += 1;
        }
        if self.comm.parallel() {
            // the step's loss, metrics and images over all ranks: means of the shard means
            let mut v: Vec<f64> = [loss_sum, images as f64]
                .into_iter()
                .chain(metrics.iter().map(|(_, x)| *x))
                .collect();
            self.comm
                .all_reduce_sum(&mut v)
                .with_context(|| format!("step {n}: reducing the loss over the ranks"))?;
            let w = self.comm.world_size() as f64;
            loss_sum = v[0] / w;
            images = v[1].round() as usize;
            for ((_, x), r) in metrics.iter_mut().zip(&v[2..]) {
                *x = r / w;
            }
            if !loss_sum.is_finite() {
                bail!(
                    "step {n}: loss is {} on at least one rank (lr {lr:.3e}); stopping without \
                     writing a checkpoint",
                    if loss_sum.is_nan() { "NaN" } else { "infinite" }
                );
            }
            dist::average_gradients(&*self.comm, &self.vars, &mut grads)
                .with_context(|| format!("step {n}"))?;
        }
        let norm = match self.train.clip_grad {
            Some(max) => clip_grad_norm(&mut grads, &self.vars, max)?,
            None => grad_norm(&grads, &self.vars)?,
        };
        if !norm.is_finite() {
            bail!("step {n}: gradient norm is {norm} (lr {lr:.3e}); stopping without writing a checkpoint");
        }
        // Layer-wise decay groups follow timm's per-group schedule (architecture.md 7.1).
        let step = self.step;
        self.optimizer
            .step_with(&grads, &|scale| sched.lr_scaled(step, scale))
            .with_context(|| format!("step {n}: optimizer"))?;
        // A finite loss and gradient can still overflow the weights (a huge lr): stop before
        // anything of this step is logged or checkpointed.
        if let Some(name) =
            checkpoint::first_non_finite(self.named_vars.iter().map(|(k, t)| (k, t)))
                .with_context(|| format!("step {n}: checking the updated weights"))?
        {
            bail!(
                "step {n}: weight `{name}` is not finite after the update (lr {lr:.3e}); \
                 stopping without writing a checkpoint"
            );
        }
        for (_, x) in metrics.iter_mut() {
            *x /= accum as f64;
        }
        Ok((loss_sum / accum as f64, norm, lr, metrics, images))
    }

    /// Bookkeeping after a step: history, scalar logs, pictures, step checkpoints.
    fn after_step(
        &mut self,
        loss: f64,
        norm: f64,
        lr: f64,
        metrics: &[(String, f64)],
        window: &mut LogWindow,
    ) -> Result<()> {
        self.step += 1;
        self.losses.push(loss);
        self.last_lr = lr;
        let step = self.step;
        if self.run.log_every > 0 && step.is_multiple_of(self.run.log_every) {
            let ips = window.images as f64 / window.since.elapsed().as_secs_f64().max(1e-9);
            let mut rows = vec![
                ("loss".to_string(), loss),
                ("lr".to_string(), lr),
                ("grad_norm".to_string(), norm),
                ("images_per_sec".to_string(), ips),
            ];
            // An objective metric named like one of the trainer's (e.g. "loss") is the same
            // quantity: the trainer's value wins.
            let own: Vec<String> = rows.iter().map(|(k, _)| k.clone()).collect();
            rows.extend(metrics.iter().filter(|(k, _)| !own.contains(k)).cloned());
            for (name, v) in &rows {
                self.tb.add_scalar(&format!("train/{name}"), *v, step)?;
            }
            self.metrics.write(step, self.epoch, "train", &rows)?;
            *window = LogWindow::new();
        }
        if self.run.image_every > 0 && step.is_multiple_of(self.run.image_every) && self.writer() {
            self.objective
                .log_images(step, self.run_dir.root(), &mut self.tb)?;
            self.last_picture = Some(step);
        }
        if self
            .run
            .checkpoint_every_steps
            .is_some_and(|k| k > 0 && step.is_multiple_of(k))
        {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// Closes an epoch: moves the position to the next one, evaluates and checkpoints when due.
    fn end_epoch(&mut self, eval_loader: Option<&DataLoader>) -> Result<()> {
        let done = self.epoch;
        self.epoch += 1;
        self.batch_in_epoch = 0;
        let every = self.run.eval_every_epochs;
        let mut new_best = None;
        // rank 0 evaluates; the others go on to the next step, where they wait for it
        let eval_loader = eval_loader.filter(|_| self.writer());
        if let Some(loader) = eval_loader.filter(|_| every > 0 && self.epoch.is_multiple_of(every))
        {
            let rows = self
                .objective
                .evaluate(loader, &self.device)
                .with_context(|| format!("evaluation after epoch {done}"))?;
            for (name, v) in &rows {
                self.tb.add_scalar(&format!("eval/{name}"), *v, self.step)?;
            }
            self.metrics.write(self.step, done, "eval", &rows)?;
            new_best = self.better_than_best(&rows)?;
        }
        let every = self.run.checkpoint_every_epochs;
        let due = every > 0 && self.epoch.is_multiple_of(every);
        if (due || new_best.is_some()) && self.last_checkpoint != Some(self.step) {
            self.save_checkpoint()?;
        }
        if let Some(best) = new_best {
            checkpoint::save_best(&self.run_dir.checkpoints(), &best)?;
            self.best = Some(best);
        }
        self.tb.flush()?;
        Ok(())
    }

    /// The new best (at the current step) when `rows` improve on `run.best_metric`; an error
    /// naming the eval metrics when the objective reports no such one.
    fn better_than_best(&self, rows: &[(String, f64)]) -> Result<Option<BestMeta>> {
        let Some(metric) = &self.run.best_metric else {
            return Ok(None);
        };
        let Some(&(_, value)) = rows.iter().find(|(k, _)| k == metric) else {
            let names: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
            bail!(
                "run.best_metric = `{metric}` is not an eval metric of `{}` (it reports: {})",
                self.objective.name(),
                names.join(", ")
            );
        };
        let better = value.is_finite() && self.best.as_ref().is_none_or(|b| b.improved_by(value));
        Ok(better.then(|| BestMeta {
            step: self.step,
            metric: metric.clone(),
            mode: self.run.best_mode,
            value,
        }))
    }

    /// Writes `checkpoints/step_<N>.*` for the current position and prunes old ones (rank 0;
    /// the other ranks of a data-parallel run hold the same weights and write nothing).
    fn save_checkpoint(&mut self) -> Result<()> {
        if !self.writer() {
            self.last_checkpoint = Some(self.step);
            return Ok(());
        }
        let dir = self.run_dir.checkpoints();
        let meta = CheckpointMeta {
            format_version: FORMAT_VERSION,
            step: self.step,
            epoch: self.epoch,
            batch_in_epoch: self.batch_in_epoch,
            optimizer_steps: self.optimizer.step_count(),
            lr: self.last_lr,
            seed: self.run.seed,
            schedule: self.train.schedule,
            losses: self.losses.len(),
            batches_per_epoch: self.batches_per_epoch,
            objective: self.objective.name().to_string(),
        };
        let weights = checkpoint::varmap_tensors(self.objective.varmap());
        let optim = self.optimizer.state_tensors();
        checkpoint::save_checkpoint(&dir, &weights, &optim, &self.losses, &meta)
            .with_context(|| format!("checkpoint of step {}", self.step))?;
        let best = self.best.as_ref().map(|b| b.step);
        checkpoint::prune_checkpoints(&dir, self.run.keep_checkpoints, self.step, best)?;
        self.last_checkpoint = Some(self.step);
        Ok(())
    }
}

/// A rank > 0's folder for what every rank logs (TensorBoard, metrics), removed when the trainer
/// is dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// A new, empty `mimlab-rank<R>-<pid>-<n>` in the temp folder.
    fn new(rank: usize) -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("mimlab-rank{rank}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&root)
            .with_context(|| format!("rank {rank}: creating {}", root.display()))?;
        Ok(Self(root))
    }

    /// The folder as a run folder.
    fn run_dir(&self) -> RunDir {
        RunDir::at(&self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Appends `{"step": S, "world_size": N, "backend": B}` to `RUN/world.jsonl` (rank 0, at every
/// start of a data-parallel run and at a resume of one, whose world size may differ).
fn record_world(run_dir: &RunDir, step: u64, comm: &dyn Communicator) -> Result<()> {
    use std::io::Write;
    let path = run_dir.root().join(WORLD_FILE);
    let line = serde_json::json!({
        "step": step,
        "world_size": comm.world_size(),
        "backend": comm.backend(),
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// File of the run folder recording each data-parallel start's world size.
pub const WORLD_FILE: &str = "world.jsonl";

/// Images seen since the last scalar log, for `train/images_per_sec`.
struct LogWindow {
    since: Instant,
    images: usize,
}

impl LogWindow {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            images: 0,
        }
    }
}
