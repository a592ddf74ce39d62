//! Data stage, dataset format: COCO JSON annotation files (`images`, `annotations`, `categories`)
//! and COCO result files (a list of `{image_id, category_id, bbox, score}`), as pycocotools reads
//! them. Read once, checked once: every later stage (the detection datasets, the COCO evaluator,
//! the generated datasets' writers) works on these types.
//!
//! Conventions (pycocotools `coco.py`, dense-tasks.md 2.1):
//! - `bbox` is `[x, y, w, h]` in pixels; `area` is the annotation's own field (the evaluator's
//!   area ranges use it, not `w * h`); `iscrowd` 0/1 (a boolean is accepted too).
//! - Category ids need not be contiguous: [`CategoryMap`] maps them to class indices `0..n` in
//!   ascending id order (mmdetection's `cat2label`) and back.
//! - A result's area is `w * h` (pycocotools `loadRes`).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

/// One image entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    /// Image id, referenced by annotations and results.
    pub id: u64,
    /// Path of the image file, relative to the image folder.
    pub file_name: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// One ground-truth object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    /// Annotation id (unique in the file).
    pub id: u64,
    /// The image it belongs to.
    pub image_id: u64,
    /// Its category (a [`CocoCategory`] id).
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Object area in pixels (the mask area in COCO proper); the evaluator's area ranges use it.
    /// Absent in some tools' files: then `w * h` of the box.
    #[serde(default)]
    pub area: Option<f64>,
    /// Crowd region: matched but never counted (pycocotools).
    #[serde(default, deserialize_with = "flag")]
    pub iscrowd: bool,
    /// pycocotools' optional `ignore` field (overridden by `iscrowd`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_flag"
    )]
    pub ignore: Option<bool>,
    /// Polygons or RLE, kept as read (masks are not used for box AP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<serde_json::Value>,
}

impl CocoAnnotation {
    /// The `area` field, or `w * h` when the file has none.
    pub fn area(&self) -> f64 {
        self.area.unwrap_or(self.bbox[2] * self.bbox[3])
    }

    /// The box as `[x1, y1, x2, y2]`.
    pub fn xyxy(&self) -> [f64; 4] {
        let [x, y, w, h] = self.bbox;
        [x, y, x + w, y + h]
    }
}

/// One category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    /// Category id (any positive integers, not necessarily contiguous).
    pub id: u64,
    /// Display name.
    pub name: String,
    /// COCO's parent name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// A COCO annotation file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CocoFile {
    /// The images.
    pub images: Vec<CocoImage>,
    /// The objects.
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    /// The categories.
    pub categories: Vec<CocoCategory>,
}

/// One detection of a result file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    /// The image it was predicted on.
    pub image_id: u64,
    /// Its category id (the file's ids, not class indices).
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels of the original image.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

impl CocoResult {
    /// `w * h` (pycocotools `loadRes`).
    pub fn area(&self) -> f64 {
        self.bbox[2] * self.bbox[3]
    }
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Int(i64),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Bool(b) => b,
        Flag::Int(i) => i != 0,
    })
}

fn opt_flag<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<bool>, D::Error> {
    flag(d).map(Some)
}

/// Maps a file's category ids to class indices `0..n` in ascending id order and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryMap {
    ids: Vec<u64>,
    names: Vec<String>,
    index: HashMap<u64, u32>,
}

impl CategoryMap {
    /// From the categories of a file (their ids must be unique).
    pub fn new(categories: &[CocoCategory]) -> Result<Self> {
        let mut sorted: BTreeMap<u64, &str> = BTreeMap::new();
        for c in categories {
            if sorted.insert(c.id, &c.name).is_some() {
                bail!("category id {} appears twice", c.id);
            }
        }
        let ids: Vec<u64> = sorted.keys().copied().collect();
        let names = sorted.values().map(|s| s.to_string()).collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        Ok(Self { ids, names, index })
    }

