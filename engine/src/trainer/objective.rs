//! Trainer stage, the plug-in point of the loop: what SimMIM, feature distillation and
//! classification provide.
//!
//! Auxiliary losses are values: a model's forward returns them (e.g. the MoE load-balancing loss,
//! built by `mimlab_models::moe::MoeAux::aux_losses`), the objective hands them over in the
//! required [`StepOutput::aux`] field without adding them itself, and the trainer alone adds them
//! to the task loss ([`StepOutput::total_loss`]) and logs their metrics.
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::data::{Batch, DataLoader};
use crate::log::TbWriter;

/// An auxiliary loss a forward produced (e.g. mixture-of-experts load balancing).
#[derive(Debug, Clone)]
pub struct AuxLoss {
    /// Scalar, already weighted, still attached to the graph.
    pub value: Tensor,
    /// Named metrics of the loss (logged as `train/<name>` after the objective's).
    pub metrics: Vec<(String, f64)>,
}

/// Loss and metrics of one training batch.
pub struct StepOutput {
    /// Scalar task loss (without the auxiliary losses), still attached to the graph.
    pub loss: Tensor,
    /// The auxiliary losses the forward returned (empty for none); the trainer adds them to
    /// `loss`, the objective never does.
    pub aux: Vec<AuxLoss>,
    /// Named metrics of the batch (logged as `train/<name>`; an objective metric named `loss` is
    /// replaced by the trainer's, the total).
    pub metrics: Vec<(String, f64)>,
}

impl StepOutput {
    /// The loss the trainer backpropagates and logs: `loss + aux_0 + aux_1 + ...`, each auxiliary
    /// loss cast to the task loss's dtype, added in order.
    pub fn total_loss(&self) -> candle_core::Result<Tensor> {
        let mut total = self.loss.clone();
        for a in &self.aux {
            total = (total + a.value.to_dtype(self.loss.dtype())?)?;
        }
        Ok(total)
    }

    /// The objective's metrics followed by those of every auxiliary loss.
    pub fn into_metrics(self) -> Vec<(String, f64)> {
        let mut m = self.metrics;
        m.extend(self.aux.into_iter().flat_map(|a| a.metrics));
        m
    }
}

/// What an objective (SimMIM, feature distillation, classification) plugs into the loop.
pub trait Objective {
    /// Short name for run folders and logs ("simmim").
    fn name(&self) -> &str;
    /// What its training loss is, for axis labels ("masked-pixel L1"). Default "loss".
    fn loss_name(&self) -> &str {
        "loss"
    }
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
    /// Forward of one training batch: the scalar task loss, the auxiliary losses the forward
    /// returned, and named metrics.
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
