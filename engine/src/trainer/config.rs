//! Training and run knobs (the `train:` and `run:` sections of an experiment config).
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::optim::{LrSchedule, ScheduleKind};

/// Optimizer, schedule and loop length. Defaults: the official SimMIM Swin-B 800-epoch
/// pretraining (architecture.md 3.5/3.6), except `epochs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Epochs of the schedule (the cosine length and the loop length).
    pub epochs: usize,
    /// Stop (and checkpoint) after this many optimizer steps in total; the schedule still spans
    /// `epochs`, so a run stopped early and resumed is the same run.
    pub max_steps: Option<u64>,
    /// Images per batch (also used for the lr scaling).
    pub batch_size: usize,
    /// Peak lr before batch scaling.
    pub base_lr: f64,
    /// lr at step 0 before batch scaling.
    pub warmup_lr: f64,
    /// Final cosine lr before batch scaling.
    pub min_lr: f64,
    /// `Some(n)`: every lr is scaled by `batch_size * accum_steps / n` (architecture.md 3.5).
    pub lr_scale_batch: Option<usize>,
    /// Linear warmup length in epochs (fractional allowed).
    pub warmup_epochs: f64,
    /// Decay after the warmup.
    pub schedule: ScheduleKind,
    /// Multistep milestones, in epochs.
    pub milestones: Vec<f64>,
    /// Multistep decay factor.
    pub gamma: f64,
    /// AdamW decoupled weight decay (0 for the no-decay parameters).
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW eps.
    pub eps: f64,
    /// Global grad-norm clip; None = no clipping (the norm is still logged).
    pub clip_grad: Option<f64>,
    /// Batches per optimizer step; the loss is divided by it.
    pub accum_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            max_steps: None,
            batch_size: 64,
            base_lr: 1e-4,
            warmup_lr: 5e-7,
            min_lr: 5e-6,
            lr_scale_batch: Some(512),
            warmup_epochs: 10.0,
            schedule: ScheduleKind::Multistep,
            milestones: vec![700.0],
            gamma: 0.1,
            weight_decay: 0.05,
            betas: [0.9, 0.999],
            eps: 1e-8,
            clip_grad: Some(5.0),
            accum_steps: 1,
        }
    }
}

