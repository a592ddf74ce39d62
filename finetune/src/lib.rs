//! Downstream tasks on pretrained backbones: image classification (finetuning and training from
//! scratch) and the frozen-feature evaluations (k-NN, linear probe), with the recipes the
//! `finetune`, `eval` and `probe` commands call (`classify`, `probe`, `init`).
pub mod classify;
pub mod config;
pub mod features;
pub mod init;
pub mod knn;
pub mod layer_decay;
pub mod linear_probe;
pub mod loss;
pub mod metrics;
pub mod mixup;
pub mod objective;
pub mod probe;
