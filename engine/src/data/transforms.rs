//! Transforms: decoded u8 image (+ its [`Target`]) -> geometric transforms -> normalized CHW f32,
//! as torchvision applies them to PIL images.
//!
//! Classification and pretraining use [`ImageTransform`]: train = random resized crop + flip,
//! eval = resize of the shorter side + centre crop, to a square. Detection/segmentation pipelines
//! (mmdet/mmseg style) compose the methods of [`Annotated`]: resize, random resized crop, random
//! scale (scale jitter), random crop, flip, then normalization into a [`Sample`], whose
//! [`Sample::pad`] (or the collate) pads bottom/right. Each geometric step moves the target with
//! the image, by the conventions of `target.rs`; randomness is drawn from the caller's rng in the
//! order the steps run.
//!
//! Resizing is PIL's `Image.resize(..., BILINEAR)` (the algorithm of `ImagingResample`: a triangle
//! filter widened by the downscale factor, i.e. antialiased, horizontal pass then vertical pass,
//! each rounded and clamped to u8). PIL uses fixed-point coefficients where this uses f32, so a
//! pixel may differ from PIL by at most 1 grey level. Output pixel `x` of a crop is centred on
//! source coordinate `left + (x + 0.5) * crop_w / out_w`; class maps take the nearest pixel to
//! that same centre.
use anyhow::{bail, ensure, Result};
use rand::rngs::StdRng;
use rand::Rng;

use super::target::Target;
use super::{AugConfig, Sample};

/// A decoded image: `height x width x channels` u8, row-major HWC, channels 1 (grey) or 3 (RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct U8Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes, HWC.
    pub data: Vec<u8>,
}

impl U8Image {
    /// Wraps an HWC buffer, checking its length.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        ensure!(
            channels == 1 || channels == 3,
            "image with {channels} channels (expected 1 or 3)"
        );
        ensure!(
            data.len() == width * height * channels,
            "image buffer of {} bytes for {width}x{height}x{channels}",
            data.len()
        );
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// Pixel (x, y), channel c.
    pub fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

/// A crop box in pixels: rows `top..top+height`, columns `left..left+width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl CropBox {
    /// The whole `height x width` image.
    pub fn full(height: usize, width: usize) -> Self {
        Self {
            top: 0,
            left: 0,
            height,
            width,
        }
    }
}

/// torchvision `RandomResizedCrop.get_params`: 10 tries of (area scale, log-uniform ratio), then the
/// centre crop with the ratio clamped into `ratio`. Python's `round` (ties to even) is kept.
pub fn random_resized_crop_params(
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut StdRng,
) -> CropBox {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            // torch.randint(0, height - h + 1): inclusive upper bound height - h.
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (
            width,
            ((width as f64 / ratio[0]).round_ties_even() as usize).max(1),
        )
    } else if in_ratio > ratio[1] {
        (
            ((height as f64 * ratio[1]).round_ties_even() as usize).max(1),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Uniform in `[lo, hi)` (torch.empty(1).uniform_), `lo` when the range is empty.
pub(crate) fn uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// torchvision `Resize(size)` with an int: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`. Returns (height, width).
pub fn shorter_side_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    if height <= width {
        (size, (size as f64 * width as f64 / height as f64) as usize)
    } else {
        ((size as f64 * height as f64 / width as f64) as usize, size)
    }
}

/// torchvision `CenterCrop(size)` box on an image at least `size` on each side:
/// `top = int(round((h - size) / 2))`.
pub fn center_crop_box(height: usize, width: usize, size: usize) -> CropBox {
    let h = size.min(height);
    let w = size.min(width);
    let top = ((height - h) as f64 / 2.0).round_ties_even() as usize;
    let left = ((width - w) as f64 / 2.0).round_ties_even() as usize;
    CropBox {
        top,
        left,
        height: h,
        width: w,
    }
}

/// PIL resampling coefficients of one axis: for each output pixel, (first input pixel, weights).
fn resample_coeffs(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    // PIL Resample.c precompute_coeffs with the bilinear (triangle, support 1) filter.
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|xx| {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

fn clip8(v: f32) -> u8 {
    // Round half up on the clamped value (= f32::round for v >= 0), without a libm call.
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

/// PIL `img.resize((out_w, out_h), BILINEAR, box=crop)`: resizes the `crop` region of `img`.
pub fn resize_bilinear(img: &U8Image, crop: CropBox, out_w: usize, out_h: usize) -> U8Image {
    let c = img.channels;
    let (x0, y0) = (crop.left as f64, crop.top as f64);
    let hcoef = resample_coeffs(img.width, x0, x0 + crop.width as f64, out_w);
    let vcoef = resample_coeffs(img.height, y0, y0 + crop.height as f64, out_h);
    // Rows the vertical pass reads (PIL's ybox), so the horizontal pass skips the others.
    let row_lo = vcoef.iter().map(|(s, _)| *s).min().unwrap_or(0);
    let row_hi = vcoef
        .iter()
        .map(|(s, w)| s + w.len())
        .max()
        .unwrap_or(0)
        .max(row_lo);
    let rows = row_hi - row_lo;
    // Horizontal pass: (rows, out_w, c)
    let mut tmp = vec![0u8; rows * out_w * c];
    let mut acc = vec![0f32; c];
    for (r, dst_row) in tmp.chunks_exact_mut(out_w * c).enumerate() {
        let src = &img.data[(row_lo + r) * img.width * c..(row_lo + r + 1) * img.width * c];
        for ((start, w), dst) in hcoef.iter().zip(dst_row.chunks_exact_mut(c)) {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (wk, px) in w.iter().zip(src[start * c..].chunks_exact(c)) {
                for (a, v) in acc.iter_mut().zip(px) {
                    *a += wk * *v as f32;
                }
            }
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = clip8(*a);
            }
        }
    }
    // Vertical pass: (out_h, out_w, c)
    let stride = out_w * c;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0f32; stride];
    for ((start, w), dst) in vcoef.iter().zip(out.chunks_exact_mut(stride)) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, wk) in w.iter().enumerate() {
            let row = &tmp[(start - row_lo + k) * stride..(start - row_lo + k + 1) * stride];
            for (a, v) in acc.iter_mut().zip(row) {
                *a += wk * *v as f32;
            }
        }
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = clip8(*a);
        }
    }
    U8Image {
        width: out_w,
        height: out_h,
        channels: c,
        data: out,
    }
}