impl TrainConfig {
    /// Rejects values the loop cannot run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        // NaN or infinity here poisons every weight at the first step (and an lr of NaN cannot
        // even be written into a checkpoint's JSON).
        let floats = [
            ("train.base_lr", self.base_lr),
            ("train.warmup_lr", self.warmup_lr),
            ("train.min_lr", self.min_lr),
            ("train.warmup_epochs", self.warmup_epochs),
            ("train.gamma", self.gamma),
            ("train.weight_decay", self.weight_decay),
            ("train.betas[0]", self.betas[0]),
            ("train.betas[1]", self.betas[1]),
            ("train.eps", self.eps),
        ];
        let extra = self.clip_grad.map(|c| ("train.clip_grad".to_string(), c));
        let milestones = self.milestones.iter().enumerate();
        for (key, v) in floats
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .chain(extra)
            .chain(milestones.map(|(i, m)| (format!("train.milestones[{i}]"), *m)))
        {
            if !v.is_finite() {
                bail!("{key} must be a finite number, got {v}");
            }
        }
        if self.epochs == 0 {
            bail!("train.epochs must be > 0");
        }
        if self.batch_size == 0 {
            bail!("train.batch_size must be > 0");
        }
        if self.accum_steps == 0 {
            bail!("train.accum_steps must be > 0");
        }
        if self.lr_scale_batch == Some(0) {
            bail!("train.lr_scale_batch must be > 0 (or null to disable scaling)");
        }
        if self.warmup_epochs.is_nan() || self.warmup_epochs < 0.0 {
            bail!(
                "train.warmup_epochs must be >= 0, got {}",
                self.warmup_epochs
            );
        }
        if let Some(c) = self.clip_grad {
            if c.is_nan() || c <= 0.0 {
                bail!("train.clip_grad must be > 0 (or null), got {c}");
            }
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                bail!("train.betas[{i}] must lie in [0, 1), got {b}");
            }
        }
        self.validate_signs_and_order()
    }

    /// Learning rates and weight decay are not negative.
    fn validate_signs_and_order(&self) -> Result<()> {
        for (key, v) in [
            ("base_lr", self.base_lr),
            ("warmup_lr", self.warmup_lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
        ] {
            if v < 0.0 {
                bail!("train.{key} must be >= 0, got {v}");
            }
        }
        Ok(())
    }

    /// Settings that run but are most likely a mistake, one line each (printed at config load):
    /// a warmup longer than the run (the default warmup of 10 epochs with `train.epochs` lowered
    /// is common, so it is a warning, not an error).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.warmup_epochs > self.epochs as f64 {
            w.push(format!(
                "train.warmup_epochs ({}) exceeds train.epochs ({}): the whole run is warmup",
                self.warmup_epochs, self.epochs
            ));
        }
        w
    }

    /// Multiplier of every lr: `batch_size * accum_steps / lr_scale_batch` (architecture.md 3.5:
    /// linear scaling of BASE_LR, WARMUP_LR and MIN_LR), or 1.
    pub fn lr_factor(&self) -> f64 {
        match self.lr_scale_batch {
            Some(n) => (self.batch_size * self.accum_steps) as f64 / n as f64,
            None => 1.0,
        }
    }

    /// The per-optimizer-step schedule for `steps_per_epoch` optimizer steps per epoch
    /// (official: `int(WARMUP_EPOCHS * n_iter)`, milestones `m * n_iter`).
    pub fn schedule(&self, steps_per_epoch: u64) -> LrSchedule {
        let f = self.lr_factor();
        let spe = steps_per_epoch as f64;
        LrSchedule {
            kind: self.schedule,
            base_lr: self.base_lr * f,
            warmup_lr: self.warmup_lr * f,
            min_lr: self.min_lr * f,
            warmup_steps: (self.warmup_epochs * spe) as u64,
            total_steps: self.epochs as u64 * steps_per_epoch,
            milestones: self.milestones.iter().map(|m| (m * spe) as u64).collect(),
            gamma: self.gamma,
        }
    }
}

/// Where a run goes and how often it logs, draws pictures, checkpoints and evaluates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Parent folder of run folders.
    pub output_dir: PathBuf,
    /// Run folder name; None -> `<objective>-<YYYYmmdd-HHMMSS>` (UTC).
    pub name: Option<String>,
    /// Root of every random stream of the run.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads for the math kernels (0 = all cores). Applied once at process start by the
    /// binary (`device::with_cpu_threads`, which also runs the work on one of them), before
    /// anything builds rayon's global pool.
    pub threads: usize,
    /// Data parallel inside one CPU process: this many ranks, each a thread with its own
    /// `threads / cpu_ranks` compute threads, its own copy of the model and its slice of every
    /// global batch, gradients averaged before the clip (`crate::dist`; 1 = off; no effect on a
    /// GPU: [`RunConfig::ranks_to_start`]). On 2 cores, two
    /// single-thread ranks run the small models' steps faster than one rank on two threads (no
    /// hand-off per kernel): BENCHMARKS.md "Data parallel in one CPU process".
    pub cpu_ranks: usize,
    /// Optimizer steps between scalar logs (0 = never).
    pub log_every: u64,
    /// Optimizer steps between pictures (0 = only at the end).
    pub image_every: u64,
    /// Epochs between checkpoints (0 = only step/end checkpoints).
    pub checkpoint_every_epochs: usize,
    /// Optimizer steps between checkpoints.
    pub checkpoint_every_steps: Option<u64>,
    /// Checkpoints kept on disk (older ones are deleted; the newest is always kept).
    pub keep_checkpoints: usize,
    /// Epochs between evaluations (0 = never).
    pub eval_every_epochs: usize,
    /// Eval metric that picks the best checkpoint (e.g. `top1`, `loss`), kept beside the newest
    /// `keep_checkpoints` as `checkpoints/best`; None: no best checkpoint.
    pub best_metric: Option<String>,
    /// Whether a larger (`max`) or smaller (`min`) `best_metric` is better.
    pub best_mode: BestMode,
    /// `f32`, or `bf16`: on a GPU, the matrix products (linear layers, attention) in bfloat16
    /// with f32 master weights, optimizer state and everything else (autocast,
    /// `crate::device::set_matmul_precision`). The CPU kernels are f32 only.
    pub precision: crate::device::Precision,
}

