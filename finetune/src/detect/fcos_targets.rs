//! FCOS target assignment (objective stage), exactly as mmdet 3.x `FCOSHead.get_targets` /
//! `_get_targets_single` (mmdetection:mmdet/models/dense_heads/fcos_head.py), on the CPU:
//!
//! - Points: mmdet 3.x `MlvlPointGenerator(strides)` with its default `offset=0.5`
//!   (mmdet/models/task_modules/prior_generators/point_generator.py): column `j`, row `i` of a
//!   level of stride `s` is the point `((j + 0.5) s, (i + 0.5) s)`. (mmdet 2.x's FCOS added
//!   `stride // 2` to `k * stride`: the same points for the even strides used here.)
//! - A point is a candidate for a box when it is strictly inside it (`min(l, t, r, b) > 0`), or
//!   with center sampling strictly inside the box's centre region `centre +- radius * stride`
//!   clipped to the box; and when its largest distance `max(l, t, r, b)` lies in the level's
//!   regression range, both ends included (`>= lo & <= hi`).
//! - Among candidate boxes the smallest area wins; equal areas go to the first box
//!   (`areas.min(dim=1)`). Points without a box are background (label = `num_classes`).
//! - Regression targets are the pixel distances to the assigned box divided by the level's
//!   stride (`norm_on_bbox=True`).
//!
//! Crowd boxes (`ObjectBox::crowd`, COCO `iscrowd`) are left out before assignment: mmdet 3.x
//! moves them to `ignored_instances` (`PackDetInputs`, from `gt_ignore_flags`) and FCOS never
//! sees them, so they create no positives and the points on them are ordinary background.
//!
//! Layout: points are flattened level by level, then image by image, then row-major, the order in
//! which [`crate::detect::fcos_loss`] flattens the head's maps (mmdet's `flatten_*` order).
use anyhow::{ensure, Result};
use mimlab_engine::data::ObjectBox;

use crate::detect::boxes::encode_ltrb;

/// mmdet's `INF` (1e8): the open end of the last regression range.
pub const INF: f32 = 1e8;

/// The point of column `j`, row `i` on a level of stride `stride` (offset 0.5).
pub fn point(j: usize, i: usize, stride: usize) -> (f32, f32) {
    (
        (j as f32 + 0.5) * stride as f32,
        (i as f32 + 0.5) * stride as f32,
    )
}

/// What the assignment needs to know about the head.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignConfig {
    /// Classes (background is `num_classes`).
    pub num_classes: usize,
    /// Stride of each level.
    pub strides: Vec<usize>,
    /// `(lo, hi)` of each level's largest regression distance, in pixels.
    pub regress_ranges: Vec<(f32, f32)>,
    /// Center sampling radius in strides; `None` = the whole box (mmdet `center_sampling=False`).
    pub center_sample_radius: Option<f32>,
}

/// The targets of a batch, flattened as the module header says (`N` points in all).
#[derive(Debug, Clone, PartialEq)]
pub struct FcosTargets {
    /// Class of each point, `num_classes` for background; `[N]`.
    pub labels: Vec<u32>,
    /// Indices of the positive points, ascending.
    pub positives: Vec<usize>,
    /// `(l, t, r, b)` of each positive to its box, divided by the level's stride; `[P]`.
    pub ltrb: Vec<[f32; 4]>,
    /// Index of the assigned box in its image's box list (crowd boxes included); `[P]`.
    pub box_index: Vec<usize>,
}

impl FcosTargets {
    /// Number of positives.
    pub fn num_pos(&self) -> usize {
        self.positives.len()
    }
}

