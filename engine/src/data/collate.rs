//! Collate (the batcher's last step): samples of any sizes -> one [`Batch`], images and class
//! maps padded on the bottom and right to a common size, each image's valid size kept.
//!
//! Padded values: images 0 after normalization (the channel mean in pixel terms, as mmdet's and
//! mmseg's data preprocessors pad), class maps [`IGNORE`](super::target::IGNORE); boxes keep their coordinates (padding
//! is bottom/right only). Samples that all have the padded size are concatenated as they are, so
//! classification batches are exactly the tensors they were before padding existed.
use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};

use super::target::{ClassMap, ObjectBox, Target};
use super::Sample;

/// One batch as the loader yields it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` f32, normalized (ImageNet mean/std by default), on the CPU; image `i` fills
    /// the top-left `valid_sizes[i]`, the rest is 0.
    pub images: Tensor,
    /// Valid (height, width) of each image, in batch order.
    pub valid_sizes: Vec<(usize, usize)>,
    /// The targets, typed by task.
    pub targets: BatchTargets,
    /// Dataset index of each sample, in batch order.
    pub indices: Vec<usize>,
    /// Epoch this batch belongs to (0-based).
    pub epoch: usize,
}

/// The targets of a batch; one variant per [`Target`] kind.
#[derive(Debug, Clone)]
pub enum BatchTargets {
    /// Unlabelled samples.
    None,
    /// `[B]` u32 class ids.
    Classes(Tensor),
    /// The boxes of each image, in pixels of its valid region.
    Boxes(Vec<Vec<ObjectBox>>),
    /// `[B, H, W]` u32 class ids, [`IGNORE`](super::target::IGNORE) outside each image's valid region.
    Masks(Tensor),
    /// Both, for samples with boxes and a class map.
    BoxesAndMasks {
        /// The boxes of each image.
        boxes: Vec<Vec<ObjectBox>>,
        /// `[B, H, W]` u32, as in [`BatchTargets::Masks`].
        masks: Tensor,
    },
}

impl Batch {
    /// A batch of unpadded images `[B, C, H, W]` (every image valid in full).
    pub fn new(
        images: Tensor,
        targets: BatchTargets,
        indices: Vec<usize>,
        epoch: usize,
    ) -> Result<Self> {
        let (b, _, h, w) = images.dims4()?;
        Ok(Self {
            images,
            valid_sizes: vec![(h, w); b],
            targets,
            indices,
            epoch,
        })
    }

    /// Samples `[start, end)` of the batch, padding kept (a data-parallel rank's share,
    /// [`crate::dist::shard_range`]).
    pub fn narrow(&self, start: usize, end: usize) -> Result<Self> {
        let b = self.indices.len();
        ensure!(
            start <= end && end <= b,
            "batch: samples {start}..{end} of a batch of {b}"
        );
        let n = end - start;
        let targets = match &self.targets {
            BatchTargets::None => BatchTargets::None,
            BatchTargets::Classes(t) => BatchTargets::Classes(t.narrow(0, start, n)?),
            BatchTargets::Boxes(bx) => BatchTargets::Boxes(bx[start..end].to_vec()),
            BatchTargets::Masks(m) => BatchTargets::Masks(m.narrow(0, start, n)?),
            BatchTargets::BoxesAndMasks { boxes, masks } => BatchTargets::BoxesAndMasks {
                boxes: boxes[start..end].to_vec(),
                masks: masks.narrow(0, start, n)?,
            },
        };
        Ok(Self {
            images: self.images.narrow(0, start, n)?,
            valid_sizes: self.valid_sizes[start..end].to_vec(),
            targets,
            indices: self.indices[start..end].to_vec(),
            epoch: self.epoch,
        })
    }

    /// The `[B]` u32 class ids of a classification batch.
    pub fn labels(&self) -> Option<&Tensor> {
        match &self.targets {
            BatchTargets::Classes(t) => Some(t),
            _ => None,
        }
    }
}

/// `v` rounded up to a multiple of `m` (`m` 0 counts as 1).
pub fn round_up(v: usize, m: usize) -> usize {
    v.div_ceil(m.max(1)) * m.max(1)
}

