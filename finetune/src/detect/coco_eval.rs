//! Detection metric: COCO box AP/AR exactly as pycocotools 2.0.11
//! `COCOeval(gt, dt, 'bbox')` + `evaluate(); accumulate(); summarize()` (dense-tasks.md 2.1).
//!
//! Reference semantics (pycocotools `cocoeval.py`, `maskApi.c` `bbIou`), kept step by step:
//! - IoU thresholds `linspace(.5, .95, 10)`, recall points `linspace(0, 1, 101)`, as numpy
//!   computes them (`start + i * step`, last element = stop): threshold 8 is 0.8999999999999999.
//! - IoU of `[x, y, w, h]` boxes in f64 without the +1 pixel; for a crowd GT the union is the
//!   detection's area. No IoU at all when an image and category has no GT or no detection.
//! - Per image and category: detections stable-sorted by score (numpy mergesort on `-score`, ties
//!   keep the result file's order) and cut to 100 (per image AND category); the cut to 1 and 10
//!   happens in accumulation on that same order.
//! - A GT is ignored when `iscrowd`, or when its `area` field is outside the area range. The file's
//!   `ignore` field has no effect: `_prepare` overwrites it with `iscrowd`.
//! - Matching per threshold, detections in score order over the GTs with ignored ones last (stable):
//!   skip GTs already matched unless crowd; stop at the first ignored GT once a regular GT is
//!   matched; take a GT when `iou >= best` where best starts at `min(t, 1 - 1e-10)` (so ties go to
//!   the later GT). A detection matched to an ignored GT is ignored; an unmatched one whose `w * h`
//!   is outside the area range is ignored.
//! - Area ranges are closed: all [0, 1e10], small [0, 32^2], medium [32^2, 96^2], large [96^2, 1e10].
//! - Accumulation per category, area range and maxDets: the images' results in ascending image id,
//!   concatenated and stable-sorted by score; TP/FP cumulated without ignored detections; recall =
//!   TP / non-ignored GTs; precision = TP / (TP + FP + eps) made non-increasing from the right and
//!   read at `searchsorted(recall, r, 'left')`, 0 past the last detection. -1 when the category has
//!   no non-ignored GT there (or no GT and no detection at all).
//! - Summaries: the mean of the entries > -1 (numpy's pairwise sum, so results are bit-exact), -1
//!   when there is none.
//!
//! pycocotools quirks matched on purpose:
//! - A match is stored as the GT's annotation id and "matched" means id != 0, so a detection matched
//!   to a GT whose id is 0 counts as unmatched (a false positive), while that GT is still used up.
//! - `loadRes([])` raises `IndexError` (it reads `anns[0]`); here an empty result list evaluates as
//!   pycocotools' algorithm does with no detections: 0 where a category has GT, -1 elsewhere.
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use mimlab_engine::data::coco::{load_results, CocoAnnotation, CocoFile, CocoResult};
use serde::Serialize;

/// Names of the 12 summary numbers, in pycocotools' `stats` order.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// pycocotools `Params.maxDets`.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

/// pycocotools `Params.areaRng` (closed ranges on the GT `area` field and the detection's `w * h`).
pub const AREA_RANGES: [[f64; 2]; 4] =
    [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];

/// numpy's `linspace(start, stop, n)`: `start + i * ((stop - start) / (n - 1))`, the last one `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// pycocotools `Params.iouThrs`: `linspace(.5, .95, 10)`.
pub fn iou_thresholds() -> Vec<f64> {
    linspace(0.5, 0.95, 10)
}

/// pycocotools `Params.recThrs`: `linspace(0, 1, 101)`.
pub fn recall_thresholds() -> Vec<f64> {
    linspace(0.0, 1.0, 101)
}

