//! Transforms stage, segmentation: mmsegmentation's ADE20K pipeline on an image and its class map
//! (mmseg/datasets/transforms; configs/_base_/datasets/ade20k.py), composed from [`Annotated`].
//!
//! - Train, in mmseg's order:
//!   1. `RandomResize(scale, ratio_range, keep_ratio=True)`: `r` uniform in `ratio_range`, the
//!      scale becomes `(int(long * r), int(short * r))` and the image is resized to the largest
//!      size of its aspect ratio within it ([`rescale_size`], mmcv's rounding);
//!   2. `RandomCrop(size, cat_max_ratio)`: a `size x size` crop (the whole side when smaller);
//!      with `cat_max_ratio < 1`, up to 10 crops are drawn until one has at least two classes and
//!      no class above `cat_max_ratio` of its labelled (not ignored) pixels; after 10 failures the
//!      11th draw is kept unchecked, as in mmseg;
//!   3. `RandomFlip(prob)`;
//!   4. `PhotoMetricDistortion` ([`photometric_distortion`]);
//!   5. normalization, then padding to `size x size` (image 0, class map 255), as mmseg's
//!      `SegDataPreProcessor(size=crop_size)`.
//! - Eval: `Resize(scale, keep_ratio=True)` of the image; the class map moves with it (for the
//!   loss), while metrics compare against the original map ([`super::segmentation`]).
//!
//! `scale` defaults to `(4 * size, size)`, the ratio of the reference's `(2048, 512)` at crop 512.
//! Class maps are resampled by nearest neighbour (`target.rs` states the pixel convention).
use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::target::{ClassMap, IGNORE};
use super::transforms::{normalization, rescale_size, uniform, Annotated, CropBox, U8Image};
use super::{AugConfig, Sample, Target};

/// Segmentation augmentation settings (`data.seg_aug`; mmseg's ADE20K values as defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegAugConfig {
    /// `(long, short)` resize scale of train (times the ratio) and eval; null = `(4 * size, size)`.
    pub scale: Option<[usize; 2]>,
    /// Train resize ratio range.
    pub ratio_range: [f64; 2],
    /// `RandomCrop`'s largest share of one class in a crop (1 = no check).
    pub cat_max_ratio: f64,
    /// Train horizontal flip probability.
    pub hflip: f64,
    /// Train `PhotoMetricDistortion` (brightness, contrast, saturation, hue).
    pub photometric: bool,
}

impl Default for SegAugConfig {
    fn default() -> Self {
        Self {
            scale: None,
            ratio_range: [0.5, 2.0],
            cat_max_ratio: 0.75,
            hflip: 0.5,
            photometric: true,
        }
    }
}

/// The segmentation pipeline of one split; see the module doc.
#[derive(Debug, Clone)]
pub struct SegTransform {
    /// Train crop side (the model input size).
    pub size: usize,
    /// Output channels (1 or 3).
    pub in_chans: usize,
    /// Train pipeline when true, eval resize when false.
    pub train: bool,
    cfg: SegAugConfig,
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// mmseg `PhotoMetricDistortion` defaults.
const BRIGHTNESS_DELTA: f64 = 32.0;
const CONTRAST_RANGE: [f64; 2] = [0.5, 1.5];
const SATURATION_RANGE: [f64; 2] = [0.5, 1.5];
const HUE_DELTA: i32 = 18;
/// mmseg `RandomCrop`'s number of checked draws.
const CROP_TRIES: usize = 10;

impl SegTransform {
    /// Checks `data.seg_aug` and the normalization against the model input.
    pub fn new(
        size: usize,
        in_chans: usize,
        train: bool,
        cfg: &SegAugConfig,
        aug: &AugConfig,
    ) -> Result<Self> {
        ensure!(size > 0, "image size must be positive");
        ensure!(
            in_chans == 1 || in_chans == 3,
            "in_chans = {in_chans}: only 1 or 3 are served"
        );
        let [lo, hi] = cfg.ratio_range;
        ensure!(
            0.0 < lo && lo <= hi && hi.is_finite(),
            "data.seg_aug.ratio_range {:?} must be positive, ascending",
            cfg.ratio_range
        );
        if let Some([l, s]) = cfg.scale {
            ensure!(
                l > 0 && s > 0,
                "data.seg_aug.scale {:?} must be positive",
                [l, s]
            );
        }
        ensure!(
            cfg.cat_max_ratio > 0.0 && cfg.cat_max_ratio <= 1.0,
            "data.seg_aug.cat_max_ratio {} not in (0, 1]",
            cfg.cat_max_ratio
        );
        ensure!(
            (0.0..=1.0).contains(&cfg.hflip),
            "data.seg_aug.hflip {} not in [0, 1]",
            cfg.hflip
        );
        let (mean, std) = normalization(aug, in_chans)?;
        Ok(Self {
            size,
            in_chans,
            train,
            cfg: cfg.clone(),
            mean,
            std,
        })
    }

