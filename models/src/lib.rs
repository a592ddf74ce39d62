//! Swin-V2 backbone and its checkpoint layouts.