/// IoU of a detection and a GT box, both `[x, y, w, h]` (pycocotools `maskApi.c` `bbIou`): for a
/// crowd GT the union is the detection's own area. 0 when the boxes do not overlap.
pub fn box_iou(dt: &[f64; 4], gt: &[f64; 4], crowd: bool) -> f64 {
    let da = dt[2] * dt[3];
    let ga = gt[2] * gt[3];
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// AP of one category (`precision[:, :, k, area all, maxDets 100]`, mean over the entries > -1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryAp {
    /// Category id of the GT file.
    pub id: u64,
    /// Category name.
    pub name: String,
    /// AP in [0, 1]; -1 when the category has no (non-crowd) GT.
    #[serde(rename = "AP")]
    pub ap: f64,
}

/// The result of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoStats {
    /// pycocotools' `stats`, in the order of [`STAT_NAMES`]; fractions, -1 where undefined.
    pub stats: [f64; 12],
    /// Per-category AP in ascending category id.
    pub per_class: Vec<CategoryAp>,
}

impl CocoStats {
    /// The stat called `name` (one of [`STAT_NAMES`]).
    pub fn get(&self, name: &str) -> Option<f64> {
        STAT_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| self.stats[i])
    }

    /// One JSON object with the 12 stats by name in pycocotools' order; with `per_class`, also
    /// `"per_class": [{"id", "name", "AP"}, ...]` in ascending category id (a list, since names
    /// need not be unique).
    pub fn to_json(&self, per_class: bool) -> String {
        struct Out<'a>(&'a CocoStats, bool);
        impl Serialize for Out<'_> {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(None)?;
                for (name, v) in STAT_NAMES.iter().zip(self.0.stats) {
                    m.serialize_entry(name, &v)?;
                }
                if self.1 {
                    m.serialize_entry("per_class", &self.0.per_class)?;
                }
                m.end()
            }
        }
        // Only numbers and strings: serializing cannot fail.
        serde_json::to_string(&Out(self, per_class)).expect("numbers and strings serialize")
    }
}

/// Reads a GT file and a result file (errors name the file) and evaluates them.
pub fn evaluate_files(gt: &Path, dt: &Path) -> Result<CocoStats> {
    let gt_file = CocoFile::load(gt)?;
    let results = load_results(dt, &gt_file)?;
    evaluate(&gt_file, &results)
}

/// `evaluateImg` of one image, category and area range (pycocotools' `evalImgs` entry).
struct ImageEval {
    /// Scores of the kept detections, highest first.
    scores: Vec<f64>,
    /// `[T][D]`: matched to a GT (with a non-zero id, see the module doc).
    matched: Vec<Vec<bool>>,
    /// `[T][D]`.
    dt_ignore: Vec<Vec<bool>>,
    /// Ignored GTs of this area range.
    gt_ignore: Vec<bool>,
}

/// Per image and category: GTs in file order, detections sorted, cut and with their IoUs.
struct Cell<'a> {
    gts: Vec<&'a CocoAnnotation>,
    /// Sorted by score and cut to `MAX_DETS[2]`.
    dts: Vec<&'a CocoResult>,
    /// `ious[d][g]` over `gts` in file order; empty when either side is.
    ious: Vec<Vec<f64>>,
}

/// Stable argsort of `-score` (numpy `argsort(..., kind='mergesort')`).
fn sort_by_score_desc<T>(items: &mut [T], score: impl Fn(&T) -> f64) {
    // `-a < -b` iff `b < a`; negation is exact, so ordering by descending score is the same
    // sort. `partial_cmp` keeps 0.0 and -0.0 equal as numpy does; scores are finite (checked).
    items.sort_by(|a, b| score(b).partial_cmp(&score(a)).unwrap_or(Ordering::Equal));
}

