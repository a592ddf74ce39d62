//! Downstream tasks on pretrained backbones, one folder each: [`classify`] (finetuning or training
//! from scratch, evaluation), [`detect`] (FCOS detection on FPN: model, losses, COCO box AP),
//! [`segment`] (semantic segmentation: mIoU as mmseg) and [`probe`] (frozen-feature k-NN and
//! linear probe). Shared by the
//! tasks: the `finetune:` config section ([`config`]), starting from a pretraining ([`init`]) and
//! layer-wise lr decay ([`layer_decay`]), and what the dense tasks' objectives share ([`dense`]).
pub mod classify;
pub mod config;
pub mod dense;
pub mod detect;
pub mod init;
pub mod layer_decay;
pub mod probe;
pub mod segment;
