//! SimMIM (Xie et al. 2022; architecture.md 3): the objective from masking (data stage) to the
//! model, its loss, the trainer objective, reconstruction pictures and the `mimlab pretrain` recipe.
//!
//! - [`mask`]: the `simmim:` config section and the per-image mask generator;
//! - [`model`]: encoder with mask token, linear pixel head, masked L1;
//! - [`objective`]: the trainer [`mimlab_engine::trainer::Objective`];
//! - [`visualize`]: reconstruction pictures; [`recipe`]: the pretraining run.
pub mod mask;
pub mod model;
pub mod objective;
pub mod recipe;
pub mod visualize;

pub use mask::{MaskGenerator, MaskStrategy, SimMimConfig};
#[cfg(test)]
pub(crate) use model::tiny_setup;
pub use model::{denorm_targets, masked_l1, norm_targets, pixel_mask, pixel_shuffle, SimMim};
pub use objective::SimMimObjective;
pub use recipe::pretrain_simmim;
pub use visualize::{reconstruction_grid, visualize_run, visualize_run_dir};
