//! Loop tests on a toy objective: linear regression `y = W x + b` over in-memory batches.
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::checkpoint::{load_checkpoint, varmap_tensors};
use super::*;
use crate::data::{Batch, BatchTargets, DataLoader, Dataset, LoaderOptions, Sample, Target};
use crate::log::TbWriter;
use crate::optim::ScheduleKind;
use crate::rng::rng_for;
use crate::run_dir::list_checkpoints;
use crate::run_dir::{pick_weights, Pick, RunDir};

/// `n` samples x in R^3 with targets from a fixed W, b; shuffled per epoch from (seed, epoch).
struct ToyData {
    xs: Vec<[f32; 3]>,
    batch: usize,
}

impl ToyData {
    fn new(n: usize, batch: usize) -> Self {
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        let mut rng = rng_for(99, &[]);
        let xs = (0..n)
            .map(|_| [0; 3].map(|_: i32| normal.sample(&mut rng)))
            .collect();
        Self { xs, batch }
    }
}

impl BatchSource for ToyData {
    fn batches_per_epoch(&self) -> usize {
        self.xs.len() / self.batch
    }

    fn epoch_batches(
        &self,
        epoch: usize,
        start_batch: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let mut order: Vec<usize> = (0..self.xs.len()).collect();
        order.shuffle(&mut rng_for(5, &[epoch as u64]));
        let batches: Vec<Vec<usize>> = order.chunks_exact(self.batch).map(|c| c.to_vec()).collect();
        Box::new(batches.into_iter().skip(start_batch).map(move |indices| {
            let flat: Vec<f32> = indices.iter().flat_map(|&i| self.xs[i]).collect();
            let images = Tensor::from_vec(flat, (indices.len(), 3, 1, 1), &Device::Cpu)?;
            Batch::new(images, BatchTargets::None, indices, epoch)
        }))
    }
}

/// Linear regression with seeded target noise (so `set_seed` matters), optional NaN at a call.
struct Toy {
    varmap: VarMap,
    w: Tensor,
    b: Tensor,
    seed: u64,
    calls: u64,
    nan_at_call: Option<u64>,
    /// `Some(c)`: the forward also returns the auxiliary loss `c * sum((W - 1)^2)`.
    aux: Option<f64>,
    /// Steps at which `log_images` was called.
    pictures: Vec<u64>,
    /// Target noise drawn per sample from (seed, dataset index), so that a data-parallel rank's
    /// shard of a batch gets the noise it gets in the whole batch; else one draw per batch.
    per_sample_noise: bool,
}

impl Toy {
    fn new() -> Self {
        let varmap = VarMap::new();
        let dev = Device::Cpu;
        let w = varmap
            .get((2, 3), "lin.weight", Init::Const(0.0), DType::F32, &dev)
            .unwrap();
        let b = varmap
            .get(2, "lin.bias", Init::Const(0.0), DType::F32, &dev)
            .unwrap();
        Self {
            varmap,
            w,
            b,
            seed: 0,
            calls: 0,
            nan_at_call: None,
            aux: None,
            pictures: vec![],
            per_sample_noise: false,
        }
    }
}

impl Toy {
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.t()?)?.broadcast_add(&self.b)?)
    }
}

/// The true map: W = [[1, -2, 0.5], [0.3, 0, -1]], b = [0.5, -0.25].
fn target(x: &Tensor) -> Result<Tensor> {
    let true_w = Tensor::new(&[[1f32, -2.0, 0.5], [0.3, 0.0, -1.0]], x.device())?;
    let true_b = Tensor::new(&[0.5f32, -0.25], x.device())?;
    Ok(x.matmul(&true_w.t()?)?.broadcast_add(&true_b)?)
}