    /// `(long, short)` of the resize.
    pub fn scale(&self) -> [usize; 2] {
        self.cfg.scale.unwrap_or([4 * self.size, self.size])
    }

    /// (height, width) of the eval image served for a `height x width` original.
    pub fn eval_size(&self, height: usize, width: usize) -> (usize, usize) {
        let [l, s] = self.scale();
        rescale_size(height, width, l.max(s), l.min(s))
    }

    /// The image and its class map through the pipeline, normalized (train: padded to the crop
    /// size); draws from `rng` in step order.
    pub fn apply(&self, image: U8Image, mask: ClassMap, rng: &mut StdRng) -> Result<Sample> {
        let a = Annotated::new(image, Target::Mask(mask))?;
        let (h, w) = (a.image().height, a.image().width);
        if !self.train {
            let (eh, ew) = self.eval_size(h, w);
            return Ok(a
                .resize(ew, eh)
                .normalize(self.in_chans, &self.mean, &self.std));
        }
        let [l, s] = self.scale();
        let r = uniform(rng, self.cfg.ratio_range[0], self.cfg.ratio_range[1]);
        let (l, s) = ((l as f64 * r) as usize, (s as f64 * r) as usize);
        let (nh, nw) = rescale_size(h, w, l.max(s).max(1), l.min(s).max(1));
        let a = a.resize(nw, nh);
        let b = self.crop_box(&a, rng)?;
        let a = a.crop(b)?.random_hflip(self.cfg.hflip, rng);
        let (mut image, target) = a.into_parts();
        if self.cfg.photometric {
            photometric_distortion(&mut image, rng);
        }
        Annotated::new(image, target)?
            .normalize(self.in_chans, &self.mean, &self.std)
            .pad(self.size, self.size)
    }

