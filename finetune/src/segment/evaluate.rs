//! Evaluation stage of segmentation: a segmentor over the eval loader (eval mode), each image's
//! logits cut to its valid region and upsampled bilinearly to its original label size (mmseg's
//! `postprocess_result`), argmax, and the dataset-wide areas of [`crate::segment::miou`] against
//! the original label maps; plus the mean loss on the served (resized) maps. Shared by the
//! trainer's evaluation, the final report of `mimlab finetune` and `mimlab eval`.
use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};
use mimlab_engine::data::{Batch, BatchTargets, DataLoader, Dataset, SegmentationDataset};
use mimlab_models::layers::resize_bilinear;

use crate::segment::miou::{AreaTotals, MiouConfig, MiouStats};
use crate::segment::model::Segmentor;

/// What one pass over the eval split gives.
#[derive(Debug, Clone)]
pub struct SegEval {
    /// mIoU, aAcc, mAcc, per-class IoU and Acc.
    pub stats: MiouStats,
    /// The summed areas behind them.
    pub areas: AreaTotals,
    /// Mean decode-head loss per image (on the served maps).
    pub loss: f64,
    /// Class names.
    pub classes: Vec<String>,
}

impl SegEval {
    /// The trainer's eval rows: `mIoU`, `aAcc`, `mAcc` (-1 where undefined) and `loss`.
    pub fn rows(&self) -> Vec<(String, f64)> {
        let v = |x: Option<f64>| x.unwrap_or(-1.0);
        vec![
            ("mIoU".into(), v(self.stats.miou)),
            ("aAcc".into(), v(self.stats.aacc)),
            ("mAcc".into(), v(self.stats.macc)),
            ("loss".into(), self.loss),
        ]
    }

    /// The three numbers and mmseg's per-class table (percent, 2 decimals), for the terminal.
    pub fn summary(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("nan".to_string(), |v| format!("{:.2}", 100.0 * v));
        let mut out = format!(
            "mIoU {}  aAcc {}  mAcc {}  (percent)\n",
            pct(self.stats.miou),
            pct(self.stats.aacc),
            pct(self.stats.macc)
        );
        let w = self
            .classes
            .iter()
            .map(|c| c.len())
            .max()
            .unwrap_or(5)
            .max(5);
        out.push_str(&format!("  {:<w$}  {:>6}  {:>6}\n", "Class", "IoU", "Acc"));
        for (i, c) in self.classes.iter().enumerate() {
            out.push_str(&format!(
                "  {c:<w$}  {:>6}  {:>6}\n",
                pct(self.stats.iou[i]),
                pct(self.stats.acc[i])
            ));
        }
        out
    }

    /// `{"mIoU", "aAcc", "mAcc", "IoU", "Acc", "classes", "loss"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut j = self.stats.to_json();
        j["classes"] = serde_json::json!(self.classes);
        j["loss"] = serde_json::json!(self.loss);
        j
    }
}

/// The `[B, H, W]` class maps of a segmentation batch, or an error naming what it has instead.
pub fn batch_masks(batch: &Batch) -> Result<&Tensor> {
    match &batch.targets {
        BatchTargets::Masks(m) | BatchTargets::BoxesAndMasks { masks: m, .. } => Ok(m),
        BatchTargets::None => bail!("segmentation needs class maps; the dataset is unlabelled"),
        BatchTargets::Classes(_) => {
            bail!("segmentation needs class maps; the dataset has class labels")
        }
        BatchTargets::Boxes(_) => bail!("segmentation needs class maps; the dataset has boxes"),
    }
}

/// The predicted class map of each image of `batch` at its original label size (`sizes[i]`,
/// height and width), from logits at the batch's input size.
pub fn predict_batch(
    model: &Segmentor,
    batch: &Batch,
    sizes: &[(usize, usize)],
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let x = batch.images.to_device(device)?;
    let logits = model.infer(&x)?;
    predict_from_logits(&logits, &batch.valid_sizes, sizes)
}

/// Argmax maps from `logits [B, C, H, W]`: image `i` cut to `valid[i]`, upsampled to `sizes[i]`.
pub fn predict_from_logits(
    logits: &Tensor,
    valid: &[(usize, usize)],
    sizes: &[(usize, usize)],
) -> Result<Vec<Vec<u32>>> {
    ensure!(valid.len() == sizes.len(), "one size per image");
    let mut out = vec![];
    for (i, (&(vh, vw), &(oh, ow))) in valid.iter().zip(sizes).enumerate() {
        let l = logits.narrow(0, i, 1)?.narrow(2, 0, vh)?.narrow(3, 0, vw)?;
        let l = resize_bilinear(&l.contiguous()?, oh, ow)?;
        out.push(l.argmax(1)?.flatten_all()?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// mIoU of `model` over every batch of `loader` (the eval split `ds`), with the mean loss.
pub fn evaluate_segmentor(
    model: &Segmentor,
    loader: &DataLoader,
    ds: &SegmentationDataset,
    device: &Device,
) -> Result<SegEval> {
    let n_cls = model.num_classes();
    let cfg = MiouConfig::new(n_cls);
    let mut areas = AreaTotals::new(n_cls);
    let (mut loss_sum, mut n) = (0f64, 0usize);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let x = batch.images.to_device(device)?;
        let (out, _) = model.forward(&x, false)?;
        let masks = batch_masks(&batch)?.to_device(device)?;
        let l = model.loss(&out, &masks)?.total.to_scalar::<f32>()?;
        let b = batch.indices.len();
        loss_sum += l as f64 * b as f64;
        n += b;
        let labels = batch
            .indices
            .iter()
            .map(|&i| ds.label(i))
            .collect::<Result<Vec<_>>>()?;
        let sizes: Vec<(usize, usize)> = labels.iter().map(|m| (m.height(), m.width())).collect();
        let logits = model.infer_from(&x, &out)?;
        let preds = predict_from_logits(&logits, &batch.valid_sizes, &sizes)?;
        for ((p, m), &i) in preds.iter().zip(&labels).zip(&batch.indices) {
            if let Some(bad) = areas.add(&cfg, p, &m.to_u32())? {
                bail!(
                    "{}: value {} ({:?}, {} pixels) outside the {n_cls} classes",
                    ds.image_path(i)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    bad.value,
                    bad.side,
                    bad.pixels
                );
            }
        }
    }
    ensure!(
        n > 0,
        "evaluation: {} gave no images",
        Dataset::describe(ds)
    );
    Ok(SegEval {
        stats: areas.summary(),
        areas,
        loss: loss_sum / n as f64,
        classes: ds.classes().to_vec(),
    })
}
