//! Object detection with FCOS on a Swin-V2 backbone (dense-tasks.md 1.1-1.3): library parts, one
//! concept per file, in pipeline order.
//!
//! - [`boxes`]: xyxy box utilities, FCOS distance coding, IoU/GIoU, centerness;
//! - [`fpn`]: the necks (mmdet FPN with P6/P7, ViTDet's simple feature pyramid);
//! - [`fcos_head`]: the FCOS head and its config;
//! - [`fcos_targets`]: mmdet's FCOS target assignment;
//! - [`fcos_loss`]: focal, GIoU and centerness losses;
//! - [`nms`], [`postprocess`]: per-class NMS and inference decoding to [`Detection`]s;
//! - [`model`]: the detector (backbone + neck + head);
//! - [`coco_eval`]: COCO box AP/AR exactly as pycocotools;
//! - [`objective`]: the trainer objective (loss of a box batch, MoE aux loss, layer decay);
//! - [`evaluate`]: detections over the eval split mapped back to original pixels, COCO AP;
//! - [`picture`]: ground truth beside detections, PNG and TensorBoard;
//! - [`recipe`]: `mimlab finetune` / `mimlab eval` for detection, reports in `RUN/eval/`.
pub mod boxes;
pub mod coco_eval;
pub mod evaluate;
pub mod fcos_head;
pub mod fcos_loss;
pub mod fcos_targets;
pub mod fpn;
pub mod model;
pub mod nms;
pub mod objective;
pub mod picture;
pub mod postprocess;
pub mod recipe;

pub use fcos_head::{FcosHead, FcosHeadConfig, HeadOutput};
pub use fcos_loss::FcosLosses;
pub use fpn::{Neck, NeckConfig, NeckKind};
pub use model::{DetectorConfig, FcosDetector};
pub use objective::DetectObjective;
pub use postprocess::{Detection, ImageMeta};
