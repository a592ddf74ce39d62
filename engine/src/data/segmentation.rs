//! Data stage, semantic segmentation datasets: images with per-pixel class maps (PNG, 8-bit grey
//! or palette indices, 255 = ignore), served through [`SegTransform`].
//!
//! Layouts (`data.dataset`):
//! - `seg-folder`: `data.img_dir` + `data.mask_dir` (eval: `data.eval_img_dir` +
//!   `data.eval_mask_dir`), every image matched to `<mask_dir>/<relative path, stem>.png`;
//! - `voc-seg`: a Pascal VOC folder `data.path` (eval: `data.eval_path`, default the same folder):
//!   `JPEGImages/` and `SegmentationClass/` (labelme's `SegmentationClassPNG/` also read), the
//!   stems of `ImageSets/Segmentation/{train,val}.txt` when that file exists, else every image;
//!   class names from `class_names.txt` there when present;
//! - `ade20k`: an ADEChallengeData2016 folder `data.path`: `images/{training,validation}/` and
//!   `annotations/{training,validation}/`, `reduce_zero_label` on by default;
//! - `digits-seg`: the class maps of the generated `digits-det` canvases ("real digits, synthetic
//!   layout"): 0 = background, 1-10 = digits "0"-"9", 255 = anti-aliased edges.
//!
//! Class names: `data.seg.classes`, else `data.seg.classes_file` (one per line), else the
//! layout's own (VOC `class_names.txt`, digits-seg's); otherwise `data.seg.num_classes` numbered
//! names. Palette: `data.seg.palette`, else the VOC colour map (class `i` gets VOC's colour `i`).
//!
//! Checked when a split is opened: the folders exist and hold images; every image has its label
//! file (a missing one is an error naming both paths). Checked on every read (errors name the
//! file): the label map has its image's size; with `reduce_zero_label` (mmseg: 0 -> 255, `v` ->
//! `v - 1`) applied, every value is a class or 255. A value that is neither is an error, not a
//! silent ignore (the documented choice: mmseg would crash in the loss or count it nowhere).
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::detection::read_class_map;
use super::folder::{decode_image, list_images};
use super::seg_aug::SegTransform;
use super::target::{ClassIds, ClassMap, IGNORE};
use super::{digits_det, subset, DataConfig, Dataset, Sample, Split};

/// Class names, palette and label convention of a segmentation dataset (`data.seg`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegDataConfig {
    /// Class names in class-id order (wins over `classes_file`).
    pub classes: Option<Vec<String>>,
    /// A text file with one class name per line.
    pub classes_file: Option<PathBuf>,
    /// Number of classes when no names are given (names are then "0", "1", ...).
    pub num_classes: Option<usize>,
    /// RGB colour per class for pictures; null = the VOC colour map.
    pub palette: Option<Vec<[u8; 3]>>,
    /// mmseg's `reduce_zero_label`; null = on for `ade20k`, off otherwise.
    pub reduce_zero_label: Option<bool>,
}

/// The layout names [`open_segmentation`] knows.
pub const SEG_DATASETS: [&str; 4] = ["seg-folder", "voc-seg", "ade20k", "digits-seg"];

/// One image and its label file.
#[derive(Debug, Clone, PartialEq)]
struct SegRecord {
    image: PathBuf,
    label: PathBuf,
}

/// A segmentation split held as file pairs; images and labels are decoded on `get`.
#[derive(Debug)]
pub struct SegmentationDataset {
    name: String,
    split: Split,
    source: PathBuf,
    tagline: Option<String>,
    records: Vec<SegRecord>,
    classes: Vec<String>,
    palette: Vec<[u8; 3]>,
    reduce_zero_label: bool,
    transform: SegTransform,
}

