//! Data stage: datasets -> transforms -> batcher (background loader) -> collate.
//!
//! Contract used by every objective:
//! - A dataset serves [`Sample`]s: a normalized CHW f32 image of its own height and width plus a
//!   typed [`Target`] (none, a class id, boxes xyxy in pixels with classes and crowd flags, a
//!   per-pixel class map with 255 = ignore, or boxes and a class map).
//! - Geometric transforms (`transforms.rs`: resize, random resized crop, flip, scale jitter,
//!   crop; pad on samples) move the target with the image exactly (`target.rs` states the pixel
//!   conventions); photometric ones (normalization) leave it alone. All randomness comes from
//!   the rng the loader derives from (seed, epoch, index).
//! - The loader collates samples into a [`Batch`] (`collate.rs`): `[B, C, H, W]` images padded
//!   with 0 on the bottom/right to the largest size rounded up to the multiple the caller asks
//!   for ([`DataLoader::pad_to_multiple`]), each image's valid (h, w), typed [`BatchTargets`]
//!   (classes as `[B]` u32, boxes per image, class maps as `[B, H, W]` u32 padded with 255) and
//!   the dataset indices (objectives derive per-sample randomness, such as SimMIM masks, from
//!   (seed, epoch, index)). Batches of equal-size images are never padded.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

pub mod coco;
pub mod collate;
pub mod det_aug;
pub mod detection;
pub mod digits_det;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod photos;
pub mod seg_aug;
pub mod segmentation;
pub mod subset;
pub mod target;
pub mod transforms;
pub mod trees;
pub mod voc;

pub use collate::{collate, Batch, BatchTargets};
pub use det_aug::{DetAugConfig, DetTransform};
pub use detection::{DetectionDataset, ImageInfo, LoadStats};
pub use folder::{decode_image, list_images, FolderDataset, SkippedImage};
pub use idx::{read_idx, IdxArray, IdxDataset};
pub use loader::{DataLoader, LoaderOptions};
pub use photos::PhotosDataset;
pub use seg_aug::{SegAugConfig, SegTransform};
pub use segmentation::{open_segmentation, SegDataConfig, SegmentationDataset};
pub use target::{ClassIds, ClassMap, ObjectBox, Target, IGNORE};
pub use transforms::{Annotated, CropBox, ImageTransform, U8Image};

/// The dataset names [`build_dataset`] knows.
pub const DATASETS: [&str; 13] = [
    "fashion-mnist",
    "mnist",
    "photos",
    "image-folder",
    "folder",
    "coco",
    "voc",
    "digits-det",
    "trees",
    "seg-folder",
    "voc-seg",
    "ade20k",
    "digits-seg",
];

