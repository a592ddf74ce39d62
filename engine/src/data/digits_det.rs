//! Data stage, generated dataset `digits-det` ("real digits, synthetic layout"): real MNIST digits
//! pasted onto random crops of the bundled photos, with exact boxes and per-pixel class maps from
//! the digit pixels. Train canvases use MNIST `train-*` digits on `photos/train`, validation
//! canvases `t10k-*` digits on `photos/heldout`, so no digit image or photo is shared.
//!
//! One canvas ([`DigitsDetConfig`] defaults): a `canvas x canvas` (128) crop of a photo (side
//! uniform between the canvas and the photo's shorter side, resized bilinearly), then 2-6 digits,
//! each a 28 x 28 MNIST cell resized to `round(h * 28 / 20)` px for a digit height `h` uniform in
//! 12-80 px (MNIST digits fill about 20 of the 28 rows), at a uniform position inside the canvas,
//! alpha-blended (alpha = MNIST intensity / 255) in a random colour dark on bright backgrounds and
//! bright on dark ones (mean luma of the covered patch), later digits over earlier ones.
//!
//! Labels, from the resized MNIST intensity `v` of the top-most digit drawn at a pixel:
//! - `v >= 128` ("core"): the pixel belongs to that digit: class map `digit + 1` (1..10);
//! - `32 <= v < 128` (anti-aliased edge): class map 255 (ignore), owned by no digit;
//! - `v < 32`: the pixel keeps what was under it; 0 = background.
//!
//! A digit's box is the extent of the core pixels it still owns (visible after occlusion), as
//! `[x1, y1, x2, y2]` with exclusive ends; a digit left with under half its core pixels is dropped
//! and its remaining core pixels become 255. Annotation `area` = its visible core pixel count.
//!
//! Files under `ROOT/digits-det/` (written whole, [`crate::fsutil::create_dir_atomic`]):
//! `train.json`, `val.json` (COCO; categories "0".."9" with ids 1..10), `train/NNNNNN.png`,
//! `val/NNNNNN.png` (RGB), `masks/{train,val}/NNNNNN.png` (8-bit grey class maps), `meta.json`
//! (the generator settings). Every canvas draws from `rng_for(seed, [split, index])`, so the same
//! settings give byte-identical files on any machine and thread count.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coco::{CocoAnnotation, CocoCategory, CocoFile, CocoImage};
use super::det_aug::DetTransform;
use super::detection::DetectionDataset;
use super::folder::encode_png;
use super::idx::read_idx;
use super::photos::load_photos;
use super::transforms::{resize_bilinear, CropBox, U8Image};
use super::{missing_bundled, DataConfig, Split, IGNORE};
use crate::log::progress::Progress;
use crate::rng::rng_for;

/// The describe line's and the docs' name for what this dataset is.
pub const TAGLINE: &str = "real digits, synthetic layout";
/// Folder name under the data root.
pub const DIR: &str = "digits-det";
/// Resized MNIST intensity from which a pixel is the digit's (boxes, class map).
pub const CORE: u8 = 128;
/// Resized MNIST intensity from which a non-core pixel is an ignored edge.
pub const EDGE: u8 = 32;

/// Generator settings (`mimlab data prepare digits-det` flags; defaults on first use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigitsDetConfig {
    /// Canvas side in pixels.
    pub canvas: usize,
    /// Train canvases.
    pub train: usize,
    /// Validation canvases.
    pub val: usize,
    /// Seed of every draw.
    pub seed: u64,
    /// Digits per canvas, inclusive range.
    pub digits: [usize; 2],
    /// Digit height in pixels, inclusive range (the 28 px cell is 1.4 times that).
    pub digit_height: [usize; 2],
}

impl DigitsDetConfig {
    /// The generator settings with `train` canvases, the rest default.
    pub fn with_train(train: usize) -> Self {
        Self {
            train,
            ..Self::default()
        }
    }

    /// The folder it is generated into under the data root: [`DIR`] for the default number of
    /// train canvases, `digits-det-train<N>` for another (`data.digits_det_train`), so a recipe
    /// that asks for more canvases never reads or replaces the default set. Canvases are drawn
    /// per index from the seed, so the first 4,000 train canvases and the validation set are the
    /// same in every folder.
    pub fn dir_name(&self) -> String {
        if self.train == Self::default().train {
            DIR.to_string()
        } else {
            format!("{DIR}-train{}", self.train)
        }
    }
}

