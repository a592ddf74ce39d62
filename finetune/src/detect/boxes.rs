//! Box utilities (detection, model and post-processing stages) on `[x1, y1, x2, y2]` boxes in
//! pixels, COCO/mmdet convention (no +1 pixel: a box's width is `x2 - x1`): FCOS distance coding
//! (mmdet `bbox2distance` / `distance2bbox`, `norm_on_bbox` dividing by the stride), IoU and GIoU,
//! on plain slices and, where the loss needs a graph, on tensors.
use anyhow::{ensure, Result};
use candle_core::Tensor;

/// mmdet's `eps` of `bbox_overlaps` (GIoULoss): unions and enclosing areas are at least this.
pub const OVERLAP_EPS: f64 = 1e-6;

/// Width times height (0 for an empty box).
pub fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// Distances `[left, top, right, bottom]` from the point `(x, y)` to the sides of `b`, divided
/// by `norm` (the level's stride with `norm_on_bbox`, else 1). Negative where the point is
/// outside.
pub fn encode_ltrb(x: f32, y: f32, b: &[f32; 4], norm: f32) -> [f32; 4] {
    [
        (x - b[0]) / norm,
        (y - b[1]) / norm,
        (b[2] - x) / norm,
        (b[3] - y) / norm,
    ]
}

/// The box at distances `d` (in units of `norm`) from `(x, y)`: [`encode_ltrb`]'s inverse.
pub fn decode_ltrb(x: f32, y: f32, d: &[f32; 4], norm: f32) -> [f32; 4] {
    [
        x - d[0] * norm,
        y - d[1] * norm,
        x + d[2] * norm,
        y + d[3] * norm,
    ]
}

/// IoU of two boxes without the +1 pixel (pycocotools, mmcv `nms`); 0 when the union is empty.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Generalized IoU (Rezatofighi et al. 2019) as mmdet's `bbox_overlaps(mode='giou')`:
/// `iou - (enclose - union) / enclose`, union and enclosing area at least [`OVERLAP_EPS`].
pub fn giou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let eps = OVERLAP_EPS as f32;
    let union = (area(a) + area(b) - inter).max(eps);
    let ew = (a[2].max(b[2]) - a[0].min(b[0])).max(0.0);
    let eh = (a[3].max(b[3]) - a[1].min(b[1])).max(0.0);
    let enclose = (ew * eh).max(eps);
    inter / union - (enclose - union) / enclose
}

/// Element-wise GIoU of boxes that share their reference point, given as distances `[P, 4]`
/// (`l, t, r, b` >= 0, any common unit): the boxes `(-l, -t, r, b)`. IoU and GIoU do not change
/// when both boxes move or scale together, so this equals mmdet's GIoU of the boxes decoded at
/// the point (FCOS decodes the stride-normalized distances at the pixel point, as here).
/// Differentiable in `pred`; `[P]`.
pub fn giou_ltrb(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    ensure!(
        pred.dims() == target.dims() && pred.rank() == 2 && pred.dim(1)? == 4,
        "giou_ltrb: pred {:?} vs target {:?}, expected [P, 4] both",
        pred.dims(),
        target.dims()
    );
    let col = |t: &Tensor, i: usize| t.narrow(1, i, 1).and_then(|c| c.squeeze(1));
    let (pl, pt, pr, pb) = (col(pred, 0)?, col(pred, 1)?, col(pred, 2)?, col(pred, 3)?);
    let (tl, tt, tr, tb) = (
        col(target, 0)?,
        col(target, 1)?,
        col(target, 2)?,
        col(target, 3)?,
    );
    let pa = ((&pl + &pr)? * (&pt + &pb)?)?;
    let ta = ((&tl + &tr)? * (&tt + &tb)?)?;
    // both boxes contain the origin: the overlap is min(l) + min(r) wide, never negative
    let iw = (pl.minimum(&tl)? + pr.minimum(&tr)?)?;
    let ih = (pt.minimum(&tt)? + pb.minimum(&tb)?)?;
    let inter = (iw * ih)?;
    let union = ((pa + ta)? - &inter)?.maximum(OVERLAP_EPS)?;
    let ew = (pl.maximum(&tl)? + pr.maximum(&tr)?)?;
    let eh = (pt.maximum(&tt)? + pb.maximum(&tb)?)?;
    let enclose = (ew * eh)?.maximum(OVERLAP_EPS)?;
    let iou = (inter / &union)?;
    Ok((iou - ((&enclose - &union)? / &enclose)?)?)
}

