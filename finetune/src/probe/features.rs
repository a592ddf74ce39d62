//! Frozen features: the pooled (mean over tokens, after the final norm) features of a backbone
//! over a whole loader, for k-NN and linear-probe evaluation.
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use mimlab_engine::data::DataLoader;
use mimlab_engine::log::Progress;
use mimlab_models::swin_v2::SwinV2;

/// `n x dim` features (row-major) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSet {
    /// Row-major `[n, dim]`.
    pub features: Vec<f32>,
    /// Feature width.
    pub dim: usize,
    /// Class id of each row.
    pub labels: Vec<u32>,
}

impl FeatureSet {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> FeatureSet {
        FeatureSet {
            features: idx.iter().flat_map(|&i| self.row(i).to_vec()).collect(),
            dim: self.dim,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Eval-mode pooled features of every batch of `loader` (epoch 0, in loader order), on `device`.
/// The loader's dataset must be labelled.
pub fn extract_features(
    model: &SwinV2,
    loader: &DataLoader,
    device: &Device,
    label: &str,
) -> Result<FeatureSet> {
    let n = loader.dataset().len();
    let progress = Progress::new(label, loader.batches_per_epoch() as u64, 0);
    let mut features = Vec::new();
    let mut labels = Vec::with_capacity(n);
    let mut dim = 0;
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let y = batch.labels().with_context(|| {
            format!("{}: the dataset has no labels", loader.dataset().describe())
        })?;
        labels.extend(y.to_vec1::<u32>()?);
        let x = batch.images.to_device(device)?;
        let f = model.forward_features(&x, None, false)?;
        let pooled = model.pre_logits(&f)?.to_dtype(DType::F32)?;
        dim = pooled.dim(1)?;
        features.extend(pooled.flatten_all()?.to_vec1::<f32>()?);
        progress.inc(1);
    }
    progress.finish(&format!("{} images", labels.len()));
    Ok(FeatureSet {
        features,
        dim,
        labels,
    })
}