impl Default for DigitsDetConfig {
    fn default() -> Self {
        Self {
            canvas: 128,
            train: 4000,
            val: 500,
            seed: 0,
            digits: [2, 6],
            digit_height: [12, 80],
        }
    }
}

/// One digit to draw: its resized glyph (MNIST intensities), top-left corner, class and colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `side x side` intensities, row-major.
    pub glyph: Vec<u8>,
    /// Glyph side in pixels.
    pub side: usize,
    /// Left column on the canvas.
    pub x: usize,
    /// Top row on the canvas.
    pub y: usize,
    /// The digit, 0..9.
    pub digit: u8,
    /// RGB colour.
    pub color: [u8; 3],
}

/// A visible digit of a composed canvas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DigitBox {
    /// The digit, 0..9.
    pub digit: u8,
    /// `[x1, y1, x2, y2]`, exclusive ends, of its visible core pixels.
    pub xyxy: [f32; 4],
    /// Its visible core pixels.
    pub area: usize,
}

/// Draws `placements` in order onto the RGB `canvas` (each fully inside it) and returns the class
/// map (0 background, `digit + 1`, 255 ignore) and the boxes of the digits still at least half
/// visible, in draw order; see the module doc.
pub fn compose(canvas: &mut U8Image, placements: &[Placement]) -> (Vec<u8>, Vec<DigitBox>) {
    let (w, h) = (canvas.width, canvas.height);
    let mut label = vec![0u8; w * h];
    let mut owner = vec![usize::MAX; w * h];
    let mut core = vec![0usize; placements.len()];
    for (k, p) in placements.iter().enumerate() {
        for gy in 0..p.side {
            for gx in 0..p.side {
                let v = p.glyph[gy * p.side + gx];
                let (x, y) = (p.x + gx, p.y + gy);
                if v == 0 || x >= w || y >= h {
                    continue;
                }
                let i = y * w + x;
                let a = v as f32 / 255.0;
                for (c, col) in p.color.iter().enumerate() {
                    let px = &mut canvas.data[i * 3 + c];
                    *px = (*px as f32 * (1.0 - a) + *col as f32 * a + 0.5) as u8;
                }
                if v >= CORE {
                    label[i] = p.digit + 1;
                    owner[i] = k;
                    core[k] += 1;
                } else if v >= EDGE {
                    label[i] = IGNORE as u8;
                    owner[i] = usize::MAX;
                }
            }
        }
    }
    // Visible extent and pixel count per digit.
    let mut ext = vec![(usize::MAX, usize::MAX, 0usize, 0usize, 0usize); placements.len()];
    for (i, &o) in owner.iter().enumerate() {
        if o == usize::MAX {
            continue;
        }
        let (x, y) = (i % w, i / w);
        let e = &mut ext[o];
        *e = (
            e.0.min(x),
            e.1.min(y),
            e.2.max(x + 1),
            e.3.max(y + 1),
            e.4 + 1,
        );
    }
    let mut boxes = Vec::new();
    for (k, &(x1, y1, x2, y2, n)) in ext.iter().enumerate() {
        if n > 0 && 2 * n >= core[k] {
            boxes.push(DigitBox {
                digit: placements[k].digit,
                xyxy: [x1 as f32, y1 as f32, x2 as f32, y2 as f32],
                area: n,
            });
        } else if n > 0 {
            // Mostly hidden: no box, and its fragments are ignored by the class map.
            for (i, o) in owner.iter().enumerate() {
                if *o == k {
                    label[i] = IGNORE as u8;
                }
            }
        }
    }
    (label, boxes)
}

/// MNIST digits of one split, held as 28 x 28 cells.
struct Digits {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Digits {
    fn load(root: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Eval => "t10k",
        };
        let dir = root.join("mnist");
        let img = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let lbl = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        for p in [&img, &lbl] {
            if !p.is_file() {
                return Err(missing_bundled(p));
            }
        }
        let (images, labels) = (read_idx(&img)?, read_idx(&lbl)?);
        anyhow::ensure!(
            images.dims.len() == 3
                && images.dims[1..] == [28, 28]
                && labels.dims == [images.dims[0]],
            "{}: MNIST arrays of dims {:?} and {:?}",
            dir.display(),
            images.dims,
            labels.dims
        );
        Ok(Self {
            images: images.data,
            labels: labels.data,
        })
    }