/// Crops without resampling.
pub fn crop(img: &U8Image, b: CropBox) -> U8Image {
    let c = img.channels;
    let mut data = Vec::with_capacity(b.height * b.width * c);
    for y in b.top..b.top + b.height {
        let row = (y * img.width + b.left) * c;
        data.extend_from_slice(&img.data[row..row + b.width * c]);
    }
    U8Image {
        width: b.width,
        height: b.height,
        channels: c,
        data,
    }
}

/// Mirrors left-right.
pub fn hflip(img: &U8Image) -> U8Image {
    let c = img.channels;
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..img.height {
        for x in (0..img.width).rev() {
            let p = (y * img.width + x) * c;
            data.extend_from_slice(&img.data[p..p + c]);
        }
    }
    U8Image { data, ..*img }
}

/// Scales the longer side down to at most `max_side` (keeping the aspect ratio); smaller images
/// are returned unchanged.
pub fn downscale_longer_side(img: &U8Image, max_side: usize) -> U8Image {
    let long = img.width.max(img.height);
    if long <= max_side {
        return img.clone();
    }
    let s = max_side as f64 / long as f64;
    let w = ((img.width as f64 * s).round() as usize).max(1);
    let h = ((img.height as f64 * s).round() as usize).max(1);
    let full = CropBox {
        top: 0,
        left: 0,
        height: img.height,
        width: img.width,
    };
    resize_bilinear(img, full, w, h)
}

/// mmcv `rescale_size` (mmdet `Resize(scale, keep_ratio=True)`): the largest size with the
/// aspect ratio of `height x width` whose longer side is at most `long` and shorter side at most
/// `short`, each side `int(side * factor + 0.5)`. Returns (height, width).
pub fn rescale_size(height: usize, width: usize, long: usize, short: usize) -> (usize, usize) {
    let f = (long as f64 / height.max(width) as f64).min(short as f64 / height.min(width) as f64);
    let side = |v: usize| ((v as f64 * f + 0.5) as usize).max(1);
    (side(height), side(width))
}

/// A decoded image with its target; every geometric method moves both (see the module doc),
/// the `random_*` ones draw their parameters from `rng` in the order they are called. Sizes are
/// given width first, as [`resize_bilinear`] (PIL) takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotated {
    image: U8Image,
    target: Target,
}

impl Annotated {
    /// Pairs `image` with `target`, checking that a class map has the image's size.
    pub fn new(image: U8Image, target: Target) -> Result<Self> {
        target.check_size(image.width, image.height)?;
        Ok(Self { image, target })
    }

