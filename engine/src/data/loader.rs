//! The batcher: a fixed, seeded order of dataset indices per epoch, decoded into [`Batch`]es on
//! background threads with a bounded number of batches queued ahead of the model.
//!
//! Determinism: the permutation comes from `rng_for(seed, &[epoch])` and each sample's
//! augmentation from `rng_for(seed, &[epoch, index])`; batches are handed out in order whatever
//! the thread timing, so the worker count never changes what the model sees. With
//! [`DataLoader::fixed_augmentation`] a sample's augmentation comes from
//! `rng_for(seed, &[FIXED_AUG_STREAM, index])` instead: the same crop every epoch (cached
//! teacher features need it).
//!
//! Samples of different sizes are padded by [`super::collate()`] to the batch's largest size,
//! rounded up to [`DataLoader::pad_to_multiple`].
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;

use super::collate::collate;
use super::folder::SkippedImage;
use super::{Batch, Dataset};
use crate::rng::rng_for;
use rand::rngs::StdRng;

/// Stream tag of epoch-independent per-sample augmentation ([`DataLoader::fixed_augmentation`]).
pub const FIXED_AUG_STREAM: u64 = 0x00F1_C5ED;

/// How the loader batches and schedules a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Samples per batch.
    pub batch_size: usize,
    /// Seeded permutation per epoch (else dataset order).
    pub shuffle: bool,
    /// Drop the last, incomplete batch.
    pub drop_last: bool,
    /// Run seed: permutation and per-sample augmentation randomness.
    pub seed: u64,
    /// Background decode threads (0 = decode on the caller's thread).
    pub workers: usize,
    /// Batches decoded ahead of the consumer (at least 1).
    pub prefetch: usize,
}

/// Yields the batches of an epoch from a dataset; see the module doc.
pub struct DataLoader {
    dataset: Arc<dyn Dataset>,
    opts: LoaderOptions,
    skipped: Arc<AtomicUsize>,
    fixed_aug: bool,
    pad_multiple: usize,
}

impl DataLoader {
    /// A loader over `dataset` (batch size 0 is treated as 1).
    pub fn new(dataset: Arc<dyn Dataset>, mut opts: LoaderOptions) -> Self {
        opts.batch_size = opts.batch_size.max(1);
        opts.prefetch = opts.prefetch.max(1);
        Self {
            dataset,
            opts,
            skipped: Arc::new(AtomicUsize::new(0)),
            fixed_aug: false,
            pad_multiple: 1,
        }
    }

    /// Batches are padded to a height and width that are multiples of `m` (the model's
    /// requirement, e.g. its patch size; default 1: the largest size in the batch).
    pub fn pad_to_multiple(mut self, m: usize) -> Self {
        self.pad_multiple = m.max(1);
        self
    }

    /// Every sample gets the same augmentation (crop, flip) in every epoch, drawn from
    /// (seed, index) only; the epoch still reshuffles the order.
    pub fn fixed_augmentation(mut self) -> Self {
        self.fixed_aug = true;
        self
    }

    /// The generator sample `index` of `epoch` is transformed with.
    pub fn sample_rng(&self, epoch: usize, index: usize) -> StdRng {
        sample_rng(self.opts.seed, self.fixed_aug, epoch, index)
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.opts.batch_size);
        if self.opts.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset served.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// The options in use.
    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    /// Images skipped as undecodable so far in the last epoch (skip_bad_images).
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Dataset indices of each batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.opts.shuffle {
            order.shuffle(&mut rng_for(self.opts.seed, &[epoch as u64]));
        }
        let mut plan: Vec<Vec<usize>> = order
            .chunks(self.opts.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.opts.drop_last && plan.last().is_some_and(|b| b.len() < self.opts.batch_size) {
            plan.pop();
        }
        plan
    }

