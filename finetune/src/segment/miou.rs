//! Evaluation stage of segmentation: mIoU, aAcc, mAcc and the per-class IoU and Acc, exactly as
//! mmsegmentation's `IoUMetric` (mmsegmentation:mmseg/evaluation/metrics/iou_metric.py,
//! dense-tasks.md 2.2):
//!
//! - per image, pixels whose label is `ignore_index` are dropped (their prediction too); the
//!   histograms of the intersection (`pred == label`), the predictions and the labels are added up
//!   over the whole dataset, and `union = pred + label - intersection`;
//! - `IoU_c = I_c / U_c`, `Acc_c = I_c / label_c`, `aAcc = sum I / sum label`; a 0/0 is NaN, which
//!   is `null` in the output and left out of `mIoU = nanmean(IoU)` and `mAcc = nanmean(Acc)`. So a
//!   class absent from both sides is `null` in both lists; a class only in the predictions has
//!   IoU 0 (counted) and Acc `null`.
//! - `reduce_zero_label` (ADE20K; mmseg's `LoadAnnotations`, on the uint8 map): label 0 becomes 255
//!   and every other label shifts down by one (255 stays 255).
//!
//! Values are fractions in [0, 1], not rounded (mmseg's printed table rounds `100 x` to 2
//! decimals). One documented difference: mmseg's `torch.histc` silently drops a label or
//! prediction value outside `0..num_classes` from its own histogram (a label so dropped still
//! adds its prediction to the union); here such a value is an error naming the file, the value and
//! its pixel count, because it almost always means a wrong `num_classes` or a palette mistake.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use mimlab_engine::data::detection::read_class_map;
use serde_json::{json, Value};

/// What the label maps mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiouConfig {
    /// Classes `0..num_classes`.
    pub num_classes: usize,
    /// Label value whose pixels are not evaluated (255 in mmseg).
    pub ignore_index: u32,
    /// ADE20K's label shift (see the module doc).
    pub reduce_zero_label: bool,
}

impl MiouConfig {
    /// mmseg's defaults: ignore 255, no label shift.
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            ignore_index: 255,
            reduce_zero_label: false,
        }
    }

    /// A stored label value as the metric sees it (`reduce_zero_label` applied).
    pub fn label(&self, v: u32) -> u32 {
        if !self.reduce_zero_label {
            return v;
        }
        // mmseg on uint8: 0 -> 255, then - 1, then 254 -> 255
        match v {
            0 | 255 => 255,
            v => v - 1,
        }
    }
}

/// Dataset-wide per-class pixel counts (mmseg's `total_area_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaTotals {
    /// Pixels with `pred == label == c`.
    pub intersect: Vec<u64>,
    /// Evaluated pixels predicted `c`.
    pub pred: Vec<u64>,
    /// Evaluated pixels labelled `c`.
    pub label: Vec<u64>,
}

/// Which map an out-of-range value is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The ground truth (after `reduce_zero_label`).
    Label,
    /// The prediction.
    Prediction,
}

/// An out-of-range value met by [`AreaTotals::add`]: labels before predictions, the smallest
/// value first, with the number of evaluated pixels holding it (a prediction is only looked at
/// where its label is a class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange {
    /// Which map.
    pub side: Side,
    /// The value.
    pub value: u32,
    /// Pixels holding it.
    pub pixels: usize,
}

impl AreaTotals {
    /// Zero counts for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self {
            intersect: vec![0; num_classes],
            pred: vec![0; num_classes],
            label: vec![0; num_classes],
        }
    }

    /// Adds one image (`pred` and stored `label` values, row-major, same length). On a value
    /// outside `0..num_classes` (labels: after the shift, the ignore value excepted) nothing is
    /// added and the value is returned.
    pub fn add(
        &mut self,
        cfg: &MiouConfig,
        pred: &[u32],
        label: &[u32],
    ) -> Result<Option<OutOfRange>> {
        ensure!(
            pred.len() == label.len(),
            "{} predicted pixels for {} labelled ones",
            pred.len(),
            label.len()
        );
        let n = cfg.num_classes;
        let mut add = Self::new(n);
        let mut bad: BTreeMap<(Side, u32), usize> = BTreeMap::new();
        for (&p, &l) in pred.iter().zip(label) {
            let l = cfg.label(l);
            if l == cfg.ignore_index {
                continue;
            }
            let (side, v) = if l as usize >= n {
                (Side::Label, l)
            } else if p as usize >= n {
                (Side::Prediction, p)
            } else {
                add.pred[p as usize] += 1;
                add.label[l as usize] += 1;
                add.intersect[p as usize] += u64::from(p == l);
                continue;
            };
            *bad.entry((side, v)).or_default() += 1;
        }
        if let Some((&(side, value), &pixels)) = bad.iter().next() {
            return Ok(Some(OutOfRange {
                side,
                value,
                pixels,
            }));
        }
        for (a, b) in [
            (&mut self.intersect, &add.intersect),
            (&mut self.pred, &add.pred),
            (&mut self.label, &add.label),
        ] {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        Ok(None)
    }

    /// The metrics of the counts so far.
    pub fn summary(&self) -> MiouStats {
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        let iou: Vec<Option<f64>> = (0..self.intersect.len())
            .map(|c| {
                let i = self.intersect[c];
                ratio(i, self.pred[c] + self.label[c] - i)
            })
            .collect();
        let acc: Vec<Option<f64>> = (0..self.intersect.len())
            .map(|c| ratio(self.intersect[c], self.label[c]))
            .collect();
        let aacc = ratio(self.intersect.iter().sum(), self.label.iter().sum());
        MiouStats {
            miou: nanmean(&iou),
            aacc,
            macc: nanmean(&acc),
            iou,
            acc,
        }
    }
}