    /// Number of categories.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there are no categories.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The class index of category `id`.
    pub fn class_of(&self, id: u64) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// The category id of class index `class`.
    pub fn id_of(&self, class: u32) -> Option<u64> {
        self.ids.get(class as usize).copied()
    }

    /// Category ids in class-index order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Names in class-index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl CocoFile {
    /// Reads and checks `path`: unique image, annotation and category ids, every annotation on a
    /// known image and category, finite boxes with non-negative sizes. Errors name the file and
    /// the annotation id (or the JSON path of a malformed field).
    pub fn load(path: &Path) -> Result<Self> {
        let file: CocoFile = read_json(path)?;
        file.check()
            .with_context(|| format!("{}: not a valid COCO annotation file", path.display()))?;
        Ok(file)
    }

    /// The checks of [`CocoFile::load`] on an in-memory file.
    pub fn check(&self) -> Result<()> {
        let mut images = HashSet::new();
        for im in &self.images {
            if !images.insert(im.id) {
                bail!("image id {} appears twice", im.id);
            }
        }
        let cats = CategoryMap::new(&self.categories)?;
        let mut anns = HashSet::new();
        for a in &self.annotations {
            if !anns.insert(a.id) {
                bail!("annotation id {} appears twice", a.id);
            }
            if !images.contains(&a.image_id) {
                bail!(
                    "annotation {} refers to image id {}, which is not in `images`",
                    a.id,
                    a.image_id
                );
            }
            if cats.class_of(a.category_id).is_none() {
                bail!(
                    "annotation {} has category id {}, which is not in `categories` (known: {:?})",
                    a.id,
                    a.category_id,
                    cats.ids()
                );
            }
            let [_, _, w, h] = a.bbox;
            if a.bbox.iter().any(|v| !v.is_finite()) || w < 0.0 || h < 0.0 {
                bail!(
                    "annotation {} has bbox {:?}: [x, y, w, h] must be finite with w, h >= 0",
                    a.id,
                    a.bbox
                );
            }
            if let Some(area) = a.area {
                if !area.is_finite() || area < 0.0 {
                    bail!("annotation {} has area {area}", a.id);
                }
            }
        }
        Ok(())
    }

    /// The category map of this file.
    pub fn category_map(&self) -> Result<CategoryMap> {
        CategoryMap::new(&self.categories)
    }

    /// Annotations grouped by image id (every image present, possibly with none), in file order.
    pub fn annotations_by_image(&self) -> HashMap<u64, Vec<&CocoAnnotation>> {
        let mut by: HashMap<u64, Vec<&CocoAnnotation>> =
            self.images.iter().map(|im| (im.id, Vec::new())).collect();
        for a in &self.annotations {
            by.entry(a.image_id).or_default().push(a);
        }
        by
    }

    /// Writes the file as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self)?;
        crate::fsutil::write_atomic(path, &json)
    }
}

/// Reads a result file and checks it against `gt`: every image id in `gt` (pycocotools: "Results
/// do not correspond to current coco set"), every category id known, finite boxes and scores.
pub fn load_results(path: &Path, gt: &CocoFile) -> Result<Vec<CocoResult>> {
    let results: Vec<CocoResult> = read_json(path)?;
    let images: HashSet<u64> = gt.images.iter().map(|im| im.id).collect();
    let cats = gt.category_map()?;
    for (i, r) in results.iter().enumerate() {
        let at = || {
            format!(
                "{}: detection {i} (image_id {})",
                path.display(),
                r.image_id
            )
        };
        if !images.contains(&r.image_id) {
            bail!("{}: image id not in the ground truth", at());
        }
        if cats.class_of(r.category_id).is_none() {
            bail!(
                "{}: category id {} not in the ground truth (known: {:?})",
                at(),
                r.category_id,
                cats.ids()
            );
        }
        if r.bbox.iter().any(|v| !v.is_finite()) || !r.score.is_finite() {
            bail!("{}: bbox {:?} / score {} not finite", at(), r.bbox, r.score);
        }
    }
    Ok(results)
}

