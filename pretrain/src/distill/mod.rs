//! Feature distillation (Wei et al. 2022; architecture.md 5): a student regresses a frozen
//! teacher's whitened features.
//!
//! - [`model`]: the `distill:` config section, the teacher, the student + projector and the loss;
//! - [`objective`]: the trainer [`mimlab_engine::trainer::Objective`];
//! - [`feature_cache`]: teacher features computed once per image; [`recipe`]: the `mimlab distill` run.
pub mod feature_cache;
pub mod model;
pub mod objective;
pub mod recipe;

pub use feature_cache::FeatureCache;
pub use model::{
    resample_nchw, resample_weights, smooth_l1, student_map, whiten, Distill, DistillConfig,
    Teacher,
};
pub use objective::{DistillObjective, Targets};
pub use recipe::distill;
