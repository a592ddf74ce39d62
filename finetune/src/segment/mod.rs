//! Semantic segmentation (dense-tasks.md 1.4 and 2.2): library parts, one concept per file, in
//! pipeline order.
//!
//! - [`config`]: the `segment:` section (decode head kind and widths, auxiliary head, test mode);
//! - [`conv`]: mmseg's ConvModule and `conv_seg` with their inits;
//! - [`upernet`]: mmseg's UPerNet decode head (pyramid pooling, FPN fuse), GroupNorm for SyncBN;
//! - [`segformer_head`]: the light baseline head (mmseg's `SegformerHead`);
//! - [`fcn_head`]: the auxiliary FCN head;
//! - [`loss`]: per-pixel cross-entropy with an ignore index and class weights (PyTorch's);
//! - [`model`]: the segmentor (backbone + heads; loss at label size; whole and slide inference);
//! - [`miou`]: mIoU, aAcc, mAcc and per-class IoU/Acc exactly as mmsegmentation's `IoUMetric`,
//!   over label-map PNG folders (`mimlab metrics miou`);
//! - [`evaluate`]: predictions at original label size over the eval split, mIoU;
//! - [`objective`]: the trainer objective (loss of a class-map batch, MoE aux loss, layer decay);
//! - [`picture`]: image, ground truth and prediction in palette colours with a legend;
//! - [`recipe`]: `mimlab finetune` / `mimlab eval` for segmentation, reports in `RUN/eval/`.
pub mod config;
pub mod conv;
pub mod evaluate;
pub mod fcn_head;
pub mod loss;
pub mod miou;
pub mod model;
pub mod objective;
pub mod picture;
pub mod recipe;
pub mod segformer_head;
pub mod upernet;

pub use config::{AuxHeadConfig, HeadKind, SegmentSection};
pub use model::Segmentor;
pub use objective::SegmentObjective;
