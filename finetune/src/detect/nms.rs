//! Non-maximum suppression (post-processing stage), per class ("batched" as mmcv's
//! `batched_nms`): boxes of different classes never suppress each other. IoU without the +1
//! pixel (mmcv `nms`, offset 0; candle-transformers' NMS adds 1). A box is suppressed by a
//! higher-scored kept box of its class when their IoU is strictly greater than the threshold
//! (mmcv's CPU kernel: `if (ovr > iou_threshold)`). Order: score descending, ties in input order
//! (a stable sort, so equal scores keep the order they came in).
use crate::detect::boxes::iou;

/// Indices of the boxes kept, by descending score (ties: input order). `boxes`, `scores` and
/// `classes` are parallel; NaN scores sort last.
pub fn batched_nms(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[u32],
    iou_thr: f32,
) -> Vec<usize> {
    debug_assert!(boxes.len() == scores.len() && scores.len() == classes.len());
    let n = boxes.len().min(scores.len()).min(classes.len());
    let mut order: Vec<usize> = (0..n).collect();
    // stable: equal scores keep their input order
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or_else(|| scores[a].is_nan().cmp(&scores[b].is_nan()))
    });
    let mut keep: Vec<usize> = Vec::new();
    for &i in &order {
        let suppressed = keep
            .iter()
            .any(|&k| classes[k] == classes[i] && iou(&boxes[k], &boxes[i]) > iou_thr);
        if !suppressed {
            keep.push(i);
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_class_overlap_is_suppressed_other_class_is_not() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 11.0, 10.0], // IoU with 0: 90 / 110 = 0.818
            [1.0, 0.0, 11.0, 10.0], // same box, other class
            [50.0, 50.0, 60.0, 60.0],
        ];
        let scores = [0.9, 0.95, 0.5, 0.1];
        let classes = [0, 0, 1, 0];
        // 1 (0.95) keeps, suppresses 0; 2 is class 1; 3 does not overlap
        assert_eq!(batched_nms(&boxes, &scores, &classes, 0.5), vec![1, 2, 3]);
    }

    #[test]
    fn equal_scores_keep_input_order() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 0.0, 30.0, 10.0],
        ];
        let scores = [0.5, 0.5, 0.5];
        assert_eq!(batched_nms(&boxes, &scores, &[3, 3, 3], 0.5), vec![0, 2]);
        // the other way round, the other one survives
        let boxes = [boxes[2], boxes[1], boxes[0]];
        assert_eq!(batched_nms(&boxes, &scores, &[3, 3, 3], 0.5), vec![0, 1]);
    }

    #[test]
    fn threshold_boundary_keeps_an_iou_equal_to_it() {
        // [0,0,10,10] vs [0,0,10,5]: intersection 50, union 100, IoU exactly 0.5
        let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]];
        let scores = [0.9, 0.8];
        assert_eq!(batched_nms(&boxes, &scores, &[0, 0], 0.5), vec![0, 1]);
        assert_eq!(batched_nms(&boxes, &scores, &[0, 0], 0.49), vec![0]);
        // with the +1 pixel convention the IoU would be 66/121 = 0.545 and suppress at 0.5
        assert!((iou(&boxes[0], &boxes[1]) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn a_suppressed_box_does_not_suppress_others() {
        // 0 suppresses 1; 1 would suppress 2, but it is gone; 0 and 2 overlap little
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [4.0, 0.0, 14.0, 10.0],
            [8.0, 0.0, 18.0, 10.0],
        ];
        let scores = [0.9, 0.8, 0.7];
        // IoU(0,1) = 60/140 = 0.43, IoU(1,2) = 0.43, IoU(0,2) = 20/180 = 0.11
        assert_eq!(batched_nms(&boxes, &scores, &[0, 0, 0], 0.4), vec![0, 2]);
    }
}