/// Mean of the defined values (`np.nanmean`); `None` when there are none.
fn nanmean(xs: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The metrics; `None` where mmseg has NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct MiouStats {
    /// Mean IoU over the classes with a union.
    pub miou: Option<f64>,
    /// Pixel accuracy over all evaluated pixels.
    pub aacc: Option<f64>,
    /// Mean accuracy over the classes with labelled pixels.
    pub macc: Option<f64>,
    /// Per class.
    pub iou: Vec<Option<f64>>,
    /// Per class.
    pub acc: Vec<Option<f64>>,
}

impl MiouStats {
    /// `{"mIoU", "aAcc", "mAcc", "IoU": [...], "Acc": [...]}`, `null` for undefined values.
    pub fn to_json(&self) -> Value {
        json!({
            "mIoU": self.miou,
            "aAcc": self.aacc,
            "mAcc": self.macc,
            "IoU": self.iou,
            "Acc": self.acc,
        })
    }
}

/// The `.png` files directly in `dir`, sorted by name.
fn pngs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Evaluates every label map of `gt_dir` against the prediction of the same file name in
/// `pred_dir` (8-bit grey or palette PNGs: the stored index is the class). Errors name the file: a
/// missing prediction, a size mismatch, an out-of-range value. Returns the summed areas
/// ([`AreaTotals::summary`] gives the metrics) and the names of predictions without a label map
/// (not evaluated).
pub fn evaluate_dirs(
    gt_dir: &Path,
    pred_dir: &Path,
    cfg: &MiouConfig,
) -> Result<(AreaTotals, Vec<String>)> {
    ensure!(cfg.num_classes > 0, "--num-classes must be at least 1");
    let gts = pngs(gt_dir)?;
    if gts.is_empty() {
        bail!("{}: no .png label maps", gt_dir.display());
    }
    let mut totals = AreaTotals::new(cfg.num_classes);
    let mut names = BTreeSet::new();
    for g in &gts {
        let name = g.file_name().context("a file without a name")?;
        names.insert(name.to_string_lossy().into_owned());
        let p = pred_dir.join(name);
        ensure!(
            p.exists(),
            "{}: no prediction for the label map {}",
            p.display(),
            g.display()
        );
        let (gm, pm) = (read_class_map(g)?, read_class_map(&p)?);
        ensure!(
            (gm.width(), gm.height()) == (pm.width(), pm.height()),
            "{} is {}x{} but its label map {} is {}x{}",
            p.display(),
            pm.width(),
            pm.height(),
            g.display(),
            gm.width(),
            gm.height()
        );
        if let Some(o) = totals.add(cfg, &pm.to_u32(), &gm.to_u32())? {
            let (file, what) = match o.side {
                Side::Label => (g, "label value"),
                Side::Prediction => (&p, "predicted class"),
            };
            let shift = if cfg.reduce_zero_label && o.side == Side::Label {
                " after reduce_zero_label"
            } else {
                ""
            };
            bail!(
                "{}: {what} {}{shift} at {} pixels is not a class of 0..{} (nor the ignore index {})",
                file.display(),
                o.value,
                o.pixels,
                cfg.num_classes,
                cfg.ignore_index
            );
        }
    }
    let extra = pngs(pred_dir)?
        .into_iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_string_lossy().into_owned();
            (!names.contains(&n)).then_some(n)
        })
        .collect();
    Ok((totals, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand case: 2 classes + ignore; I = [1, 2], pred = [2, 2], label = [1, 3] (one ignored
    /// pixel whose prediction is dropped), so IoU = [1/2, 2/3], Acc = [1, 2/3], aAcc = 3/4.
    #[test]
    fn hand_counts() -> Result<()> {
        let cfg = MiouConfig::new(3);
        let mut t = AreaTotals::new(3);
        let pred = [0, 1, 1, 1, 0, 2];
        let label = [0, 1, 1, 0, 255, 255];
        assert_eq!(t.add(&cfg, &pred, &label)?, None);
        assert_eq!(t.intersect, vec![1, 2, 0]);
        assert_eq!(t.pred, vec![1, 3, 0]);
        assert_eq!(t.label, vec![2, 2, 0]);
        let s = t.summary();
        assert_eq!(s.iou, vec![Some(0.5), Some(2.0 / 3.0), None]);
        assert_eq!(s.acc, vec![Some(0.5), Some(1.0), None]);
        assert_eq!(s.aacc, Some(0.75));
        assert_eq!(s.miou, Some((0.5 + 2.0 / 3.0) / 2.0));
        Ok(())
    }

    #[test]
    fn reduce_zero_label_shifts_and_ignores_zero() {
        let cfg = MiouConfig {
            reduce_zero_label: true,
            ..MiouConfig::new(150)
        };
        assert_eq!(
            [0, 1, 2, 150, 254, 255].map(|v| cfg.label(v)),
            [255, 0, 1, 149, 253, 255]
        );
    }

    #[test]
    fn out_of_range_values_are_reported_not_counted() -> Result<()> {
        let cfg = MiouConfig::new(2);
        let mut t = AreaTotals::new(2);
        let o = t.add(&cfg, &[0, 1, 1, 0], &[0, 7, 7, 255])?.unwrap();
        assert_eq!((o.side, o.value, o.pixels), (Side::Label, 7, 2));
        // a prediction of 5 under an ignored label does not count
        let o = t.add(&cfg, &[5, 5, 0], &[255, 1, 0])?.unwrap();
        assert_eq!((o.side, o.value, o.pixels), (Side::Prediction, 5, 1));
        assert_eq!(t, AreaTotals::new(2));
        assert_eq!(t.add(&cfg, &[5, 0], &[255, 0])?, None);
        Ok(())
    }
}
