//! Data stage: datasets -> transforms -> batcher (background loader).
//!
//! Contract used by every objective: a [`Batch`] holds normalized NCHW images on the CPU, optional
//! labels, and the dataset indices of its samples (objectives derive per-sample randomness, such
//! as SimMIM masks, from (seed, epoch, index)).
use candle_core::Tensor;

/// One batch as the loader yields it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` f32, normalized (ImageNet mean/std by default), on the CPU.
    pub images: Tensor,
    /// `[B]` u32 class ids, when the dataset has labels.
    pub labels: Option<Tensor>,
    /// Dataset index of each sample, in batch order.
    pub indices: Vec<usize>,
    /// Epoch this batch belongs to (0-based).
    pub epoch: usize,
}