/// FCOS centerness of distances `[P, 4]` (l, t, r, b), mmdet `FCOSHead.centerness_target`:
/// `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`; `[P]`.
pub fn centerness(ltrb: &[[f32; 4]]) -> Vec<f32> {
    ltrb.iter()
        .map(|d| {
            let lr = d[0].min(d[2]) / d[0].max(d[2]);
            let tb = d[1].min(d[3]) / d[1].max(d[3]);
            (lr * tb).sqrt()
        })
        .collect()
}

/// `[P, 4]` f32 tensor of `rows` on `like`'s device and dtype.
pub fn tensor4(rows: &[[f32; 4]], like: &Tensor) -> Result<Tensor> {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), 4), like.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn distance_coding_round_trips_and_normalizes_by_stride() {
        let b = [10.0f32, 20.0, 50.0, 36.0];
        for (x, y, s) in [
            (12.0f32, 28.0f32, 8.0f32),
            (30.0, 30.0, 16.0),
            (0.0, 0.0, 1.0),
        ] {
            let d = encode_ltrb(x, y, &b, s);
            let back = decode_ltrb(x, y, &d, s);
            for k in 0..4 {
                assert!((back[k] - b[k]).abs() < 1e-5, "{back:?} vs {b:?}");
            }
            // norm_on_bbox: the pixel distances divided by the stride
            let px = encode_ltrb(x, y, &b, 1.0);
            for k in 0..4 {
                assert!((px[k] / s - d[k]).abs() < 1e-6);
            }
        }
        // (12, 28) with stride 8: l = 2/8, t = 8/8, r = 38/8, b = 8/8
        assert_eq!(encode_ltrb(12.0, 28.0, &b, 8.0), [0.25, 1.0, 4.75, 1.0]);
    }

    #[test]
    fn iou_and_giou_hand_values() {
        let a = [0.0f32, 0.0, 10.0, 10.0];
        let b = [5.0f32, 0.0, 15.0, 10.0];
        // overlap 5x10 = 50, union 150
        assert!((iou(&a, &b) - 1.0 / 3.0).abs() < 1e-6);
        // enclosing 15x10 = union: GIoU = IoU
        assert!((giou(&a, &b) - 1.0 / 3.0).abs() < 1e-6);
        // disjoint: IoU 0, GIoU = -(enclose - union) / enclose = -(200 - 200 + ...)
        let c = [20.0f32, 0.0, 30.0, 10.0];
        assert_eq!(iou(&a, &c), 0.0);
        // enclose 30x10 = 300, union 200: -100/300
        assert!((giou(&a, &c) + 1.0 / 3.0).abs() < 1e-6);
        // touching edges (no +1 pixel): IoU 0
        assert_eq!(iou(&a, &[10.0, 0.0, 20.0, 10.0]), 0.0);
        assert_eq!(iou(&a, &a), 1.0);
        // empty boxes: 0, not NaN
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
    }

    #[test]
    fn giou_of_distances_equals_giou_of_decoded_boxes() -> Result<()> {
        let dev = Device::Cpu;
        let pred = [
            [1.0f32, 2.0, 3.0, 0.5],
            [0.2, 0.1, 0.3, 4.0],
            [2.0, 2.0, 2.0, 2.0],
        ];
        let tgt = [
            [1.5f32, 1.0, 2.0, 1.0],
            [3.0, 3.0, 0.1, 0.2],
            [2.0, 2.0, 2.0, 2.0],
        ];
        let g = giou_ltrb(&tensor4(&pred, &Tensor::zeros(1, DType::F32, &dev)?)?, &{
            tensor4(&tgt, &Tensor::zeros(1, DType::F32, &dev)?)?
        })?
        .to_vec1::<f32>()?;
        // decoded at a pixel point with stride 8 (mmdet decodes stride units at pixel points)
        let (x, y) = (100.0f32, 36.0f32);
        for i in 0..3 {
            let want = giou(
                &decode_ltrb(x, y, &pred[i], 8.0),
                &decode_ltrb(x, y, &tgt[i], 8.0),
            );
            assert!((g[i] - want).abs() < 1e-5, "{i}: {} vs {want}", g[i]);
        }
        assert!((g[2] - 1.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn centerness_hand_values() {
        let c = centerness(&[
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 2.0, 3.0, 2.0],
            [0.5, 1.0, 2.0, 4.0],
        ]);
        assert!((c[0] - 1.0).abs() < 1e-7);
        assert!((c[1] - (1.0f32 / 3.0).sqrt()).abs() < 1e-7);
        assert!((c[2] - (0.25f32 * 0.25).sqrt()).abs() < 1e-7);
    }
}
