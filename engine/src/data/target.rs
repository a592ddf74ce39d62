//! Targets (the transforms stage's second half): what a sample is labelled with (nothing, a
//! class, boxes, a per-pixel class map) and how each geometric transform of its image moves it.
//!
//! Conventions, shared with the image operations of `transforms.rs`:
//! - Pixel (row i, column j) covers `[j, j+1) x [i, i+1)`; a box is `[x1, y1, x2, y2]` f32 in
//!   pixels of its image, so the whole `W x H` image is `[0, 0, W, H]` (COCO/mmdet, no +1).
//! - A resized crop maps `x` to `(x - left) * out_w / crop_w` (f64 arithmetic, then f32); boxes
//!   are then clipped to the output and dropped when their width or height is not positive.
//! - Class maps are resampled by nearest neighbour at pixel centres, the convention of
//!   `resize_bilinear` (PIL): output column `x` of a crop `[left, left + crop_w)` resized to
//!   `out_w` reads source column `floor(left + (x + 0.5) * crop_w / out_w)` (PIL's NEAREST;
//!   cv2's INTER_NEAREST, which mmseg uses, reads `floor(x * crop_w / out_w)` instead).
//! - Padding goes to the bottom and right: boxes keep their coordinates, class maps get
//!   [`IGNORE`].
use anyhow::{ensure, Result};

use super::transforms::CropBox;

/// Class id of unlabelled pixels (mmseg's `ignore_index`); padding of class maps uses it.
pub const IGNORE: u16 = 255;

/// One object: a box, its class and whether it is a crowd region (COCO `iscrowd`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectBox {
    /// `[x1, y1, x2, y2]` in pixels.
    pub xyxy: [f32; 4],
    /// Class id.
    pub class: u32,
    /// COCO `iscrowd`: ignored by matching, kept through the transforms.
    pub crowd: bool,
}

/// Class ids of a class map, row-major, in the width the dataset stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassIds {
    /// Up to 255 classes (255 itself is [`IGNORE`]).
    U8(Vec<u8>),
    /// More classes; [`IGNORE`] is still 255.
    U16(Vec<u16>),
}

/// A per-pixel class map of `height x width` (semantic segmentation labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassMap {
    width: usize,
    height: usize,
    ids: ClassIds,
}