impl Objective for Toy {
    fn name(&self) -> &str {
        "toy"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    fn evaluate(&mut self, loader: &DataLoader, device: &Device) -> Result<Vec<(String, f64)>> {
        let (mut sum, mut n) = (0.0, 0usize);
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let x = batch.images.to_device(device)?.flatten_from(1)?;
            let (pred, y) = (self.predict(&x)?, target(&x)?);
            sum += (pred - y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            n += x.dim(0)? * 2;
        }
        Ok(vec![("mse".into(), sum / n as f64)])
    }

    fn log_images(&mut self, step: u64, _run_dir: &Path, _tb: &mut TbWriter) -> Result<()> {
        self.pictures.push(step);
        Ok(())
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        self.calls += 1;
        let x = batch.images.to_device(device)?.flatten_from(1)?; // (B, 3)
        let normal = Normal::new(0.0f32, 0.01).unwrap();
        let mut rng = rng_for(self.seed, &[]);
        let noise: Vec<f32> = if self.per_sample_noise {
            batch
                .indices
                .iter()
                .flat_map(|&i| {
                    let mut r = rng_for(self.seed, &[i as u64]);
                    [normal.sample(&mut r), normal.sample(&mut r)]
                })
                .collect()
        } else {
            (0..x.dim(0)? * 2)
                .map(|_| normal.sample(&mut rng))
                .collect()
        };
        let noise = Tensor::from_vec(noise, (x.dim(0)?, 2), device)?;
        let y = (target(&x)? + noise)?;
        let pred = self.predict(&x)?;
        let mut loss = (pred - y)?.sqr()?.mean_all()?;
        if self.nan_at_call == Some(self.calls) {
            loss = (loss * f64::NAN)?;
        }
        let aux = match self.aux {
            Some(c) => {
                let value = ((&self.w - 1.0)?.sqr()?.sum_all()? * c)?;
                let v = value.to_scalar::<f32>()? as f64;
                vec![AuxLoss {
                    value,
                    metrics: vec![("aux_w".into(), v)],
                }]
            }
            None => vec![],
        };
        Ok(StepOutput {
            loss,
            aux,
            metrics: vec![("calls".into(), self.calls as f64)],
        })
    }
}

fn configs(out: &Path, max_steps: Option<u64>, accum: usize) -> (TrainConfig, RunConfig) {
    let train = TrainConfig {
        epochs: 4,
        max_steps,
        batch_size: 4,
        base_lr: 0.05,
        warmup_lr: 0.01,
        min_lr: 0.001,
        lr_scale_batch: None,
        warmup_epochs: 0.5,
        schedule: ScheduleKind::Cosine,
        milestones: vec![],
        weight_decay: 0.05,
        clip_grad: Some(5.0),
        accum_steps: accum,
        ..TrainConfig::default()
    };
    let run = RunConfig {
        output_dir: out.to_path_buf(),
        name: Some("toy-run".into()),
        log_every: 2,
        image_every: 0,
        checkpoint_every_epochs: 1,
        keep_checkpoints: 10,
        ..RunConfig::default()
    };
    (train, run)
}

fn weights_bits(toy: &Toy) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = varmap_tensors(&toy.varmap)
        .into_iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    out.sort();
    out
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut train, run) = configs(dir.path(), None, 1);
    train.epochs = 8;
    let data = ToyData::new(32, 4);
    let mut toy = Toy::new();
    let mut t = Trainer::new(&mut toy, &train, &run, "x: 1\n", &RunStart::fresh()).unwrap();
    let s = t.fit_source(&data, None).unwrap();
    assert_eq!((s.steps, s.epochs, s.losses.len()), (64, 8, 64));
    assert!(
        s.last_loss < 0.05 * s.first_loss,
        "{} -> {}",
        s.first_loss,
        s.last_loss
    );
    let run_dir = dir.path().join("toy-run");
    assert_eq!(s.run_dir, run_dir);
    // the loss/lr curves of every step (issue 24), a panel each: 900 x 660 px
    let png = std::fs::read(run_dir.join("pictures/curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(
        (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap())
        ),
        (900, 660)
    );
    assert_eq!(
        std::fs::read_to_string(RunDir::at(&run_dir).config()).unwrap(),
        "x: 1\n"
    );
    // TensorBoard: train/loss every 2 steps, equal (as f32) to the step's loss.
    let events = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .unwrap();
    let losses: Vec<(u64, f32)> = crate::log::read_events(&events)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            crate::log::TbEvent::Scalar { tag, step, value } if tag == "train/loss" => {
                Some((step, value))
            }
            _ => None,
        })
        .collect();
    assert_eq!(losses.len(), 32);
    assert_eq!(losses[0], (2, s.losses[1] as f32));
    // Epoch checkpoints every 8 steps, all 8 kept (keep 10).
    let ck = RunDir::at(&run_dir).checkpoints();
    assert_eq!(
        list_checkpoints(&ck).unwrap(),
        (1..=8).map(|e| e * 8).collect::<Vec<u64>>()
    );
}

