//! The plug-in point of the loop: what SimMIM, feature distillation and classification provide.
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::data::{Batch, DataLoader};
use crate::log::TbWriter;

/// Loss and metrics of one training batch.
pub struct StepOutput {
    /// Scalar loss (aux losses included), still attached to the graph.
    pub loss: Tensor,
    /// Named metrics of the batch (logged as `train/<name>`).
    pub metrics: Vec<(String, f64)>,
}

/// What an objective (SimMIM, feature distillation, classification) plugs into the loop.
pub trait Objective {
    /// Short name for run folders and logs ("simmim").
    fn name(&self) -> &str;
    /// Every trainable variable, by checkpoint key.
    fn varmap(&self) -> &VarMap;
    /// Extra no-weight-decay keywords beyond the default rule.
    fn no_decay_keywords(&self) -> Vec<String> {
        vec![]
    }
    /// Per-parameter lr multiplier (layer-wise decay in finetuning). Default 1.
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
    /// Re-seeds stochastic layers (drop path, dropout); the trainer calls it with
    /// `mix_seed(run seed, [step])` before each step.
    fn set_seed(&mut self, seed: u64);
    /// Forward of one training batch: the scalar loss (aux losses included) and named metrics.
    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput>;
    /// Evaluation over a loader; named metrics. Default: none.
    fn evaluate(&mut self, _loader: &DataLoader, _device: &Device) -> Result<Vec<(String, f64)>> {
        Ok(vec![])
    }
    /// Pictures for TensorBoard and the run folder (e.g. reconstructions), every
    /// `run.image_every` steps and at the end.
    fn log_images(&mut self, _step: u64, _run_dir: &Path, _tb: &mut TbWriter) -> Result<()> {
        Ok(())
    }
}