impl ClassMap {
    /// Wraps `ids` (row-major, `height * width` values), checking the length.
    pub fn new(width: usize, height: usize, ids: ClassIds) -> Result<Self> {
        let n = match &ids {
            ClassIds::U8(v) => v.len(),
            ClassIds::U16(v) => v.len(),
        };
        ensure!(
            n == width * height,
            "class map of {n} values for {width}x{height}"
        );
        Ok(Self { width, height, ids })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The stored ids.
    pub fn ids(&self) -> &ClassIds {
        &self.ids
    }

    /// Class id at column `x`, row `y`.
    pub fn at(&self, x: usize, y: usize) -> u16 {
        let i = y * self.width + x;
        match &self.ids {
            ClassIds::U8(v) => v[i] as u16,
            ClassIds::U16(v) => v[i],
        }
    }

    /// Row-major ids widened to u32 (the batched mask tensor's dtype).
    pub fn to_u32(&self) -> Vec<u32> {
        match &self.ids {
            ClassIds::U8(v) => v.iter().map(|c| *c as u32).collect(),
            ClassIds::U16(v) => v.iter().map(|c| *c as u32).collect(),
        }
    }

    /// A `xs.len() x ys.len()` map whose pixel (x, y) is this map's `(xs[x], ys[y])`, or
    /// [`IGNORE`] where either is `None`. Every geometric move of a class map is one such gather.
    fn gather(&self, xs: &[Option<usize>], ys: &[Option<usize>]) -> Self {
        fn pick<T: Copy>(
            src: &[T],
            w: usize,
            xs: &[Option<usize>],
            ys: &[Option<usize>],
            fill: T,
        ) -> Vec<T> {
            let mut out = Vec::with_capacity(xs.len() * ys.len());
            for y in ys {
                match y {
                    Some(y) => {
                        let row = &src[y * w..(y + 1) * w];
                        out.extend(xs.iter().map(|x| x.map_or(fill, |x| row[x])));
                    }
                    None => out.extend(std::iter::repeat_n(fill, xs.len())),
                }
            }
            out
        }
        let ids = match &self.ids {
            ClassIds::U8(v) => ClassIds::U8(pick(v, self.width, xs, ys, IGNORE as u8)),
            ClassIds::U16(v) => ClassIds::U16(pick(v, self.width, xs, ys, IGNORE)),
        };
        Self {
            width: xs.len(),
            height: ys.len(),
            ids,
        }
    }

    /// The crop `b` resized to `out_w x out_h`, nearest neighbour (module doc).
    pub fn resized_crop(&self, b: CropBox, out_w: usize, out_h: usize) -> Self {
        let xs = nearest_indices(self.width, b.left, b.width, out_w);
        let ys = nearest_indices(self.height, b.top, b.height, out_h);
        self.gather(&xs, &ys)
    }

    /// Mirrored left-right.
    pub fn hflip(&self) -> Self {
        let xs: Vec<_> = (0..self.width).rev().map(Some).collect();
        let ys: Vec<_> = (0..self.height).map(Some).collect();
        self.gather(&xs, &ys)
    }

    /// Padded with [`IGNORE`] on the bottom and right to `out_w x out_h` (not smaller than now).
    pub fn pad(&self, out_w: usize, out_h: usize) -> Self {
        let xs: Vec<_> = (0..out_w).map(|x| (x < self.width).then_some(x)).collect();
        let ys: Vec<_> = (0..out_h).map(|y| (y < self.height).then_some(y)).collect();
        self.gather(&xs, &ys)
    }
}

/// Source index of each of `out` output pixels when `[start, start + len)` of an axis of
/// `in_size` pixels is resized to `out`: `floor(start + (o + 0.5) * len / out)`, clamped.
fn nearest_indices(in_size: usize, start: usize, len: usize, out: usize) -> Vec<Option<usize>> {
    let scale = len as f64 / out as f64;
    (0..out)
        .map(|o| {
            let s = (start as f64 + (o as f64 + 0.5) * scale).floor() as usize;
            Some(s.min(in_size.saturating_sub(1)))
        })
        .collect()
}

/// Boxes of the crop `b` resized to `out_w x out_h` (module doc): moved, scaled, clipped to the
/// output; the ones left with no width or height are dropped.
pub fn boxes_resized_crop(
    boxes: &[ObjectBox],
    b: CropBox,
    out_w: usize,
    out_h: usize,
) -> Vec<ObjectBox> {
    let (sx, sy) = (
        out_w as f64 / b.width as f64,
        out_h as f64 / b.height as f64,
    );
    let map = |v: f32, start: usize, s: f64, limit: usize| -> f32 {
        (((v as f64 - start as f64) * s) as f32).clamp(0.0, limit as f32)
    };
    boxes
        .iter()
        .filter_map(|o| {
            let [x1, y1, x2, y2] = o.xyxy;
            let xyxy = [
                map(x1, b.left, sx, out_w),
                map(y1, b.top, sy, out_h),
                map(x2, b.left, sx, out_w),
                map(y2, b.top, sy, out_h),
            ];
            (xyxy[2] > xyxy[0] && xyxy[3] > xyxy[1]).then_some(ObjectBox { xyxy, ..*o })
        })
        .collect()
}

/// Boxes of an image of `width` mirrored left-right: `x1' = W - x2`, `x2' = W - x1`.
pub fn boxes_hflip(boxes: &[ObjectBox], width: usize) -> Vec<ObjectBox> {
    let w = width as f32;
    boxes
        .iter()
        .map(|o| {
            let [x1, y1, x2, y2] = o.xyxy;
            ObjectBox {
                xyxy: [w - x2, y1, w - x1, y2],
                ..*o
            }
        })
        .collect()
}

/// What a sample is labelled with. Geometric transforms move it with the image; photometric ones
/// (normalization) leave it alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Unlabelled (self-supervised pretraining).
    None,
    /// One class id for the image (classification).
    Class(u32),
    /// Objects (detection).
    Boxes(Vec<ObjectBox>),
    /// A class per pixel (semantic segmentation).
    Mask(ClassMap),
    /// Objects and a class per pixel of the same image.
    BoxesAndMask {
        /// The objects.
        boxes: Vec<ObjectBox>,
        /// The class map, of the image's size.
        mask: ClassMap,
    },
}

