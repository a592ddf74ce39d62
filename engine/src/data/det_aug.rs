//! Transforms stage, detection: the per-sample pipeline of the detection datasets, composed from
//! the [`Annotated`] steps (mmdet's `Resize` + `RandomCrop` + `RandomFlip` recipe, LSJ-like).
//!
//! - Train: one resize of the image to `f * s0` of its size, where `s0` makes its longer side the
//!   target `size` (aspect kept) and `f` is drawn uniformly from `data.det_aug.scale_range`
//!   ([`Annotated::random_scale`] with the range times `s0`); a random `size x size` crop
//!   ([`Annotated::random_crop`]: the whole image when smaller; boxes clipped, boxes left with no
//!   width or height dropped); a horizontal flip with probability `data.det_aug.hflip`.
//! - Eval: a fixed keep-aspect resize, longer side = `size` ([`rescale_size`]); the collate pads
//!   the batch. [`DetTransform::eval_scale`] gives the factors, so a prediction made on the served
//!   image maps back to the original by dividing by them.
use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::transforms::{normalization, rescale_size, Annotated, U8Image};
use super::{AugConfig, Sample, Target};

/// Detection augmentation settings (`data.det_aug`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetAugConfig {
    /// Train scale jitter: factor range over the resize that fits the longer side to the size.
    pub scale_range: [f64; 2],
    /// Train horizontal flip probability.
    pub hflip: f64,
}

impl Default for DetAugConfig {
    fn default() -> Self {
        Self {
            scale_range: [0.5, 1.5],
            hflip: 0.5,
        }
    }
}

