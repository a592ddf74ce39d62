//! Self-supervised objectives, one folder each: [`simmim`] (masking, model, loss, trainer
//! objective, pictures, the `pretrain` and `visualize` recipes), [`distill`] (feature
//! distillation: teacher, student, trainer objective, feature cache, the `distill` recipe) and
//! [`avgdist`] (the masking analysis); [`backbone`] says which key prefix each objective keeps its
//! backbone under; [`convert`] writes any weights in one key layout.
pub mod avgdist;
pub mod backbone;
pub mod convert;
pub mod distill;
pub mod simmim;

pub use avgdist::{
    avgdist_csv, avgdist_heatmap, avgdist_of_mask, avgdist_plot, avgdist_table, paper_band,
    AvgDistRow, AvgDistTable,
};
pub use distill::{Distill, DistillConfig, DistillObjective, FeatureCache, Targets, Teacher};
pub use simmim::{
    reconstruction_grid, visualize_run, visualize_run_dir, MaskGenerator, MaskStrategy, SimMim,
    SimMimConfig, SimMimObjective,
};