    /// The image.
    pub fn image(&self) -> &U8Image {
        &self.image
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Both parts.
    pub fn into_parts(self) -> (U8Image, Target) {
        (self.image, self.target)
    }

    fn check_box(&self, b: CropBox) -> Result<()> {
        ensure!(
            b.top + b.height <= self.image.height
                && b.left + b.width <= self.image.width
                && b.height > 0
                && b.width > 0,
            "crop {b:?} is not a non-empty part of the {}x{} image",
            self.image.width,
            self.image.height
        );
        Ok(())
    }

    /// The region `b` resized to `out_w x out_h` (bilinear image, nearest class map).
    pub fn resized_crop(self, b: CropBox, out_w: usize, out_h: usize) -> Result<Self> {
        self.check_box(b)?;
        Ok(self.resized_crop_unchecked(b, out_w, out_h))
    }

    fn resized_crop_unchecked(self, b: CropBox, out_w: usize, out_h: usize) -> Self {
        Self {
            image: resize_bilinear(&self.image, b, out_w, out_h),
            target: self.target.resized_crop(b, out_w, out_h),
        }
    }

    /// The whole image resized to `out_w x out_h`.
    pub fn resize(self, out_w: usize, out_h: usize) -> Self {
        let full = CropBox::full(self.image.height, self.image.width);
        self.resized_crop_unchecked(full, out_w, out_h)
    }

    /// The region `b`, without resampling.
    pub fn crop(self, b: CropBox) -> Result<Self> {
        self.check_box(b)?;
        Ok(Self {
            image: crop(&self.image, b),
            target: self.target.resized_crop(b, b.width, b.height),
        })
    }

    /// Mirrored left-right.
    pub fn hflip(self) -> Self {
        Self {
            target: self.target.hflip(self.image.width),
            image: hflip(&self.image),
        }
    }

    /// torchvision `RandomResizedCrop((out_h, out_w), scale, ratio)`: draws the box
    /// ([`random_resized_crop_params`]), then resizes it to `out_w x out_h`.
    pub fn random_resized_crop(
        self,
        out_w: usize,
        out_h: usize,
        scale: [f64; 2],
        ratio: [f64; 2],
        rng: &mut StdRng,
    ) -> Self {
        let b = random_resized_crop_params(self.image.height, self.image.width, scale, ratio, rng);
        self.resized_crop_unchecked(b, out_w, out_h)
    }

    /// `RandomHorizontalFlip(p)`: one draw, flips when it is below `p`.
    pub fn random_hflip(self, p: f64, rng: &mut StdRng) -> Self {
        if rng.random::<f64>() < p {
            self.hflip()
        } else {
            self
        }
    }

    /// Scale jitter: one factor `f` uniform in `[range[0], range[1])`, then a resize to
    /// `int(w * f + 0.5) x int(h * f + 0.5)` (at least 1; mmcv's rounding).
    pub fn random_scale(self, range: [f64; 2], rng: &mut StdRng) -> Self {
        let f = uniform(rng, range[0], range[1]);
        let side = |v: usize| ((v as f64 * f + 0.5) as usize).max(1);
        let (w, h) = (side(self.image.width), side(self.image.height));
        self.resize(w, h)
    }

    /// mmdet/mmseg `RandomCrop((crop_h, crop_w))`: a `min(crop_w, W) x min(crop_h, H)` region at
    /// offsets drawn uniformly from `0..=H - h` (first) and `0..=W - w`.
    pub fn random_crop(self, crop_w: usize, crop_h: usize, rng: &mut StdRng) -> Self {
        let (h, w) = (crop_h.min(self.image.height), crop_w.min(self.image.width));
        let top = rng.random_range(0..=self.image.height - h);
        let left = rng.random_range(0..=self.image.width - w);
        let b = CropBox {
            top,
            left,
            height: h,
            width: w,
        };
        Self {
            image: crop(&self.image, b),
            target: self.target.resized_crop(b, w, h),
        }
    }

    /// ToTensor + Normalize (photometric: the target is left alone) into a [`Sample`].
    pub fn normalize(self, in_chans: usize, mean: &[f32], std: &[f32]) -> Sample {
        Sample {
            image: to_chw_normalized(&self.image, in_chans, mean, std),
            height: self.image.height,
            width: self.image.width,
            target: self.target,
        }
    }
}

/// Per-channel mean/std for `in_chans` channels: used as given when the lengths match, averaged
/// over channels for a grey model given RGB statistics, broadcast when one value is given.
pub fn channel_stats(values: &[f32], in_chans: usize, what: &str) -> Result<Vec<f32>> {
    match values.len() {
        n if n == in_chans => Ok(values.to_vec()),
        1 => Ok(vec![values[0]; in_chans]),
        _ if in_chans == 1 => Ok(vec![values.iter().sum::<f32>() / values.len() as f32]),
        n => bail!("data.aug.{what} has {n} values but the model takes {in_chans} channels"),
    }
}

/// The per-channel `data.aug.mean` and `data.aug.std` for `in_chans` channels
/// ([`channel_stats`]), the std checked positive.
pub fn normalization(aug: &AugConfig, in_chans: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let mean = channel_stats(&aug.mean, in_chans, "mean")?;
    let std = channel_stats(&aug.std, in_chans, "std")?;
    ensure!(
        std.iter().all(|s| *s > 0.0),
        "data.aug.std {:?} must be positive",
        aug.std
    );
    Ok((mean, std))
}

/// ToTensor + Normalize into CHW f32 with `in_chans` channels: grey is replicated to 3 channels,
/// RGB becomes grey by PIL's `convert("L")` (Pillow's fixed-point ITU-R 601-2 luma).
pub fn to_chw_normalized(img: &U8Image, in_chans: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let hw = img.width * img.height;
    let mut out = vec![0f32; in_chans * hw];
    let grey: Vec<u8>;
    let (src, src_c) = if img.channels == 3 && in_chans == 1 {
        grey = img
            .data
            .chunks_exact(3)
            .map(|px| {
                let l = px[0] as u32 * 19595 + px[1] as u32 * 38470 + px[2] as u32 * 7471;
                ((l + 0x8000) >> 16) as u8
            })
            .collect();
        (&grey[..], 1)
    } else {
        (&img.data[..], img.channels)
    };
    for (ch, plane) in out.chunks_exact_mut(hw).enumerate() {
        let (m, s) = (mean[ch], std[ch]);
        let lut: Vec<f32> = (0..256).map(|v| (v as f32 / 255.0 - m) / s).collect();
        let off = if src_c == 1 { 0 } else { ch };
        for (o, px) in plane.iter_mut().zip(src.chunks_exact(src_c)) {
            *o = lut[px[off] as usize];
        }
    }
    out
}

/// The per-sample pipeline: train (random resized crop + flip) or eval (resize shorter side to
/// `size / eval_crop_pct` + centre crop), then to normalized CHW with `in_chans` channels.
#[derive(Debug, Clone)]
pub struct ImageTransform {
    /// Output side (square).
    pub size: usize,
    /// Output channels (1 or 3).
    pub in_chans: usize,
    /// Random resized crop + flip when true, resize + centre crop when false.
    pub train: bool,
    /// Crop scale/ratio, flip probability, eval crop fraction.
    pub aug: AugConfig,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl ImageTransform {
    /// Checks the augmentation settings against the model input.
    pub fn new(size: usize, in_chans: usize, train: bool, aug: &AugConfig) -> Result<Self> {
        ensure!(size > 0, "image size must be positive");
        ensure!(
            in_chans == 1 || in_chans == 3,
            "in_chans = {in_chans}: only 1 or 3 are served"
        );
        let [s0, s1] = aug.crop_scale;
        ensure!(
            0.0 < s0 && s0 <= s1 && s1 <= 1.0,
            "data.aug.crop_scale {:?} not in (0, 1]",
            [s0, s1]
        );
        let [r0, r1] = aug.crop_ratio;
        ensure!(
            0.0 < r0 && r0 <= r1,
            "data.aug.crop_ratio {:?} must be positive, ascending",
            [r0, r1]
        );
        ensure!(
            (0.0..=1.0).contains(&aug.hflip),
            "data.aug.hflip {} not in [0, 1]",
            aug.hflip
        );
        ensure!(
            aug.eval_crop_pct > 0.0 && aug.eval_crop_pct <= 1.0,
            "data.aug.eval_crop_pct {} not in (0, 1]",
            aug.eval_crop_pct
        );
        let (mean, std) = normalization(aug, in_chans)?;
        Ok(Self {
            size,
            in_chans,
            train,
            aug: aug.clone(),
            mean,
            std,
        })
    }

    /// Values per output image (`in_chans * size * size`).
    pub fn output_len(&self) -> usize {
        self.in_chans * self.size * self.size
    }

    /// The random draws of the train transform of a `height x width` image, in the order
    /// [`Self::apply_spatial`] makes them: the crop box, then the horizontal-flip flag.
    pub fn train_params(&self, height: usize, width: usize, rng: &mut StdRng) -> (CropBox, bool) {
        let b = random_resized_crop_params(
            height,
            width,
            self.aug.crop_scale,
            self.aug.crop_ratio,
            rng,
        );
        // RandomHorizontalFlip: torch.rand(1) < p.
        (b, rng.random::<f64>() < self.aug.hflip)
    }

    /// Spatial part only: the `size x size` u8 image (channels as decoded).
    pub fn apply_spatial(&self, img: &U8Image, rng: &mut StdRng) -> U8Image {
        self.apply_spatial_with_target(img, &Target::None, rng).0
    }

    /// Spatial part with the target moved alongside; the same draws as [`Self::apply_spatial`].
    pub fn apply_spatial_with_target(
        &self,
        img: &U8Image,
        target: &Target,
        rng: &mut StdRng,
    ) -> (U8Image, Target) {
        let s = self.size;
        if self.train {
            let (b, flip) = self.train_params(img.height, img.width, rng);
            let out = resize_bilinear(img, b, s, s);
            let target = target.resized_crop(b, s, s);
            if flip {
                (hflip(&out), target.hflip(s))
            } else {
                (out, target)
            }
        } else {
            // Official Swin eval: Resize(int(size / crop_pct)) then CenterCrop(size).
            let short = ((s as f64 / self.aug.eval_crop_pct) as usize).max(s);
            let (h, w) = shorter_side_size(img.height, img.width, short);
            let full = CropBox::full(img.height, img.width);
            let resized = resize_bilinear(img, full, w, h);
            let center = center_crop_box(h, w, s);
            let target =
                target
                    .resized_crop(full, w, h)
                    .resized_crop(center, center.width, center.height);
            (crop(&resized, center), target)
        }
    }

    /// The whole pipeline with a target: a [`Sample`] of `size x size` whose target moved with
    /// the image (a class map must have the image's size).
    pub fn apply_with_target(
        &self,
        img: &U8Image,
        target: &Target,
        rng: &mut StdRng,
    ) -> Result<Sample> {
        target.check_size(img.width, img.height)?;
        let (out, target) = self.apply_spatial_with_target(img, target, rng);
        Ok(Sample {
            image: to_chw_normalized(&out, self.in_chans, &self.mean, &self.std),
            height: out.height,
            width: out.width,
            target,
        })
    }

    /// The whole pipeline: normalized CHW f32 of length [`Self::output_len`].
    pub fn apply(&self, img: &U8Image, rng: &mut StdRng) -> Vec<f32> {
        let out = self.apply_spatial(img, rng);
        to_chw_normalized(&out, self.in_chans, &self.mean, &self.std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::target::{ClassIds, ClassMap, ObjectBox};
    use crate::rng::rng_for;

    fn ramp(w: usize, h: usize) -> U8Image {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x * 10 + y) as u8))
            .collect();
        U8Image::new(w, h, 1, data).unwrap()
    }

