//! Data stage, detection datasets: images with boxes (and, where a class-map PNG exists, a
//! per-pixel class map) read from a COCO annotation file (`coco`; the generated `digits-det` and
//! `trees` are COCO too) or a Pascal VOC folder (`voc`), served through [`DetTransform`].
//!
//! What is checked when a split is opened (every later stage trusts it):
//! - COCO: [`CocoFile::load`] (unknown category or image ids are errors naming the file and the
//!   annotation id); classes are the [`CategoryMap`] indices (ascending category id); `iscrowd`
//!   (or pycocotools' `ignore`) -> [`ObjectBox::crowd`].
//! - VOC: class ids are the distinct `<name>`s of all the folder's XMLs sorted by name (so both
//!   splits agree: labelme's bus, car, person -> 0, 1, 2); category id = class + 1; image id =
//!   position of the XML in sorted order + 1; `difficult` boxes are kept as crowd (ignored by
//!   matching, as VOC's evaluation ignores them).
//! - An image file that does not exist is an error naming it and its image id
//!   (`data.skip_bad_images: true`: warned about, skipped and counted).
//! - Boxes are clipped to the image; boxes left with no width or height are dropped and counted
//!   ([`LoadStats`]); images without boxes are kept.
//! - Each index's COCO image id, original size and eval scale ([`ImageInfo`]) let an evaluator
//!   map predictions on the served image back to original pixels and to the file's ids
//!   ([`DetectionDataset::ground_truth`] is the split as a [`CocoFile`]).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;

use super::coco::{CategoryMap, CocoAnnotation, CocoCategory, CocoFile, CocoImage};
use super::det_aug::DetTransform;
use super::folder::decode_image;
use super::target::{ClassIds, ClassMap, ObjectBox, Target};
use super::voc::load_voc;
use super::{subset, DataConfig, Dataset, Sample, Split};

/// Where an index's image came from and how the eval transform scales it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// The COCO image id (VOC: position in sorted order + 1).
    pub image_id: u64,
    /// The image file.
    pub path: PathBuf,
    /// Original width in pixels.
    pub width: usize,
    /// Original height in pixels.
    pub height: usize,
    /// `[x, y]` factors of the eval transform: served = original * scale, so a box predicted on
    /// the eval image maps back by dividing its x by `scale[0]` and its y by `scale[1]`.
    pub scale: [f64; 2],
}

/// One image of a split, in original pixels.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    info: ImageInfo,
    boxes: Vec<ObjectBox>,
    /// Annotation id of each box (COCO; VOC: a running number).
    ann_ids: Vec<u64>,
    mask: Option<PathBuf>,
}

/// What opening a split found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Images served.
    pub images: usize,
    /// Boxes kept.
    pub boxes: usize,
    /// Of which crowd / difficult (ignored by matching).
    pub crowd: usize,
    /// Boxes that reached outside their image and were clipped.
    pub clipped: usize,
    /// Boxes dropped for having no width or height inside the image.
    pub dropped: usize,
    /// Images skipped because their file is missing (`data.skip_bad_images`).
    pub skipped_images: usize,
}

/// A detection split held as records; images are decoded on `get`.
#[derive(Debug)]
pub struct DetectionDataset {
    name: String,
    split: Split,
    source: PathBuf,
    tagline: Option<String>,
    records: Vec<Record>,
    categories: CategoryMap,
    stats: LoadStats,
    transform: DetTransform,
}

/// `box` clipped to `width x height`: (clipped box, whether it moved), `None` when nothing with a
/// positive width and height is left.
fn clip_box(xyxy: [f64; 4], width: usize, height: usize) -> (Option<[f32; 4]>, bool) {
    let (w, h) = (width as f64, height as f64);
    let c = [
        xyxy[0].clamp(0.0, w),
        xyxy[1].clamp(0.0, h),
        xyxy[2].clamp(0.0, w),
        xyxy[3].clamp(0.0, h),
    ];
    let moved = c != xyxy;
    let f = c.map(|v| v as f32);
    ((f[2] > f[0] && f[3] > f[1]).then_some(f), moved)
}