/// Direction of `run.best_metric`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BestMode {
    /// Larger is better (accuracy, AP, mIoU).
    #[default]
    Max,
    /// Smaller is better (losses).
    Min,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs"),
            name: None,
            seed: 0,
            device: "cpu".into(),
            threads: 0,
            cpu_ranks: 1,
            log_every: 10,
            image_every: 200,
            checkpoint_every_epochs: 1,
            checkpoint_every_steps: None,
            keep_checkpoints: 2,
            eval_every_epochs: 1,
            best_metric: None,
            best_mode: BestMode::Max,
            precision: crate::device::Precision::F32,
        }
    }
}

impl RunConfig {
    /// The in-process ranks to start: `cpu_ranks` on the CPU; 1 on a GPU, where the key does
    /// nothing (a CPU recipe runs on `run.device: cuda` unchanged; GPUs train data parallel with
    /// scripts/launch_gpus.sh), said once on stderr.
    pub fn ranks_to_start(&self) -> usize {
        if self.device.trim() == "cpu" {
            return self.cpu_ranks.max(1);
        }
        if self.cpu_ranks > 1 {
            eprintln!(
                "note: run.cpu_ranks {} applies to run.device cpu; `{}` trains as one rank",
                self.cpu_ranks, self.device
            );
        }
        1
    }