/// Which dataset, where it lives, how it is loaded and augmented (the `data:` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "fashion-mnist" | "mnist" | "photos" | "image-folder" | "folder" (classification,
    /// pretraining); "coco" | "voc" | "digits-det" | "trees" (detection, `detection.rs`);
    /// "seg-folder" | "voc-seg" | "ade20k" | "digits-seg" (segmentation, `segmentation.rs`).
    pub dataset: String,
    /// Where scripts/setup-data.sh put the bundled datasets (and where `digits-det` and `trees`
    /// are generated on first use).
    pub root: PathBuf,
    /// Train folder of `image-folder` / `folder`; the VOC folder of `voc` (`Annotations/`,
    /// `JPEGImages/`, optional `ImageSets/Main/{train,val}.txt`).
    pub path: Option<PathBuf>,
    /// Eval folder of `image-folder` / `folder`; `voc`: another VOC folder for eval (default: the
    /// `path` folder, its `val.txt` images).
    pub eval_path: Option<PathBuf>,
    /// `coco`: the train annotation file (COCO JSON). Required for `coco`.
    pub ann_file: Option<PathBuf>,
    /// `coco`: the eval annotation file. Required for `coco` eval.
    pub eval_ann_file: Option<PathBuf>,
    /// `coco`: folder the train `file_name`s are relative to (default: the annotation file's
    /// folder); `seg-folder`: the train images.
    pub img_dir: Option<PathBuf>,
    /// `coco`: folder the eval `file_name`s are relative to (default: the eval annotation file's
    /// folder); `seg-folder`: the eval images.
    pub eval_img_dir: Option<PathBuf>,
    /// `coco`: folder of train class-map PNGs `<file_name stem>.png` (8-bit grey or palette
    /// indices, 255 = ignore); samples with one serve boxes and mask. Default: none.
    /// `seg-folder`: the train label maps (required).
    pub mask_dir: Option<PathBuf>,
    /// `coco`: folder of eval class-map PNGs. Default: none. `seg-folder`: the eval label maps.
    pub eval_mask_dir: Option<PathBuf>,
    /// Decode/augment threads of the loader.
    pub num_workers: usize,
    /// Batches decoded ahead of the model.
    pub prefetch_batches: usize,
    /// false: an undecodable image is an error naming its path; true: warn, skip and count it.
    pub skip_bad_images: bool,
    /// Cap on the number of samples of a split (quick runs, tests).
    pub max_samples: Option<usize>,
    /// Below 1: a class-balanced, seeded subset of the labelled train split (low-label finetuning).
    pub label_fraction: f64,
    /// Seed of the `label_fraction` subset; unset: the fixed [`subset::LABEL_SUBSET_SEED`], the
    /// same images in every run. Set it per seed to make the subset part of what seeds vary.
    pub label_seed: Option<u64>,
    /// Random crops that make one epoch of `photos`.
    pub photos_crops_per_epoch: usize,
    /// `digits-det` / `digits-seg`: train canvases (4,000 by default, in `digits-det/`; another
    /// number is generated on first use into `digits-det-train<N>/`, whose first 4,000 canvases
    /// and validation set equal the default folder's).
    pub digits_det_train: usize,
    /// Augmentation and normalization.
    pub aug: AugConfig,
    /// Detection augmentation (scale jitter, crop, flip) of `coco`, `voc`, `digits-det`, `trees`.
    pub det_aug: DetAugConfig,
    /// Segmentation classes, palette and label convention.
    pub seg: SegDataConfig,
    /// Segmentation augmentation (mmseg's resize, crop, flip, photometric distortion).
    pub seg_aug: SegAugConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "fashion-mnist".into(),
            root: PathBuf::from("data"),
            path: None,
            eval_path: None,
            ann_file: None,
            eval_ann_file: None,
            img_dir: None,
            eval_img_dir: None,
            mask_dir: None,
            eval_mask_dir: None,
            num_workers: 2,
            prefetch_batches: 4,
            skip_bad_images: false,
            max_samples: None,
            label_fraction: 1.0,
            label_seed: None,
            photos_crops_per_epoch: 2048,
            digits_det_train: digits_det::DigitsDetConfig::default().train,
            aug: AugConfig::default(),
            det_aug: DetAugConfig::default(),
            seg: SegDataConfig::default(),
            seg_aug: SegAugConfig::default(),
        }
    }
}

/// Augmentation and normalization settings (`data.aug`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugConfig {
    /// RandomResizedCrop area scale (SimMIM: [0.67, 1.0], architecture.md 3.4).
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// Horizontal flip probability.
    pub hflip: f64,
    /// Per-channel mean (ImageNet).
    pub mean: Vec<f32>,
    /// Per-channel std (ImageNet).
    pub std: Vec<f32>,
    /// Eval: resize the shorter side to size / eval_crop_pct, then centre crop (official Swin 0.875).
    pub eval_crop_pct: f64,
}

