//! Logs stage of detection: held-out images with their ground-truth boxes beside the detector's
//! boxes (class name and score on each), as one PNG grid for the run folder and TensorBoard.
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mimlab_engine::data::{Dataset, DetectionDataset, Target};
use mimlab_engine::picture::boxes::{draw_boxes, DrawBox};
use mimlab_engine::picture::font;
use mimlab_engine::picture::{from_chw, grid, RgbImage};
use mimlab_engine::rng::rng_for;

use crate::dense::PictureSpec;
use crate::detect::model::FcosDetector;
use crate::detect::postprocess::ImageMeta;

/// Predictions below this score are not drawn.
pub const PICTURE_SCORE: f32 = 0.3;

/// One row per image of the first `spec.images` of `ds` (its eval transform): the ground truth
/// and the detections with score at least [`PICTURE_SCORE`], drawn at least 256 px tall.
pub fn detection_picture(
    model: &FcosDetector,
    ds: &DetectionDataset,
    spec: &PictureSpec,
    device: &Device,
) -> Result<RgbImage> {
    let names = ds.categories().names().to_vec();
    let name = |c: u32| {
        names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| c.to_string())
    };
    let mut rows = vec![];
    let mut side = 0;
    let n = spec.images.min(ds.len());
    let mut panels = vec![];
    for i in 0..n {
        // the eval transform draws nothing; the rng only satisfies the trait
        let s = ds.get(i, &mut rng_for(0, &[i as u64]))?;
        let c = s.image.len() / (s.height * s.width);
        let x = Tensor::from_slice(&s.image, (1, c, s.height, s.width), device)?;
        let mult = model.backbone().config().size_multiple().max(1);
        let (ph, pw) = (
            s.height.div_ceil(mult) * mult,
            s.width.div_ceil(mult) * mult,
        );
        let x = x
            .pad_with_zeros(2, 0, ph - s.height)?
            .pad_with_zeros(3, 0, pw - s.width)?;
        let (out, _) = model.forward(&x, false)?;
        let meta = ImageMeta {
            valid_size: (s.height, s.width),
            scale: (1.0, 1.0),
        };
        let dets = model
            .predict(&out, &[meta])?
            .pop()
            .context("one image in, one detection list out")?;
        let gt: Vec<DrawBox> = match &s.target {
            Target::Boxes(b) | Target::BoxesAndMask { boxes: b, .. } => b
                .iter()
                .map(|o| DrawBox {
                    xyxy: o.xyxy,
                    class: o.class,
                    label: if o.crowd {
                        format!("{} crowd", name(o.class))
                    } else {
                        name(o.class)
                    },
                })
                .collect(),
            _ => vec![],
        };
        let pred: Vec<DrawBox> = dets
            .iter()
            .filter(|d| d.score >= PICTURE_SCORE)
            .map(|d| DrawBox {
                xyxy: d.bbox_xyxy,
                class: d.class,
                label: format!("{} {:.2}", name(d.class), d.score),
            })
            .collect();
        let img = from_chw(&s.image, c, s.height, s.width, &spec.mean, &spec.std);
        side = side.max(s.height.max(s.width));
        panels.push((img, gt, pred));
    }
    // small images are drawn larger so that labels stay readable
    let up = (256 / side.max(1)).max(1) as u32;
    let tile = side as u32 * up;
    for (img, gt, pred) in panels {
        let mut row = vec![];
        for boxes in [gt, pred] {
            let mut canvas = RgbImage::new(tile, tile, [255, 255, 255]);
            canvas.blit(&img.upscale(up), 0, 0);
            let scaled: Vec<DrawBox> = boxes
                .into_iter()
                .map(|b| DrawBox {
                    xyxy: b.xyxy.map(|v| v * up as f32),
                    ..b
                })
                .collect();
            draw_boxes(&mut canvas, &scaled, 2, font::SMALL);
            row.push(canvas);
        }
        rows.push(row);
    }
    Ok(grid(
        &rows,
        4,
        &["ground truth", "detections (score >= 0.3)"],
    ))
}