/// The in-memory evaluation: `gt` (checked as [`CocoFile::load`] does) against `dt`; every
/// detection's image and category must be in `gt`.
pub fn evaluate(gt: &CocoFile, dt: &[CocoResult]) -> Result<CocoStats> {
    gt.check()?;
    let cats = gt.category_map()?;
    let mut img_ids: Vec<u64> = gt.images.iter().map(|im| im.id).collect();
    img_ids.sort_unstable();
    let img_index: HashMap<u64, usize> =
        img_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let (ni, nk) = (img_ids.len(), cats.len());
    for (i, r) in dt.iter().enumerate() {
        if !img_index.contains_key(&r.image_id) {
            bail!(
                "detection {i}: image id {} is not in the ground truth",
                r.image_id
            );
        }
        if cats.class_of(r.category_id).is_none() {
            bail!(
                "detection {i}: category id {} is not in the ground truth",
                r.category_id
            );
        }
        if r.bbox.iter().any(|v| !v.is_finite()) || !r.score.is_finite() {
            bail!(
                "detection {i}: bbox {:?} / score {} not finite",
                r.bbox,
                r.score
            );
        }
    }

    // `_prepare` + `computeIoU`: cells indexed [k][i], both lists in file order.
    let mut cells: Vec<Vec<Cell>> = (0..nk)
        .map(|_| {
            (0..ni)
                .map(|_| Cell {
                    gts: vec![],
                    dts: vec![],
                    ious: vec![],
                })
                .collect()
        })
        .collect();
    for a in &gt.annotations {
        let k = cats.class_of(a.category_id).unwrap() as usize; // checked by gt.check()
        cells[k][img_index[&a.image_id]].gts.push(a);
    }
    for r in dt {
        let k = cats.class_of(r.category_id).unwrap() as usize; // checked above
        cells[k][img_index[&r.image_id]].dts.push(r);
    }
    let max_det = MAX_DETS[2];
    for cell in cells.iter_mut().flatten() {
        sort_by_score_desc(&mut cell.dts, |d| d.score);
        cell.dts.truncate(max_det);
        if !cell.gts.is_empty() && !cell.dts.is_empty() {
            cell.ious = cell
                .dts
                .iter()
                .map(|d| {
                    cell.gts
                        .iter()
                        .map(|g| box_iou(&d.bbox, &g.bbox, g.iscrowd))
                        .collect()
                })
                .collect();
        }
    }

    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let (nt, nr, na, nm) = (
        iou_thrs.len(),
        rec_thrs.len(),
        AREA_RANGES.len(),
        MAX_DETS.len(),
    );

    // `evaluate`: evalImgs[k][a][i].
    let evals: Vec<Vec<Vec<Option<ImageEval>>>> = cells
        .iter()
        .map(|row| {
            AREA_RANGES
                .iter()
                .map(|rng| {
                    row.iter()
                        .map(|cell| evaluate_img(cell, rng, &iou_thrs))
                        .collect()
                })
                .collect()
        })
        .collect();

    // `accumulate`: precision [T][R][K][A][M] and recall [T][K][A][M], -1 when absent.
    let p_at = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * nr + r) * nk + k) * na + a) * nm + m
    };
    let r_at = |t: usize, k: usize, a: usize, m: usize| ((t * nk + k) * na + a) * nm + m;
    let mut precision = vec![-1.0f64; nt * nr * nk * na * nm];
    let mut recall = vec![-1.0f64; nt * nk * na * nm];
    for (k, per_area) in evals.iter().enumerate() {
        for (a, per_image) in per_area.iter().enumerate() {
            let es: Vec<&ImageEval> = per_image.iter().flatten().collect();
            if es.is_empty() {
                continue;
            }
            let npig = es
                .iter()
                .flat_map(|e| e.gt_ignore.iter())
                .filter(|&&ig| !ig)
                .count();
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // (score, image entry, detection index) concatenated in ascending image id.
                let mut order: Vec<(f64, usize, usize)> = es
                    .iter()
                    .enumerate()
                    .flat_map(|(e, ev)| {
                        ev.scores
                            .iter()
                            .take(max_det)
                            .enumerate()
                            .map(move |(d, &s)| (s, e, d))
                    })
                    .collect();
                sort_by_score_desc(&mut order, |x| x.0);
                if npig == 0 {
                    continue;
                }
                let nd = order.len();
                for t in 0..nt {
                    let (mut tp, mut fp) = (0u64, 0u64);
                    let mut rc = Vec::with_capacity(nd);
                    let mut pr = Vec::with_capacity(nd);
                    for &(_, e, d) in &order {
                        let (hit, ig) = (es[e].matched[t][d], es[e].dt_ignore[t][d]);
                        if !ig {
                            if hit {
                                tp += 1;
                            } else {
                                fp += 1;
                            }
                        }
                        let (tpf, fpf) = (tp as f64, fp as f64);
                        rc.push(tpf / npig as f64);
                        pr.push(tpf / (fpf + tpf + f64::EPSILON));
                    }
                    recall[r_at(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (ri, &thr) in rec_thrs.iter().enumerate() {
                        // searchsorted(rc, thr, side='left') on a non-decreasing rc.
                        let pi = rc.partition_point(|&x| x < thr);
                        let q = if pi < nd { pr[pi] } else { 0.0 };
                        precision[p_at(t, ri, k, a, m)] = q;
                    }
                }
            }
        }
    }

    // `summarize`: means over the selected entries > -1 in numpy's C order (t, r, k) / (t, k).
    let t_sel = |thr: Option<f64>| -> Vec<usize> {
        match thr {
            None => (0..nt).collect(),
            Some(v) => (0..nt).filter(|&t| iou_thrs[t] == v).collect(),
        }
    };
    let ap = |thr: Option<f64>, a: usize, m: usize| {
        let mut vals = vec![];
        for t in t_sel(thr) {
            for r in 0..nr {
                for k in 0..nk {
                    vals.push(precision[p_at(t, r, k, a, m)]);
                }
            }
        }
        mean_defined(&vals)
    };
    let ar = |a: usize, m: usize| {
        let mut vals = vec![];
        for t in 0..nt {
            for k in 0..nk {
                vals.push(recall[r_at(t, k, a, m)]);
            }
        }
        mean_defined(&vals)
    };
    let stats = [
        ap(None, 0, 2),
        ap(Some(0.5), 0, 2),
        ap(Some(0.75), 0, 2),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ];
    let per_class = (0..nk)
        .map(|k| {
            let mut vals = vec![];
            for t in 0..nt {
                for r in 0..nr {
                    vals.push(precision[p_at(t, r, k, 0, 2)]);
                }
            }
            CategoryAp {
                id: cats.ids()[k],
                name: cats.names()[k].clone(),
                ap: mean_defined(&vals),
            }
        })
        .collect();
    Ok(CocoStats { stats, per_class })
}