#[test]
fn checkpoint_round_trip_is_bit_exact_and_leaves_no_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let (train, run) = configs(dir.path(), Some(3), 1);
    let data = ToyData::new(20, 4);
    let mut toy = Toy::new();
    let s = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    assert_eq!(s.steps, 3);
    let ck_dir = RunDir::at(&s.run_dir).checkpoints();
    assert_eq!(list_checkpoints(&ck_dir).unwrap(), vec![3]);
    let ck = load_checkpoint(&ck_dir, 3).unwrap();
    assert_eq!(
        (
            ck.meta.epoch,
            ck.meta.batch_in_epoch,
            ck.meta.optimizer_steps
        ),
        (0, 3, 3)
    );
    assert_eq!(ck.meta.batches_per_epoch, 5);
    assert_eq!(
        ck.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        s.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    // Load into a fresh objective: weights bit-equal.
    let fresh = Toy::new();
    super::checkpoint::load_into_varmap(
        &fresh.varmap,
        ck.weights.clone(),
        &super::checkpoint::LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(weights_bits(&fresh), weights_bits(&toy));
    assert_ne!(weights_bits(&fresh), weights_bits(&Toy::new()));
    assert!(ck.optim.contains_key("lin.weight.exp_avg_sq"));
    let files = files_under(&s.run_dir);
    assert!(files.iter().all(|f| !f.ends_with(".tmp")), "{files:?}");
    assert!(files.contains(&"metrics.jsonl".to_string()), "{files:?}");
}

fn exact_resume_case(accum: usize) {
    let data = ToyData::new(20, 4); // 5 batches per epoch
    let whole_dir = tempfile::tempdir().unwrap();
    let (train, run) = configs(whole_dir.path(), Some(6), accum);
    let mut whole = Toy::new();
    let a = Trainer::new(&mut whole, &train, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    assert_eq!(a.steps, 6);

    let split_dir = tempfile::tempdir().unwrap();
    let (train3, run) = configs(split_dir.path(), Some(3), accum);
    let mut first = Toy::new();
    let b1 = Trainer::new(&mut first, &train3, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    assert_eq!(b1.steps, 3);
    let (train6, run) = configs(split_dir.path(), Some(6), accum);
    let mut second = Toy::new(); // fresh weights: everything must come from the checkpoint
    let b = Trainer::new(
        &mut second,
        &train6,
        &run,
        "",
        &RunStart::resume(&b1.run_dir),
    )
    .unwrap()
    .fit_source(&data, None)
    .unwrap();
    assert_eq!(b.steps, 6);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses), bits(&b.losses), "accum {accum}");
    assert_eq!(weights_bits(&whole), weights_bits(&second), "accum {accum}");
    assert_eq!(a.epochs, b.epochs);
}

#[test]
fn exact_resume_matches_uninterrupted_run() {
    exact_resume_case(1); // stop mid-epoch 0, cross the epoch end after resuming
    exact_resume_case(2); // 2 steps per epoch (one batch skipped), stop mid-epoch 1
}

#[test]
fn nan_stops_without_writing_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (train, mut run) = configs(dir.path(), None, 1);
    run.checkpoint_every_steps = Some(1);
    let data = ToyData::new(20, 4);
    let mut toy = Toy::new();
    toy.nan_at_call = Some(3);
    let mut t = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh()).unwrap();
    let err = t.fit_source(&data, None).unwrap_err().to_string();
    assert!(err.contains("step 3") && err.contains("NaN"), "{err}");
    assert!(err.contains("without writing a checkpoint"), "{err}");
    let run_dir = RunDir::at(dir.path().join("toy-run"));
    let ck = run_dir.checkpoints();
    assert_eq!(run_dir.checkpoint_steps().unwrap(), vec![1, 2]);
    let files = files_under(&ck);
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("step_3") && !f.ends_with(".tmp")),
        "{files:?}"
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.latest_file()).unwrap(),
        "step_2\n"
    );
}

