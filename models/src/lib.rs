//! Swin-V2 backbone (optionally with mixture-of-experts MLPs) and its checkpoint layouts.
pub mod checkpoint;
pub mod layers;
pub mod moe;
pub mod ops;
pub mod pretrained;
pub mod swin_v2;