/// The PASCAL VOC colour map (`VOCdevkit`'s `labelcolormap`): colour of class `i`.
pub fn voc_color(i: usize) -> [u8; 3] {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = i;
    for j in 0..8 {
        r |= ((c & 1) as u8) << (7 - j);
        g |= (((c >> 1) & 1) as u8) << (7 - j);
        b |= (((c >> 2) & 1) as u8) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

/// The 21 PASCAL VOC classes (mmseg `PascalVOCDataset`).
pub const VOC_CLASSES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

fn read_names(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    ensure!(!names.is_empty(), "{}: no class names", path.display());
    Ok(names)
}

/// The label file of `image` (relative to `img_dir`) in `mask_dir`: same relative path, `.png`.
fn label_of(image: &Path, img_dir: &Path, mask_dir: &Path) -> PathBuf {
    let rel = image.strip_prefix(img_dir).unwrap_or(image);
    mask_dir.join(rel).with_extension("png")
}

/// Pairs every image under `img_dir` (those whose stem is in `wanted`, when given) with its label
/// in `mask_dir`; a missing label is an error naming both.
fn pair_folder(
    img_dir: &Path,
    mask_dir: &Path,
    wanted: Option<&std::collections::BTreeSet<String>>,
) -> Result<Vec<SegRecord>> {
    ensure!(
        mask_dir.is_dir(),
        "label folder {} not found (images in {})",
        mask_dir.display(),
        img_dir.display()
    );
    let mut out = vec![];
    for image in list_images(img_dir)? {
        let stem = image
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if wanted.is_some_and(|w| !w.contains(&stem)) {
            continue;
        }
        let label = label_of(&image, img_dir, mask_dir);
        if !label.is_file() {
            bail!(
                "{}: its label file {} is missing",
                image.display(),
                label.display()
            );
        }
        out.push(SegRecord { image, label });
    }
    if let Some(w) = wanted {
        ensure!(
            out.len() == w.len(),
            "{} of the {} listed images were found in {}",
            out.len(),
            w.len(),
            img_dir.display()
        );
    }
    Ok(out)
}

/// Opens `split` of the configured segmentation dataset (module doc).
pub fn open_segmentation(
    cfg: &DataConfig,
    split: Split,
    t: SegTransform,
) -> Result<SegmentationDataset> {
    let name = cfg.dataset.as_str();
    let train = split == Split::Train;
    let pick =
        |tr: &Option<PathBuf>, ev: &Option<PathBuf>| if train { tr.clone() } else { ev.clone() };
    let mut own_names: Option<Vec<String>> = None;
    let mut tagline = None;
    let (source, records) = match name {
        "seg-folder" => {
            let (ik, mk) = if train {
                ("data.img_dir", "data.mask_dir")
            } else {
                ("data.eval_img_dir", "data.eval_mask_dir")
            };
            let img = pick(&cfg.img_dir, &cfg.eval_img_dir)
                .with_context(|| format!("data.dataset `seg-folder` needs {ik}"))?;
            let mask = pick(&cfg.mask_dir, &cfg.eval_mask_dir)
                .with_context(|| format!("data.dataset `seg-folder` needs {mk}"))?;
            (img.clone(), pair_folder(&img, &mask, None)?)
        }
        "voc-seg" => {
            let dir = if train {
                cfg.path.clone()
            } else {
                cfg.eval_path.clone().or_else(|| cfg.path.clone())
            }
            .context("data.dataset `voc-seg` needs data.path (a VOC folder)")?;
            let img = dir.join("JPEGImages");
            ensure!(
                img.is_dir(),
                "{}: not a VOC folder (no JPEGImages/)",
                dir.display()
            );
            let masks = ["SegmentationClass", "SegmentationClassPNG"]
                .iter()
                .map(|m| dir.join(m))
                .find(|m| m.is_dir() && list_images(m).is_ok_and(|l| !l.is_empty()))
                .with_context(|| {
                    format!(
                        "{}: no SegmentationClass/ (or SegmentationClassPNG/) with PNG labels",
                        dir.display()
                    )
                })?;
            let list = dir.join("ImageSets/Segmentation").join(if train {
                "train.txt"
            } else {
                "val.txt"
            });
            let wanted = if list.is_file() {
                let text = std::fs::read_to_string(&list)
                    .with_context(|| format!("reading {}", list.display()))?;
                Some(text.split_whitespace().map(str::to_string).collect())
            } else {
                None
            };
            let names = dir.join("class_names.txt");
            own_names = Some(if names.is_file() {
                read_names(&names)?
            } else {
                VOC_CLASSES.iter().map(|s| s.to_string()).collect()
            });
            let src = if wanted.is_some() { list } else { dir.clone() };
            (src, pair_folder(&img, &masks, wanted.as_ref())?)
        }
        "ade20k" => {
            let dir = cfg
                .path
                .clone()
                .context("data.dataset `ade20k` needs data.path (ADEChallengeData2016)")?;
            let sub = if train { "training" } else { "validation" };
            let img = dir.join("images").join(sub);
            ensure!(
                img.is_dir(),
                "{}: not an ADE20K folder (no images/{sub}/)",
                dir.display()
            );
            (
                img.clone(),
                pair_folder(&img, &dir.join("annotations").join(sub), None)?,
            )
        }
        "digits-seg" => {
            let dir = digits_det::ensure_generated(cfg)?;
            let (_, img, mask) = digits_det::split_paths(&dir, split);
            own_names = Some(
                std::iter::once("background".to_string())
                    .chain((0..10).map(|d| d.to_string()))
                    .collect(),
            );
            tagline = Some(digits_det::TAGLINE.to_string());
            (img.clone(), pair_folder(&img, &mask, None)?)
        }
        other => bail!(
            "data.dataset `{other}` is not a segmentation dataset ({})",
            SEG_DATASETS.join(", ")
        ),
    };
    let seg = &cfg.seg;
    let classes = match (&seg.classes, &seg.classes_file, own_names, seg.num_classes) {
        (Some(c), _, _, _) => c.clone(),
        (None, Some(f), _, _) => read_names(f).context("data.seg.classes_file")?,
        (None, None, Some(c), _) => c,
        (None, None, None, Some(n)) => (0..n).map(|i| i.to_string()).collect(),
        (None, None, None, None) if name == "ade20k" => (0..150).map(|i| i.to_string()).collect(),
        _ => bail!(
            "{}: name the classes with data.seg.classes, data.seg.classes_file or \
             data.seg.num_classes",
            source.display()
        ),
    };
    ensure!(
        !classes.is_empty() && classes.len() < IGNORE as usize,
        "{} classes: a segmentation dataset has 1 to 254 (255 is the ignore value)",
        classes.len()
    );
    if let Some(n) = seg.num_classes {
        ensure!(
            n == classes.len(),
            "data.seg.num_classes is {n} but {} class names are given",
            classes.len()
        );
    }
    let palette = match &seg.palette {
        Some(p) => {
            ensure!(
                p.len() >= classes.len(),
                "data.seg.palette has {} colours for {} classes",
                p.len(),
                classes.len()
            );
            p.clone()
        }
        None => (0..classes.len()).map(voc_color).collect(),
    };
    let keep = subset::select(cfg, split, records.len(), None)?;
    let records: Vec<SegRecord> = keep.into_iter().map(|i| records[i].clone()).collect();
    Ok(SegmentationDataset {
        name: name.into(),
        split,
        source,
        tagline,
        records,
        classes,
        palette,
        reduce_zero_label: seg.reduce_zero_label.unwrap_or(name == "ade20k"),
        transform: t,
    })
}

impl SegmentationDataset {
    /// Class names in class-id order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Colour of each class.
    pub fn palette(&self) -> &[[u8; 3]] {
        &self.palette
    }

    /// The image file of `index`.
    pub fn image_path(&self, index: usize) -> Option<&Path> {
        self.records.get(index).map(|r| r.image.as_path())
    }

    /// Whether stored labels are shifted (ADE20K's `reduce_zero_label`).
    pub fn reduce_zero_label(&self) -> bool {
        self.reduce_zero_label
    }

    /// The transform the split serves through.
    pub fn transform(&self) -> &SegTransform {
        &self.transform
    }

    /// The class map of `index` at its original size, `reduce_zero_label` applied and checked
    /// (what metrics compare against).
    pub fn label(&self, index: usize) -> Result<ClassMap> {
        let rec = self.record(index)?;
        let m = read_class_map(&rec.label)?;
        self.convert(m, &rec.label)
    }

    fn record(&self, index: usize) -> Result<&SegRecord> {
        self.records.get(index).with_context(|| {
            format!(
                "{}: index {index} out of range ({} samples)",
                self.describe(),
                self.records.len()
            )
        })
    }

    /// `reduce_zero_label`, then the range check (module doc).
    fn convert(&self, m: ClassMap, path: &Path) -> Result<ClassMap> {
        let n = self.classes.len();
        let ClassIds::U8(mut ids) = m.ids().clone() else {
            bail!("{}: 16-bit class maps are not read", path.display());
        };
        if self.reduce_zero_label {
            for v in ids.iter_mut() {
                *v = match *v {
                    0 => IGNORE as u8,
                    255 => 255,
                    v => v - 1,
                };
            }
        }
        if let Some(pos) = ids
            .iter()
            .position(|&v| v != IGNORE as u8 && v as usize >= n)
        {
            let bad = ids[pos];
            let count = ids.iter().filter(|&&v| v == bad).count();
            bail!(
                "{}: label value {bad} at (x {}, y {}) ({count} pixels){} is not a class of \
                 0..{n} nor the ignore value 255",
                path.display(),
                pos % m.width(),
                pos / m.width(),
                if self.reduce_zero_label {
                    " after reduce_zero_label"
                } else {
                    ""
                }
            );
        }
        ClassMap::new(m.width(), m.height(), ClassIds::U8(ids))
    }
}

/// Encodes a class map as an 8-bit palette PNG (the stored index is the class, so
/// [`read_class_map`] and `mimlab metrics miou` read it back; viewers show `palette` colours,
/// index 255 white).
pub fn encode_label_png(
    width: usize,
    height: usize,
    ids: &[u8],
    palette: &[[u8; 3]],
) -> Result<Vec<u8>> {
    ensure!(
        ids.len() == width * height,
        "{} class ids for a {width}x{height} map",
        ids.len()
    );
    let mut pal = vec![0u8; 256 * 3];
    for (i, c) in palette.iter().take(255).enumerate() {
        pal[3 * i..3 * i + 3].copy_from_slice(c);
    }
    pal[255 * 3..].copy_from_slice(&[255, 255, 255]);
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(pal);
    let mut w = enc.write_header().context("encoding a label PNG")?;
    w.write_image_data(ids).context("encoding a label PNG")?;
    w.finish().context("encoding a label PNG")?;
    Ok(out)
}

impl Dataset for SegmentationDataset {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        let rec = self.record(index)?;
        let img = decode_image(&rec.image)?;
        let mask = self.label(index)?;
        ensure!(
            (mask.width(), mask.height()) == (img.width, img.height),
            "{}: label map is {}x{} but its image {} is {}x{}",
            rec.label.display(),
            mask.width(),
            mask.height(),
            rec.image.display(),
            img.width,
            img.height
        );
        self.transform
            .apply(img, mask, rng)
            .with_context(|| format!("{}", rec.image.display()))
    }

    fn channels(&self) -> usize {
        self.transform.in_chans
    }

    fn num_classes(&self) -> Option<usize> {
        Some(self.classes.len())
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(self.classes.clone())
    }

    fn describe(&self) -> String {
        let t = &self.transform;
        let tag = self
            .tagline
            .as_ref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        let served = if t.train {
            format!("random-resized {0}x{0} crops", t.size)
        } else {
            let [l, s] = t.scale();
            format!("resized within {l}x{s}")
        };
        format!(
            "{}{tag} {} ({}): {} images, {} classes{}, served {}ch {served}",
            self.name,
            self.split.name(),
            self.source.display(),
            self.records.len(),
            self.classes.len(),
            if self.reduce_zero_label {
                " (reduce_zero_label)"
            } else {
                ""
            },
            t.in_chans
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::tests::write_png;
    use crate::data::seg_aug::SegAugConfig;
    use crate::rng::rng_for;

    fn eval_t(size: usize) -> SegTransform {
        SegTransform::new(
            size,
            3,
            false,
            &SegAugConfig::default(),
            &DataConfig::default().aug,
        )
        .unwrap()
    }

    fn grey(path: &Path, w: u32, h: u32, v: Vec<u8>) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_raw(w, h, v)
            .unwrap()
            .save(path)
            .unwrap();
    }

    #[test]
    fn label_pngs_round_trip_as_palette_indices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.png");
        let ids = vec![0u8, 1, 2, 255, 7, 0];
        let pal: Vec<[u8; 3]> = (0..8).map(voc_color).collect();
        std::fs::write(&p, encode_label_png(3, 2, &ids, &pal).unwrap()).unwrap();
        let m = read_class_map(&p).unwrap();
        assert_eq!((m.width(), m.height(), m.ids()), (3, 2, &ClassIds::U8(ids)));
        assert!(encode_label_png(3, 3, &[0; 6], &pal).is_err());
    }

    #[test]
    fn voc_colours_are_the_standard_map() {
        assert_eq!(voc_color(0), [0, 0, 0]);
        assert_eq!(voc_color(1), [128, 0, 0]);
        assert_eq!(voc_color(15), [192, 128, 128]);
        assert_eq!(voc_color(20), [0, 64, 128]);
    }

    #[test]
    fn folder_pairs_reduce_zero_label_and_bad_input_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_png(&d.join("img/a.png"), 3, 2, [10, 20, 30]);
        write_png(&d.join("img/sub/b.png"), 3, 2, [10, 20, 30]);
        grey(&d.join("ann/a.png"), 3, 2, vec![0, 1, 2, 3, 255, 1]);
        grey(&d.join("ann/sub/b.png"), 3, 2, vec![1; 6]);
        let mut cfg = DataConfig {
            dataset: "seg-folder".into(),
            img_dir: Some(d.join("img")),
            mask_dir: Some(d.join("ann")),
            ..Default::default()
        };
        cfg.seg.num_classes = Some(4);
        let ds = open_segmentation(&cfg, Split::Train, eval_t(8)).unwrap();
        assert_eq!((ds.len(), ds.classes().len()), (2, 4));
        assert_eq!(ds.label(0).unwrap().to_u32(), [0, 1, 2, 3, 255, 1]);
        let s = ds.get(1, &mut rng_for(0, &[])).unwrap();
        // within (32, 8): factor min(32 / 3, 8 / 2) = 4
        assert_eq!((s.width, s.height), (12, 8));
        // ADE's convention: 0 -> 255, v -> v - 1
        cfg.seg.reduce_zero_label = Some(true);
        cfg.seg.num_classes = Some(3);
        let ds = open_segmentation(&cfg, Split::Train, eval_t(8)).unwrap();
        assert_eq!(ds.label(0).unwrap().to_u32(), [255, 0, 1, 2, 255, 0]);
        // a value beyond the classes is named with its file and place
        cfg.seg.reduce_zero_label = None;
        let ds = open_segmentation(&cfg, Split::Train, eval_t(8)).unwrap();
        let e = format!("{:#}", ds.get(0, &mut rng_for(0, &[])).unwrap_err());
        assert!(
            e.contains("ann/a.png: label value 3 at (x 0, y 1) (1 pixels) is not a class of 0..3"),
            "{e}"
        );
        // a label of another size than its image
        grey(&d.join("ann/sub/b.png"), 2, 2, vec![1; 4]);
        let e = format!("{:#}", ds.get(1, &mut rng_for(0, &[])).unwrap_err());
        assert!(
            e.contains("sub/b.png: label map is 2x2 but its image") && e.contains("is 3x2"),
            "{e}"
        );
        // no class names at all
        let n = cfg.seg.num_classes.take();
        let e = open_segmentation(&cfg, Split::Train, eval_t(8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.seg.classes"), "{e}");
        let e = open_segmentation(&cfg, Split::Eval, eval_t(8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs data.eval_img_dir"), "{e}");
        cfg.seg.num_classes = n;
        // a missing label file is named at opening
        std::fs::remove_file(d.join("ann/sub/b.png")).unwrap();
        let e = format!(
            "{:#}",
            open_segmentation(&cfg, Split::Train, eval_t(8)).unwrap_err()
        );
        assert!(
            e.contains("img/sub/b.png: its label file") && e.contains("ann/sub/b.png is missing"),
            "{e}"
        );
    }

    #[test]
    fn labelme_voc_class_masks_load() {
        let root = crate::data::test_data_root().join("labelme/voc-seg");
        if !root.join("JPEGImages").is_dir() {
            eprintln!(
                "skipped: {} not installed (scripts/setup-data.sh installs Debian labelme-examples)",
                root.display()
            );
            return;
        }
        let cfg = DataConfig {
            dataset: "voc-seg".into(),
            path: Some(root.clone()),
            ..Default::default()
        };
        let ds = open_segmentation(&cfg, Split::Train, eval_t(250)).unwrap();
        assert_eq!(ds.len(), 3);
        // labelme's class_names.txt: _background_, aeroplane, ..., 21 names
        assert_eq!(ds.classes().len(), 21);
        assert_eq!(ds.classes()[15], "person");
        let mut total = [0usize; 256];
        for i in 0..3 {
            let m = ds.label(i).unwrap();
            for v in m.to_u32() {
                total[v as usize] += 1;
            }
        }
        let present: Vec<usize> = (0..256).filter(|&v| total[v] > 0).collect();
        // palette indices as stored (PIL: np.unique of the three PNGs): bottle, bus, car, chair,
        // person, sofa and the unlabelled borders
        assert_eq!(present, [0, 5, 6, 7, 9, 15, 18, 255], "{present:?}");
        assert_eq!(
            (total[0], total[15], total[255]),
            (125_767 + 93_492 + 62_022, 32_900 + 34_792, 9_460 + 909)
        );
        // 500 x 338 within (1000, 250): factor 250 / 338
        let s = ds.get(0, &mut rng_for(0, &[])).unwrap();
        assert_eq!((s.width, s.height), (370, 250));
    }
}