impl DetectionDataset {
    /// Opens a COCO split: `ann_file` with its images under `img_dir` (`file_name` relative to
    /// it) and, when `mask_dir` is given, class-map PNGs `mask_dir/<file_name stem>.png`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_coco(
        name: &str,
        split: Split,
        ann_file: &Path,
        img_dir: &Path,
        mask_dir: Option<&Path>,
        cfg: &DataConfig,
        transform: DetTransform,
    ) -> Result<Self> {
        let file = CocoFile::load(ann_file)?;
        let categories = file.category_map()?;
        let mut by_image = file.annotations_by_image();
        let mut stats = LoadStats::default();
        let mut records = Vec::with_capacity(file.images.len());
        for im in &file.images {
            let path = img_dir.join(&im.file_name);
            if !path.is_file() {
                let msg = format!(
                    "{}: image id {} ({}) not found",
                    ann_file.display(),
                    im.id,
                    path.display()
                );
                if cfg.skip_bad_images {
                    eprintln!("warning: {msg}: skipped");
                    stats.skipped_images += 1;
                    continue;
                }
                bail!("{msg} (data.skip_bad_images: true skips such images)");
            }
            let (width, height) = (im.width as usize, im.height as usize);
            let mut rec = Record {
                info: ImageInfo {
                    image_id: im.id,
                    scale: transform.eval_scale(height, width),
                    path,
                    width,
                    height,
                },
                boxes: Vec::new(),
                ann_ids: Vec::new(),
                mask: mask_dir.map(|d| {
                    let stem = Path::new(&im.file_name).with_extension("png");
                    d.join(stem)
                }),
            };
            for a in by_image.remove(&im.id).unwrap_or_default() {
                let class = categories
                    .class_of(a.category_id)
                    .context("category checked by CocoFile::load")?;
                let crowd = a.iscrowd || a.ignore == Some(true);
                push_box(&mut rec, &mut stats, a.xyxy(), class, crowd, a.id);
            }
            records.push(rec);
        }
        Self::finish(
            name, split, ann_file, records, categories, stats, cfg, transform,
        )
    }

    /// Opens a VOC split of the folder `dir` (`Annotations/*.xml`, `JPEGImages/`): the stems
    /// listed in `ImageSets/Main/{train,val}.txt` when that file exists, else every XML.
    pub fn from_voc(
        name: &str,
        split: Split,
        dir: &Path,
        cfg: &DataConfig,
        transform: DetTransform,
    ) -> Result<Self> {
        let ann_dir = dir.join("Annotations");
        let mut xmls: Vec<PathBuf> = std::fs::read_dir(&ann_dir)
            .with_context(|| format!("{}: not a VOC folder (no Annotations/)", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        xmls.sort();
        let stem = |p: &Path| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        };
        let files = xmls
            .iter()
            .map(|p| load_voc(p))
            .collect::<Result<Vec<_>>>()?;
        let names: BTreeSet<&str> = files
            .iter()
            .flat_map(|f| f.objects.iter().map(|o| o.name.as_str()))
            .collect();
        let cats: Vec<CocoCategory> = names
            .iter()
            .enumerate()
            .map(|(i, n)| CocoCategory {
                id: i as u64 + 1,
                name: n.to_string(),
                supercategory: None,
            })
            .collect();
        let categories = CategoryMap::new(&cats)?;
        let list_name = match split {
            Split::Train => "train.txt",
            Split::Eval => "val.txt",
        };
        let list = dir.join("ImageSets/Main").join(list_name);
        let wanted: Option<BTreeSet<String>> = if list.is_file() {
            let text = std::fs::read_to_string(&list)
                .with_context(|| format!("reading {}", list.display()))?;
            Some(text.split_whitespace().map(str::to_string).collect())
        } else {
            None
        };
        let mut stats = LoadStats::default();
        let mut records = Vec::new();
        let mut ann_id = 0;
        for (i, (xml, f)) in xmls.iter().zip(&files).enumerate() {
            if wanted.as_ref().is_some_and(|w| !w.contains(&stem(xml))) {
                continue;
            }
            let path = dir.join("JPEGImages").join(&f.filename);
            if !path.is_file() {
                let msg = format!("{}: image {} not found", xml.display(), path.display());
                if cfg.skip_bad_images {
                    eprintln!("warning: {msg}: skipped");
                    stats.skipped_images += 1;
                    continue;
                }
                bail!("{msg} (data.skip_bad_images: true skips such images)");
            }
            let (width, height) = match (f.width, f.height) {
                (Some(w), Some(h)) => (w as usize, h as usize),
                _ => {
                    let (w, h) = image::image_dimensions(&path)
                        .with_context(|| format!("{}: reading its size", path.display()))?;
                    (w as usize, h as usize)
                }
            };
            let mut rec = Record {
                info: ImageInfo {
                    image_id: i as u64 + 1,
                    scale: transform.eval_scale(height, width),
                    path,
                    width,
                    height,
                },
                boxes: Vec::new(),
                ann_ids: Vec::new(),
                mask: None,
            };
            for o in &f.objects {
                ann_id += 1;
                let class = categories
                    .class_of(names.iter().position(|n| *n == o.name).unwrap_or(0) as u64 + 1)
                    .context("every name has a category")?;
                push_box(&mut rec, &mut stats, o.xyxy, class, o.difficult, ann_id);
            }
            records.push(rec);
        }
        let source = if wanted.is_some() { list } else { dir.into() };
        Self::finish(
            name, split, &source, records, categories, stats, cfg, transform,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        name: &str,
        split: Split,
        source: &Path,
        records: Vec<Record>,
        categories: CategoryMap,
        mut stats: LoadStats,
        cfg: &DataConfig,
        transform: DetTransform,
    ) -> Result<Self> {
        let keep = subset::select(cfg, split, records.len(), None)?;
        let records: Vec<Record> = keep.into_iter().map(|i| records[i].clone()).collect();
        stats.images = records.len();
        stats.boxes = records.iter().map(|r| r.boxes.len()).sum();
        stats.crowd = records
            .iter()
            .flat_map(|r| &r.boxes)
            .filter(|b| b.crowd)
            .count();
        Ok(Self {
            name: name.into(),
            split,
            source: source.into(),
            tagline: None,
            records,
            categories,
            stats,
            transform,
        })
    }

    /// Adds a phrase to the describe line (e.g. "real digits, synthetic layout").
    pub fn with_tagline(mut self, tagline: &str) -> Self {
        self.tagline = Some(tagline.into());
        self
    }

    /// Counts of the split.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// Image id, original size and eval scale of `index`.
    pub fn image_info(&self, index: usize) -> Option<&ImageInfo> {
        self.records.get(index).map(|r| &r.info)
    }

    /// The boxes of `index` in original pixels (clipped; dropped ones gone).
    pub fn boxes(&self, index: usize) -> Option<&[ObjectBox]> {
        self.records.get(index).map(|r| &r.boxes[..])
    }

    /// Category ids <-> classes.
    pub fn categories(&self) -> &CategoryMap {
        &self.categories
    }

    /// The served split as a COCO ground-truth file (original pixels, the clipped boxes), for the
    /// evaluator.
    pub fn ground_truth(&self) -> CocoFile {
        let ids = self.categories.ids();
        CocoFile {
            images: self
                .records
                .iter()
                .map(|r| CocoImage {
                    id: r.info.image_id,
                    file_name: r.info.path.display().to_string(),
                    width: r.info.width as u32,
                    height: r.info.height as u32,
                })
                .collect(),
            annotations: self
                .records
                .iter()
                .flat_map(|r| {
                    r.boxes
                        .iter()
                        .zip(&r.ann_ids)
                        .map(move |(b, id)| (r, b, id))
                })
                .map(|(r, b, id)| {
                    let [x1, y1, x2, y2] = b.xyxy.map(|v| v as f64);
                    CocoAnnotation {
                        id: *id,
                        image_id: r.info.image_id,
                        category_id: ids[b.class as usize],
                        bbox: [x1, y1, x2 - x1, y2 - y1],
                        area: None,
                        iscrowd: b.crowd,
                        ignore: None,
                        segmentation: None,
                    }
                })
                .collect(),
            categories: self
                .categories
                .ids()
                .iter()
                .zip(self.categories.names())
                .map(|(id, n)| CocoCategory {
                    id: *id,
                    name: n.clone(),
                    supercategory: None,
                })
                .collect(),
        }
    }
}

fn push_box(
    rec: &mut Record,
    stats: &mut LoadStats,
    xyxy: [f64; 4],
    class: u32,
    crowd: bool,
    ann_id: u64,
) {
    let (clipped, moved) = clip_box(xyxy, rec.info.width, rec.info.height);
    match clipped {
        Some(b) => {
            stats.clipped += moved as usize;
            rec.boxes.push(ObjectBox {
                xyxy: b,
                class,
                crowd,
            });
            rec.ann_ids.push(ann_id);
        }
        None => stats.dropped += 1,
    }
}

/// Reads a class-map PNG as stored: 8-bit grey values or 8-bit palette indices (VOC's
/// `SegmentationClassPNG`), never the palette's colours.
pub fn read_class_map(path: &Path) -> Result<ClassMap> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let size = reader
        .output_buffer_size()
        .with_context(|| format!("{}: image too large", path.display()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: cannot decode", path.display()))?;
    if info.bit_depth != png::BitDepth::Eight
        || !matches!(
            info.color_type,
            png::ColorType::Grayscale | png::ColorType::Indexed
        )
    {
        bail!(
            "{}: a class map must be 8-bit grey or palette, not {:?} {:?}",
            path.display(),
            info.color_type,
            info.bit_depth
        );
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let mut ids = Vec::with_capacity(w * h);
    for row in buf[..info.buffer_size()].chunks_exact(info.line_size) {
        ids.extend_from_slice(&row[..w]);
    }
    ClassMap::new(w, h, ClassIds::U8(ids))
}

impl Dataset for DetectionDataset {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        let Some(rec) = self.records.get(index) else {
            bail!(
                "{}: index {index} out of range ({} samples)",
                self.describe(),
                self.records.len()
            );
        };
        let img = decode_image(&rec.info.path)?;
        if (img.width, img.height) != (rec.info.width, rec.info.height) {
            bail!(
                "{}: image is {}x{}, its annotation says {}x{} (image id {})",
                rec.info.path.display(),
                img.width,
                img.height,
                rec.info.width,
                rec.info.height,
                rec.info.image_id
            );
        }
        let target = match &rec.mask {
            Some(m) if m.is_file() => Target::BoxesAndMask {
                boxes: rec.boxes.clone(),
                mask: read_class_map(m)?,
            },
            _ => Target::Boxes(rec.boxes.clone()),
        };
        self.transform
            .apply(img, target, rng)
            .with_context(|| format!("{}", rec.info.path.display()))
    }

    fn channels(&self) -> usize {
        self.transform.in_chans
    }

    fn num_classes(&self) -> Option<usize> {
        Some(self.categories.len())
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(self.categories.names().to_vec())
    }

    fn describe(&self) -> String {
        let s = &self.stats;
        let t = &self.transform;
        let tag = self
            .tagline
            .as_ref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        let served = if t.train {
            format!("scale-jittered {0}x{0} crops", t.size)
        } else {
            format!("longer side {}", t.size)
        };
        let mut line = format!(
            "{}{tag} {} ({}): {} images, {} boxes ({} crowd/difficult), {} classes, served {}ch {served}",
            self.name,
            self.split.name(),
            self.source.display(),
            s.images,
            s.boxes,
            s.crowd,
            self.categories.len(),
            t.in_chans,
        );
        if s.clipped + s.dropped + s.skipped_images > 0 {
            line += &format!(
                "; {} boxes clipped, {} dropped (no area inside the image), {} images skipped",
                s.clipped, s.dropped, s.skipped_images
            );
        }
        line
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::det_aug::DetAugConfig;
    use crate::data::folder::tests::write_png;
    use crate::rng::rng_for;

    pub(crate) fn eval_transform(size: usize) -> DetTransform {
        DetTransform::new(
            size,
            3,
            false,
            &DetAugConfig::default(),
            &DataConfig::default().aug,
        )
        .unwrap()
    }

    const GT: &str = r#"{
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 3, "file_name": "b.png", "width": 20, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [30, 20, 20, 20], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [5, 5, 0, 8]},
            {"id": 5, "image_id": 7, "category_id": 5, "bbox": [45, 5, 3, 3]}
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}]
    }"#;

    fn coco_dir(gt: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("img/a.png"), 40, 30, [200, 10, 10]);
        write_png(&dir.path().join("img/b.png"), 20, 20, [10, 200, 10]);
        std::fs::write(dir.path().join("gt.json"), gt).unwrap();
        dir
    }

    fn open(dir: &Path, cfg: &DataConfig) -> Result<DetectionDataset> {
        DetectionDataset::from_coco(
            "coco",
            Split::Eval,
            &dir.join("gt.json"),
            &dir.join("img"),
            None,
            cfg,
            eval_transform(20),
        )
    }

    #[test]
    fn coco_boxes_are_clipped_dropped_counted_and_images_without_boxes_kept() {
        let dir = coco_dir(GT);
        let ds = open(dir.path(), &DataConfig::default()).unwrap();
        assert_eq!(ds.len(), 2);
        // Classes by ascending category id: 5 airplane -> 0, 90 toothbrush -> 1.
        assert_eq!(ds.class_names().unwrap(), ["airplane", "toothbrush"]);
        let b = ds.boxes(0).unwrap();
        assert_eq!(
            b,
            &[
                ObjectBox {
                    xyxy: [1.0, 2.0, 11.0, 7.0],
                    class: 1,
                    crowd: false
                },
                // [30, 20, 50, 40] clipped to the 40 x 30 image, crowd kept.
                ObjectBox {
                    xyxy: [30.0, 20.0, 40.0, 30.0],
                    class: 0,
                    crowd: true
                },
            ]
        );
        // Zero width (id 4) and wholly outside (id 5, x from 45 on a 40 wide image): dropped.
        assert_eq!(
            ds.stats(),
            LoadStats {
                images: 2,
                boxes: 2,
                crowd: 1,
                clipped: 1,
                dropped: 2,
                skipped_images: 0
            }
        );
        assert!(ds.boxes(1).unwrap().is_empty(), "image without boxes kept");
        let info = ds.image_info(0).unwrap();
        assert_eq!((info.image_id, info.width, info.height), (7, 40, 30));
        // Eval: longer side 20 -> 20 x 15, scale 0.5.
        assert_eq!(info.scale, [0.5, 0.5]);
        let s = ds.get(0, &mut rng_for(0, &[])).unwrap();
        assert_eq!((s.width, s.height), (20, 15));
        assert_eq!(s.target.boxes().unwrap()[0].xyxy, [0.5, 1.0, 5.5, 3.5]);
        assert!(ds.describe().contains("2 dropped"), "{}", ds.describe());
        // The ground truth keeps ids and maps classes back to category ids.
        let gt = ds.ground_truth();
        assert_eq!(gt.annotations.len(), 2);
        assert_eq!(
            (gt.annotations[1].id, gt.annotations[1].category_id),
            (2, 5)
        );
        assert_eq!(gt.annotations[1].bbox, [30.0, 20.0, 10.0, 10.0]);
        gt.check().unwrap();
    }

    #[test]
    fn coco_bad_inputs_name_the_file() {
        // Unknown category id: CocoFile::load names the file and the annotation id.
        let dir = coco_dir(&GT.replace("\"category_id\": 90", "\"category_id\": 91"));
        let err = format!(
            "{:#}",
            open(dir.path(), &DataConfig::default()).unwrap_err()
        );
        assert!(
            err.contains("gt.json") && err.contains("annotation 1 has category id 91"),
            "{err}"
        );
        // An image file that is missing: error naming it, or skipped and counted.
        let dir = coco_dir(&GT.replace("b.png", "missing.png"));
        let err = format!(
            "{:#}",
            open(dir.path(), &DataConfig::default()).unwrap_err()
        );
        assert!(
            err.contains("image id 3") && err.contains("missing.png") && err.contains("not found"),
            "{err}"
        );
        let cfg = DataConfig {
            skip_bad_images: true,
            ..Default::default()
        };
        let ds = open(dir.path(), &cfg).unwrap();
        assert_eq!((ds.len(), ds.stats().skipped_images), (1, 1));
        // An image whose size disagrees with the annotation fails on get, naming it.
        let dir = coco_dir(&GT.replace("\"width\": 20", "\"width\": 21"));
        let ds = open(dir.path(), &DataConfig::default()).unwrap();
        let err = format!("{:#}", ds.get(1, &mut rng_for(0, &[])).unwrap_err());
        assert!(
            err.contains("b.png: image is 20x20, its annotation says 21x20"),
            "{err}"
        );
    }

    fn voc_xml(file: &str, objects: &[(&str, [f64; 4], bool)]) -> String {
        let objs: String = objects
            .iter()
            .map(|(n, b, d)| {
                format!(
                    "<object><name>{n}</name><truncated/><difficult>{}</difficult><bndbox>\
                     <xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
                    *d as u8, b[0], b[1], b[2], b[3]
                )
            })
            .collect();
        format!(
            "<annotation><filename>{file}</filename><size><width>40</width><height>30</height>\
             </size>{objs}</annotation>"
        )
    }

    #[test]
    fn voc_classes_sorted_difficult_as_crowd_and_splits_from_imagesets() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("Annotations")).unwrap();
        std::fs::create_dir_all(d.join("ImageSets/Main")).unwrap();
        for (stem, objs) in [
            ("x1", vec![("zebra", [1.5, 2.0, 10.0, 12.25], false)]),
            (
                "x2",
                vec![
                    ("ant", [0.0, 0.0, 45.0, 10.0], true),
                    ("zebra", [3.0, 3.0, 3.0, 9.0], false),
                ],
            ),
        ] {
            std::fs::write(
                d.join(format!("Annotations/{stem}.xml")),
                voc_xml(&format!("{stem}.jpg"), &objs),
            )
            .unwrap();
            write_png(&d.join(format!("JPEGImages/{stem}.jpg")), 40, 30, [1, 2, 3]);
        }
        std::fs::write(d.join("ImageSets/Main/train.txt"), "x1\n").unwrap();
        std::fs::write(d.join("ImageSets/Main/val.txt"), "x2\n").unwrap();
        let cfg = DataConfig::default();
        let tr =
            DetectionDataset::from_voc("voc", Split::Train, d, &cfg, eval_transform(40)).unwrap();
        let ev =
            DetectionDataset::from_voc("voc", Split::Eval, d, &cfg, eval_transform(40)).unwrap();
        // Names over the whole folder, sorted: ant 0, zebra 1 in both splits.
        assert_eq!(tr.class_names().unwrap(), ["ant", "zebra"]);
        assert_eq!(ev.class_names().unwrap(), ["ant", "zebra"]);
        assert_eq!((tr.len(), ev.len()), (1, 1));
        assert_eq!(tr.boxes(0).unwrap()[0].xyxy, [1.5, 2.0, 10.0, 12.25]);
        assert_eq!(tr.boxes(0).unwrap()[0].class, 1);
        // x2: the difficult ant is clipped to 40 and kept as crowd; the zero-width zebra dropped.
        assert_eq!(
            ev.boxes(0).unwrap(),
            &[ObjectBox {
                xyxy: [0.0, 0.0, 40.0, 10.0],
                class: 0,
                crowd: true
            }]
        );
        assert_eq!((ev.stats().dropped, ev.stats().clipped), (1, 1));
        assert_eq!(ev.image_info(0).unwrap().image_id, 2);
        assert_eq!(ev.ground_truth().categories[1].id, 2);
        // A missing image and a corrupt XML are errors naming the file.
        std::fs::remove_file(d.join("JPEGImages/x2.jpg")).unwrap();
        let err = format!(
            "{:#}",
            DetectionDataset::from_voc("voc", Split::Eval, d, &cfg, eval_transform(40))
                .err()
                .unwrap()
        );
        assert!(
            err.contains("x2.xml: image") && err.contains("x2.jpg not found"),
            "{err}"
        );
        std::fs::write(d.join("Annotations/x3.xml"), "<annotation><filename>").unwrap();
        let err = format!(
            "{:#}",
            DetectionDataset::from_voc("voc", Split::Train, d, &cfg, eval_transform(40))
                .err()
                .unwrap()
        );
        assert!(err.contains("x3.xml: not a valid VOC annotation"), "{err}");
    }

    #[test]
    fn class_maps_are_read_as_stored_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        image::GrayImage::from_raw(3, 2, vec![0, 1, 10, 255, 4, 0])
            .unwrap()
            .save(&p)
            .unwrap();
        let m = read_class_map(&p).unwrap();
        assert_eq!((m.width(), m.height()), (3, 2));
        assert_eq!(m.ids(), &ClassIds::U8(vec![0, 1, 10, 255, 4, 0]));
        write_png(&dir.path().join("rgb.png"), 2, 2, [1, 2, 3]);
        let err = read_class_map(&dir.path().join("rgb.png"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("8-bit grey or palette"), "{err}");
    }

    #[test]
    fn labelme_examples_load_through_voc_and_coco() {
        let root = crate::data::test_data_root().join("labelme");
        if !root.join(".complete").is_file() {
            eprintln!(
                "skipped: {} not installed (scripts/setup-data.sh installs Debian labelme-examples)",
                root.display()
            );
            return;
        }
        let cfg = DataConfig::default();
        // VOC: 9 boxes over 3 photos; names sorted bus, car, person; float corners as written.
        let voc = DetectionDataset::from_voc(
            "voc",
            Split::Train,
            &root.join("voc"),
            &cfg,
            eval_transform(250),
        )
        .unwrap();
        assert_eq!(voc.len(), 3);
        assert_eq!(voc.stats().boxes, 9);
        assert_eq!((voc.stats().dropped, voc.stats().crowd), (0, 0));
        assert_eq!(voc.class_names().unwrap(), ["bus", "car", "person"]);
        let counts: Vec<usize> = (0..3).map(|i| voc.boxes(i).unwrap().len()).collect();
        assert_eq!(counts, [2, 4, 3], "2011_000003, 2011_000006, 2011_000025");
        let first = voc.boxes(0).unwrap()[0];
        assert_eq!(first.class, 2);
        let want = [191.0, 107.369_003_690_036_89, 313.0, 329.369_003_690_036_95];
        assert_eq!(first.xyxy, want.map(|v: f64| v as f32));
        let bus = voc.boxes(2).unwrap()[0];
        let want = [84.0, 20.384_615_384_615_387, 435.0, 373.384_615_384_615_36];
        assert_eq!((bus.class, bus.xyxy), (0, want.map(|v: f64| v as f32)));
        // The car touches the right edge (x2 = 500 = width): kept as written, not clipped.
        assert_eq!(voc.boxes(2).unwrap()[2].xyxy, [409.0, 167.0, 500.0, 266.0]);
        assert_eq!(voc.stats().clipped, 0);
        let info = voc.image_info(0).unwrap();
        assert_eq!((info.image_id, info.width, info.height), (1, 500, 338));
        assert_eq!(info.scale, [0.5, 169.0 / 338.0]);
        let s = voc.get(0, &mut rng_for(0, &[])).unwrap();
        assert_eq!((s.width, s.height), (250, 169));
        // COCO: the same photos, 12 instances, 21 categories (id 0 = _background_).
        let cfg = DataConfig {
            dataset: "coco".into(),
            eval_ann_file: Some(root.join("coco/annotations.json")),
            ..Default::default()
        };
        let coco = crate::data::open_detection(&cfg, Split::Eval, eval_transform(250)).unwrap();
        assert_eq!((coco.len(), coco.stats().boxes), (3, 12));
        let names = coco.class_names().unwrap();
        assert_eq!(
            (names.len(), names[0].as_str(), names[15].as_str()),
            (21, "_background_", "person")
        );
        // Annotation 0: bbox [191, 107, 123, 221] on image id 0 (2011_000003.jpg).
        assert_eq!(coco.image_info(0).unwrap().image_id, 0);
        assert_eq!(coco.boxes(0).unwrap()[0].xyxy, [191.0, 107.0, 314.0, 328.0]);
        assert_eq!(coco.boxes(0).unwrap()[0].class, 15);
        let s = coco.get(1, &mut rng_for(0, &[])).unwrap();
        assert_eq!(
            s.target.boxes().unwrap().len(),
            3,
            "2011_000025: 2 buses and a car"
        );
        // A missing key is named.
        let err = crate::data::open_detection(&cfg, Split::Train, eval_transform(250))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs data.ann_file"), "{err}");
    }
}
