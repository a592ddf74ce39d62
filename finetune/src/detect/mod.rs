//! Object detection with FCOS on a Swin-V2 backbone (dense-tasks.md 1.1-1.3).
pub mod boxes;
pub mod fcos_head;
pub mod fcos_loss;
pub mod fcos_targets;
pub mod fpn;
pub mod nms;
pub mod postprocess;
