//! Semantic segmentation (dense-tasks.md 1.4 and 2.2): library parts, one concept per file, in
//! pipeline order.
//!
//! - [`upernet`]: mmseg's UPerNet decode head (pyramid pooling, FPN fuse) and its auxiliary FCN
//!   head, GroupNorm for SyncBN;
//! - [`loss`]: per-pixel cross-entropy with an ignore index and class weights (PyTorch's);
//! - [`miou`]: mIoU, aAcc, mAcc and per-class IoU/Acc exactly as mmsegmentation's `IoUMetric`,
//!   over label-map PNG folders (`mimlab metrics miou`).
pub mod loss;
pub mod miou;
pub mod upernet;