    fn cell(&self, i: usize) -> U8Image {
        U8Image {
            width: 28,
            height: 28,
            channels: 1,
            data: self.images[i * 784..(i + 1) * 784].to_vec(),
        }
    }
}

/// Mean luma of the `side x side` patch at (x, y) of an RGB image.
fn mean_luma(img: &U8Image, x: usize, y: usize, side: usize) -> f32 {
    let mut sum = 0.0;
    for yy in y..y + side {
        for xx in x..x + side {
            let p = &img.data[(yy * img.width + xx) * 3..][..3];
            sum += 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        }
    }
    sum / (side * side) as f32
}

fn to_rgb(img: &U8Image) -> U8Image {
    if img.channels == 3 {
        return img.clone();
    }
    U8Image {
        channels: 3,
        data: img.data.iter().flat_map(|v| [*v; 3]).collect(),
        ..*img
    }
}

/// One canvas: (RGB image, class map, boxes), all draws from `rng`.
fn make_canvas(
    cfg: &DigitsDetConfig,
    digits: &Digits,
    photos: &[U8Image],
    rng: &mut StdRng,
) -> (U8Image, Vec<u8>, Vec<DigitBox>) {
    let s = cfg.canvas;
    let photo = &photos[rng.random_range(0..photos.len())];
    let short = photo.width.min(photo.height);
    let side = if short > s {
        rng.random_range(s..=short)
    } else {
        short
    };
    let b = CropBox {
        top: rng.random_range(0..=photo.height - side),
        left: rng.random_range(0..=photo.width - side),
        height: side,
        width: side,
    };
    let mut background = to_rgb(&resize_bilinear(photo, b, s, s));
    let mut canvas = background.clone();
    let n = rng.random_range(cfg.digits[0]..=cfg.digits[1]);
    let mut placements = Vec::with_capacity(n);
    for _ in 0..n {
        let i = rng.random_range(0..digits.labels.len());
        let height = rng.random_range(cfg.digit_height[0]..=cfg.digit_height[1]);
        let cell = ((height * 28) as f64 / 20.0).round() as usize;
        let cell = cell.clamp(1, s);
        let glyph = resize_bilinear(&digits.cell(i), CropBox::full(28, 28), cell, cell).data;
        let (x, y) = (
            rng.random_range(0..=s - cell),
            rng.random_range(0..=s - cell),
        );
        let bright = mean_luma(&canvas, x, y, cell) < 128.0;
        let mut color = [0u8; 3];
        for c in &mut color {
            *c = if bright {
                rng.random_range(195..=255)
            } else {
                rng.random_range(0..=60)
            };
        }
        placements.push(Placement {
            glyph,
            side: cell,
            x,
            y,
            digit: digits.labels[i],
            color,
        });
        // Drawn now too, so the next digit's colour sees the ones under it.
        compose(&mut canvas, &placements[placements.len() - 1..]);
    }
    // The labels need all digits at once; blending the same digits in the same order onto the
    // background again gives the same pixels.
    let (label, boxes) = compose(&mut background, &placements);
    debug_assert_eq!(background, canvas);
    (background, label, boxes)
}

/// The 10 categories "0".."9" with ids 1..10.
fn categories() -> Vec<CocoCategory> {
    (0..10)
        .map(|d| CocoCategory {
            id: d + 1,
            name: d.to_string(),
            supercategory: None,
        })
        .collect()
}

