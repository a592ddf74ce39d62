//! Trainer stage: the one training loop (batches -> objective -> backward -> clip -> AdamW ->
//! schedule -> logs -> checkpoints -> eval) every objective plugs into, with exact resume.
pub mod checkpoint;
pub(crate) mod config;
mod fit;
mod objective;
mod session;
#[cfg(test)]
mod tests;

pub use config::{BestMode, RunConfig, TrainConfig};
pub use fit::{BatchSource, RunStart, TrainSummary, Trainer};
pub use objective::{AuxLoss, Objective, StepOutput};
pub use session::TrainSession;