/// Assigns the points of feature maps of `sizes` (`(h, w)` per level) to the `boxes` of each
/// image of a batch.
pub fn assign(
    cfg: &AssignConfig,
    sizes: &[(usize, usize)],
    boxes: &[Vec<ObjectBox>],
) -> Result<FcosTargets> {
    ensure!(
        sizes.len() == cfg.strides.len() && cfg.regress_ranges.len() == cfg.strides.len(),
        "FCOS targets: {} feature maps for {} strides and {} regression ranges",
        sizes.len(),
        cfg.strides.len(),
        cfg.regress_ranges.len()
    );
    let bg = cfg.num_classes as u32;
    for (img, bs) in boxes.iter().enumerate() {
        for b in bs.iter().filter(|b| !b.crowd) {
            ensure!(
                (b.class as usize) < cfg.num_classes,
                "image {img}: box class {} but the head has {} classes",
                b.class,
                cfg.num_classes
            );
        }
    }
    let mut t = FcosTargets {
        labels: vec![],
        positives: vec![],
        ltrb: vec![],
        box_index: vec![],
    };
    for (lvl, &(h, w)) in sizes.iter().enumerate() {
        let s = cfg.strides[lvl];
        let (lo, hi) = cfg.regress_ranges[lvl];
        for bs in boxes {
            for i in 0..h {
                for j in 0..w {
                    let (x, y) = point(j, i, s);
                    // (area, box index, distances) of the best candidate so far
                    let mut best: Option<(f32, usize, [f32; 4])> = None;
                    for (k, b) in bs.iter().enumerate() {
                        if b.crowd {
                            continue;
                        }
                        let d = encode_ltrb(x, y, &b.xyxy, 1.0);
                        let inside = match cfg.center_sample_radius {
                            Some(r) => {
                                let [x1, y1, x2, y2] = b.xyxy;
                                let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
                                let rad = s as f32 * r;
                                // centre region clipped to the box (mmdet's torch.where)
                                let c = [
                                    (cx - rad).max(x1),
                                    (cy - rad).max(y1),
                                    (cx + rad).min(x2),
                                    (cy + rad).min(y2),
                                ];
                                let cd = encode_ltrb(x, y, &c, 1.0);
                                cd.iter().copied().fold(f32::INFINITY, f32::min) > 0.0
                            }
                            None => d.iter().copied().fold(f32::INFINITY, f32::min) > 0.0,
                        };
                        let m = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        if !inside || m < lo || m > hi {
                            continue;
                        }
                        let a = (b.xyxy[2] - b.xyxy[0]) * (b.xyxy[3] - b.xyxy[1]);
                        // strictly smaller: equal areas keep the first box
                        if best.is_none_or(|(ba, _, _)| a < ba) {
                            best = Some((a, k, d));
                        }
                    }
                    match best {
                        Some((_, k, d)) => {
                            t.positives.push(t.labels.len());
                            t.labels.push(bs[k].class);
                            let sf = s as f32;
                            t.ltrb.push([d[0] / sf, d[1] / sf, d[2] / sf, d[3] / sf]);
                            t.box_index.push(k);
                        }
                        None => t.labels.push(bg),
                    }
                }
            }
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(xyxy: [f32; 4], class: u32, crowd: bool) -> ObjectBox {
        ObjectBox { xyxy, class, crowd }
    }

    /// Positives as (level, x, y, class), in flattened order.
    fn positives(
        t: &FcosTargets,
        sizes: &[(usize, usize)],
        strides: &[usize],
    ) -> Vec<(usize, f32, f32, u32)> {
        let mut starts = vec![0];
        for &(h, w) in sizes {
            starts.push(starts.last().unwrap() + h * w);
        }
        t.positives
            .iter()
            .map(|&p| {
                let lvl = starts.iter().rposition(|&s| s <= p).unwrap();
                let r = p - starts[lvl];
                let (h, w) = sizes[lvl];
                assert!(r < h * w, "single image");
                let (x, y) = point(r % w, r / w, strides[lvl]);
                (lvl, x, y, t.labels[p])
            })
            .collect()
    }

    /// A 64x64 image, levels of stride 8 (8x8 points at 4, 12, ..., 60) and 16 (4x4 points at 8,
    /// 24, 40, 56), ranges (-1, 24) and (24, INF), center sampling radius 1.5.
    ///
    /// Box A = [0, 0, 40, 40] class 0 (area 1600), centre (20, 20):
    /// - stride 8: centre region [8, 8, 32, 32]; points strictly inside: x, y in {12, 20, 28};
    ///   largest distance <= 24 only at (20, 20) (20); e.g. (12, 12) has r = 28.
    /// - stride 16: region [-4, -4, 44, 44] clipped to [0, 0, 40, 40]; points x, y in {8, 24};
    ///   largest distances 32, 32, 32 and 24 (at (24, 24): l = t = 24): all >= 24, all in range.
    ///
    /// Box B = [16, 16, 48, 40] class 1 (area 768), centre (32, 28):
    /// - stride 8: region [20, 16, 44, 40]; x in {28, 36} (20 is on the edge: not > 0),
    ///   y in {20, 28, 36}; largest distance 20 at all six: all positive.
    /// - stride 16: region [8, 4, 56, 52] clipped to the box; x in {24, 40}, y in {24} (40 on the
    ///   edge); largest distances 24 (r at (24, 24)) and 24 (l at (40, 24)): in range.
    ///
    /// Conflict: (24, 24) at stride 16 is a candidate of both: B has the smaller area and wins.
    /// A crowd box over the whole image changes nothing.
    #[test]
    fn hand_computed_positives_for_two_boxes() -> Result<()> {
        let cfg = AssignConfig {
            num_classes: 3,
            strides: vec![8, 16],
            regress_ranges: vec![(-1.0, 24.0), (24.0, INF)],
            center_sample_radius: Some(1.5),
        };
        let sizes = [(8, 8), (4, 4)];
        let a = obj([0.0, 0.0, 40.0, 40.0], 0, false);
        let b = obj([16.0, 16.0, 48.0, 40.0], 1, false);
        let crowd = obj([0.0, 0.0, 64.0, 64.0], 2, true);
        let t = assign(&cfg, &sizes, &[vec![a, crowd, b]])?;
        let want = vec![
            // stride 8, row-major
            (0, 20.0, 20.0, 0),
            (0, 28.0, 20.0, 1),
            (0, 36.0, 20.0, 1),
            (0, 28.0, 28.0, 1),
            (0, 36.0, 28.0, 1),
            (0, 28.0, 36.0, 1),
            (0, 36.0, 36.0, 1),
            // stride 16
            (1, 8.0, 8.0, 0),
            (1, 24.0, 8.0, 0),
            (1, 8.0, 24.0, 0),
            (1, 24.0, 24.0, 1),
            (1, 40.0, 24.0, 1),
        ];
        assert_eq!(positives(&t, &sizes, &cfg.strides), want);
        assert_eq!(t.labels.len(), 64 + 16);
        assert_eq!(t.labels.iter().filter(|&&l| l == 3).count(), 80 - 12);
        // (24, 24) at stride 16 to B [16, 16, 48, 40]: (8, 8, 24, 16) / 16; box index 2 (after
        // the crowd box)
        let k = t.positives.iter().position(|&p| p == 64 + 5).unwrap();
        assert_eq!(t.ltrb[k], [0.5, 0.5, 1.5, 1.0]);
        assert_eq!(t.box_index[k], 2);
        // (20, 20) at stride 8 to A: (20, 20, 20, 20) / 8
        assert_eq!(t.ltrb[0], [2.5, 2.5, 2.5, 2.5]);

        // center sampling on a 64x64 box at stride 16: region [8, 8, 56, 56], points 24 and 40
        // on each axis (8 and 56 lie on its edges); the whole box: all 16 points
        let one = AssignConfig {
            num_classes: 3,
            strides: vec![16],
            regress_ranges: vec![(-1.0, INF)],
            center_sample_radius: Some(1.5),
        };
        let big = vec![obj([0.0, 0.0, 64.0, 64.0], 0, false)];
        assert_eq!(
            assign(&one, &[(4, 4)], std::slice::from_ref(&big))?.num_pos(),
            4
        );
        let whole = AssignConfig {
            center_sample_radius: None,
            ..one
        };
        assert_eq!(assign(&whole, &[(4, 4)], &[big])?.num_pos(), 16);

        // two images: the second's points follow the first's within each level
        let t3 = assign(&cfg, &sizes, &[vec![], vec![a, b]])?;
        assert_eq!(t3.labels.len(), 2 * 80);
        assert_eq!(t3.num_pos(), 12);
        assert_eq!(t3.positives[0], 64 + 2 * 8 + 2); // (20, 20) of image 1 at stride 8
        Ok(())
    }

    #[test]
    fn equal_areas_go_to_the_first_box_and_bad_classes_are_refused() -> Result<()> {
        let cfg = AssignConfig {
            num_classes: 2,
            strides: vec![8],
            regress_ranges: vec![(-1.0, INF)],
            center_sample_radius: Some(1.5),
        };
        let a = obj([0.0, 0.0, 16.0, 16.0], 1, false);
        let b = obj([0.0, 0.0, 16.0, 16.0], 0, false);
        let t = assign(&cfg, &[(2, 2)], &[vec![a, b]])?;
        assert_eq!(t.labels, vec![1, 1, 1, 1]);
        let bad = obj([0.0, 0.0, 16.0, 16.0], 2, false);
        let e = assign(&cfg, &[(2, 2)], &[vec![bad]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("box class 2"), "{e}");
        Ok(())
    }
}