/// Stacks `samples` (each `channels x height x width`) into a batch padded to the largest
/// height and width, each rounded up to a multiple of `pad_multiple` (the model's requirement,
/// e.g. its patch size or 32; 1 = no rounding). Errors when a sample's image does not have
/// `channels` planes of its size or when samples have different kinds of target.
pub fn collate(
    samples: Vec<Sample>,
    channels: usize,
    pad_multiple: usize,
    indices: Vec<usize>,
    epoch: usize,
) -> Result<Batch> {
    ensure!(!samples.is_empty(), "collate: no samples");
    ensure!(
        samples.len() == indices.len(),
        "collate: {} samples with {} indices",
        samples.len(),
        indices.len()
    );
    for (s, i) in samples.iter().zip(&indices) {
        ensure!(
            s.image.len() == channels * s.height * s.width,
            "sample {i}: {} values for a {channels}x{}x{} image",
            s.image.len(),
            s.height,
            s.width
        );
        s.target.check_size(s.width, s.height)?;
    }
    let h = round_up(
        samples.iter().map(|s| s.height).max().unwrap_or(0),
        pad_multiple,
    );
    let w = round_up(
        samples.iter().map(|s| s.width).max().unwrap_or(0),
        pad_multiple,
    );
    let b = samples.len();
    let valid_sizes: Vec<(usize, usize)> = samples.iter().map(|s| (s.height, s.width)).collect();
    let mut images = Vec::with_capacity(b * channels * h * w);
    for s in &samples {
        if (s.height, s.width) == (h, w) {
            images.extend_from_slice(&s.image);
        } else {
            images.extend(pad_planes(&s.image, channels, (s.height, s.width), (h, w)));
        }
    }
    let images = Tensor::from_vec(images, (b, channels, h, w), &Device::Cpu)?;
    let targets = collate_targets(samples.into_iter().map(|s| s.target).collect(), h, w)?;
    Ok(Batch {
        images,
        valid_sizes,
        targets,
        indices,
        epoch,
    })
}

/// `channels` CHW planes of `h x w` padded with 0 to `out_h x out_w` (bottom/right).
pub(crate) fn pad_planes(
    data: &[f32],
    channels: usize,
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0f32; channels * out_h * out_w];
    if h * w == 0 {
        return out;
    }
    for (src, dst) in data
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(out_h * out_w))
    {
        for (row, dst_row) in src.chunks_exact(w).zip(dst.chunks_exact_mut(out_w)) {
            dst_row[..w].copy_from_slice(row);
        }
    }
    out
}

/// `[B, h, w]` u32 of class maps padded with [`IGNORE`](super::target::IGNORE).
fn masks_tensor(masks: Vec<ClassMap>, h: usize, w: usize) -> Result<Tensor> {
    let b = masks.len();
    let data: Vec<u32> = masks.iter().flat_map(|m| m.pad(w, h).to_u32()).collect();
    Ok(Tensor::from_vec(data, (b, h, w), &Device::Cpu)?)
}