#[test]
fn resume_and_run_folder_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (train, run) = configs(dir.path(), Some(1), 1);
    let mut toy = Toy::new();
    let empty = dir.path().join("empty");
    let err = Trainer::new(&mut toy, &train, &run, "", &RunStart::resume(&empty))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no complete checkpoint"), "{err}");
    let data = ToyData::new(8, 4);
    Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    let err = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");
    // A different loader size cannot continue exactly.
    let run_dir = dir.path().join("toy-run");
    let (train2, _) = configs(dir.path(), Some(2), 1);
    let mut t = Trainer::new(&mut toy, &train2, &run, "", &RunStart::resume(&run_dir)).unwrap();
    let err = t
        .fit_source(&ToyData::new(12, 4), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 batches per epoch") && err.contains("3"),
        "{err}"
    );
}

/// A real `Dataset` for the real `DataLoader`: fixed points plus seeded per-sample jitter (the
/// loader's (seed, epoch, index) augmentation stream).
struct TinySet(ToyData);

impl Dataset for TinySet {
    fn len(&self) -> usize {
        self.0.xs.len()
    }
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        let image = self.0.xs[index]
            .iter()
            .map(|v| v + rng.random_range(-0.05f32..0.05))
            .collect();
        Ok(Sample {
            image,
            height: 1,
            width: 1,
            target: Target::None,
        })
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
    fn describe(&self) -> String {
        format!("tiny: {} points", self.0.xs.len())
    }
}

fn loader(n: usize, shuffle: bool, workers: usize) -> DataLoader {
    let opts = LoaderOptions {
        batch_size: 4,
        shuffle,
        drop_last: true,
        seed: 3,
        workers,
        prefetch: 2,
    };
    DataLoader::new(Arc::new(TinySet(ToyData::new(n, 4))), opts)
}

#[test]
fn data_loader_fit_resumes_exactly_and_evaluates() {
    let (train_data, eval_data) = (loader(22, true, 2), loader(8, false, 0)); // 5 batches/epoch
    let whole_dir = tempfile::tempdir().unwrap();
    let (train, run) = configs(whole_dir.path(), Some(12), 1);
    let mut whole = Toy::new();
    let mut t = Trainer::new(&mut whole, &train, &run, "", &RunStart::fresh()).unwrap();
    let a = t.fit(&train_data, Some(&eval_data)).unwrap();
    assert_eq!((a.steps, a.epochs), (12, 2));

    let split_dir = tempfile::tempdir().unwrap();
    let (train7, run) = configs(split_dir.path(), Some(7), 1);
    let mut first = Toy::new();
    let mut t = Trainer::new(&mut first, &train7, &run, "", &RunStart::fresh()).unwrap();
    let b1 = t.fit(&train_data, Some(&eval_data)).unwrap();
    drop(t); // the run folder stays locked while its trainer lives
    let (train12, run) = configs(split_dir.path(), Some(12), 1);
    let mut second = Toy::new();
    let mut t = Trainer::new(
        &mut second,
        &train12,
        &run,
        "",
        &RunStart::resume(&b1.run_dir),
    )
    .unwrap();
    let b = t.fit(&train_data, Some(&eval_data)).unwrap();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses), bits(&b.losses));
    assert_eq!(weights_bits(&whole), weights_bits(&second));

    // metrics.jsonl: train rows every 2 steps, one eval row per epoch (after steps 5 and 10),
    // and the resumed run continues the same file without duplicates.
    for dir in [&a.run_dir, &b.run_dir] {
        let rows = crate::log::read_metrics(&RunDir::at(dir).metrics()).unwrap();
        let of = |split: &str| -> Vec<u64> {
            rows.iter()
                .filter(|r| r["split"] == split)
                .map(|r| r["step"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(of("train"), vec![2, 4, 6, 8, 10, 12], "{}", dir.display());
        assert_eq!(of("eval"), vec![5, 10], "{}", dir.display());
        let eval: Vec<f64> = rows
            .iter()
            .filter(|r| r["split"] == "eval")
            .map(|r| r["mse"].as_f64().unwrap())
            .collect();
        assert!(eval[1] < eval[0], "{eval:?}");
    }
}

#[test]
fn the_trainer_adds_auxiliary_losses_and_logs_their_metrics() {
    // W starts at 0: the aux loss of the first step is c * 6 = 3 and pulls every weight to 1.
    let run = |aux: Option<f64>| {
        let dir = tempfile::tempdir().unwrap();
        let (train, run) = configs(dir.path(), Some(2), 1);
        let mut toy = Toy { aux, ..Toy::new() };
        let mut t = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh()).unwrap();
        let s = t.fit_source(&ToyData::new(32, 4), None).unwrap();
        let rows = crate::log::read_metrics(&s.run_dir.join("metrics.jsonl")).unwrap();
        (s.losses, rows, weights_bits(&toy))
    };
    let (plain, plain_rows, plain_w) = run(None);
    let (with, rows, w) = run(Some(0.5));
    assert!(
        (with[0] - (plain[0] + 3.0)).abs() < 1e-6,
        "{with:?} vs {plain:?}"
    );
    assert_ne!(w, plain_w, "the auxiliary loss has a gradient");
    // the step-2 row: the trainer's loss (task + aux), then the objective's and the aux metrics
    let row = &rows[0];
    assert_eq!(row["step"].as_u64(), Some(2));
    let keys: Vec<&str> = row.keys().map(|k| k.as_str()).collect();
    assert!(
        keys.contains(&"aux_w") && keys.contains(&"calls"),
        "{keys:?}"
    );
    assert!(!plain_rows[0].contains_key("aux_w"));
    assert_eq!(row["loss"].as_f64(), Some(with[1]));
    assert!(row["aux_w"].as_f64().unwrap() > 0.0);
}

#[test]
fn weights_made_infinite_by_the_update_stop_the_run_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut train, mut run) = configs(dir.path(), None, 1);
    // finite in f64, so validate accepts it; the first update overflows f32 weights
    (train.base_lr, train.warmup_lr, train.min_lr) = (1e39, 1e39, 1e39);
    run.checkpoint_every_steps = Some(1);
    let data = ToyData::new(20, 4);
    let mut toy = Toy::new();
    let mut t = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh()).unwrap();
    let err = t.fit_source(&data, None).unwrap_err().to_string();
    assert_eq!(
        err,
        "step 1: weight `lin.bias` is not finite after the update (lr 1.000e39); stopping \
         without writing a checkpoint"
    );
    drop(t);
    let run_dir = RunDir::at(dir.path().join("toy-run"));
    assert!(!run_dir.checkpoints().exists());
    assert!(
        !run_dir.metrics().exists()
            || std::fs::read_to_string(run_dir.metrics())
                .unwrap()
                .is_empty()
    );
}

