//! Trainer stage, the recipes' entry: what a training command hands to its recipe (the shared
//! sections of the experiment, the resolved config to write, the run folder to resume) and the
//! one way a recipe builds its training loader and runs the loop.
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use super::{Objective, RunConfig, RunStart, TrainConfig, TrainSummary, Trainer};
use crate::data::{build_dataset, DataConfig, DataLoader, Dataset, LoaderOptions, Split};

/// One training run about to start (or to resume).
#[derive(Debug, Clone)]
pub struct TrainSession<'a> {
    /// Dataset, loader and augmentation.
    pub data: &'a DataConfig,
    /// Optimizer, schedule, epochs, batch size.
    pub train: &'a TrainConfig,
    /// Output folder, seed, device, logging and checkpoint intervals.
    pub run: &'a RunConfig,
    /// The fully resolved experiment, written to the run folder's `config.yaml`.
    pub config_yaml: String,
    /// A new run folder (named after objective, model and dataset) or one to resume.
    pub start: RunStart<'a>,
}

impl TrainSession<'_> {
    /// The training loader's options: shuffled, last incomplete batch dropped (as the reference
    /// loaders), seeded by the run seed.
    pub fn loader_options(&self) -> LoaderOptions {
        LoaderOptions {
            batch_size: self.train.batch_size,
            shuffle: true,
            drop_last: true,
            seed: self.run.seed,
            workers: self.data.num_workers,
            prefetch: self.data.prefetch_batches,
        }
    }

    /// The train split of `data` at `img_size` x `in_chans`, with the training augmentation.
    pub fn train_dataset(&self, img_size: usize, in_chans: usize) -> Result<Arc<dyn Dataset>> {
        build_dataset(self.data, Split::Train, img_size, in_chans, true)
    }

    /// The training loader over `dataset` ([`Self::loader_options`]), after
    /// [`Self::check_batch_size`].
    pub fn train_loader(&self, dataset: Arc<dyn Dataset>) -> Result<DataLoader> {
        self.check_batch_size(dataset.as_ref())?;
        Ok(DataLoader::new(dataset, self.loader_options()))
    }

    /// An error naming both numbers when the train split cannot fill one batch (the last
    /// incomplete batch is dropped, so the run would have no step).
    pub fn check_batch_size(&self, dataset: &dyn Dataset) -> Result<()> {
        let (n, b) = (dataset.len(), self.train.batch_size);
        if n < b {
            bail!(
                "train.batch_size = {b} is larger than the train split ({n} samples: {}); lower \
                 train.batch_size, or raise data.max_samples / data.label_fraction",
                dataset.describe()
            );
        }
        Ok(())
    }

    /// Runs the one trainer for `objective` (a new run folder, or the resumed one) and prints
    /// `done: N steps in S s, loss A -> B; run folder DIR` on stdout.
    pub fn fit<O: Objective>(
        &self,
        objective: &mut O,
        loader: &DataLoader,
        eval: Option<&DataLoader>,
    ) -> Result<TrainSummary> {
        let start = Instant::now();
        let mut trainer = Trainer::new(
            objective,
            self.train,
            self.run,
            &self.config_yaml,
            &self.start,
        )?;
        let summary = trainer.fit(loader, eval)?;
        // ranks > 0 of a data-parallel run stop here; rank 0 reports and evaluates
        let rank = trainer.rank();
        drop(trainer);
        crate::dist::leave_if_worker(rank)?;
        println!(
            "done: {} steps in {:.1}s, loss {:.4} -> {:.4}; run folder {}",
            summary.steps,
            start.elapsed().as_secs_f64(),
            summary.first_loss,
            summary.last_loss,
            summary.run_dir.display()
        );
        Ok(summary)
    }
}
