//! Self-supervised objectives: SimMIM (masking, model, loss, trainer objective, pictures), feature
//! distillation (model, trainer objective, teacher-feature cache), the AvgDist masking analysis,
//! the recipes the `pretrain`, `distill`, `visualize` and `avgdist` commands call, and the
//! backbone of a run (`backbone`: which key prefix each objective keeps it under).
pub mod avgdist;
pub mod backbone;
pub mod distance;
pub mod distill;
pub mod distill_objective;
pub mod distill_recipe;
pub mod feature_cache;
pub mod mask;
pub mod objective;
pub mod simmim;
pub mod simmim_recipe;
pub mod visualize;

pub use avgdist::{
    avgdist_csv, avgdist_of_mask, avgdist_plot, avgdist_table, AvgDistRow, AvgDistTable,
};
pub use distill::{Distill, DistillConfig, Teacher};
pub use distill_objective::{DistillObjective, Targets};
pub use feature_cache::FeatureCache;
pub use mask::{MaskGenerator, MaskStrategy, SimMimConfig};
pub use objective::SimMimObjective;
pub use simmim::SimMim;
pub use visualize::{reconstruction_grid, visualize_run, visualize_run_dir};