#[test]
fn a_second_trainer_on_a_running_folder_fails_naming_it_and_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let (train, run) = configs(dir.path(), Some(2), 1);
    let data = ToyData::new(8, 4);
    let mut first = Toy::new();
    let mut running =
        Trainer::new(&mut first, &train, &run, "first\n", &RunStart::fresh()).unwrap();
    let folder = dir.path().join("toy-run");
    let expected = format!(
        "run folder {f} is in use by another run (pid {pid}, holding {f}/.lock): wait for it \
         to end, or pick another run.name",
        f = folder.display(),
        pid = std::process::id()
    );
    let mut second = Toy::new();
    let err = Trainer::new(&mut second, &train, &run, "second\n", &RunStart::fresh())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, expected);
    // --resume of the running run is refused the same way
    let err = Trainer::new(
        &mut second,
        &train,
        &run,
        "second\n",
        &RunStart::resume(&folder),
    )
    .err()
    .unwrap()
    .to_string();
    assert_eq!(err, expected);
    // the second run wrote nothing
    assert_eq!(
        std::fs::read_to_string(RunDir::at(&folder).config()).unwrap(),
        "first\n"
    );
    running.fit_source(&data, None).unwrap();
    drop(running);
    // once the first run has ended, its folder can be resumed
    let (train3, _) = configs(dir.path(), Some(3), 1);
    let s = Trainer::new(&mut second, &train3, &run, "", &RunStart::resume(&folder))
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    assert_eq!(s.steps, 3);
}