    /// Batches of `epoch` starting at batch `start_batch` (mid-epoch resume), in a fixed order
    /// whatever the thread timing. Decoding runs on `workers` background threads with `prefetch`
    /// batches queued. A batch whose every image was skipped is left out. After an error the
    /// iterator ends.
    pub fn epoch(
        &self,
        epoch: usize,
        start_batch: usize,
    ) -> impl Iterator<Item = Result<Batch>> + '_ {
        self.epoch_of(epoch, start_batch, None)
    }

    /// [`DataLoader::epoch`] for rank `rank` of `world` data-parallel ranks: of each batch only
    /// the samples [`crate::dist::shard_range`] gives this rank are decoded (in one process the
    /// ranks no longer each decode the whole batch). A batch that does not split evenly is an
    /// error, and so is a skipped image (`data.skip_bad_images`): the ranks would train on
    /// batches of different sizes. Samples of different sizes are padded to the shard's largest.
    pub fn epoch_shard(
        &self,
        epoch: usize,
        start_batch: usize,
        rank: usize,
        world: usize,
    ) -> impl Iterator<Item = Result<Batch>> + '_ {
        self.epoch_of(epoch, start_batch, Some((rank, world)))
    }

    fn epoch_of(
        &self,
        epoch: usize,
        start_batch: usize,
        shard: Option<(usize, usize)>,
    ) -> impl Iterator<Item = Result<Batch>> + '_ {
        self.skipped.store(0, Ordering::Relaxed);
        let plan: Vec<Vec<usize>> = self
            .epoch_plan(epoch)
            .into_iter()
            .skip(start_batch)
            .collect();
        let job = Arc::new(Job {
            dataset: self.dataset.clone(),
            plan,
            seed: self.opts.seed,
            fixed_aug: self.fixed_aug,
            pad_multiple: self.pad_multiple,
            epoch,
            skipped: self.skipped.clone(),
            shard,
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_take: 0,
                consumed: 0,
                ready: BTreeMap::new(),
                cancel: false,
            }),
            cv: Condvar::new(),
        });
        let workers = (0..self.opts.workers.min(job.plan.len()))
            .map(|i| {
                let (job, shared, prefetch) = (job.clone(), shared.clone(), self.opts.prefetch);
                std::thread::Builder::new()
                    .name(format!("mimlab-data-{i}"))
                    .spawn(move || worker(&job, &shared, prefetch))
                    .expect("spawning a data loader thread")
            })
            .collect();
        EpochIter {
            job,
            shared,
            workers,
            pos: 0,
            done: false,
        }
    }
}

/// Per-sample augmentation generator: (seed, epoch, index), or (seed, index) when fixed.
fn sample_rng(seed: u64, fixed: bool, epoch: usize, index: usize) -> StdRng {
    if fixed {
        rng_for(seed, &[FIXED_AUG_STREAM, index as u64])
    } else {
        rng_for(seed, &[epoch as u64, index as u64])
    }
}

/// What every worker of one epoch reads.
struct Job {
    dataset: Arc<dyn Dataset>,
    plan: Vec<Vec<usize>>,
    seed: u64,
    fixed_aug: bool,
    pad_multiple: usize,
    epoch: usize,
    skipped: Arc<AtomicUsize>,
    /// (rank, world): decode only this rank's samples of each batch.
    shard: Option<(usize, usize)>,
}

