//! Frozen-feature evaluations: pooled features of a frozen backbone, then a weighted k-NN and a
//! linear probe, fit on the same class-balanced label fractions as low-label finetuning.
//!
//! - [`features`]: pooled features over a loader; [`knn`]: DINO's weighted k-NN;
//! - [`mod@linear_probe`]: standardized features + linear softmax head; [`recipe`]: `mimlab probe`.
pub mod features;
pub mod knn;
pub mod linear_probe;
pub mod recipe;

pub use features::{extract_features, FeatureSet};
pub use knn::{knn_evaluate, knn_scores};
pub use linear_probe::{linear_probe, ProbeConfig};
pub use recipe::{probe_backbone, ProbeSetup};
