//! FCOS inference decoding (post-processing stage), mmdet 3.x
//! `BaseDenseHead._predict_by_feat_single` + `_bbox_post_process`
//! (mmdetection:mmdet/models/dense_heads/base_dense_head.py), per image:
//!
//! 1. per level: classification scores `σ(cls)` of every (point, class) pair; pairs above
//!    `score_thr` (strictly), the best `nms_pre` of them by that score (mmdet
//!    `filter_scores_and_topk`: the threshold and top-k use the classification score alone);
//! 2. boxes decoded at the points with the level's stride (`norm_on_bbox`: distances in strides),
//!    clipped to the image's valid size (`max_shape=img_shape`), then divided by the resize
//!    factor (`rescale=True`: back to the original image);
//! 3. score = classification score x `σ(centerness)` (`score_factors`; no square root: mmdet keeps
//!    a TODO about the paper's sqrt, detectron2 and the official FCOS take it);
//! 4. boxes not wider and taller than `min_bbox_size` dropped, per-class NMS
//!    ([`crate::detect::nms`]) on the product score, the first `max_per_img` kept.
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use crate::detect::boxes::decode_ltrb;
use crate::detect::fcos_head::{FcosHeadConfig, HeadOutput};
use crate::detect::fcos_targets::point;
use crate::detect::nms::batched_nms;

/// One detection in original-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`.
    pub bbox_xyxy: [f32; 4],
    /// Classification score times centerness.
    pub score: f32,
    /// Class id.
    pub class: u32,
}