impl Job {
    /// Decodes batch `pos` of the plan (this rank's samples of it when sharded); `None` when
    /// every image in it was skipped.
    fn make(&self, pos: usize) -> Result<Option<Batch>> {
        let ds = &self.dataset;
        let mut idx = &self.plan[pos][..];
        if let Some((rank, world)) = self.shard {
            let (start, end) = crate::dist::even_shard(idx.len(), rank, world)?;
            idx = &idx[start..end];
        }
        let mut samples = Vec::with_capacity(idx.len());
        let mut indices = Vec::with_capacity(idx.len());
        for &i in idx {
            let mut rng = sample_rng(self.seed, self.fixed_aug, self.epoch, i);
            match ds.get(i, &mut rng) {
                Ok(s) => {
                    samples.push(s);
                    indices.push(i);
                }
                Err(e) => match e.downcast_ref::<SkippedImage>() {
                    Some(skip) if self.shard.is_some() => {
                        bail!(
                            "{skip}: data parallel ranks cannot skip images (their batches \
                             would differ in size); remove or fix the image"
                        )
                    }
                    Some(skip) => {
                        eprintln!("warning: skipping {skip}");
                        self.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    None => return Err(e.context(format!("{}: sample {i}", ds.describe()))),
                },
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        let batch = collate(
            samples,
            ds.channels(),
            self.pad_multiple,
            indices,
            self.epoch,
        )
        .with_context(|| ds.describe())?;
        Ok(Some(batch))
    }
}

struct State {
    /// Next plan position a worker may take.
    next_take: usize,
    /// Next plan position the consumer wants.
    consumed: usize,
    /// Finished batches waiting for the consumer.
    ready: BTreeMap<usize, Result<Option<Batch>>>,
    cancel: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

fn worker(job: &Job, shared: &Shared, prefetch: usize) {
    loop {
        let pos = {
            let mut st = shared.state.lock().expect("loader mutex poisoned");
            while !st.cancel
                && st.next_take < job.plan.len()
                && st.next_take >= st.consumed + prefetch
            {
                st = shared.cv.wait(st).expect("loader mutex poisoned");
            }
            if st.cancel || st.next_take >= job.plan.len() {
                return;
            }
            st.next_take += 1;
            st.next_take - 1
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| job.make(pos)))
            .unwrap_or_else(|_| Err(anyhow!("data loader thread panicked on batch {pos}")));
        let mut st = shared.state.lock().expect("loader mutex poisoned");
        st.ready.insert(pos, result);
        shared.cv.notify_all();
    }
}

/// Iterator over one epoch's batches; dropping it stops and joins the workers.
struct EpochIter {
    job: Arc<Job>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    pos: usize,
    done: bool,
}

impl EpochIter {
    fn next_result(&mut self) -> Result<Option<Batch>> {
        let pos = self.pos;
        self.pos += 1;
        if self.workers.is_empty() {
            return self.job.make(pos);
        }
        let mut st = self.shared.state.lock().expect("loader mutex poisoned");
        loop {
            if let Some(r) = st.ready.remove(&pos) {
                st.consumed = pos + 1;
                self.shared.cv.notify_all();
                return r;
            }
            st = self.shared.cv.wait(st).expect("loader mutex poisoned");
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        while !self.done && self.pos < self.job.plan.len() {
            match self
                .next_result()
                .with_context(|| format!("epoch {}", self.job.epoch))
            {
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => continue,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.cancel = true;
        }
        self.shared.cv.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::tests::make_folder;
    use crate::data::{build_dataset, BatchTargets, DataConfig, Sample, Split, Target};
    use rand::rngs::StdRng;
    use rand::Rng;

    /// 2x2 one-channel samples: value = index + a draw from the sample rng; label = index % 3.
    struct Toy(usize);

    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
            let v = index as f32 + rng.random::<f32>();
            Ok(Sample {
                image: vec![v; 4],
                height: 2,
                width: 2,
                target: Target::Class(index as u32 % 3),
            })
        }
        fn channels(&self) -> usize {
            1
        }
        fn num_classes(&self) -> Option<usize> {
            Some(3)
        }
        fn class_names(&self) -> Option<Vec<String>> {
            None
        }
        fn describe(&self) -> String {
            format!("toy: {} samples", self.0)
        }
    }

    fn opts(seed: u64, workers: usize) -> LoaderOptions {
        LoaderOptions {
            batch_size: 4,
            shuffle: true,
            drop_last: false,
            seed,
            workers,
            prefetch: 2,
        }
    }

    fn collect(
        loader: &DataLoader,
        epoch: usize,
        start: usize,
    ) -> Vec<(Vec<usize>, Vec<f32>, Vec<u32>)> {
        loader
            .epoch(epoch, start)
            .map(|b| {
                let b = b.unwrap();
                assert_eq!(b.epoch, epoch);
                let imgs = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let labels = b.labels().unwrap().to_vec1::<u32>().unwrap();
                (b.indices, imgs, labels)
            })
            .collect()
    }

    #[test]
    fn same_seed_same_batches_whatever_the_workers() {
        let ds: Arc<dyn Dataset> = Arc::new(Toy(18));
        let sync = DataLoader::new(ds.clone(), opts(7, 0));
        let a = collect(&sync, 1, 0);
        for w in [1, 2, 5] {
            assert_eq!(
                collect(&DataLoader::new(ds.clone(), opts(7, w)), 1, 0),
                a,
                "{w} workers"
            );
        }
        assert_eq!(sync.batches_per_epoch(), 5);
        assert_eq!(a.len(), 5);
        assert_eq!(a[4].0.len(), 2, "18 = 4*4 + 2");
        let mut all: Vec<usize> = a.iter().flat_map(|b| b.0.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..18).collect::<Vec<_>>(), "a permutation");
        // Image values: index + U[0,1) draw from rng_for(seed, [epoch, index]).
        let first = a[0].0[0];
        let want = first as f32 + rng_for(7, &[1, first as u64]).random::<f32>();
        assert_eq!(a[0].1[..4], [want; 4]);
        assert_eq!(a[0].2[0], first as u32 % 3);
        // Another seed or epoch reorders.
        assert_ne!(collect(&DataLoader::new(ds.clone(), opts(8, 2)), 1, 0), a);
        assert_ne!(collect(&sync, 2, 0), a);
    }

    #[test]
    fn fixed_augmentation_gives_a_sample_the_same_draw_every_epoch() {
        let ds: Arc<dyn Dataset> = Arc::new(Toy(18));
        let l = DataLoader::new(ds, opts(7, 2)).fixed_augmentation();
        let by_index = |epoch| {
            let mut v: Vec<(usize, f32)> = collect(&l, epoch, 0)
                .into_iter()
                .flat_map(|(idx, img, _)| {
                    let per = img.len() / idx.len();
                    idx.into_iter()
                        .enumerate()
                        .map(move |(k, i)| (i, img[k * per]))
                        .collect::<Vec<_>>()
                })
                .collect();
            v.sort_by_key(|p| p.0);
            v
        };
        let (e0, e3) = (by_index(0), by_index(3));
        assert_eq!(e0, e3, "same value per index in epochs 0 and 3");
        // The draw is (seed, FIXED_AUG_STREAM, index), whatever the epoch; the order still moves.
        let want = 5.0 + rng_for(7, &[FIXED_AUG_STREAM, 5]).random::<f32>();
        assert_eq!(e0[5], (5, want));
        assert_eq!(5.0 + l.sample_rng(9, 5).random::<f32>(), want);
        assert_ne!(l.epoch_plan(0), l.epoch_plan(3));
    }

    #[test]
    fn start_batch_equals_skipping_and_drop_last() {
        let ds: Arc<dyn Dataset> = Arc::new(Toy(18));
        let l = DataLoader::new(ds.clone(), opts(3, 2));
        let full = collect(&l, 0, 0);
        assert_eq!(collect(&l, 0, 3), full[3..].to_vec());
        assert!(collect(&l, 0, 9).is_empty());
        let dl = DataLoader::new(
            ds,
            LoaderOptions {
                drop_last: true,
                shuffle: false,
                ..opts(3, 2)
            },
        );
        assert_eq!(dl.batches_per_epoch(), 4);
        let b = collect(&dl, 0, 0);
        assert_eq!(b.len(), 4);
        assert_eq!(b[1].0, vec![4, 5, 6, 7], "unshuffled order");
    }

    #[test]
    fn dropping_an_epoch_midway_stops_the_workers() {
        let l = DataLoader::new(Arc::new(Toy(400)), opts(1, 3));
        let mut it = l.epoch(0, 0);
        assert!(it.next().unwrap().is_ok());
        drop(it);
        assert_eq!(l.epoch(0, 0).count(), 100);
    }

    #[test]
    fn bad_image_is_an_error_or_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let bad = make_folder(dir.path());
        let cfg = DataConfig {
            dataset: "image-folder".into(),
            path: Some(dir.path().into()),
            ..Default::default()
        };
        let o = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            drop_last: false,
            seed: 0,
            workers: 2,
            prefetch: 2,
        };
        let ds = build_dataset(&cfg, Split::Train, 8, 3, true).unwrap();
        let l = DataLoader::new(ds, o.clone());
        let results: Vec<_> = l.epoch(0, 0).collect();
        assert_eq!(results.len(), 1, "ends at the error");
        let err = format!("{:#}", results[0].as_ref().unwrap_err());
        assert!(
            err.contains(&format!("{}: cannot decode image", bad.display())),
            "{err}"
        );
        let skip = DataConfig {
            skip_bad_images: true,
            ..cfg
        };
        let l = DataLoader::new(build_dataset(&skip, Split::Train, 8, 3, true).unwrap(), o);
        let batches: Vec<Batch> = l.epoch(0, 0).map(|b| b.unwrap()).collect();
        let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
        assert_eq!(
            sizes,
            vec![1, 2, 1],
            "index 1 (cat/y.jpg) dropped from the first batch"
        );
        assert_eq!(batches[0].images.dims(), &[1, 3, 8, 8]);
        assert_eq!(l.skipped(), 1);
    }

    /// [`Toy`] that counts its decodes.
    struct Counted(Toy, AtomicUsize);

    impl Dataset for Counted {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.get(index, rng)
        }
        fn channels(&self) -> usize {
            self.0.channels()
        }
        fn num_classes(&self) -> Option<usize> {
            self.0.num_classes()
        }
        fn class_names(&self) -> Option<Vec<String>> {
            self.0.class_names()
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }

    /// A data-parallel rank's epoch is its slice of every batch of the whole epoch (same
    /// indices, same augmentation draws, from a mid-epoch start too), and only its samples are
    /// decoded; a batch that does not split evenly is an error naming train.batch_size, and so
    /// is a skipped image.
    #[test]
    fn a_rank_decodes_only_its_shard_of_each_batch() {
        let counted = Arc::new(Counted(Toy(10), AtomicUsize::new(0)));
        let o = LoaderOptions {
            drop_last: true,
            ..opts(5, 2)
        };
        let l = DataLoader::new(counted.clone(), o.clone());
        let whole = collect(&l, 1, 0);
        for start in [0, 1] {
            counted.1.store(0, Ordering::Relaxed);
            for rank in 0..2 {
                let shard: Vec<Batch> = l
                    .epoch_shard(1, start, rank, 2)
                    .map(|b| b.unwrap())
                    .collect();
                assert_eq!(shard.len(), 2 - start);
                for (b, (idx, imgs, labels)) in shard.iter().zip(&whole[start..]) {
                    let r = 2 * rank..2 * rank + 2;
                    assert_eq!(b.indices, idx[r.clone()]);
                    let got = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(got, imgs[4 * r.start..4 * r.end]);
                    assert_eq!(b.labels().unwrap().to_vec1::<u32>().unwrap(), labels[r]);
                }
            }
            assert_eq!(
                counted.1.load(Ordering::Relaxed),
                4 * (2 - start),
                "each sample once"
            );
        }
        let e = l.epoch_shard(0, 0, 0, 3).next().unwrap().unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("a batch of 4 samples does not split evenly over 3 processes")
                && e.contains("train.batch_size is the global batch"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let bad = make_folder(dir.path());
        let cfg = DataConfig {
            dataset: "image-folder".into(),
            path: Some(dir.path().into()),
            skip_bad_images: true,
            ..Default::default()
        };
        let ds = build_dataset(&cfg, Split::Train, 8, 3, true).unwrap();
        let o = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            ..o
        };
        let l = DataLoader::new(ds, o);
        let results: Vec<_> = l.epoch_shard(0, 0, 1, 2).collect();
        assert_eq!(results.len(), 1, "ends at the error");
        let e = format!("{:#}", results[0].as_ref().unwrap_err());
        assert!(
            e.contains(&bad.display().to_string())
                && e.contains("data parallel ranks cannot skip images"),
            "{e}"
        );
    }

    /// Sample i: one channel of (1 + i % 3) x (2 + i % 4) pixels valued i, one box [0, 0, 1, 1]
    /// of class i.
    struct Sizes;

    impl Dataset for Sizes {
        fn len(&self) -> usize {
            6
        }
        fn get(&self, index: usize, _rng: &mut StdRng) -> Result<Sample> {
            let (height, width) = (1 + index % 3, 2 + index % 4);
            let boxes = vec![crate::data::ObjectBox {
                xyxy: [0.0, 0.0, 1.0, 1.0],
                class: index as u32,
                crowd: false,
            }];
            Ok(Sample {
                image: vec![index as f32; height * width],
                height,
                width,
                target: Target::Boxes(boxes),
            })
        }
        fn channels(&self) -> usize {
            1
        }
        fn num_classes(&self) -> Option<usize> {
            Some(6)
        }
        fn class_names(&self) -> Option<Vec<String>> {
            None
        }
        fn describe(&self) -> String {
            "sizes: 6 samples".into()
        }
    }

    #[test]
    fn loader_pads_samples_of_different_sizes_to_the_multiple() {
        let o = LoaderOptions {
            batch_size: 3,
            shuffle: false,
            ..opts(0, 2)
        };
        let l = DataLoader::new(Arc::new(Sizes), o).pad_to_multiple(4);
        let batches: Vec<Batch> = l.epoch(0, 0).map(|b| b.unwrap()).collect();
        // Batch 0: samples 0, 1, 2 of 1x2, 2x3, 3x4 -> largest 3x4 -> 4x4.
        // Batch 1: samples 3, 4, 5 of 1x5, 2x2, 3x3 -> largest 3x5 -> 4x8.
        assert_eq!(batches[0].images.dims(), &[3, 1, 4, 4]);
        assert_eq!(batches[0].valid_sizes, vec![(1, 2), (2, 3), (3, 4)]);
        assert_eq!(batches[1].images.dims(), &[3, 1, 4, 8]);
        assert_eq!(batches[1].valid_sizes, vec![(1, 5), (2, 2), (3, 3)]);
        let img = batches[1].images.get(0).unwrap().flatten_all().unwrap();
        let img = img.to_vec1::<f32>().unwrap();
        // Sample 3 fills row 0, columns 0..5 with 3; the rest is padding.
        let want: Vec<f32> = (0..32).map(|i| if i < 5 { 3.0 } else { 0.0 }).collect();
        assert_eq!(img, want);
        let BatchTargets::Boxes(b) = &batches[1].targets else {
            panic!("{:?}", batches[1].targets)
        };
        let classes: Vec<u32> = b.iter().map(|v| v[0].class).collect();
        assert_eq!(classes, [3, 4, 5]);
        assert!(batches[1].labels().is_none());
        // Without a multiple: the largest size only.
        let l = DataLoader::new(
            Arc::new(Sizes),
            LoaderOptions {
                batch_size: 3,
                shuffle: false,
                ..opts(0, 0)
            },
        );
        assert_eq!(
            l.epoch(0, 1).next().unwrap().unwrap().images.dims(),
            &[3, 1, 3, 5]
        );
    }

    /// FNV-1a over a batch's dims, image bits, labels and indices (a stable hash: values recorded
    /// at ada891f, before targets and padding existed).
    fn batch_hash(b: &Batch) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for x in bytes {
                h = (h ^ *x as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for d in b.images.dims() {
            eat(&(*d as u64).to_le_bytes());
        }
        for v in b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            eat(&v.to_bits().to_le_bytes());
        }
        if let Some(l) = b.labels() {
            for v in l.to_vec1::<u32>().unwrap() {
                eat(&v.to_le_bytes());
            }
        }
        for i in &b.indices {
            eat(&(*i as u64).to_le_bytes());
        }
        h
    }

    /// Hashes of the first two batches of epoch 1 (seed 7, batch 8, shuffled) of each bundled
    /// dataset and of an image-folder / folder written by `make_folder`, train and eval transform.
    fn classification_hashes() -> Vec<(String, Vec<u64>)> {
        let root = crate::data::test_data_root();
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path());
        let o = LoaderOptions {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            seed: 7,
            workers: 2,
            prefetch: 2,
        };
        let mut out = Vec::new();
        for (name, size, chans) in [
            ("fashion-mnist", 32, 1),
            ("mnist", 32, 3),
            ("photos", 24, 3),
            ("image-folder", 8, 3),
            ("folder", 6, 1),
        ] {
            let cfg = DataConfig {
                dataset: name.into(),
                root: root.clone(),
                path: Some(dir.path().join("cat")),
                eval_path: Some(dir.path().join("dog")),
                skip_bad_images: true,
                max_samples: Some(40),
                photos_crops_per_epoch: 40,
                ..Default::default()
            };
            let cfg = if name == "image-folder" {
                DataConfig {
                    path: Some(dir.path().into()),
                    eval_path: Some(dir.path().into()),
                    ..cfg
                }
            } else {
                cfg
            };
            for split in [Split::Train, Split::Eval] {
                let ds = build_dataset(&cfg, split, size, chans, split == Split::Train).unwrap();
                let l = DataLoader::new(ds, o.clone());
                let hashes = l
                    .epoch(1, 0)
                    .take(2)
                    .map(|b| batch_hash(&b.unwrap()))
                    .collect();
                out.push((format!("{name} {}", split.name()), hashes));
            }
        }
        out
    }