#[test]
fn resume_falls_back_from_a_truncated_newest_checkpoint_and_prune_clears_orphans() {
    let data = ToyData::new(20, 4); // 5 batches per epoch
    let whole_dir = tempfile::tempdir().unwrap();
    let (train6, run) = configs(whole_dir.path(), Some(6), 1);
    let mut whole = Toy::new();
    let a = Trainer::new(&mut whole, &train6, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (train4, mut run) = configs(dir.path(), Some(4), 1);
    run.checkpoint_every_steps = Some(1);
    let mut first = Toy::new();
    let b1 = Trainer::new(&mut first, &train4, &run, "", &RunStart::fresh())
        .unwrap()
        .fit_source(&data, None)
        .unwrap();
    let rd = RunDir::at(&b1.run_dir);
    assert_eq!(rd.checkpoint_steps().unwrap(), vec![1, 2, 3, 4]);
    // the newest weights file is cut short, as by a full disk outside mimlab's writes
    let w4 = rd.checkpoint(4).weights;
    let len = std::fs::metadata(&w4).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&w4).unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);
    // orphans of earlier kills: weights without JSON, an optimizer file alone, temp files
    let ck = rd.checkpoints();
    std::fs::copy(rd.checkpoint(1).weights, ck.join("step_9.safetensors")).unwrap();
    std::fs::write(ck.join("step_7.optim.safetensors"), b"x").unwrap();
    std::fs::write(ck.join(".step_8.json.999.0.tmp"), b"{").unwrap();
    std::fs::write(ck.join("notes.txt"), b"mine").unwrap();

    let mut second = Toy::new();
    let mut t = Trainer::new(
        &mut second,
        &train6,
        &run,
        "",
        &RunStart::resume(&b1.run_dir),
    )
    .unwrap();
    let b = t.fit_source(&data, None).unwrap();
    drop(t);
    // resumed from step 3: the same run as an uninterrupted one
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses), bits(&b.losses));
    assert_eq!(weights_bits(&whole), weights_bits(&second));
    // keep 10: steps 1..=6 complete, every orphan piece gone, the user's file kept
    assert_eq!(
        rd.checkpoint_steps().unwrap(),
        (1..=6).collect::<Vec<u64>>()
    );
    let mut files = files_under(&ck);
    files.sort();
    let mut expected: Vec<String> = (1..=6)
        .flat_map(|s| ["json", "optim.safetensors", "safetensors"].map(|e| format!("step_{s}.{e}")))
        .chain(["latest".to_string(), "notes.txt".to_string()])
        .collect();
    expected.sort();
    assert_eq!(files, expected);
    let ck4 = load_checkpoint(&ck, 4).unwrap();
    assert_eq!(ck4.meta.step, 4);
}

#[test]
fn the_best_checkpoint_is_kept_and_a_resume_from_it_moves_later_ones_aside() {
    let data = (loader(22, true, 2), loader(8, false, 0)); // 5 batches/epoch
    let dir = tempfile::tempdir().unwrap();
    let (train, mut run) = configs(dir.path(), Some(20), 1);
    run.keep_checkpoints = 1;
    // "best" = the largest eval mse, i.e. the first evaluation (the mse falls): step 5
    run.best_metric = Some("mse".into());
    run.best_mode = BestMode::Max;
    let mut whole = Toy::new();
    let mut t = Trainer::new(&mut whole, &train, &run, "", &RunStart::fresh()).unwrap();
    let a = t.fit(&data.0, Some(&data.1)).unwrap();
    drop(t);
    let folder = RunDir::at(&a.run_dir);
    assert_eq!(folder.checkpoint_steps().unwrap(), vec![5, 20]);
    assert_eq!(folder.best_step().unwrap(), Some(5));
    assert_eq!(folder.pick(Pick::Best).unwrap(), 5);
    assert_eq!(folder.pick(Pick::Last).unwrap(), 20);
    let err = folder.pick(Pick::Step(10)).unwrap_err().to_string();
    assert!(
        err.ends_with("no complete checkpoint step_10; it holds step_5, step_20"),
        "{err}"
    );
    assert_eq!(
        pick_weights(&a.run_dir, Pick::Best).unwrap(),
        folder.checkpoint(5).weights
    );
    let best = checkpoint::load_best(&folder.checkpoints())
        .unwrap()
        .unwrap();
    let first_eval = crate::log::read_metrics(&folder.metrics())
        .unwrap()
        .into_iter()
        .find(|r| r["split"] == "eval")
        .unwrap();
    assert_eq!((best.step, best.metric.as_str()), (5, "mse"));
    assert_eq!(best.value, first_eval["mse"].as_f64().unwrap());
    // `checkpoints/best` stands for step_5 wherever a weights file is taken
    let src = crate::run_dir::resolve_init(&folder.best_file()).unwrap();
    assert_eq!(src.weights, folder.checkpoint(5).weights);

    // Resume from the best (step 5) and stop at step 10: the same steps 6..10 as a run that
    // never stopped, the step-20 checkpoint moved aside (not deleted), metrics cut at step 5.
    let (train10, _) = configs(dir.path(), Some(10), 1);
    let mut again = Toy::new();
    let start = RunStart::Resume {
        dir: &a.run_dir,
        pick: Pick::Best,
    };
    let mut t = Trainer::new(&mut again, &train10, &run, "", &start).unwrap();
    let b = t.fit(&data.0, Some(&data.1)).unwrap();
    drop(t);
    let ref_dir = tempfile::tempdir().unwrap();
    let (_, ref_run) = configs(ref_dir.path(), None, 1);
    let mut reference = Toy::new();
    let mut t = Trainer::new(&mut reference, &train10, &ref_run, "", &RunStart::fresh()).unwrap();
    let r = t.fit(&data.0, Some(&data.1)).unwrap();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&b.losses), bits(&r.losses));
    assert_eq!(weights_bits(&again), weights_bits(&reference));
    assert_eq!(folder.checkpoint_steps().unwrap(), vec![5, 10]);
    let superseded: Vec<String> = std::fs::read_dir(folder.checkpoints())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("superseded-"))
        .collect();
    assert_eq!(superseded.len(), 1, "{superseded:?}");
    let mut moved = files_under(&folder.checkpoints().join(&superseded[0]));
    moved.sort();
    assert_eq!(
        moved,
        [
            "step_20.json",
            "step_20.optim.safetensors",
            "step_20.safetensors"
        ]
    );
    let steps: Vec<u64> = crate::log::read_metrics(&folder.metrics())
        .unwrap()
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        vec![2, 4, 5, 6, 8, 10, 10],
        "train and eval rows up to step 10"
    );
}