    /// mmseg `RandomCrop.crop_bbox` with the `cat_max_ratio` retries (module doc).
    fn crop_box(&self, a: &Annotated, rng: &mut StdRng) -> Result<CropBox> {
        let img = a.image();
        let (ch, cw) = (self.size.min(img.height), self.size.min(img.width));
        let draw = |rng: &mut StdRng| CropBox {
            top: rng.random_range(0..=img.height - ch),
            left: rng.random_range(0..=img.width - cw),
            height: ch,
            width: cw,
        };
        let mut b = draw(rng);
        if self.cfg.cat_max_ratio < 1.0 {
            let mask = a.target().mask().expect("a segmentation sample has a mask");
            for _ in 0..CROP_TRIES {
                if crop_is_varied(mask, b, self.cfg.cat_max_ratio) {
                    break;
                }
                b = draw(rng);
            }
        }
        Ok(b)
    }
}

/// mmseg's test: more than one labelled class in the crop and none above `max_ratio` of its
/// labelled pixels.
pub fn crop_is_varied(mask: &ClassMap, b: CropBox, max_ratio: f64) -> bool {
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    for y in b.top..b.top + b.height {
        for x in b.left..b.left + b.width {
            let v = mask.at(x, y);
            if v != IGNORE {
                *counts.entry(v).or_default() += 1;
            }
        }
    }
    let total: usize = counts.values().sum();
    let top = counts.values().copied().max().unwrap_or(0);
    counts.len() > 1 && (top as f64) / (total as f64) < max_ratio
}

/// `np.clip(v * alpha + beta, 0, 255).astype(np.uint8)` (mmseg's `convert`).
fn convert(v: u8, alpha: f64, beta: f64) -> u8 {
    (v as f64 * alpha + beta).clamp(0.0, 255.0) as u8
}

/// mmseg `PhotoMetricDistortion` with its defaults, in place, drawing as mmseg does:
/// brightness (p 0.5, delta uniform in [-32, 32)), a mode bit, contrast first when it is 1 (p 0.5,
/// alpha in [0.5, 1.5)), saturation (p 0.5, alpha in [0.5, 1.5) on HSV's S), hue (p 0.5, an
/// integer delta in [-18, 18) added to HSV's H modulo 180), contrast last when the mode is 0.
/// HSV is OpenCV's 8-bit HSV (H in [0, 180)); grey images skip saturation and hue.
pub fn photometric_distortion(img: &mut U8Image, rng: &mut StdRng) {
    let coin = |rng: &mut StdRng| rng.random_range(0..2) == 1;
    let point = |img: &mut U8Image, alpha: f64, beta: f64| {
        for v in img.data.iter_mut() {
            *v = convert(*v, alpha, beta);
        }
    };
    if coin(rng) {
        let beta = uniform(rng, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA);
        point(img, 1.0, beta);
    }
    let contrast = |img: &mut U8Image, rng: &mut StdRng| {
        if coin(rng) {
            let alpha = uniform(rng, CONTRAST_RANGE[0], CONTRAST_RANGE[1]);
            point(img, alpha, 0.0);
        }
    };
    let mode = coin(rng);
    if mode {
        contrast(img, rng);
    }
    if coin(rng) {
        let alpha = uniform(rng, SATURATION_RANGE[0], SATURATION_RANGE[1]);
        map_hsv(img, |hsv| hsv[1] = convert(hsv[1], alpha, 0.0));
    }
    if coin(rng) {
        let delta = rng.random_range(-HUE_DELTA..HUE_DELTA);
        map_hsv(img, |hsv| {
            hsv[0] = (hsv[0] as i32 + delta).rem_euclid(180) as u8
        });
    }
    if !mode {
        contrast(img, rng);
    }
}

/// Applies `f` to every pixel of an RGB image in OpenCV's 8-bit HSV; grey images are left alone.
fn map_hsv(img: &mut U8Image, f: impl Fn(&mut [u8; 3])) {
    if img.channels != 3 {
        return;
    }
    for px in img.data.chunks_exact_mut(3) {
        let mut hsv = rgb_to_hsv([px[0], px[1], px[2]]);
        f(&mut hsv);
        px.copy_from_slice(&hsv_to_rgb(hsv));
    }
}

/// OpenCV `COLOR_RGB2HSV` on 8 bits: V = max, S = 255 (V - min) / V, H = hue in degrees / 2,
/// each rounded.
pub fn rgb_to_hsv([r, g, b]: [u8; 3]) -> [u8; 3] {
    let (rf, gf, bf) = (r as f64, g as f64, b as f64);
    let v = rf.max(gf).max(bf);
    let d = v - rf.min(gf).min(bf);
    let s = if v > 0.0 { 255.0 * d / v } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if v == rf {
        60.0 * (gf - bf) / d
    } else if v == gf {
        120.0 + 60.0 * (bf - rf) / d
    } else {
        240.0 + 60.0 * (rf - gf) / d
    };
    let h = if h < 0.0 { h + 360.0 } else { h };
    let h = ((h / 2.0).round() as u32 % 180) as u8;
    [h, s.round() as u8, v as u8]
}

/// OpenCV `COLOR_HSV2RGB` on 8 bits (H in [0, 180)).
pub fn hsv_to_rgb([h, s, v]: [u8; 3]) -> [u8; 3] {
    let (h, s, v) = (h as f64 * 2.0, s as f64 / 255.0, v as f64);
    let c = v * s;
    let hp = (h / 60.0) % 6.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let q = |t: f64| (t + m).round().clamp(0.0, 255.0) as u8;
    [q(r), q(g), q(b)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::target::ClassIds;
    use crate::rng::rng_for;

    /// A `w x h` grey image whose class map is 1 on the left `split` columns and 2 on the rest.
    fn halves(w: usize, h: usize, split: usize) -> (U8Image, ClassMap) {
        let img = U8Image::new(w, h, 3, vec![128; w * h * 3]).unwrap();
        let ids = (0..h)
            .flat_map(|_| (0..w).map(move |x| if x < split { 1 } else { 2 }))
            .collect();
        (img, ClassMap::new(w, h, ClassIds::U8(ids)).unwrap())
    }

    #[test]
    fn train_crops_are_padded_to_the_size_and_keep_classes_with_the_image() {
        let cfg = SegAugConfig {
            photometric: false,
            ..Default::default()
        };
        let t = SegTransform::new(32, 3, true, &cfg, &AugConfig::default()).unwrap();
        for seed in 0..20 {
            let (img, mask) = halves(64, 40, 16);
            let s = t.apply(img, mask, &mut rng_for(seed, &[])).unwrap();
            assert_eq!((s.width, s.height), (32, 32), "seed {seed}");
            let m = s.target.mask().unwrap();
            // every row reads 1s then 2s (or the reverse when flipped), then 255 padding
            for y in 0..32 {
                let row: Vec<u16> = (0..32).map(|x| m.at(x, y)).collect();
                let changes = row.windows(2).filter(|w| w[0] != w[1]).count();
                assert!(changes <= 2, "seed {seed} row {y}: {row:?}");
            }
        }
    }

    #[test]
    fn cat_max_ratio_retries_crops_that_hold_one_class() {
        // 1 on the left 12 of 200 columns: a 32-wide crop holds enough of both classes (class 2
        // under 75%) only when its left edge is at most 3
        let (img, mask) = halves(200, 32, 12);
        let a = Annotated::new(img, Target::Mask(mask.clone())).unwrap();
        let mk = |ratio: f64| {
            let cfg = SegAugConfig {
                cat_max_ratio: ratio,
                ..Default::default()
            };
            SegTransform::new(32, 3, true, &cfg, &AugConfig::default()).unwrap()
        };
        let (mut varied_with, mut varied_without) = (0, 0);
        for seed in 0..400 {
            let b = mk(0.75).crop_box(&a, &mut rng_for(seed, &[])).unwrap();
            varied_with += crop_is_varied(&mask, b, 0.75) as usize;
            let b = mk(1.0).crop_box(&a, &mut rng_for(seed, &[])).unwrap();
            varied_without += crop_is_varied(&mask, b, 0.75) as usize;
        }
        // one draw: P = 4/169 (about 9 of 400); up to 11 draws: 1 - (165/169)^11 = 23% (about 92)
        assert!(varied_without < 25, "{varied_without}");
        assert!(
            (60..130).contains(&varied_with),
            "{varied_with} varied crops of 400"
        );
        // the rule: two classes, none at the ratio or above (here 12/32 and 20/32 = 62.5%)
        let b = CropBox {
            top: 0,
            left: 0,
            height: 32,
            width: 32,
        };
        assert!(crop_is_varied(&mask, b, 0.75));
        assert!(!crop_is_varied(&mask, b, 0.625));
        let one = CropBox { left: 100, ..b };
        assert!(!crop_is_varied(&mask, one, 0.99), "a single class");
    }

    #[test]
    fn eval_resize_keeps_the_aspect_within_the_scale() {
        let t = SegTransform::new(
            64,
            3,
            false,
            &SegAugConfig::default(),
            &AugConfig::default(),
        )
        .unwrap();
        // scale (256, 64): 100 x 300 -> factor min(256/300, 64/100) = 0.64
        assert_eq!(t.eval_size(100, 300), (64, 192));
        let (img, mask) = halves(300, 100, 150);
        let s = t.apply(img, mask, &mut rng_for(0, &[])).unwrap();
        assert_eq!((s.width, s.height), (192, 64));
        assert_eq!(s.target.mask().unwrap().at(95, 0), 1);
        assert_eq!(s.target.mask().unwrap().at(96, 0), 2);
    }

    #[test]
    fn hsv_matches_opencv_on_known_colours_and_round_trips() {
        // cv2.cvtColor(np.uint8([[[r, g, b]]]), cv2.COLOR_RGB2HSV)
        assert_eq!(rgb_to_hsv([255, 0, 0]), [0, 255, 255]);
        assert_eq!(rgb_to_hsv([0, 255, 0]), [60, 255, 255]);
        assert_eq!(rgb_to_hsv([0, 0, 255]), [120, 255, 255]);
        assert_eq!(rgb_to_hsv([255, 128, 0]), [15, 255, 255]);
        assert_eq!(rgb_to_hsv([100, 100, 100]), [0, 0, 100]);
        assert_eq!(rgb_to_hsv([10, 20, 30]), [105, 170, 30]);
        for rgb in [
            [255, 0, 0],
            [0, 255, 0],
            [12, 200, 77],
            [90, 90, 91],
            [0, 0, 0],
        ] {
            let back = hsv_to_rgb(rgb_to_hsv(rgb));
            for c in 0..3 {
                assert!(
                    (back[c] as i32 - rgb[c] as i32).abs() <= 2,
                    "{rgb:?} -> {back:?}"
                );
            }
        }
    }

    #[test]
    fn photometric_changes_colours_deterministically_and_grey_stays_grey() {
        let base = U8Image::new(
            4,
            1,
            3,
            vec![10, 100, 200, 50, 50, 50, 0, 0, 0, 255, 255, 255],
        )
        .unwrap();
        let run = |seed| {
            let mut img = base.clone();
            photometric_distortion(&mut img, &mut rng_for(seed, &[]));
            img
        };
        assert_eq!(run(3), run(3));
        assert!((0..20).any(|s| run(s) != base));
        let mut grey = U8Image::new(2, 1, 1, vec![0, 200]).unwrap();
        for s in 0..20 {
            photometric_distortion(&mut grey, &mut rng_for(s, &[]));
            assert_eq!(grey.channels, 1);
        }
        let e = SegTransform::new(
            8,
            3,
            true,
            &SegAugConfig {
                cat_max_ratio: 0.0,
                ..Default::default()
            },
            &AugConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("data.seg_aug.cat_max_ratio"), "{e}");
    }
}
