//! Optimizer stage: AdamW with per-parameter weight decay / lr scale, the no-weight-decay rule,
//! global-norm gradient clipping and the per-step learning-rate schedules (architecture.md 3.5).
mod adamw;
mod clip;
mod fused;
mod groups;
mod schedule;

pub use adamw::{AdamW, ParamGroup};
pub use clip::{clip_grad_norm, grad_norm};
pub use groups::{no_weight_decay, param_groups, DEFAULT_NO_DECAY_KEYWORDS};
pub use schedule::{LrSchedule, ScheduleKind};