fn collate_targets(targets: Vec<Target>, h: usize, w: usize) -> Result<BatchTargets> {
    let first = targets[0].kind();
    if let Some(other) = targets.iter().find(|t| t.kind() != first) {
        if matches!((first, other.kind()), ("none", "class") | ("class", "none")) {
            bail!("some samples of a batch have labels, others not");
        }
        bail!(
            "samples of a batch have different kinds of target ({first} and {})",
            other.kind()
        );
    }
    let b = targets.len();
    let mut classes = Vec::new();
    let mut boxes = Vec::new();
    let mut masks = Vec::new();
    for t in targets {
        match t {
            Target::None => {}
            Target::Class(c) => classes.push(c),
            Target::Boxes(bx) => boxes.push(bx),
            Target::Mask(m) => masks.push(m),
            Target::BoxesAndMask { boxes: bx, mask } => {
                boxes.push(bx);
                masks.push(mask);
            }
        }
    }
    Ok(match first {
        "none" => BatchTargets::None,
        "class" => BatchTargets::Classes(Tensor::from_vec(classes, b, &Device::Cpu)?),
        "boxes" => BatchTargets::Boxes(boxes),
        "mask" => BatchTargets::Masks(masks_tensor(masks, h, w)?),
        // "boxes and mask"
        _ => BatchTargets::BoxesAndMasks {
            boxes,
            masks: masks_tensor(masks, h, w)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::target::ClassIds;

    /// One-channel sample of `h x w`, pixel value = 100 * k + 10 * row + column, with a class map
    /// of the same values as u8 (under 255 for the sizes used here).
    fn sample(k: usize, h: usize, w: usize) -> Sample {
        let v: Vec<usize> = (0..h * w).map(|i| 100 * k + 10 * (i / w) + i % w).collect();
        let mask = ClassMap::new(w, h, ClassIds::U8(v.iter().map(|x| *x as u8).collect())).unwrap();
        Sample {
            image: v.iter().map(|x| *x as f32).collect(),
            height: h,
            width: w,
            target: Target::Mask(mask),
        }
    }

    #[test]
    fn three_sizes_pad_to_the_largest_rounded_up() {
        // (h, w) = (2, 3), (4, 1), (1, 2); largest 4 x 3, rounded up to multiples of 4: 4 x 4.
        let s = vec![sample(0, 2, 3), sample(1, 4, 1), sample(2, 1, 2)];
        let b = collate(s, 1, 4, vec![7, 8, 9], 3).unwrap();
        assert_eq!(b.images.dims(), &[3, 1, 4, 4]);
        assert_eq!(b.valid_sizes, vec![(2, 3), (4, 1), (1, 2)]);
        assert_eq!((b.indices, b.epoch), (vec![7, 8, 9], 3));
        let img = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let want = [
            0., 1., 2., 0.,     10., 11., 12., 0.,  0., 0., 0., 0.,   0., 0., 0., 0.,
            100., 0., 0., 0.,   110., 0., 0., 0.,   120., 0., 0., 0., 130., 0., 0., 0.,
            200., 201., 0., 0., 0., 0., 0., 0.,     0., 0., 0., 0.,   0., 0., 0., 0.,
        ];
        assert_eq!(img, want);
        let BatchTargets::Masks(m) = &b.targets else {
            panic!("{:?}", b.targets)
        };
        assert_eq!(m.dims(), &[3, 4, 4]);
        let m = m.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        // Mask ids are the image values as u8 (200, 201 fit), 255 where the image is padded.
        let want: Vec<u32> = want
            .iter()
            .zip(0..)
            .map(|(v, i)| {
                let (k, y, x) = (i / 16, i / 4 % 4, i % 4);
                let (h, w) = [(2, 3), (4, 1), (1, 2)][k];
                if y < h && x < w {
                    *v as u32
                } else {
                    255
                }
            })
            .collect();
        assert_eq!(m, want);
        // Multiple 1: just the largest size.
        let s = vec![sample(0, 2, 3), sample(1, 4, 1)];
        assert_eq!(
            collate(s, 1, 1, vec![0, 1], 0).unwrap().images.dims(),
            &[2, 1, 4, 3]
        );
    }

    #[test]
    fn equal_sizes_are_concatenated_classes_boxes_and_mixed_kinds() {
        let cls = |k: usize, c: u32| Sample {
            target: Target::Class(c),
            ..sample(k, 2, 2)
        };
        let b = collate(vec![cls(0, 5), cls(1, 2)], 1, 2, vec![0, 1], 0).unwrap();
        assert_eq!(b.images.dims(), &[2, 1, 2, 2]);
        let img = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(img, [0., 1., 10., 11., 100., 101., 110., 111.]);
        assert_eq!(b.labels().unwrap().to_vec1::<u32>().unwrap(), [5, 2]);
        assert_eq!(b.valid_sizes, vec![(2, 2); 2]);
        let ob = ObjectBox {
            xyxy: [0.0, 0.5, 1.0, 2.0],
            class: 3,
            crowd: false,
        };
        let bx = |k, boxes: Vec<ObjectBox>| Sample {
            target: Target::Boxes(boxes),
            ..sample(k, 2, 1 + k)
        };
        let b = collate(vec![bx(0, vec![ob]), bx(1, vec![])], 1, 1, vec![0, 1], 0).unwrap();
        assert_eq!(b.images.dims(), &[2, 1, 2, 2]);
        assert!(b.labels().is_none());
        let BatchTargets::Boxes(boxes) = &b.targets else {
            panic!("{:?}", b.targets)
        };
        assert_eq!(
            boxes,
            &vec![vec![ob], vec![]],
            "padding keeps box coordinates"
        );
        let err = collate(vec![cls(0, 1), sample(1, 2, 2)], 1, 1, vec![0, 1], 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "samples of a batch have different kinds of target (class and mask)"
        );
        let none = Sample {
            target: Target::None,
            ..sample(1, 2, 2)
        };
        let err = collate(vec![cls(0, 1), none], 1, 1, vec![0, 1], 0)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "some samples of a batch have labels, others not");
        let err = collate(vec![sample(0, 2, 2)], 3, 1, vec![4], 0)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "sample 4: 4 values for a 3x2x2 image");
    }

    #[test]
    fn sample_pad_fills_zero_and_ignore() {
        let p = sample(0, 1, 2).pad(2, 3).unwrap();
        assert_eq!((p.height, p.width), (2, 3));
        assert_eq!(p.image, [0., 1., 0., 0., 0., 0.]);
        let m = p.target.mask().unwrap();
        assert_eq!(m.to_u32(), [0, 1, 255, 255, 255, 255]);
        let err = sample(0, 2, 2).pad(1, 4).unwrap_err().to_string();
        assert_eq!(err, "cannot pad a 2x2 sample to 1x4");
        assert_eq!(round_up(33, 32), 64);
        assert_eq!(round_up(32, 32), 32);
        assert_eq!(round_up(5, 0), 5);
    }
}
