//! Trainer stage: the one training loop (batches -> objective -> backward -> clip -> AdamW ->
//! schedule -> logs -> checkpoints -> eval) every objective plugs into, with exact resume.
pub mod checkpoint;
mod config;
mod fit;
mod objective;
mod session;
#[cfg(test)]
mod tests;

pub use config::{RunConfig, TrainConfig};
pub use fit::{BatchSource, TrainSummary, Trainer};
pub use objective::{AuxLoss, Objective, StepOutput};
pub use session::TrainSession;