/// Where an image sits in the batch tensor and how it was resized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageMeta {
    /// Valid `(height, width)` in the batch (the rest is padding): boxes are clipped to it.
    pub valid_size: (usize, usize),
    /// `(sx, sy)`: batch pixels per original pixel (mmdet `scale_factor`); `(1, 1)` = none.
    pub scale: (f32, f32),
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The detections of every image of `out` (module header), best first.
pub fn decode(
    out: &HeadOutput,
    metas: &[ImageMeta],
    cfg: &FcosHeadConfig,
) -> Result<Vec<Vec<Detection>>> {
    ensure!(
        out.cls.len() == cfg.strides.len(),
        "decode: {} levels for {} strides",
        out.cls.len(),
        cfg.strides.len()
    );
    let b = out.cls.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    ensure!(
        metas.len() == b,
        "decode: {} image metas for a batch of {b}",
        metas.len()
    );
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let levels = out
        .cls
        .iter()
        .zip(&out.reg)
        .zip(&out.ctr)
        .map(|((c, r), z)| Ok((host(c)?, host(r)?, host(z)?, c.dims4()?)))
        .collect::<Result<Vec<_>>>()?;
    let mut all = Vec::with_capacity(b);
    for (img, meta) in metas.iter().enumerate() {
        let (vh, vw) = (meta.valid_size.0 as f32, meta.valid_size.1 as f32);
        let (mut boxes, mut scores, mut classes) = (vec![], vec![], vec![]);
        for (lvl, (cls, reg, ctr, (_, k, h, w))) in levels.iter().enumerate() {
            let (k, hw) = (*k, h * w);
            let s = cfg.strides[lvl];
            // (score, point, class) above the threshold, in mmdet's (point, class) order
            let mut cand: Vec<(f32, usize, usize)> = vec![];
            for p in 0..hw {
                for c in 0..k {
                    let v = sigmoid(cls[(img * k + c) * hw + p]);
                    if v > cfg.score_thr {
                        cand.push((v, p, c));
                    }
                }
            }
            // stable: equal scores keep the (point, class) order
            cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
            cand.truncate(cfg.nms_pre);
            for (v, p, c) in cand {
                let (x, y) = point(p % w, p / w, s);
                let d = std::array::from_fn(|q| reg[(img * 4 + q) * hw + p]);
                let bx = decode_ltrb(x, y, &d, s as f32);
                let clipped = [
                    bx[0].clamp(0.0, vw) / meta.scale.0,
                    bx[1].clamp(0.0, vh) / meta.scale.1,
                    bx[2].clamp(0.0, vw) / meta.scale.0,
                    bx[3].clamp(0.0, vh) / meta.scale.1,
                ];
                boxes.push(clipped);
                scores.push(v * sigmoid(ctr[img * hw + p]));
                classes.push(c as u32);
            }
        }
        let valid: Vec<usize> = (0..boxes.len())
            .filter(|&i| {
                let b = boxes[i];
                b[2] - b[0] > cfg.min_bbox_size && b[3] - b[1] > cfg.min_bbox_size
            })
            .collect();
        let pick = |v: &[[f32; 4]]| valid.iter().map(|&i| v[i]).collect::<Vec<_>>();
        let (boxes, scores, classes) = (
            pick(&boxes),
            valid.iter().map(|&i| scores[i]).collect::<Vec<_>>(),
            valid.iter().map(|&i| classes[i]).collect::<Vec<_>>(),
        );
        let keep = batched_nms(&boxes, &scores, &classes, cfg.nms_iou);
        all.push(
            keep.into_iter()
                .take(cfg.max_per_img)
                .map(|i| Detection {
                    bbox_xyxy: boxes[i],
                    score: scores[i],
                    class: classes[i],
                })
                .collect(),
        );
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::fcos_targets::INF;
    use candle_core::Device;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    /// One image, one level of stride 8 on a 2x2 map, 2 classes; hand-placed predictions.
    #[test]
    fn decode_thresholds_ranks_by_centerness_nms_and_rescales() -> Result<()> {
        let cfg = FcosHeadConfig {
            num_classes: 2,
            strides: vec![8],
            regress_ranges: vec![[-1.0, INF]],
            ..FcosHeadConfig::default()
        };
        let dev = Device::Cpu;
        let lo = logit(0.01);
        // cls [1, 2, 2, 2]: class 0 at point 0 (0.9) and point 1 (0.8); class 1 at point 3
        // (0.6); the rest below the 0.05 threshold
        let cls = [
            logit(0.9),
            logit(0.8),
            lo,
            lo, // class 0, points 0..3
            lo,
            lo,
            lo,
            logit(0.6), // class 1
        ];
        // points: (4, 4), (12, 4), (4, 12), (12, 12); every box 1 stride each way
        let reg = vec![1f32; 16];
        // centerness: point 0 0.5, point 1 1.0 (so point 1 outranks point 0), point 3 0.5
        let ctr = [0.0, 20.0, 0.0, 0.0];
        let out = HeadOutput {
            cls: vec![Tensor::from_vec(cls.to_vec(), (1, 2, 2, 2), &dev)?],
            reg: vec![Tensor::from_vec(reg, (1, 4, 2, 2), &dev)?],
            ctr: vec![Tensor::from_vec(ctr.to_vec(), (1, 1, 2, 2), &dev)?],
        };
        let meta = ImageMeta {
            valid_size: (16, 16),
            scale: (2.0, 0.5),
        };
        let d = &decode(&out, &[meta], &cfg)?[0];
        // point 1: [4, -4, 20, 12] clipped to [4, 0, 16, 12], rescaled /(2, 0.5): [2, 0, 8, 24]
        // point 0: [-4, -4, 12, 12] -> [0, 0, 12, 12]; IoU with point 1's clipped box
        // [4,0,16,12]: 8*12 / (144 + 144 - 96) = 0.5, not above 0.5: kept
        // point 3: [4, 4, 20, 20] -> [4, 4, 16, 16], class 1
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0].class, 0);
        assert!((d[0].score - 0.8).abs() < 1e-6);
        assert_eq!(d[0].bbox_xyxy, [2.0, 0.0, 8.0, 24.0]);
        assert!((d[1].score - 0.45).abs() < 1e-6);
        assert_eq!(d[1].bbox_xyxy, [0.0, 0.0, 6.0, 24.0]);
        assert_eq!(d[2].class, 1);
        assert!((d[2].score - 0.3).abs() < 1e-6);
        assert_eq!(d[2].bbox_xyxy, [2.0, 8.0, 8.0, 32.0]);

        // a stricter NMS suppresses point 0 by point 1; max_per_img and nms_pre cut
        let strict = FcosHeadConfig {
            nms_iou: 0.4,
            ..cfg.clone()
        };
        let d = &decode(&out, &[meta], &strict)?[0];
        assert_eq!(d.iter().map(|x| x.score).collect::<Vec<_>>().len(), 2);
        let one = FcosHeadConfig {
            max_per_img: 1,
            ..cfg.clone()
        };
        assert_eq!(decode(&out, &[meta], &one)?[0].len(), 1);
        // nms_pre 1 keeps the best classification score (0.9 at point 0), not the best product
        let pre = FcosHeadConfig {
            nms_pre: 1,
            ..cfg.clone()
        };
        let d = &decode(&out, &[meta], &pre)?[0];
        assert_eq!(d.len(), 1);
        assert!((d[0].score - 0.45).abs() < 1e-6);
        Ok(())
    }
}