    #[test]
    fn crop_params_stay_in_bounds_and_are_seeded() {
        let (h, w) = (300, 400);
        let mut rng = rng_for(3, &[]);
        let mut fallbacks = 0;
        for _ in 0..1000 {
            let b = random_resized_crop_params(h, w, [0.67, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(b.top + b.height <= h && b.left + b.width <= w, "{b:?}");
            let area = (b.height * b.width) as f64 / (h * w) as f64;
            let ratio = b.width as f64 / b.height as f64;
            if b == (CropBox {
                top: 0,
                left: 0,
                height: 300,
                width: 400,
            }) {
                fallbacks += 1; // the fallback crop: whole image (ratio 4/3 is inside the bounds)
                continue;
            }
            // Rounding w and h to integers moves area/ratio by at most a pixel's worth.
            assert!((0.67 - 0.01..=1.0).contains(&area), "area {area}");
            assert!(
                (0.75 - 0.01..=4.0 / 3.0 + 0.01).contains(&ratio),
                "ratio {ratio}"
            );
        }
        assert!(fallbacks < 50, "{fallbacks} fallbacks");
        let draw = |seed| {
            let mut rng = rng_for(seed, &[]);
            (0..20)
                .map(|_| random_resized_crop_params(h, w, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn crop_fallback_clamps_ratio() {
        // A 10x1000 strip: no crop of ratio <= 4/3 with area >= 0.9 fits, so the fallback is the
        // centre crop of width round(10 * 4/3) = 13.
        let mut rng = rng_for(0, &[]);
        let b = random_resized_crop_params(10, 1000, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: (1000 - 13) / 2,
                height: 10,
                width: 13
            }
        );
        let b = random_resized_crop_params(1000, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: (1000 - 13) / 2,
                left: 0,
                height: 13,
                width: 10
            }
        );
    }

    #[test]
    fn resize_identity_constant_and_upscale_values() {
        let img = ramp(6, 4);
        let full = CropBox {
            top: 0,
            left: 0,
            height: 4,
            width: 6,
        };
        assert_eq!(resize_bilinear(&img, full, 6, 4), img);
        let flat = U8Image::new(7, 5, 3, vec![77; 105]).unwrap();
        let full = CropBox {
            top: 0,
            left: 0,
            height: 5,
            width: 7,
        };
        let out = resize_bilinear(&flat, full, 3, 11);
        assert_eq!((out.width, out.height, out.channels), (3, 11, 3));
        assert!(out.data.iter().all(|v| *v == 77));
        // PIL: Image.fromarray(np.uint8([[0, 100]])).resize((4, 1), BILINEAR) -> [0, 25, 75, 100]
        // (centres at 0.25, 0.75, 1.25, 1.75 source px; edge weights renormalized).
        let two = U8Image::new(2, 1, 1, vec![0, 100]).unwrap();
        let b = CropBox {
            top: 0,
            left: 0,
            height: 1,
            width: 2,
        };
        assert_eq!(resize_bilinear(&two, b, 4, 1).data, vec![0, 25, 75, 100]);
        // Downscale by 2 widens the triangle to support 2: centre 1.0 takes taps 0,1,2 with
        // weights .75,.75,.25 -> 25/1.75 = 14 (PIL gives [14, 86]).
        let four = U8Image::new(4, 1, 1, vec![0, 0, 100, 100]).unwrap();
        let b = CropBox {
            top: 0,
            left: 0,
            height: 1,
            width: 4,
        };
        assert_eq!(resize_bilinear(&four, b, 2, 1).data, vec![14, 86]);
    }

    #[test]
    fn resize_matches_pil_reference() {
        // Pillow 12: Image.frombytes('L', (9, 7), r).resize((5, 4), BILINEAR) and
        // .resize((13, 11), BILINEAR, box=(2, 1, 8, 6)) with r[y][x] = (10x + y) % 256.
        let img = ramp(9, 7);
        let full = CropBox {
            top: 0,
            left: 0,
            height: 7,
            width: 9,
        };
        let want = [
            7, 22, 41, 60, 75, 8, 23, 42, 61, 76, 10, 25, 44, 63, 78, 11, 26, 45, 64, 79,
        ];
        assert_eq!(resize_bilinear(&img, full, 5, 4).data, want);
        let b = CropBox {
            top: 1,
            left: 2,
            height: 5,
            width: 6,
        };
        let out = resize_bilinear(&img, b, 13, 11);
        let row0 = [18, 23, 28, 32, 37, 41, 46, 51, 55, 60, 64, 69, 74];
        let row10 = [22, 27, 32, 36, 41, 45, 50, 55, 59, 64, 68, 73, 78];
        assert_eq!(&out.data[..13], row0);
        assert_eq!(&out.data[130..], row10);
        assert_eq!(out.data[5 * 13 + 6], 48);
    }

    #[test]
    fn hflip_reverses_ramp_and_crop_cuts() {
        let img = ramp(5, 3);
        let f = hflip(&img);
        for y in 0..3 {
            for x in 0..5 {
                assert_eq!(f.at(x, y, 0), img.at(4 - x, y, 0));
            }
        }
        assert_eq!(hflip(&f), img);
        let c = crop(
            &img,
            CropBox {
                top: 1,
                left: 2,
                height: 2,
                width: 3,
            },
        );
        assert_eq!(c.data, vec![21, 31, 41, 22, 32, 42]);
    }

    #[test]
    fn shorter_side_and_center_crop_follow_torchvision() {
        assert_eq!(shorter_side_size(400, 600, 256), (256, 384));
        assert_eq!(shorter_side_size(600, 401, 256), (383, 256));
        // int(round((257 - 224) / 2)) = round(16.5) = 16 (ties to even), (300-224)/2 = 38.
        assert_eq!(
            center_crop_box(257, 300, 224),
            CropBox {
                top: 16,
                left: 38,
                height: 224,
                width: 224
            }
        );
    }

    #[test]
    fn normalize_constant_image_exact_values() {
        let aug = AugConfig::default();
        let img = U8Image::new(2, 2, 3, [255u8, 0, 51].repeat(4)).unwrap();
        let out = to_chw_normalized(&img, 3, &aug.mean, &aug.std);
        assert_eq!(out.len(), 12);
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (0.2 - 0.406) / 0.225,
        ];
        for (ch, w) in want.iter().enumerate() {
            for v in &out[ch * 4..ch * 4 + 4] {
                assert!((v - w).abs() < 1e-6, "channel {ch}: {v} vs {w}");
            }
        }
        // Grey -> 3 channels replicates; RGB -> grey uses PIL's L weights.
        let grey = U8Image::new(1, 1, 1, vec![128]).unwrap();
        let g3 = to_chw_normalized(&grey, 3, &[0.0; 3], &[1.0; 3]);
        assert_eq!(g3, vec![128.0 / 255.0; 3]);
        let rgb = U8Image::new(1, 1, 3, vec![255, 0, 0]).unwrap();
        assert_eq!(
            to_chw_normalized(&rgb, 1, &[0.0], &[1.0]),
            vec![76.0 / 255.0]
        );
        // Pillow: Image.frombytes('RGB', (1, 1), bytes([197, 215, 20])).convert('L') -> 187
        let rgb = U8Image::new(1, 1, 3, vec![197, 215, 20]).unwrap();
        assert_eq!(
            to_chw_normalized(&rgb, 1, &[0.0], &[1.0]),
            vec![187.0 / 255.0]
        );
    }

    #[test]
    fn pipeline_shapes_and_eval_is_deterministic() {
        let img = U8Image::new(40, 30, 3, (0..3600).map(|i| (i % 251) as u8).collect()).unwrap();
        for (train, chans) in [(true, 3), (false, 3), (true, 1), (false, 1)] {
            let t = ImageTransform::new(16, chans, train, &AugConfig::default()).unwrap();
            let a = t.apply(&img, &mut rng_for(1, &[]));
            assert_eq!(a.len(), chans * 16 * 16);
            assert_eq!(
                a,
                t.apply(&img, &mut rng_for(1, &[])),
                "same seed, same output"
            );
            let b = t.apply(&img, &mut rng_for(2, &[]));
            assert_eq!(
                a == b,
                !train,
                "train draws depend on the seed, eval does not"
            );
        }
        // Eval at crop_pct 1.0 on a square image is a plain resize.
        let aug = AugConfig {
            eval_crop_pct: 1.0,
            ..AugConfig::default()
        };
        let t = ImageTransform::new(20, 3, false, &aug).unwrap();
        let sq = U8Image::new(40, 40, 3, vec![9; 4800]).unwrap();
        let out = t.apply_spatial(&sq, &mut rng_for(0, &[]));
        assert_eq!((out.width, out.height), (20, 20));
        let bad = AugConfig {
            crop_scale: [0.5, 1.5],
            ..AugConfig::default()
        };
        let err = ImageTransform::new(20, 3, true, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.aug.crop_scale"), "{err}");
    }

    #[test]
    fn flip_probability_one_mirrors_full_crop() {
        // scale [1,1] and ratio equal to the image's (2:1) always crops the whole image.
        let img = ramp(8, 4);
        let aug = AugConfig {
            crop_scale: [1.0, 1.0],
            crop_ratio: [2.0, 2.0],
            hflip: 1.0,
            ..Default::default()
        };
        let t = ImageTransform::new(4, 1, true, &aug).unwrap();
        // Output is square 4x4; compare with resize-then-flip of the whole image.
        let full = CropBox {
            top: 0,
            left: 0,
            height: 4,
            width: 8,
        };
        let want = hflip(&resize_bilinear(&img, full, 4, 4));
        assert_eq!(t.apply_spatial(&img, &mut rng_for(5, &[])), want);
    }

    #[test]
    fn downscale_keeps_aspect() {
        let img = U8Image::new(1000, 600, 3, vec![200; 1_800_000]).unwrap();
        let d = downscale_longer_side(&img, 512);
        assert_eq!((d.width, d.height), (512, 307));
        assert!(d.data.iter().all(|v| *v == 200));
        assert_eq!(downscale_longer_side(&ramp(5, 3), 512), ramp(5, 3));
    }

    #[test]
    fn train_params_are_the_draws_of_apply_spatial() {
        let data: Vec<u8> = (0..20 * 30).map(|i| (i * 7 % 251) as u8).collect();
        let img = U8Image::new(30, 20, 1, data).unwrap();
        let aug = AugConfig {
            crop_scale: [0.3, 1.0],
            ..AugConfig::default()
        };
        let t = ImageTransform::new(8, 1, true, &aug).unwrap();
        let mut flips = 0;
        for seed in 0..8 {
            let (b, flip) = t.train_params(20, 30, &mut rng_for(seed, &[]));
            flips += flip as usize;
            let out = resize_bilinear(&img, b, 8, 8);
            let want = if flip { hflip(&out) } else { out };
            assert_eq!(t.apply_spatial(&img, &mut rng_for(seed, &[])), want);
        }
        assert!(flips > 0 && flips < 8, "{flips} of 8 flipped");
    }

    /// 12 x 8 image (pixel = column + 12 * row) with a class map id = 16 * row + column.
    fn annotated(boxes: Vec<ObjectBox>) -> Annotated {
        let img = U8Image::new(12, 8, 1, (0..96).map(|i| i as u8).collect()).unwrap();
        let ids = (0..8)
            .flat_map(|y| (0..12).map(move |x| (16 * y + x) as u8))
            .collect();
        let mask = ClassMap::new(12, 8, ClassIds::U8(ids)).unwrap();
        Annotated::new(img, Target::BoxesAndMask { boxes, mask }).unwrap()
    }

    fn ob(xyxy: [f32; 4], class: u32) -> ObjectBox {
        ObjectBox {
            xyxy,
            class,
            crowd: false,
        }
    }

    #[test]
    fn boxes_and_mask_through_crop_flip_jitter_pad() {
        // Seed 8 draws the crop rows 1..7, columns 4..12 (6 x 8 at scale 0.5, ratio 1.5 of the
        // 12 x 8 image: w = round(sqrt(72)) = 8, h = round(sqrt(32)) = 6), then a flip.
        let mut rng = rng_for(8, &[]);
        let b = random_resized_crop_params(8, 12, [0.5, 0.5], [1.5, 1.5], &mut rng);
        assert_eq!(
            (b, rng.random::<f64>() < 0.5),
            (
                CropBox {
                    top: 1,
                    left: 4,
                    height: 6,
                    width: 8
                },
                true
            )
        );
        let crowd = ObjectBox {
            crowd: true,
            ..ob([10.0, 6.5, 12.0, 8.0], 4)
        };
        let boxes = vec![
            ob([5.0, 2.0, 9.0, 5.0], 1),
            ob([2.0, 0.0, 6.0, 3.0], 2),
            ob([0.0, 0.0, 3.0, 8.0], 3),
            crowd,
        ];
        let mut rng = rng_for(8, &[]);
        let s = annotated(boxes)
            .random_resized_crop(16, 12, [0.5, 0.5], [1.5, 1.5], &mut rng)
            .random_hflip(0.5, &mut rng)
            // A one-point range keeps the numbers round; the factor is still drawn.
            .random_scale([0.75, 0.75], &mut rng)
            .normalize(1, &[0.0], &[1.0]);
        assert_eq!((s.height, s.width), (9, 12));
        // Pad to multiples of 8.
        let s = s.pad(16, 16).unwrap();
        // Boxes: crop + resize x' = (x - 4) * 2, y' = (y - 1) * 2 (clipped to 16 x 12); flip
        // x' = 16 - x2, x2' = 16 - x1; jitter * 0.75 (12/16 and 9/12); pad keeps them.
        // [5, 2, 9, 5] -> [2, 2, 10, 8] -> [6, 2, 14, 8] -> [4.5, 1.5, 10.5, 6]
        // [2, 0, 6, 3] -> [0, 0, 4, 4] (clipped) -> [12, 0, 16, 4] -> [9, 0, 12, 3]
        // [0, 0, 3, 8] -> x2 = -2, clipped to 0: no width, dropped
        // crowd [10, 6.5, 12, 8] -> [12, 11, 16, 12] -> [0, 11, 4, 12] -> [0, 8.25, 3, 9]
        let want = [
            ob([4.5, 1.5, 10.5, 6.0], 1),
            ob([9.0, 0.0, 12.0, 3.0], 2),
            ObjectBox {
                crowd: true,
                ..ob([0.0, 8.25, 3.0, 9.0], 4)
            },
        ];
        assert_eq!(s.target.boxes().unwrap(), &want[..]);
        // Mask (id = 16 * row + column), pixel centres: after the jitter column x reads flipped
        // column floor((x + 0.5) * 4/3) = [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15][x] of the
        // 16-wide crop, i.e. its column 15 - that, i.e. source column 4 + (15 - that) / 2:
        let cols = [11, 10, 10, 9, 8, 8, 7, 6, 6, 5, 4, 4];
        // rows floor((y + 0.5) * 4/3) = [0, 2, 3, 4, 6, 7, 8, 10, 11] -> source 1 + that / 2:
        let rows = [1, 2, 2, 3, 4, 4, 5, 6, 6];
        let m = s.target.mask().unwrap();
        assert_eq!((m.width(), m.height()), (16, 16));
        for y in 0..16 {
            for x in 0..16 {
                let want = match (rows.get(y), cols.get(x)) {
                    (Some(r), Some(c)) => 16 * r + c,
                    _ => 255,
                };
                assert_eq!(m.at(x, y), want, "mask pixel ({x}, {y})");
            }
        }
        assert_eq!(
            (0..12).map(|x| m.at(x, 0)).collect::<Vec<_>>(),
            [27, 26, 26, 25, 24, 24, 23, 22, 22, 21, 20, 20]
        );
        // The image took the same path; padding is 0.
        let full16 = CropBox::full(12, 16);
        let img = resize_bilinear(
            &hflip(&resize_bilinear(&annotated(vec![]).image, b, 16, 12)),
            full16,
            12,
            9,
        );
        for y in 0..16 {
            for x in 0..16 {
                let want = if y < 9 && x < 12 {
                    img.at(x, y, 0) as f32 / 255.0
                } else {
                    0.0
                };
                assert_eq!(s.image[y * 16 + x], want, "image pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn transform_moves_targets_with_the_same_draws() {
        let data: Vec<u8> = (0..20 * 30).map(|i| (i * 7 % 251) as u8).collect();
        let img = U8Image::new(30, 20, 1, data).unwrap();
        let boxes = vec![ob([3.0, 2.0, 21.0, 15.0], 1), ob([25.0, 0.0, 30.0, 4.0], 2)];
        let target = Target::Boxes(boxes.clone());
        let aug = AugConfig {
            crop_scale: [0.3, 1.0],
            ..AugConfig::default()
        };
        let t = ImageTransform::new(8, 1, true, &aug).unwrap();
        for seed in 0..6 {
            let s = t
                .apply_with_target(&img, &target, &mut rng_for(seed, &[]))
                .unwrap();
            assert_eq!(s.image, t.apply(&img, &mut rng_for(seed, &[])));
            assert_eq!((s.height, s.width), (8, 8));
            let (b, flip) = t.train_params(20, 30, &mut rng_for(seed, &[]));
            let moved = crate::data::target::boxes_resized_crop(&boxes, b, 8, 8);
            let want = if flip {
                crate::data::target::boxes_hflip(&moved, 8)
            } else {
                moved
            };
            assert_eq!(s.target, Target::Boxes(want));
        }
        // Eval at crop_pct 0.5 on 40x30: shorter side 32 -> 42x32 (int(32 * 40 / 30)), centre
        // crop 16 at left round(26 / 2) = 13, top 8. Box [20, 15, 24, 18] -> x 42/40, y 32/30:
        // [21, 16, 25.2, 19.2] -> minus (13, 8): [8, 8, 12.2, 11.2]; [0, 0, 10, 10] is cut away.
        let aug = AugConfig {
            eval_crop_pct: 0.5,
            ..AugConfig::default()
        };
        let t = ImageTransform::new(16, 1, false, &aug).unwrap();
        let img = U8Image::new(40, 30, 1, vec![0; 1200]).unwrap();
        let target = Target::Boxes(vec![
            ob([20.0, 15.0, 24.0, 18.0], 0),
            ob([0.0, 0.0, 10.0, 10.0], 1),
        ]);
        let s = t
            .apply_with_target(&img, &target, &mut rng_for(0, &[]))
            .unwrap();
        let got = s.target.boxes().unwrap();
        assert_eq!(got.len(), 1);
        for (g, w) in got[0].xyxy.iter().zip([8.0, 8.0, 12.2, 11.2]) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        // A class map of another size is an error.
        let bad = Target::Mask(ClassMap::new(2, 2, ClassIds::U8(vec![0; 4])).unwrap());
        let err = t
            .apply_with_target(&img, &bad, &mut rng_for(0, &[]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "class map of 2x2 for an image of 40x30");
    }

    #[test]
    fn random_crop_and_rescale_follow_mmdet() {
        // mmcv rescale_size((w, h), (1333, 800)): factor min(1333 / long, 800 / short).
        assert_eq!(rescale_size(480, 640, 1333, 800), (800, 1067));
        assert_eq!(rescale_size(600, 1000, 1333, 800), (800, 1333));
        // RandomCrop((4, 5)) of 12x8: top from 0..=4, then left from 0..=7.
        let boxes = vec![ob([0.0, 0.0, 12.0, 8.0], 0), ob([1.0, 1.0, 2.0, 2.0], 1)];
        for seed in 0..5 {
            let mut rng = rng_for(seed, &[]);
            let (top, left) = (rng.random_range(0..=4usize), rng.random_range(0..=7usize));
            let a = annotated(boxes.clone()).random_crop(5, 4, &mut rng_for(seed, &[]));
            assert_eq!((a.image().width, a.image().height), (5, 4));
            assert_eq!(a.image().at(0, 0, 0) as usize, left + 12 * top);
            assert_eq!(
                a.target().mask().unwrap().at(0, 0) as usize,
                left + 16 * top
            );
            let b = a.target().boxes().unwrap();
            assert_eq!(
                b[0].xyxy,
                [0.0, 0.0, 5.0, 4.0],
                "the whole-image box is clipped"
            );
            // [1, 1, 2, 2] survives only when the crop starts at or before it.
            assert_eq!(b.len(), 1 + (top < 2 && left < 2) as usize);
        }
        // A crop larger than the image keeps it whole.
        let a = annotated(boxes.clone()).random_crop(50, 40, &mut rng_for(0, &[]));
        assert_eq!(a, annotated(boxes.clone()));
        let err = annotated(boxes)
            .crop(CropBox {
                top: 5,
                left: 0,
                height: 4,
                width: 2,
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a non-empty part of the 12x8 image"),
            "{err}"
        );
    }
}