/// Writes one split (`train` or `val`) into `dir`, `n` canvases.
fn write_split(
    dir: &Path,
    cfg: &DigitsDetConfig,
    split: Split,
    name: &str,
    n: usize,
    root: &Path,
) -> Result<(usize, usize)> {
    let digits = Digits::load(root, split)?;
    let (_, _, photos) = load_photos(root, split)?;
    let (img_dir, mask_dir) = (dir.join(name), dir.join("masks").join(name));
    std::fs::create_dir_all(&img_dir)?;
    std::fs::create_dir_all(&mask_dir)?;
    let progress = Progress::new(&format!("digits-det {name}"), n as u64, 0);
    let mut file = CocoFile {
        categories: categories(),
        ..Default::default()
    };
    let split_id = match split {
        Split::Train => 0,
        Split::Eval => 1,
    };
    let chunk = 256;
    for start in (0..n).step_by(chunk) {
        let made = (start..(start + chunk).min(n))
            .into_par_iter()
            .map(|i| -> Result<_> {
                let mut rng = rng_for(cfg.seed, &[split_id, i as u64]);
                let (img, label, boxes) = make_canvas(cfg, &digits, &photos, &mut rng);
                let mask = U8Image::new(cfg.canvas, cfg.canvas, 1, label)?;
                Ok((i, encode_png(&img)?, encode_png(&mask)?, boxes))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, png, mask, boxes) in made {
            let file_name = format!("{i:06}.png");
            std::fs::write(img_dir.join(&file_name), png)?;
            std::fs::write(mask_dir.join(&file_name), mask)?;
            let image_id = i as u64 + 1;
            file.images.push(CocoImage {
                id: image_id,
                file_name,
                width: cfg.canvas as u32,
                height: cfg.canvas as u32,
            });
            for b in boxes {
                let [x1, y1, x2, y2] = b.xyxy.map(|v| v as f64);
                file.annotations.push(CocoAnnotation {
                    id: file.annotations.len() as u64 + 1,
                    image_id,
                    category_id: b.digit as u64 + 1,
                    bbox: [x1, y1, x2 - x1, y2 - y1],
                    area: Some(b.area as f64),
                    iscrowd: false,
                    ignore: None,
                    segmentation: None,
                });
            }
            progress.inc(1);
        }
    }
    progress.finish(&format!("{} boxes", file.annotations.len()));
    file.check()?;
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_vec(&file)?)?;
    Ok((file.images.len(), file.annotations.len()))
}

/// What [`prepare`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// False when the folder was already there (nothing written).
    pub created: bool,
    /// (images, boxes) of train.
    pub train: (usize, usize),
    /// (images, boxes) of val.
    pub val: (usize, usize),
}

/// Generates `root/<cfg.dir_name()>` with `cfg` unless it exists (atomically: a temp folder
/// renamed whole). Reads `root/mnist` and `root/photos`.
pub fn prepare(root: &Path, cfg: &DigitsDetConfig) -> Result<Prepared> {
    anyhow::ensure!(
        cfg.canvas >= 8 && cfg.digits[0] <= cfg.digits[1] && cfg.digits[1] > 0,
        "digits-det: canvas {} (at least 8) and digits {:?} (ascending)",
        cfg.canvas,
        cfg.digits
    );
    anyhow::ensure!(
        0 < cfg.digit_height[0] && cfg.digit_height[0] <= cfg.digit_height[1],
        "digits-det: digit_height {:?} must be positive, ascending",
        cfg.digit_height
    );
    let dir = root.join(cfg.dir_name());
    let mut counts = ((0, 0), (0, 0));
    let created = crate::fsutil::create_dir_atomic(&dir, |tmp| {
        counts.0 = write_split(tmp, cfg, Split::Train, "train", cfg.train, root)?;
        counts.1 = write_split(tmp, cfg, Split::Eval, "val", cfg.val, root)?;
        std::fs::write(tmp.join("meta.json"), serde_json::to_vec_pretty(cfg)?)?;
        Ok(())
    })?;
    Ok(Prepared {
        created,
        train: counts.0,
        val: counts.1,
    })
}

/// The paths of one split of the dataset folder `dir`: (annotation file, image folder,
/// class-map folder).
pub fn split_paths(dir: &Path, split: Split) -> (PathBuf, PathBuf, PathBuf) {
    let name = match split {
        Split::Train => "train",
        Split::Eval => "val",
    };
    (
        dir.join(format!("{name}.json")),
        dir.join(name),
        dir.join("masks").join(name),
    )
}

/// The dataset folder of `cfg` (`data.digits_det_train` train canvases, see
/// [`DigitsDetConfig::dir_name`]), generated first when it is missing (detection's `digits-det`
/// and segmentation's `digits-seg` read the same files).
pub fn ensure_generated(cfg: &DataConfig) -> Result<PathBuf> {
    let gen = DigitsDetConfig::with_train(cfg.digits_det_train);
    let name = gen.dir_name();
    let root = cfg.generated_root(&name, "mnist")?;
    let dir = root.join(&name);
    if !dir.is_dir() {
        eprintln!(
            "digits-det ({TAGLINE}): {} not found, generating it (once)",
            dir.display()
        );
        prepare(&root, &gen).with_context(|| {
            format!(
                "generating {name} (or run `mimlab data prepare digits-det --train {}`)",
                gen.train
            )
        })?;
    }
    Ok(dir)
}

