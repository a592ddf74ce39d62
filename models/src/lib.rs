//! Swin-V2 backbone and its checkpoint layouts.
pub mod checkpoint;
pub mod swin_v2;