/// Writes `results` as a COCO result file, atomically.
pub fn save_results(path: &Path, results: &[CocoResult]) -> Result<()> {
    let json = serde_json::to_vec(results)?;
    crate::fsutil::write_atomic(path, &json)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_slice(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        anyhow::anyhow!("{}: at `{at}`: {}", path.display(), e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GT: &str = r#"{
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 3, "file_name": "b.png", "width": 20, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 5], "area": 40, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 4, 4], "iscrowd": true}
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}]
    }"#;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_fields_and_maps_non_contiguous_categories_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let gt = CocoFile::load(&write(dir.path(), "gt.json", GT)).unwrap();
        assert_eq!(gt.annotations[0].area(), 40.0);
        assert_eq!(gt.annotations[1].area(), 16.0, "no area field: w * h");
        assert!(gt.annotations[1].iscrowd && !gt.annotations[0].iscrowd);
        assert_eq!(gt.annotations[0].xyxy(), [1.0, 2.0, 11.0, 7.0]);
        let map = gt.category_map().unwrap();
        assert_eq!(map.ids(), &[5, 90]);
        assert_eq!(map.names(), &["airplane".to_string(), "toothbrush".into()]);
        assert_eq!(
            (map.class_of(90), map.class_of(5), map.class_of(6)),
            (Some(1), Some(0), None)
        );
        assert_eq!((map.id_of(1), map.id_of(2)), (Some(90), None));
        let by = gt.annotations_by_image();
        assert_eq!(by[&7].len(), 2);
        assert!(by[&3].is_empty(), "an image without boxes is kept");
        // Round trip through save.
        let out = dir.path().join("out.json");
        gt.save(&out).unwrap();
        assert_eq!(CocoFile::load(&out).unwrap(), gt);
    }

    #[test]
    fn bad_files_name_the_file_and_the_annotation() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                GT.replace(
                    "\"image_id\": 7, \"category_id\": 90",
                    "\"image_id\": 8, \"category_id\": 90",
                ),
                "annotation 1 refers to image id 8",
            ),
            (
                GT.replace("\"category_id\": 5", "\"category_id\": 6"),
                "annotation 2 has category id 6, which is not in `categories`",
            ),
            (
                GT.replace("[1, 2, 10, 5]", "[1, 2, -10, 5]"),
                "annotation 1 has bbox",
            ),
            (
                GT.replace("\"id\": 2,", "\"id\": 1,"),
                "annotation id 1 appears twice",
            ),
            (
                GT.replace("[1, 2, 10, 5]", "[1, 2, 10]"),
                "at `annotations[0].bbox`",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = write(dir.path(), &format!("bad{i}.json"), text);
            let err = format!("{:#}", CocoFile::load(&p).unwrap_err());
            assert!(err.contains(want), "case {i}: {err}");
            assert!(
                err.contains(&format!("bad{i}.json")),
                "case {i} names the file: {err}"
            );
        }
    }

    #[test]
    fn results_are_checked_against_the_ground_truth() {
        let dir = tempfile::tempdir().unwrap();
        let gt = CocoFile::load(&write(dir.path(), "gt.json", GT)).unwrap();
        let ok = write(
            dir.path(),
            "dt.json",
            r#"[{"image_id": 3, "category_id": 90, "bbox": [1, 1, 2, 3], "score": 0.5}]"#,
        );
        let r = load_results(&ok, &gt).unwrap();
        assert_eq!(r[0].area(), 6.0);
        let p = dir.path().join("rt.json");
        save_results(&p, &r).unwrap();
        assert_eq!(load_results(&p, &gt).unwrap(), r);
        let bad = write(
            dir.path(),
            "dt_bad.json",
            r#"[{"image_id": 4, "category_id": 90, "bbox": [1, 1, 2, 3], "score": 0.5}]"#,
        );
        let err = format!("{:#}", load_results(&bad, &gt).unwrap_err());
        assert!(
            err.contains("dt_bad.json: detection 0 (image_id 4): image id not in"),
            "{err}"
        );
    }
}