/// Opens `split` of the digits-det folder of `cfg` (boxes and class maps), generating it first
/// when it is missing.
pub fn open(cfg: &DataConfig, split: Split, t: DetTransform) -> Result<DetectionDataset> {
    let dir = ensure_generated(cfg)?;
    let (ann, img, mask) = split_paths(&dir, split);
    Ok(
        DetectionDataset::from_coco(DIR, split, &ann, &img, Some(&mask), cfg, t)?
            .with_tagline(TAGLINE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::detection::tests::eval_transform;
    use crate::data::test_data_root;
    use crate::data::{Dataset, Target};

    fn grey_canvas(w: usize, h: usize, v: u8) -> U8Image {
        U8Image::new(w, h, 3, vec![v; w * h * 3]).unwrap()
    }

    #[test]
    fn boxes_and_class_map_come_from_the_digit_pixels() {
        // A 3 x 3 glyph: core pixels (>= 128) form an L, one edge pixel (64), one faint (16).
        #[rustfmt::skip]
        let glyph = vec![
            200, 0,   16,
            255, 64,  0,
            255, 255, 0,
        ];
        let p = Placement {
            glyph,
            side: 3,
            x: 2,
            y: 1,
            digit: 7,
            color: [255, 0, 0],
        };
        let mut c = grey_canvas(6, 5, 100);
        let (label, boxes) = compose(&mut c, &[p]);
        // Core pixels at canvas (2,1), (2,2), (2,3), (3,3): box [2, 1, 4, 4], 4 pixels.
        assert_eq!(
            boxes,
            vec![DigitBox {
                digit: 7,
                xyxy: [2.0, 1.0, 4.0, 4.0],
                area: 4
            }]
        );
        #[rustfmt::skip]
        let want = vec![
            0, 0, 0, 0, 0, 0,
            0, 0, 8, 0, 0, 0,   // (4, 1) is faint (16 < 32): background
            0, 0, 8, 255, 0, 0, // (3, 2) is an edge: ignore
            0, 0, 8, 8, 0, 0,
            0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(label, want);
        // Alpha blend: 100 * (1 - 200/255) + 255 * 200/255 = 221.57 -> 222 red; green 21.57 -> 22.
        let px = |x: usize, y: usize| &c.data[(y * 6 + x) * 3..][..3];
        assert_eq!(px(2, 1), [222, 22, 22]);
        assert_eq!(px(2, 2), [255, 0, 0]);
        assert_eq!(px(0, 0), [100, 100, 100]);
    }

    #[test]
    fn occlusion_recomputes_visible_boxes_and_drops_mostly_hidden_digits() {
        let solid = |side: usize| vec![255u8; side * side];
        let a = Placement {
            glyph: solid(4),
            side: 4,
            x: 0,
            y: 0,
            digit: 1,
            color: [0, 0, 0],
        };
        // b covers columns 2..6 of rows 0..4: a keeps columns 0..2 (8 of 16 pixels, exactly
        // half: kept) with box [0, 0, 2, 4].
        let b = Placement {
            x: 2,
            digit: 2,
            ..a.clone()
        };
        let mut c = grey_canvas(8, 6, 200);
        let (label, boxes) = compose(&mut c, &[a.clone(), b.clone()]);
        assert_eq!(
            boxes,
            vec![
                DigitBox {
                    digit: 1,
                    xyxy: [0.0, 0.0, 2.0, 4.0],
                    area: 8
                },
                DigitBox {
                    digit: 2,
                    xyxy: [2.0, 0.0, 6.0, 4.0],
                    area: 16
                },
            ]
        );
        assert_eq!(&label[..8], &[2, 2, 3, 3, 3, 3, 0, 0]);
        // Shifted one more column, b hides 12 of a's 16 pixels: a is dropped, its visible
        // column becomes ignore.
        let b3 = Placement { x: 1, ..b };
        let (label, boxes) = compose(&mut grey_canvas(8, 6, 200), &[a, b3]);
        assert_eq!(boxes.len(), 1);
        assert_eq!(boxes[0].xyxy, [1.0, 0.0, 5.0, 4.0]);
        assert_eq!(&label[..8], &[255, 3, 3, 3, 3, 0, 0, 0]);
    }

    #[test]
    fn generation_is_deterministic_and_atomic() {
        let root = test_data_root();
        let mnist = root.join("mnist/t10k-images-idx3-ubyte.gz");
        assert!(
            mnist.is_file() && root.join("photos/heldout").is_dir(),
            "{} or photos/ not found: run scripts/setup-data.sh",
            mnist.display()
        );
        let cfg = DigitsDetConfig {
            canvas: 48,
            train: 5,
            val: 3,
            seed: 3,
            ..Default::default()
        };
        // A temp root that links the real mnist and photos folders.
        let make = || {
            let d = tempfile::tempdir().unwrap();
            for sub in ["mnist", "photos"] {
                std::os::unix::fs::symlink(
                    root.join(sub).canonicalize().unwrap(),
                    d.path().join(sub),
                )
                .unwrap();
            }
            d
        };
        let (a, b) = (make(), make());
        let pa = prepare(a.path(), &cfg).unwrap();
        assert!(pa.created);
        assert_eq!((pa.train.0, pa.val.0), (5, 3));
        assert!(
            pa.train.1 >= 5,
            "at least one visible digit per canvas: {pa:?}"
        );
        assert!(
            !prepare(a.path(), &cfg).unwrap().created,
            "present: untouched"
        );
        prepare(b.path(), &cfg).unwrap();
        let files = |d: &Path| -> Vec<(String, Vec<u8>)> {
            let mut v = Vec::new();
            for sub in ["", "train", "val", "masks/train", "masks/val"] {
                let dir = d.join(cfg.dir_name()).join(sub);
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_file() {
                        v.push((
                            p.strip_prefix(d).unwrap().display().to_string(),
                            std::fs::read(&p).unwrap(),
                        ));
                    }
                }
            }
            v.sort();
            v
        };
        let (fa, fb) = (files(a.path()), files(b.path()));
        assert_eq!(fa.len(), 3 + 2 * (5 + 3));
        assert!(fa == fb, "same seed, byte-identical files");
        // Another seed, other canvases.
        let c = make();
        prepare(
            c.path(),
            &DigitsDetConfig {
                seed: 4,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_ne!(files(c.path()), fa);
        // More train canvases go to their own folder and start with the same canvases; the
        // validation canvases are the same.
        assert_eq!(cfg.dir_name(), "digits-det-train5");
        assert_eq!(DigitsDetConfig::default().dir_name(), DIR);
        let more = DigitsDetConfig {
            train: 7,
            ..cfg.clone()
        };
        prepare(a.path(), &more).unwrap();
        for (sub, n) in [
            ("train", 5),
            ("val", 3),
            ("masks/train", 5),
            ("masks/val", 3),
        ] {
            for i in 0..n {
                let f = format!("{sub}/{i:06}.png");
                let read =
                    |c: &DigitsDetConfig| std::fs::read(a.path().join(c.dir_name()).join(&f));
                assert_eq!(read(&cfg).unwrap(), read(&more).unwrap(), "{f}");
            }
        }
        // The dataset serves boxes with class maps whose core pixels agree with the boxes.
        let dcfg = DataConfig {
            root: a.path().into(),
            digits_det_train: cfg.train,
            ..Default::default()
        };
        let ds = open(&dcfg, Split::Eval, eval_transform(48)).unwrap();
        assert!(ds.describe().contains(TAGLINE), "{}", ds.describe());
        assert_eq!(ds.class_names().unwrap()[3], "3");
        for i in 0..ds.len() {
            let s = ds.get(i, &mut rng_for(0, &[])).unwrap();
            let Target::BoxesAndMask { boxes, mask } = &s.target else {
                panic!("no class map: {:?}", s.target.kind())
            };
            for b in boxes {
                let [x1, y1, x2, y2] = b.xyxy.map(|v| v as usize);
                let cls = b.class as u16 + 1;
                let inside = (y1..y2)
                    .flat_map(|y| (x1..x2).map(move |x| (x, y)))
                    .filter(|&(x, y)| mask.at(x, y) == cls)
                    .count();
                assert!(inside > 0, "canvas {i}: no class-{cls} pixel in {b:?}");
            }
        }
        // No temp folders left behind.
        let names = crate::fsutil::dir_names(a.path());
        assert_eq!(
            names,
            ["digits-det-train5", "digits-det-train7", "mnist", "photos"]
        );
    }
}