/// The detection pipeline of one split; see the module doc.
#[derive(Debug, Clone)]
pub struct DetTransform {
    /// Target size (train crop side, eval longer side).
    pub size: usize,
    /// Output channels (1 or 3).
    pub in_chans: usize,
    /// Scale jitter + crop + flip when true, fixed resize when false.
    pub train: bool,
    cfg: DetAugConfig,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl DetTransform {
    /// Checks the settings (`data.det_aug`, `data.aug.mean/std`) against the model input.
    pub fn new(
        size: usize,
        in_chans: usize,
        train: bool,
        cfg: &DetAugConfig,
        aug: &AugConfig,
    ) -> Result<Self> {
        ensure!(size > 0, "image size must be positive");
        ensure!(
            in_chans == 1 || in_chans == 3,
            "in_chans = {in_chans}: only 1 or 3 are served"
        );
        let [lo, hi] = cfg.scale_range;
        ensure!(
            0.0 < lo && lo <= hi && hi.is_finite(),
            "data.det_aug.scale_range {:?} must be positive, ascending",
            cfg.scale_range
        );
        ensure!(
            (0.0..=1.0).contains(&cfg.hflip),
            "data.det_aug.hflip {} not in [0, 1]",
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

    /// (height, width) of the eval image served for a `height x width` original.
    pub fn eval_size(&self, height: usize, width: usize) -> (usize, usize) {
        rescale_size(height, width, self.size, self.size)
    }

    /// `[x, y]` factors from original to eval-served pixels (served = original * factor).
    pub fn eval_scale(&self, height: usize, width: usize) -> [f64; 2] {
        let (h, w) = self.eval_size(height, width);
        [w as f64 / width as f64, h as f64 / height as f64]
    }

    /// The image and target through the pipeline, normalized; draws from `rng` in step order
    /// (scale, crop top, crop left, flip).
    pub fn apply(&self, image: U8Image, target: Target, rng: &mut StdRng) -> Result<Sample> {
        let a = Annotated::new(image, target)?;
        let (h, w) = (a.image().height, a.image().width);
        let a = if self.train {
            let s0 = self.size as f64 / h.max(w) as f64;
            let [lo, hi] = self.cfg.scale_range;
            a.random_scale([lo * s0, hi * s0], rng)
                .random_crop(self.size, self.size, rng)
                .random_hflip(self.cfg.hflip, rng)
        } else {
            let (eh, ew) = self.eval_size(h, w);
            a.resize(ew, eh)
        };
        Ok(a.normalize(self.in_chans, &self.mean, &self.std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ObjectBox;
    use crate::rng::rng_for;

    /// A 120 x 80 grey image, black with a white rectangle [30, 20, 70, 50), its box as target.
    fn rect_sample() -> (U8Image, Target) {
        let (w, h) = (120, 80);
        let data = (0..h)
            .flat_map(|y| {
                (0..w).map(move |x| {
                    if (30..70).contains(&x) && (20..50).contains(&y) {
                        255
                    } else {
                        0
                    }
                })
            })
            .collect();
        let b = ObjectBox {
            xyxy: [30.0, 20.0, 70.0, 50.0],
            class: 0,
            crowd: false,
        };
        (U8Image::new(w, h, 1, data).unwrap(), Target::Boxes(vec![b]))
    }

    #[test]
    fn train_transforms_keep_the_box_around_the_rectangle() {
        let (img, target) = rect_sample();
        let mut seen = 0;
        // Never and always flipped, 20 scale/crop draws each.
        for (seed, flip) in (0..40).map(|s| (s, (s % 2) as f64)) {
            let cfg = DetAugConfig {
                hflip: flip,
                ..Default::default()
            };
            let t = DetTransform::new(64, 1, true, &cfg, &AugConfig::default()).unwrap();
            let s = t
                .apply(img.clone(), target.clone(), &mut rng_for(seed, &[]))
                .unwrap();
            assert!(s.height <= 64 && s.width <= 64);
            // Back to [0, 1] grey: normalized with the channel-mean of the ImageNet stats.
            let (m, sd) = (0.449f32, 0.226f32);
            let px = |x: usize, y: usize| s.image[y * s.width + x] * sd + m;
            let boxes = s.target.boxes().unwrap();
            // Bright pixels (> 0.9 after the bilinear edge) lie in the box, and every pixel
            // whose centre is 1.5 px inside the box is bright.
            let bright: Vec<(usize, usize)> = (0..s.height)
                .flat_map(|y| (0..s.width).map(move |x| (x, y)))
                .filter(|&(x, y)| px(x, y) > 0.9)
                .collect();
            match boxes {
                [] => assert!(bright.is_empty(), "seed {seed}: rectangle without a box"),
                [b] => {
                    seen += 1;
                    let [x1, y1, x2, y2] = b.xyxy;
                    for &(x, y) in &bright {
                        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
                        assert!(
                            cx > x1 - 0.5 && cx < x2 + 0.5 && cy > y1 - 0.5 && cy < y2 + 0.5,
                            "seed {seed}: bright ({x}, {y}) outside {:?}",
                            b.xyxy
                        );
                    }
                    for y in 0..s.height {
                        for x in 0..s.width {
                            let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
                            if cx > x1 + 1.5 && cx < x2 - 1.5 && cy > y1 + 1.5 && cy < y2 - 1.5 {
                                assert!(
                                    px(x, y) > 0.5,
                                    "seed {seed}: ({x}, {y}) in the box is dark"
                                );
                            }
                        }
                    }
                }
                more => panic!("seed {seed}: {more:?}"),
            }
        }
        assert!(seen > 20, "the rectangle was kept in {seen} of 40 crops");
    }

    #[test]
    fn eval_resizes_keeping_aspect_and_records_the_scale() {
        let t = DetTransform::new(
            60,
            3,
            false,
            &DetAugConfig::default(),
            &AugConfig::default(),
        )
        .unwrap();
        let (img, target) = rect_sample();
        // 120 x 80 -> longer side 60: 60 x 40, factors 0.5 both ways.
        assert_eq!(t.eval_size(80, 120), (40, 60));
        assert_eq!(t.eval_scale(80, 120), [0.5, 0.5]);
        let s = t.apply(img, target, &mut rng_for(0, &[])).unwrap();
        assert_eq!((s.width, s.height, s.image.len()), (60, 40, 3 * 60 * 40));
        assert_eq!(s.target.boxes().unwrap()[0].xyxy, [15.0, 10.0, 35.0, 25.0]);
        // 101 x 33 -> factor 60/101: int(33 * 0.594 + 0.5) = 20 rows.
        assert_eq!(t.eval_size(33, 101), (20, 60));
        let bad = DetAugConfig {
            scale_range: [1.5, 0.5],
            ..Default::default()
        };
        let err = DetTransform::new(8, 3, true, &bad, &AugConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.det_aug.scale_range"), "{err}");
    }
}