/// pycocotools `evaluateImg` for one image, category and area range (maxDet 100).
fn evaluate_img(cell: &Cell, rng: &[f64; 2], iou_thrs: &[f64]) -> Option<ImageEval> {
    if cell.gts.is_empty() && cell.dts.is_empty() {
        return None;
    }
    let out = |area: f64| !(rng[0]..=rng[1]).contains(&area);
    let ignore: Vec<bool> = cell
        .gts
        .iter()
        .map(|g| g.iscrowd || out(g.area()))
        .collect();
    // GTs with ignored ones last, stable.
    let mut gind: Vec<usize> = (0..cell.gts.len()).collect();
    gind.sort_by_key(|&g| ignore[g]);
    let gt_ignore: Vec<bool> = gind.iter().map(|&g| ignore[g]).collect();
    let crowd: Vec<bool> = gind.iter().map(|&g| cell.gts[g].iscrowd).collect();
    let (nt, ng, nd) = (iou_thrs.len(), gind.len(), cell.dts.len());
    let mut gt_matched = vec![vec![false; ng]; nt];
    let mut matched_id: Vec<Vec<Option<u64>>> = vec![vec![None; nd]; nt];
    let mut dt_ignore = vec![vec![false; nd]; nt];
    if !cell.ious.is_empty() {
        for (t, &thr) in iou_thrs.iter().enumerate() {
            for d in 0..nd {
                let mut best = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for (j, &g) in gind.iter().enumerate() {
                    if gt_matched[t][j] && !crowd[j] {
                        continue;
                    }
                    if let Some(mj) = m {
                        if !gt_ignore[mj] && gt_ignore[j] {
                            break;
                        }
                    }
                    let iou = cell.ious[d][g];
                    if iou < best {
                        continue;
                    }
                    best = iou;
                    m = Some(j);
                }
                if let Some(j) = m {
                    dt_ignore[t][d] = gt_ignore[j];
                    matched_id[t][d] = Some(cell.gts[gind[j]].id);
                    gt_matched[t][j] = true;
                }
            }
        }
    }
    // `dtm == 0` means unmatched in pycocotools, also for a GT whose id is 0.
    let matched: Vec<Vec<bool>> = matched_id
        .iter()
        .map(|row| row.iter().map(|id| id.is_some_and(|id| id != 0)).collect())
        .collect();
    for (ig_t, hit_t) in dt_ignore.iter_mut().zip(&matched) {
        for ((ig, &hit), det) in ig_t.iter_mut().zip(hit_t).zip(&cell.dts) {
            if !hit && out(det.area()) {
                *ig = true;
            }
        }
    }
    Some(ImageEval {
        scores: cell.dts.iter().map(|d| d.score).collect(),
        matched,
        dt_ignore,
        gt_ignore,
    })
}