    #[test]
    fn classification_batches_are_bit_identical_to_before_targets() {
        // Recorded at ada891f (before targets and padding) by this same function.
        #[rustfmt::skip]
        let want: Vec<(&str, Vec<u64>)> = vec![
            ("fashion-mnist train", vec![0xa5840d6968e4f4fe, 0x388e0dbe9bdcc979]),
            ("fashion-mnist eval", vec![0xd1e0fa75c1976b3f, 0xd234f95c1ef63ae1]),
            ("mnist train", vec![0x7b89b5f038a575e5, 0x626dea3335d60d39]),
            ("mnist eval", vec![0x94c6f1fac1549a6a, 0xe9eda719a44a8ced]),
            ("photos train", vec![0x8607a8ea54fa736c, 0x43cd918d9f22c42c]),
            ("photos eval", vec![0x506590620a901412]),
            ("image-folder train", vec![0xfaed6174d64ce167]),
            ("image-folder eval", vec![0xfaed6174d64ce167]),
            ("folder train", vec![0x2f60210c8b69c204]),
            ("folder eval", vec![0x380e4dcfde9a2087]),
        ];
        let got = classification_hashes();
        let got: Vec<(&str, Vec<u64>)> = got.iter().map(|(n, h)| (n.as_str(), h.clone())).collect();
        assert_eq!(got, want);
    }
}