impl Default for AugConfig {
    fn default() -> Self {
        Self {
            crop_scale: [0.67, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            hflip: 0.5,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            eval_crop_pct: 0.875,
        }
    }
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training split.
    Train,
    /// Held-out split (test set / held-out photos / `eval_path`).
    Eval,
}

impl Split {
    /// "train" or "eval".
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// One decoded, transformed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Normalized CHW f32, `channels * height * width` values.
    pub image: Vec<f32>,
    /// Rows of the image.
    pub height: usize,
    /// Columns of the image.
    pub width: usize,
    /// What the sample is labelled with, in pixels of this image.
    pub target: Target,
}

impl Sample {
    /// The class id of a classification sample.
    pub fn label(&self) -> Option<u32> {
        self.target.class()
    }

    /// Padded on the bottom and right to `height x width` (not smaller than now): the image with
    /// 0 (after normalization), a class map with [`IGNORE`]; boxes keep their coordinates.
    pub fn pad(self, height: usize, width: usize) -> Result<Self> {
        ensure!(
            height >= self.height && width >= self.width,
            "cannot pad a {}x{} sample to {height}x{width}",
            self.height,
            self.width
        );
        let channels = self
            .image
            .len()
            .checked_div(self.height * self.width)
            .unwrap_or(0);
        Ok(Self {
            image: collate::pad_planes(
                &self.image,
                channels,
                (self.height, self.width),
                (height, width),
            ),
            height,
            width,
            target: self.target.pad(width, height),
        })
    }
}

/// A random-access dataset serving transformed samples.
pub trait Dataset: Send + Sync {
    /// Number of samples in an epoch.
    fn len(&self) -> usize;
    /// True when the dataset has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index` decoded and transformed (normalized CHW f32 of its own size, its target
    /// moved with it); all randomness from `rng` (seeded by the loader from (seed, epoch, index)).
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample>;
    /// The crop box (in source pixels) and flip flag that `get(index, rng)` would draw from the
    /// same `rng`, for datasets that can tell without decoding (`None`: not known, or no random
    /// crop). Feature caches store them next to the features they were computed on.
    fn crop_params(&self, _index: usize, _rng: &mut StdRng) -> Result<Option<(CropBox, bool)>> {
        Ok(None)
    }
    /// Channels of the served images.
    fn channels(&self) -> usize;
    /// Number of classes, for labelled datasets.
    fn num_classes(&self) -> Option<usize>;
    /// Class names in class-id order, for labelled datasets.
    fn class_names(&self) -> Option<Vec<String>>;
    /// One line, e.g. "fashion-mnist train: 60000 images, 10 classes, served 3x32x32".
    fn describe(&self) -> String;
}

/// Builds `split` of the configured dataset, serving `in_chans x img_size x img_size` images with
/// the train (random resized crop + flip) or eval (resize + centre crop) transform.
pub fn build_dataset(
    cfg: &DataConfig,
    split: Split,
    img_size: usize,
    in_chans: usize,
    train_aug: bool,
) -> Result<Arc<dyn Dataset>> {
    let transform = ImageTransform::new(img_size, in_chans, train_aug, &cfg.aug)?;
    if !(cfg.label_fraction > 0.0 && cfg.label_fraction <= 1.0) {
        bail!(
            "data.label_fraction = {} must be in (0, 1]",
            cfg.label_fraction
        );
    }
    let ds: Arc<dyn Dataset> = match cfg.dataset.as_str() {
        "fashion-mnist" | "mnist" => Arc::new(IdxDataset::open(cfg, split, transform)?),
        "photos" => Arc::new(PhotosDataset::open(cfg, split, transform)?),
        "image-folder" => Arc::new(FolderDataset::open(cfg, split, transform, true)?),
        "folder" => Arc::new(FolderDataset::open(cfg, split, transform, false)?),
        "coco" | "voc" | "digits-det" | "trees" => {
            let t = DetTransform::new(img_size, in_chans, train_aug, &cfg.det_aug, &cfg.aug)?;
            Arc::new(open_detection(cfg, split, t)?)
        }
        "seg-folder" | "voc-seg" | "ade20k" | "digits-seg" => {
            let t = SegTransform::new(img_size, in_chans, train_aug, &cfg.seg_aug, &cfg.aug)?;
            Arc::new(open_segmentation(cfg, split, t)?)
        }
        other => {
            let best = DATASETS
                .iter()
                .map(|k| (strsim::jaro_winkler(other, k), *k))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .filter(|(s, _)| *s > 0.8)
                .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            bail!(
                "data.dataset `{other}` is unknown{best}; known: {}",
                DATASETS.join(", ")
            )
        }
    };
    if ds.is_empty() {
        bail!("{}: no samples", ds.describe());
    }
    Ok(ds)
}

/// Opens `split` of a detection dataset (`coco`, `voc`, `digits-det`, `trees`).
pub fn open_detection(cfg: &DataConfig, split: Split, t: DetTransform) -> Result<DetectionDataset> {
    let pick = |train: &Option<PathBuf>, eval: &Option<PathBuf>| match split {
        Split::Train => train.clone(),
        Split::Eval => eval.clone(),
    };
    let name = cfg.dataset.as_str();
    match name {
        "coco" => {
            let key = match split {
                Split::Train => "data.ann_file",
                Split::Eval => "data.eval_ann_file",
            };
            let ann = pick(&cfg.ann_file, &cfg.eval_ann_file)
                .with_context(|| format!("data.dataset `coco` needs {key} (a COCO JSON file)"))?;
            let img_dir = pick(&cfg.img_dir, &cfg.eval_img_dir)
                .unwrap_or_else(|| ann.parent().map(PathBuf::from).unwrap_or_default());
            let mask_dir = pick(&cfg.mask_dir, &cfg.eval_mask_dir);
            DetectionDataset::from_coco(name, split, &ann, &img_dir, mask_dir.as_deref(), cfg, t)
        }
        "voc" => {
            let dir = match split {
                Split::Train => cfg.path.clone(),
                Split::Eval => cfg.eval_path.clone().or_else(|| cfg.path.clone()),
            }
            .context("data.dataset `voc` needs data.path (a VOC folder)")?;
            DetectionDataset::from_voc(name, split, &dir, cfg, t)
        }
        "digits-det" => digits_det::open(cfg, split, t),
        "trees" => trees::open(cfg, split, t),
        other => bail!("data.dataset `{other}` is not a detection dataset"),
    }
}

/// Fixed, deterministic images for reconstruction pictures: the held-out photos (photos dataset)
/// or the first n images of the eval split; `[n, C, H, W]` normalized, eval transform. Fewer than
/// `n` when the split is smaller (the photos hold out 4).
pub fn heldout_images(
    cfg: &DataConfig,
    img_size: usize,
    in_chans: usize,
    n: usize,
) -> Result<Tensor> {
    let ds = build_dataset(cfg, Split::Eval, img_size, in_chans, false)
        .context("building the held-out images")?;
    let n = n.min(ds.len());
    let mut data = Vec::with_capacity(n * in_chans * img_size * img_size);
    for i in 0..n {
        // The eval transform draws nothing; the rng is only there to satisfy the trait.
        let mut rng = crate::rng::rng_for(0, &[i as u64]);
        data.extend(ds.get(i, &mut rng)?.image);
    }
    Ok(Tensor::from_vec(
        data,
        (n, in_chans, img_size, img_size),
        &Device::Cpu,
    )?)
}

/// Environment variable naming a data root (see [`DataConfig::bundled_dir`]).
pub const DATA_ENV: &str = "MIMLAB_DATA";

impl DataConfig {
    /// The seed of the `label_fraction` subset: `label_seed`, or the fixed default.
    pub fn label_subset_seed(&self) -> u64 {
        self.label_seed.unwrap_or(subset::LABEL_SUBSET_SEED)
    }