impl Target {
    /// The class id of a classification target.
    pub fn class(&self) -> Option<u32> {
        match self {
            Target::Class(c) => Some(*c),
            _ => None,
        }
    }

    /// The boxes, when the target has them.
    pub fn boxes(&self) -> Option<&[ObjectBox]> {
        match self {
            Target::Boxes(b) | Target::BoxesAndMask { boxes: b, .. } => Some(b),
            _ => None,
        }
    }

    /// The class map, when the target has one.
    pub fn mask(&self) -> Option<&ClassMap> {
        match self {
            Target::Mask(m) | Target::BoxesAndMask { mask: m, .. } => Some(m),
            _ => None,
        }
    }

    /// "none", "class", "boxes", "mask" or "boxes and mask" (error messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Target::None => "none",
            Target::Class(_) => "class",
            Target::Boxes(_) => "boxes",
            Target::Mask(_) => "mask",
            Target::BoxesAndMask { .. } => "boxes and mask",
        }
    }

    /// Checks that a class map has the size of its `width x height` image.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        if let Some(m) = self.mask() {
            ensure!(
                (m.width, m.height) == (width, height),
                "class map of {}x{} for an image of {width}x{height}",
                m.width,
                m.height
            );
        }
        Ok(())
    }

    /// Applies `on_boxes` and `on_mask` to the parts the target has.
    fn map(
        &self,
        on_boxes: impl Fn(&[ObjectBox]) -> Vec<ObjectBox>,
        on_mask: impl Fn(&ClassMap) -> ClassMap,
    ) -> Self {
        match self {
            Target::None | Target::Class(_) => self.clone(),
            Target::Boxes(b) => Target::Boxes(on_boxes(b)),
            Target::Mask(m) => Target::Mask(on_mask(m)),
            Target::BoxesAndMask { boxes, mask } => Target::BoxesAndMask {
                boxes: on_boxes(boxes),
                mask: on_mask(mask),
            },
        }
    }

    /// Follows the image's crop `b` resized to `out_w x out_h` (resize: the whole image as `b`;
    /// crop: `out` = the crop's size).
    pub fn resized_crop(&self, b: CropBox, out_w: usize, out_h: usize) -> Self {
        self.map(
            |bx| boxes_resized_crop(bx, b, out_w, out_h),
            |m| m.resized_crop(b, out_w, out_h),
        )
    }

    /// Follows a left-right flip of an image `width` pixels wide.
    pub fn hflip(&self, width: usize) -> Self {
        self.map(|bx| boxes_hflip(bx, width), ClassMap::hflip)
    }

    /// Follows padding of the image on the bottom and right to `out_w x out_h`.
    pub fn pad(&self, out_w: usize, out_h: usize) -> Self {
        self.map(|bx| bx.to_vec(), |m| m.pad(out_w, out_h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(w: usize, h: usize) -> ClassMap {
        // id = 10 * row + column
        let ids = (0..h)
            .flat_map(|y| (0..w).map(move |x| (10 * y + x) as u8))
            .collect();
        ClassMap::new(w, h, ClassIds::U8(ids)).unwrap()
    }

    fn ob(xyxy: [f32; 4], class: u32) -> ObjectBox {
        ObjectBox {
            xyxy,
            class,
            crowd: false,
        }
    }

    fn rows(m: &ClassMap) -> Vec<Vec<u16>> {
        (0..m.height())
            .map(|y| (0..m.width()).map(|x| m.at(x, y)).collect())
            .collect()
    }

    #[test]
    fn mask_nearest_resize_uses_pixel_centres() {
        let m = grid(4, 2);
        let full = CropBox::full(2, 4);
        // Up 4 -> 8 columns: centres (x + 0.5) / 2 = 0.25, 0.75, 1.25, ... -> 0,0,1,1,2,2,3,3;
        // rows 2 -> 3: (y + 0.5) * 2/3 = 0.33, 1.0, 1.67 -> rows 0, 1, 1.
        let up = m.resized_crop(full, 8, 3);
        assert_eq!(
            rows(&up),
            vec![
                vec![0, 0, 1, 1, 2, 2, 3, 3],
                vec![10, 10, 11, 11, 12, 12, 13, 13],
                vec![10, 10, 11, 11, 12, 12, 13, 13],
            ]
        );
        // Down 4 -> 3 columns: (x + 0.5) * 4/3 = 0.67, 2.0, 3.33 -> columns 0, 2, 3.
        assert_eq!(
            rows(&m.resized_crop(full, 3, 2)),
            vec![vec![0, 2, 3], vec![10, 12, 13]]
        );
        // A crop at scale 1 is a plain cut: columns 1..3 of row 1.
        let cut = CropBox {
            top: 1,
            left: 1,
            height: 1,
            width: 2,
        };
        assert_eq!(rows(&m.resized_crop(cut, 2, 1)), vec![vec![11, 12]]);
        // u16 maps keep their width and values above 255.
        let wide = ClassMap::new(2, 1, ClassIds::U16(vec![300, 7])).unwrap();
        let w2 = wide.resized_crop(CropBox::full(1, 2), 4, 1);
        assert_eq!(w2.ids(), &ClassIds::U16(vec![300, 300, 7, 7]));
        assert!(ClassMap::new(2, 2, ClassIds::U8(vec![0; 3])).is_err());
    }

    #[test]
    fn flip_and_pad_move_boxes_and_masks() {
        // x' = W - x2, x2' = W - x1 on a 10 px wide image; y untouched.
        let b = boxes_hflip(&[ob([1.0, 2.0, 4.5, 3.0], 7)], 10);
        assert_eq!(b, vec![ob([5.5, 2.0, 9.0, 3.0], 7)]);
        let m = grid(3, 2);
        assert_eq!(rows(&m.hflip()), vec![vec![2, 1, 0], vec![12, 11, 10]]);
        let t = Target::BoxesAndMask {
            boxes: vec![ob([0.0, 0.0, 3.0, 2.0], 1)],
            mask: m,
        };
        let p = t.pad(4, 3);
        assert_eq!(p.boxes().unwrap(), &[ob([0.0, 0.0, 3.0, 2.0], 1)]);
        assert_eq!(
            rows(p.mask().unwrap()),
            vec![vec![0, 1, 2, 255], vec![10, 11, 12, 255], vec![255; 4]]
        );
        assert!(t.check_size(3, 2).is_ok());
        let err = t.check_size(4, 2).unwrap_err().to_string();
        assert_eq!(err, "class map of 3x2 for an image of 4x2");
        // Class and None targets do not move.
        assert_eq!(Target::Class(4).hflip(10), Target::Class(4));
        assert_eq!(Target::None.pad(5, 5), Target::None);
    }

    #[test]
    fn crop_clips_boxes_and_drops_the_ones_cropped_away() {
        // Crop columns 2..8, rows 1..5 of the image, resized to 12 x 8 (scale 2 both ways).
        let b = CropBox {
            top: 1,
            left: 2,
            height: 4,
            width: 6,
        };
        let boxes = [
            ob([3.0, 2.0, 5.0, 3.5], 0), // inside: ((3-2)*2, (2-1)*2, (5-2)*2, (3.5-1)*2)
            ob([0.0, 0.0, 4.0, 9.0], 1), // clipped to [0, 0, 4, 8]
            ob([8.0, 1.0, 10.0, 4.0], 2), // right of the crop: x1 = x2 = 12 after clipping
            ob([0.5, 0.0, 1.5, 6.0], 3), // left of the crop: x1 = x2 = 0
            ob([2.5, 1.0, 2.5, 3.0], 4), // no width to begin with
        ];
        let crowd = ObjectBox {
            crowd: true,
            ..ob([7.0, 4.0, 9.0, 6.0], 5)
        };
        let mut all = boxes.to_vec();
        all.push(crowd);
        let out = boxes_resized_crop(&all, b, 12, 8);
        assert_eq!(
            out,
            vec![
                ob([2.0, 2.0, 6.0, 5.0], 0),
                ob([0.0, 0.0, 4.0, 8.0], 1),
                ObjectBox {
                    crowd: true,
                    ..ob([10.0, 6.0, 12.0, 8.0], 5)
                },
            ]
        );
    }
}
