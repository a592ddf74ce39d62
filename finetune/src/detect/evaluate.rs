//! Evaluation stage of detection: a detector run over a COCO-indexed eval loader (eval mode), its
//! detections mapped back to original image pixels as COCO results, the losses, and the 12 COCO
//! numbers from [`crate::detect::coco_eval`]. Shared by the trainer's evaluation, the final
//! report of `mimlab finetune` and `mimlab eval`.
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use mimlab_engine::data::coco::CocoResult;
use mimlab_engine::data::{DataLoader, Dataset, DetectionDataset};

use crate::detect::coco_eval::{evaluate, CocoStats};
use crate::detect::fcos_loss::scalar;
use crate::detect::model::FcosDetector;
use crate::detect::objective::batch_boxes;
use crate::detect::postprocess::{Detection, ImageMeta};

/// What one pass over the eval split gives.
#[derive(Debug, Clone)]
pub struct DetEval {
    /// The 12 COCO numbers and per-category AP.
    pub stats: CocoStats,
    /// Every detection, in original pixels, COCO results format.
    pub results: Vec<CocoResult>,
    /// Mean total, classification, box and centerness loss per image.
    pub losses: [f64; 4],
}

impl DetEval {
    /// The trainer's eval rows: `AP`, `AP50`, ... (the 12 COCO names, -1 where undefined) and
    /// the losses.
    pub fn rows(&self) -> Vec<(String, f64)> {
        let mut rows: Vec<(String, f64)> = crate::detect::coco_eval::STAT_NAMES
            .iter()
            .zip(self.stats.stats)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for (k, v) in ["loss", "loss_cls", "loss_bbox", "loss_centerness"]
            .iter()
            .zip(self.losses)
        {
            rows.push((k.to_string(), v));
        }
        rows
    }
}

impl DetEval {
    /// The 12 numbers on two lines and the per-class AP, for the terminal.
    pub fn summary(&self) -> String {
        use crate::detect::coco_eval::STAT_NAMES;
        let mut out = String::new();
        for half in [0..6, 6..12] {
            let line: Vec<String> = half
                .map(|i| format!("{} {:.4}", STAT_NAMES[i], self.stats.stats[i]))
                .collect();
            out.push_str(&line.join("  "));
            out.push('\n');
        }
        for c in &self.stats.per_class {
            out.push_str(&format!("  AP {:<16} {:.4}\n", c.name, c.ap));
        }
        out
    }
}

/// The detections of the `model` on every batch of `loader` over `ds` (its eval split), in
/// original pixels, with the mean losses; then COCO evaluation against `ds`'s ground truth.
pub fn evaluate_detector(
    model: &FcosDetector,
    loader: &DataLoader,
    ds: &DetectionDataset,
    device: &Device,
) -> Result<DetEval> {
    let cats = ds.categories().clone();
    let mut results = vec![];
    let mut sums = [0f64; 4];
    let mut n = 0usize;
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let x = batch.images.to_device(device)?;
        let (out, _) = model.forward(&x, false)?;
        let l = model.loss(&out, batch_boxes(&batch)?)?;
        let b = batch.valid_sizes.len();
        for (s, t) in sums
            .iter_mut()
            .zip([&l.total()?, &l.cls, &l.bbox, &l.centerness])
        {
            *s += scalar(t)? * b as f64;
        }
        n += b;
        let infos = batch
            .indices
            .iter()
            .map(|&i| {
                ds.image_info(i)
                    .with_context(|| format!("eval image {i}: no image info"))
            })
            .collect::<Result<Vec<_>>>()?;
        let metas: Vec<ImageMeta> = infos
            .iter()
            .zip(&batch.valid_sizes)
            .map(|(info, &valid_size)| ImageMeta {
                valid_size,
                scale: (info.scale[0] as f32, info.scale[1] as f32),
            })
            .collect();
        let dets = model.predict(&out, &metas)?;
        for (info, per_image) in infos.iter().zip(dets) {
            for d in per_image {
                results.push(to_coco(&d, info.image_id, cats.id_of(d.class))?);
            }
        }
    }
    ensure!(
        n > 0,
        "evaluation: {} gave no images",
        Dataset::describe(ds)
    );
    let stats = evaluate(&ds.ground_truth(), &results).context("COCO evaluation")?;
    Ok(DetEval {
        stats,
        results,
        losses: sums.map(|s| s / n as f64),
    })
}

/// One detection as a COCO result (`[x, y, w, h]`, the file's category id).
fn to_coco(d: &Detection, image_id: u64, category: Option<u64>) -> Result<CocoResult> {
    let category_id = category.with_context(|| format!("class {} has no category", d.class))?;
    let [x1, y1, x2, y2] = d.bbox_xyxy.map(f64::from);
    Ok(CocoResult {
        image_id,
        category_id,
        bbox: [x1, y1, x2 - x1, y2 - y1],
        score: f64::from(d.score),
    })
}