    /// The folder of the bundled dataset `sub` (`fashion-mnist`, `photos`, ...): the first that
    /// exists of
    /// 1. `data.root/sub` (a relative `data.root` from the working directory; an absolute one is
    ///    the only place looked at);
    /// 2. `$MIMLAB_DATA/sub`;
    /// 3. `<checkout>/<data.root>/sub`, in the checkout this binary was built from (an installed
    ///    `mimlab` run from elsewhere finds the data `scripts/setup-data.sh` put there).
    ///
    /// When none exists the error lists every place looked at and the ways to fix it.
    pub fn bundled_dir(&self, sub: &str) -> Result<PathBuf> {
        let mut tried: Vec<(PathBuf, &str)> = vec![(self.root.join(sub), "data.root")];
        if self.root.is_relative() {
            if let Some(env) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
                tried.push((PathBuf::from(env).join(sub), "$MIMLAB_DATA"));
            }
            let checkout = checkout_dir();
            tried.push((
                checkout.join(&self.root).join(sub),
                "the checkout mimlab was built from",
            ));
        }
        if let Some((dir, _)) = tried.iter().find(|(d, _)| d.is_dir()) {
            return Ok(dir.clone());
        }
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let mut msg = format!("dataset folder `{sub}` not found; looked in:");
        for (dir, why) in &tried {
            let whence = if dir.is_relative() {
                format!(" (from the working directory {cwd})")
            } else {
                String::new()
            };
            msg.push_str(&format!("\n  {} ({why}){whence}", dir.display()));
        }
        if self.root.is_relative() && std::env::var_os(DATA_ENV).is_none() {
            msg.push_str("\n  ($MIMLAB_DATA is not set)");
        }
        msg.push_str(&format!(
            "\nfix: run scripts/setup-data.sh in the mimlab checkout, or point data.root (or \
             MIMLAB_DATA) at the folder that holds `{sub}/`"
        ));
        Err(anyhow::anyhow!(msg))
    }
    /// The data root that holds (or will hold) the generated dataset `sub`: where `sub` is found
    /// ([`DataConfig::bundled_dir`]), else where its inputs `source` are (it is generated there).
    pub fn generated_root(&self, sub: &str, source: &str) -> Result<PathBuf> {
        let found = self
            .bundled_dir(sub)
            .or_else(|_| self.bundled_dir(source))?;
        Ok(found
            .parent()
            .map_or_else(|| self.root.clone(), Path::to_path_buf))
    }
}