/// numpy `np.mean(s[s > -1])`, or -1 when no entry is > -1.
fn mean_defined(vals: &[f64]) -> f64 {
    let kept: Vec<f64> = vals.iter().copied().filter(|&v| v > -1.0).collect();
    if kept.is_empty() {
        -1.0
    } else {
        pairwise_sum(&kept) / kept.len() as f64
    }
}

/// numpy's `pairwise_sum` for float64 (`np.add.reduce` on a contiguous array): exact same
/// rounding as `np.sum`, 8 accumulators in blocks of up to 128.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, &x| s + x)
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (rj, x) in r.iter_mut().zip(&a[i..i + 8]) {
                *rj += x;
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimlab_engine::data::coco::{CocoCategory, CocoImage};

    #[test]
    fn thresholds_are_numpy_linspace() {
        let t = iou_thresholds();
        assert_eq!(t.len(), 10);
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!((t[0], t[5], t[9]), (0.5, 0.75, 0.95));
        let r = recall_thresholds();
        assert_eq!((r.len(), r[50], r[100]), (101, 0.5, 1.0));
        assert_eq!(r[7], 0.07);
    }

    #[test]
    fn box_iou_and_crowd_iou() {
        // Overlap 5 x 5 = 25; union 100 + 100 - 25 = 175 -> 1/7; crowd: 25 / dt area 100.
        let (d, g) = ([0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 10.0, 10.0]);
        assert!((box_iou(&d, &g, false) - 1.0 / 7.0).abs() < 1e-15);
        assert_eq!(box_iou(&d, &g, true), 0.25);
        // A crowd GT that contains the detection: 100 / 100 = 1 although the GT is 4x larger.
        assert_eq!(box_iou(&d, &[0.0, 0.0, 20.0, 20.0], true), 1.0);
        // Touching edges do not overlap; no +1 pixel.
        assert_eq!(box_iou(&d, &[10.0, 0.0, 5.0, 5.0], false), 0.0);
        assert_eq!(box_iou(&d, &d, false), 1.0);
    }

    fn one_image(gts: &[[f64; 4]], dts: &[([f64; 4], f64)]) -> (CocoFile, Vec<CocoResult>) {
        let gt = CocoFile {
            images: vec![CocoImage {
                id: 1,
                file_name: "a.png".into(),
                width: 640,
                height: 480,
            }],
            annotations: gts
                .iter()
                .enumerate()
                .map(|(i, b)| CocoAnnotation {
                    id: i as u64 + 1,
                    image_id: 1,
                    category_id: 3,
                    bbox: *b,
                    area: Some(b[2] * b[3]),
                    iscrowd: false,
                    ignore: None,
                    segmentation: None,
                })
                .collect(),
            categories: vec![CocoCategory {
                id: 3,
                name: "cat".into(),
                supercategory: None,
            }],
        };
        let dt = dts
            .iter()
            .map(|&(bbox, score)| CocoResult {
                image_id: 1,
                category_id: 3,
                bbox,
                score,
            })
            .collect();
        (gt, dt)
    }

    #[test]
    fn three_detections_by_hand() {
        // Two large GTs (area 10^4 > 96^2). In score order: d1 on GT1 (IoU 1, TP), d2 on nothing
        // (FP), d3 on GT2 (IoU 1, TP), at every threshold. Recall 1/2, 1/2, 1; precision 1, 1/2,
        // 2/3 -> envelope 1, 2/3, 2/3. Recall points 0.00..0.50 (51) read 1, 0.51..1.00 (50) read
        // 2/3: AP = (51 + 50 * 2/3) / 101 = 253/303 (precision 1 is 1/(1+eps) in pycocotools).
        let (gt, dt) = one_image(
            &[[0.0, 0.0, 100.0, 100.0], [200.0, 0.0, 100.0, 100.0]],
            &[
                ([400.0, 0.0, 100.0, 100.0], 0.8),
                ([200.0, 0.0, 100.0, 100.0], 0.7),
                ([0.0, 0.0, 100.0, 100.0], 0.9),
            ],
        );
        let s = evaluate(&gt, &dt).unwrap();
        let ap = 253.0 / 303.0;
        for name in ["AP", "AP50", "AP75", "APl"] {
            assert!((s.get(name).unwrap() - ap).abs() < 1e-12, "{name}: {s:?}");
        }
        // No GT is small or medium: undefined.
        for name in ["APs", "APm", "ARs", "ARm"] {
            assert_eq!(s.get(name), Some(-1.0), "{name}");
        }
        // maxDets 1 keeps d1 only: recall 1/2; 10 and 100 find both GTs.
        assert_eq!(s.get("AR1"), Some(0.5));
        assert_eq!(s.get("AR10"), Some(1.0));
        assert_eq!(s.get("AR100"), Some(1.0));
        assert_eq!(s.get("ARl"), Some(1.0));
        assert_eq!(s.per_class.len(), 1);
        assert_eq!(
            (s.per_class[0].id, s.per_class[0].name.as_str()),
            (3, "cat")
        );
        assert!((s.per_class[0].ap - ap).abs() < 1e-12);
        // The JSON names every stat.
        let text = s.to_json(true);
        assert!(text.starts_with("{\"AP\":"), "pycocotools' order: {text}");
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j.as_object().unwrap().len(), 13);
        assert_eq!(j["AR1"], 0.5);
        assert_eq!(j["per_class"][0]["AP"], s.per_class[0].ap);
    }

    #[test]
    fn empty_results_score_zero_where_there_is_ground_truth() {
        let (gt, _) = one_image(&[[0.0, 0.0, 10.0, 10.0]], &[]);
        let s = evaluate(&gt, &[]).unwrap();
        assert_eq!(s.stats[..4], [0.0, 0.0, 0.0, 0.0]);
        assert_eq!(s.stats[4..6], [-1.0, -1.0]);
    }

    #[test]
    fn unknown_image_or_category_is_an_error() {
        let (gt, mut dt) = one_image(&[[0.0, 0.0, 10.0, 10.0]], &[([0.0; 4], 0.5)]);
        dt[0].image_id = 9;
        let e = evaluate(&gt, &dt).unwrap_err().to_string();
        assert!(e.contains("image id 9"), "{e}");
        dt[0].image_id = 1;
        dt[0].category_id = 4;
        let e = evaluate(&gt, &dt).unwrap_err().to_string();
        assert!(e.contains("category id 4"), "{e}");
    }

    #[test]
    fn pairwise_sum_groups_as_numpy() {
        // 1e16 + 1 + ... : a left fold loses every 1, numpy's 8 accumulators keep 7 of them in
        // the first block (r[1..8] = 1 each, then (r0+r1) rounds 1 away): 1e16 + 6 exactly.
        let mut a = vec![1.0f64; 8];
        a[0] = 1e16;
        assert_eq!(pairwise_sum(&a), 1e16 + 6.0);
        assert_eq!(pairwise_sum(&[1.0, 2.0, 3.0]), 6.0);
    }
}