    /// Rejects a `run.name` that is empty or leaves `run.output_dir` (a path separator or `..`),
    /// and bf16 precision off a GPU.
    pub fn validate(&self) -> Result<()> {
        if self.precision == crate::device::Precision::Bf16 && !self.device.starts_with("cuda") {
            bail!(
                "run.precision: bf16 is for CUDA devices (run.device is `{}`; the CPU kernels \
                 are f32, and bf16 products composed on the CPU are slower, not faster)",
                self.device
            );
        }
        if self.cpu_ranks == 0 {
            bail!("run.cpu_ranks must be at least 1 (1 = one rank, no data parallelism)");
        }
        if let Some(name) = &self.name {
            if name.is_empty() {
                bail!("run.name must not be empty (leave it unset for a timestamped name)");
            }
            if name.contains(['/', '\\']) || name == "." || name == ".." {
                bail!(
                    "run.name `{name}` must be a folder name inside run.output_dir, without `/`, \
                     `\\`, `.` or `..`"
                );
            }
        }
        if let Some(m) = &self.best_metric {
            if m.is_empty() {
                bail!("run.best_metric must not be empty (leave it unset for no best checkpoint)");
            }
            if self.eval_every_epochs == 0 {
                bail!("run.best_metric = `{m}` needs evaluations: run.eval_every_epochs is 0");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run.cpu_ranks`: 0 is refused naming the key; the ranks start on the CPU only.
    #[test]
    fn cpu_ranks_start_on_the_cpu_only() {
        let run: RunConfig = serde_yaml_ng::from_str("cpu_ranks: 2\n").unwrap();
        run.validate().unwrap();
        assert_eq!(run.ranks_to_start(), 2);
        let gpu = RunConfig {
            device: "cuda:0".into(),
            ..run.clone()
        };
        gpu.validate().unwrap();
        assert_eq!(gpu.ranks_to_start(), 1);
        assert_eq!(RunConfig::default().ranks_to_start(), 1);
        let zero = RunConfig {
            cpu_ranks: 0,
            ..run
        };
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("run.cpu_ranks must be at least 1"), "{e}");
    }

    /// `run.precision: bf16` is read from YAML and refused off a GPU, naming the key.
    #[test]
    fn bf16_precision_is_for_cuda_devices() {
        let run: RunConfig = serde_yaml_ng::from_str("precision: bf16\ndevice: cuda\n").unwrap();
        assert_eq!(run.precision, crate::device::Precision::Bf16);
        run.validate().unwrap();
        let cpu = RunConfig {
            device: "cpu".into(),
            ..run
        };
        let e = cpu.validate().unwrap_err().to_string();
        assert!(e.contains("run.precision: bf16 is for CUDA devices"), "{e}");
        assert!(serde_yaml_ng::from_str::<RunConfig>("precision: fp16\n").is_err());
    }

    #[test]
    fn lr_scaling_and_schedule_in_steps() {
        let t = TrainConfig {
            batch_size: 128,
            accum_steps: 2,
            warmup_epochs: 2.5,
            milestones: vec![7.0],
            ..TrainConfig::default()
        };
        assert_eq!(t.lr_factor(), 0.5);
        let s = t.schedule(10);
        assert_eq!(
            (s.warmup_steps, s.total_steps, s.milestones.clone()),
            (25, 100, vec![70])
        );
        assert_eq!((s.base_lr, s.warmup_lr), (5e-5, 2.5e-7));
        let y = "epochs: 3\nschedule: cosine\nclip_grad: null\n";
        let c: TrainConfig = serde_yaml_ng::from_str(y).unwrap();
        assert_eq!(
            (c.epochs, c.schedule, c.clip_grad),
            (3, ScheduleKind::Cosine, None)
        );
        assert!(serde_yaml_ng::from_str::<TrainConfig>("lr: 1").is_err());
        let bad = TrainConfig {
            accum_steps: 0,
            ..TrainConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("train.accum_steps"));
    }

    #[test]
    fn non_finite_hyperparameters_are_refused_by_key() {
        type Set = fn(&mut TrainConfig, f64);
        let cases: [(&str, Set); 7] = [
            ("train.base_lr", |t, v| t.base_lr = v),
            ("train.min_lr", |t, v| t.min_lr = v),
            ("train.weight_decay", |t, v| t.weight_decay = v),
            ("train.betas[1]", |t, v| t.betas[1] = v),
            ("train.eps", |t, v| t.eps = v),
            ("train.clip_grad", |t, v| t.clip_grad = Some(v)),
            ("train.milestones[0]", |t, v| t.milestones = vec![v]),
        ];
        for (key, set) in cases {
            for (v, shown) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
                let mut t = TrainConfig::default();
                set(&mut t, v);
                assert_eq!(
                    t.validate().unwrap_err().to_string(),
                    format!("{key} must be a finite number, got {shown}")
                );
            }
        }
        // as a user writes them in YAML
        let t: TrainConfig = serde_yaml_ng::from_str("base_lr: .nan\n").unwrap();
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "train.base_lr must be a finite number, got NaN"
        );
        let t: TrainConfig = serde_yaml_ng::from_str("warmup_lr: -.inf\n").unwrap();
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "train.warmup_lr must be a finite number, got -inf"
        );
        TrainConfig::default().validate().unwrap();
    }

    #[test]
    fn negative_rates_are_errors_and_a_warmup_past_the_end_a_warning() {
        let err = |t: TrainConfig| t.validate().unwrap_err().to_string();
        let d = TrainConfig::default;
        assert_eq!(
            err(TrainConfig {
                base_lr: -1e-3,
                ..d()
            }),
            "train.base_lr must be >= 0, got -0.001"
        );
        assert_eq!(
            err(TrainConfig {
                weight_decay: -0.05,
                ..d()
            }),
            "train.weight_decay must be >= 0, got -0.05"
        );
        let long_warmup = TrainConfig {
            epochs: 3,
            warmup_epochs: 3.5,
            ..d()
        };
        long_warmup.validate().unwrap();
        assert_eq!(
            long_warmup.warnings(),
            ["train.warmup_epochs (3.5) exceeds train.epochs (3): the whole run is warmup"]
        );
        assert!(d().warnings().is_empty());
    }

    #[test]
    fn run_names_stay_inside_the_output_dir() {
        let err = |name: &str| {
            let run = RunConfig {
                name: Some(name.into()),
                ..RunConfig::default()
            };
            run.validate().unwrap_err().to_string()
        };
        assert_eq!(
            err(""),
            "run.name must not be empty (leave it unset for a timestamped name)"
        );
        for bad in ["../..", "..", "a/b", "."] {
            assert_eq!(
                err(bad),
                format!(
                    "run.name `{bad}` must be a folder name inside run.output_dir, without `/`, \
                     `\\`, `.` or `..`"
                )
            );
        }
        let ok = RunConfig {
            name: Some("conc..2".into()),
            ..RunConfig::default()
        };
        ok.validate().unwrap();
    }
}