/// The source checkout this binary was built from (where `scripts/setup-data.sh` puts `data/`).
pub fn checkout_dir() -> PathBuf {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR"));
    engine.parent().unwrap_or(engine).to_path_buf()
}

/// `path` not found, with the hint to run the setup script (bundled datasets).
pub(crate) fn missing_bundled(path: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!("{} not found: run scripts/setup-data.sh", path.display())
}

/// The data root used by tests: `$MIMLAB_DATA` or `data/` at the repository root.
#[cfg(test)]
pub(crate) fn test_data_root() -> PathBuf {
    match std::env::var_os("MIMLAB_DATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_roundtrip_and_reject_unknown_keys() {
        let cfg = DataConfig::default();
        let yaml = serde_yaml_ng::to_string(&cfg).unwrap();
        let back: DataConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, cfg);
        let partial: DataConfig =
            serde_yaml_ng::from_str("dataset: mnist\naug: {hflip: 0.0}").unwrap();
        assert_eq!(partial.dataset, "mnist");
        assert_eq!(partial.aug.hflip, 0.0);
        assert_eq!(partial.aug.crop_scale, [0.67, 1.0]);
        assert!(serde_yaml_ng::from_str::<DataConfig>("datset: mnist").is_err());
    }

    #[test]
    fn unknown_dataset_suggests_the_closest() {
        let cfg = DataConfig {
            dataset: "fashon-mnist".into(),
            ..Default::default()
        };
        let err = build_dataset(&cfg, Split::Train, 8, 1, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("did you mean `fashion-mnist`"), "{err}");
    }
}