#[test]
fn a_best_metric_the_objective_does_not_report_is_named_with_the_ones_it_does() {
    let data = (loader(22, true, 0), loader(8, false, 0));
    let dir = tempfile::tempdir().unwrap();
    let (train, mut run) = configs(dir.path(), Some(6), 1);
    run.best_metric = Some("top1".into());
    let mut toy = Toy::new();
    let mut t = Trainer::new(&mut toy, &train, &run, "", &RunStart::fresh()).unwrap();
    let err = format!("{:#}", t.fit(&data.0, Some(&data.1)).unwrap_err());
    assert!(
        err.contains("run.best_metric = `top1` is not an eval metric of `toy` (it reports: mse)"),
        "{err}"
    );
    run.eval_every_epochs = 0;
    let err = run.validate().unwrap_err().to_string();
    assert!(err.contains("run.eval_every_epochs is 0"), "{err}");
}

#[test]
fn pictures_are_drawn_once_per_step_and_new_folders_carry_the_label() {
    let dir = tempfile::tempdir().unwrap();
    for (every, want) in [(2, vec![2, 4, 6]), (4, vec![4, 6]), (0, vec![6])] {
        let (train, mut run) = configs(dir.path(), Some(6), 1);
        run.name = None;
        run.image_every = every;
        let mut toy = Toy::new();
        let label = "simmim-swinv2_nano-fashion-mnist".to_string();
        let mut t = Trainer::new(&mut toy, &train, &run, "", &RunStart::New { label }).unwrap();
        let s = t.fit_source(&ToyData::new(16, 4), None).unwrap();
        drop(t);
        assert_eq!(toy.pictures, want, "image_every {every}");
        let name = s
            .run_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with("simmim-swinv2_nano-fashion-mnist-2"),
            "{name}"
        );
    }
}

/// What a rank of the data-parallel test ends with: every step's loss, the weights by name, the
/// run folder.
type RankResult = (Vec<f64>, Vec<(String, Vec<f32>)>, std::path::PathBuf);

/// One process of the data-parallel test: `comm`'s rank trains a per-sample-noise [`Toy`] on
/// 32 samples at global batch 4; (losses, weights, run folder).
fn dp_rank(
    comm: Arc<dyn crate::dist::Communicator>,
    out: &Path,
    start: RunStart<'_>,
    max_steps: Option<u64>,
) -> Result<RankResult> {
    let (train, run) = configs(out, max_steps, 1);
    let data = ToyData::new(32, 4);
    let mut toy = Toy {
        per_sample_noise: true,
        ..Toy::new()
    };
    let mut t = Trainer::with_communicator(&mut toy, &train, &run, "x: 1\n", &start, comm)?;
    let s = t.fit_source(&data, None)?;
    drop(t);
    let mut w: Vec<(String, Vec<f32>)> = varmap_tensors(&toy.varmap)
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((s.losses, w, s.run_dir))
}

