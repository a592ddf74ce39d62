//! Image classification (architecture.md 7.1): finetuning or training from scratch with a linear
//! head on pooled features, and the evaluation of its weights.
//!
//! - [`objective`]: the trainer [`mimlab_engine::trainer::Objective`] and the evaluation loop;
//! - [`loss`], [`mixup`]: soft-target cross-entropy, label smoothing, Mixup/CutMix (timm);
//! - [`metrics`]: top-1/top-5, per-class accuracy, confusion matrix;
//! - [`recipe`]: the `mimlab finetune` and `mimlab eval` runs.
pub mod loss;
pub mod metrics;
pub mod mixup;
pub mod objective;
pub mod recipe;

pub use metrics::{ClassificationReport, Confusion};
pub use objective::{evaluate_classifier, ClassifyObjective};
pub use recipe::{class_names, eval_loader, evaluate_weights, finetune_classifier, write_report};
