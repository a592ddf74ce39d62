//! Classification metrics: top-1 / top-5 accuracy, per-class accuracy and the confusion matrix
//! (with its picture).
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::picture::{Heatmap, RgbImage};
use serde::Serialize;

/// Accumulates predictions batch by batch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Confusion {
    /// `counts[true][predicted]`.
    pub counts: Vec<Vec<u64>>,
    /// Samples whose label is among the 5 highest scores (or all classes when fewer than 5).
    pub top5_hits: u64,
    /// Samples seen.
    pub total: u64,
}

/// A finished evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassificationReport {
    /// Samples evaluated.
    pub samples: u64,
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent.
    pub top5: f64,
    /// Accuracy of each true class in percent (NaN for a class with no samples).
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

impl Confusion {
    /// Empty matrix for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            counts: vec![vec![0; classes]; classes],
            top5_hits: 0,
            total: 0,
        }
    }

    /// Adds a batch of scores `[B, classes]` (any float dtype, any device) and labels.
    pub fn add(&mut self, scores: &Tensor, labels: &[u32]) -> Result<()> {
        let (b, c) = scores.dims2()?;
        ensure!(
            c == self.counts.len(),
            "scores have {c} classes, expected {}",
            self.counts.len()
        );
        ensure!(
            labels.len() == b,
            "{b} score rows but {} labels",
            labels.len()
        );
        let s: Vec<Vec<f32>> = scores.to_dtype(DType::F32)?.to_vec2()?;
        for (row, &y) in s.iter().zip(labels) {
            let y = y as usize;
            ensure!(y < c, "label {y} out of range for {c} classes");
            self.add_one(row, y);
        }
        Ok(())
    }

    /// Adds one sample's scores. Ties go to the lower class id (as `argmax`).
    pub fn add_one(&mut self, scores: &[f32], label: usize) {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        self.counts[label][order[0]] += 1;
        if order.iter().take(5).any(|&k| k == label) {
            self.top5_hits += 1;
        }
        self.total += 1;
    }

    /// Accuracies and the matrix.
    pub fn report(&self) -> ClassificationReport {
        let correct: u64 = (0..self.counts.len()).map(|k| self.counts[k][k]).sum();
        let pct = |a: u64, n: u64| {
            if n == 0 {
                f64::NAN
            } else {
                100.0 * a as f64 / n as f64
            }
        };
        ClassificationReport {
            samples: self.total,
            top1: pct(correct, self.total),
            top5: pct(self.top5_hits, self.total),
            per_class: self
                .counts
                .iter()
                .enumerate()
                .map(|(k, row)| pct(row[k], row.iter().sum()))
                .collect(),
            confusion: self.counts.clone(),
        }
    }
}

impl ClassificationReport {
    /// The confusion matrix as a picture: cells are the percent of each true class (rows)
    /// predicted as each class (columns).
    pub fn confusion_picture(&self, class_names: &[String], title: &str) -> RgbImage {
        let values: Vec<Vec<f64>> = self
            .confusion
            .iter()
            .map(|row| {
                let n: u64 = row.iter().sum();
                row.iter()
                    .map(|&v| {
                        if n == 0 {
                            f64::NAN
                        } else {
                            (100.0 * v as f64 / n as f64).round()
                        }
                    })
                    .collect()
            })
            .collect();
        Heatmap {
            title: title.to_string(),
            values,
            row_labels: class_names.to_vec(),
            col_labels: class_names.to_vec(),
            row_title: "true class".into(),
            col_title: "predicted class".into(),
        }
        .render()
    }

    /// Writes `<stem>.json` (the report, with class names) and `<stem>_confusion.png`.
    pub fn write(&self, dir: &Path, stem: &str, class_names: &[String], title: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::json!({
            "samples": self.samples,
            "top1": self.top1,
            "top5": self.top5,
            "classes": class_names,
            "per_class": self.per_class.iter().map(|v| if v.is_nan() { None } else { Some(*v) }).collect::<Vec<_>>(),
            "confusion": self.confusion,
        });
        let path = dir.join(format!("{stem}.json"));
        write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
        self.confusion_picture(class_names, title)
            .save_png(&dir.join(format!("{stem}_confusion.png")))
    }

    /// Human-readable lines: accuracies, then per-class accuracy.
    pub fn summary(&self, class_names: &[String]) -> String {
        let mut s = format!(
            "top-1 {:.2}%  top-5 {:.2}%  ({} images)\n",
            self.top1, self.top5, self.samples
        );
        for (k, acc) in self.per_class.iter().enumerate() {
            let name = class_names.get(k).cloned().unwrap_or_else(|| k.to_string());
            s.push_str(&format!("  {name:<14} {acc:6.2}%\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn top1_top5_per_class_and_matrix() -> Result<()> {
        let mut m = Confusion::new(6);
        let s = Tensor::new(
            &[
                [9f32, 1., 2., 3., 4., 5.], // label 0: top-1 hit
                [0., 1., 2., 3., 4., 5.],   // label 0: rank 6 -> miss top-5
                [5., 4., 3., 2., 1., 0.],   // label 1: predicted 0, rank 2
                [1., 1., 0., 0., 0., 0.],   // label 1: tie -> class 0 wins, rank 2
            ],
            &Device::Cpu,
        )?;
        m.add(&s, &[0, 0, 1, 1])?;
        let r = m.report();
        assert_eq!(r.samples, 4);
        assert_eq!(r.top1, 25.0);
        assert_eq!(r.top5, 75.0);
        assert_eq!(r.per_class[0], 50.0);
        assert_eq!(r.per_class[1], 0.0);
        assert!(r.per_class[2].is_nan());
        assert_eq!(r.confusion[0], vec![1, 0, 0, 0, 0, 1]);
        assert_eq!(r.confusion[1], vec![2, 0, 0, 0, 0, 0]);
        let err = m.add(&s, &[0, 0, 1]).unwrap_err().to_string();
        assert!(err.contains("4 score rows but 3 labels"), "{err}");
        let dir = tempfile::tempdir()?;
        let names: Vec<String> = (0..6).map(|k| format!("c{k}")).collect();
        r.write(dir.path(), "eval", &names, "test")?;
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval.json"))?)?;
        assert_eq!(j["top1"], 25.0);
        assert!(j["per_class"][2].is_null());
        assert!(dir.path().join("eval_confusion.png").is_file());
        Ok(())
    }
}