/// Runs `world` thread ranks of [`dp_rank`]; their results in rank order.
fn dp_group(world: usize, out: &Path, max_steps: Option<u64>) -> Vec<Result<RankResult>> {
    let handles: Vec<_> = crate::dist::ThreadGroup::new(world)
        .into_iter()
        .map(|c| {
            let out = out.to_path_buf();
            std::thread::spawn(move || dp_rank(Arc::new(c), &out, RunStart::fresh(), max_steps))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max)
}

fn weights_max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((ka, va), (kb, vb))| {
            assert_eq!(ka, kb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// Data parallelism (engine/src/dist): two ranks at global batch 4 train the model one process
/// trains at batch 4, over 32 steps with clipping, warmup and cosine: every step's loss within
/// 1e-6 (relative) and the weights within 1e-6 (f32 sums of two half-batch gradients against
/// one of the whole batch); both ranks end with the same weights; rank 0 alone writes the run
/// folder (checkpoints and `world.jsonl` with the world size), rank 1's scratch folder is gone.
/// Then the same with a world-size change at resume: 2 ranks for 12 steps, 1 process to the
/// end, equals the uninterrupted 1-process run.
#[test]
fn two_ranks_train_the_one_process_model() -> Result<()> {
    let one = tempfile::tempdir()?;
    let (losses, weights, _) = dp_rank(
        Arc::new(crate::dist::Local),
        one.path(),
        RunStart::fresh(),
        None,
    )?;
    assert_eq!(losses.len(), 32);
    let two = tempfile::tempdir()?;
    let ranks = dp_group(2, two.path(), None);
    let mut ranks = ranks.into_iter().collect::<Result<Vec<_>>>()?;
    let (l1, w1, scratch) = ranks.pop().unwrap();
    let (l0, w0, dir0) = ranks.pop().unwrap();
    let d = max_rel(&l0, &losses);
    assert!(d < 1e-6, "losses differ from the 1-process run by {d:e}");
    assert_eq!(l0, l1, "both ranks log the reduced loss");
    let d = weights_max_diff(&w0, &weights);
    assert!(d < 1e-6, "weights differ from the 1-process run by {d:e}");
    assert_eq!(weights_max_diff(&w0, &w1), 0.0, "ranks diverged");
    assert_eq!(dir0, two.path().join("toy-run"));
    assert_eq!(list_checkpoints(&RunDir::at(&dir0).checkpoints())?.len(), 4);
    let world = std::fs::read_to_string(dir0.join(super::fit::WORLD_FILE))?;
    assert_eq!(
        world,
        "{\"backend\":\"threads\",\"step\":0,\"world_size\":2}\n"
    );
    assert!(!scratch.exists(), "{} left behind", scratch.display());

    // 2 ranks for 12 steps, then 1 process resumes the run to the end
    let mixed = tempfile::tempdir()?;
    for r in dp_group(2, mixed.path(), Some(12)) {
        r?;
    }
    let (lm, wm, _) = dp_rank(
        Arc::new(crate::dist::Local),
        mixed.path(),
        RunStart::resume(&mixed.path().join("toy-run")),
        None,
    )?;
    let d = max_rel(&lm, &losses);
    assert!(
        d < 1e-6,
        "resumed at another world size: losses differ by {d:e}"
    );
    let world = std::fs::read_to_string(mixed.path().join("toy-run").join(super::fit::WORLD_FILE))?;
    assert_eq!(
        world,
        "{\"backend\":\"threads\",\"step\":0,\"world_size\":2}\n\
         {\"backend\":\"local\",\"step\":12,\"world_size\":1}\n"
    );
    let d = weights_max_diff(&wm, &weights);
    assert!(
        d < 1e-6,
        "resumed at another world size: weights differ by {d:e}"
    );
    Ok(())
}

/// A global batch that does not split evenly over the ranks is an error on every rank that
/// names `train.batch_size`.
#[test]
fn uneven_shards_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for r in dp_group(3, dir.path(), None) {
        let e = format!("{:#}", r.unwrap_err());
        assert!(
            e.contains("a batch of 4 samples does not split evenly over 3 processes")
                && e.contains("train.batch_size is the global batch"),
            "{e}"
        );
    }
}
