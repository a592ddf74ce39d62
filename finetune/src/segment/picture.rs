//! Logs stage of segmentation: held-out images beside their ground truth and the prediction as
//! palette colour maps (ignored pixels white), with a legend of the class colours, as one PNG for
//! the run folder and TensorBoard.
use anyhow::Result;
use candle_core::{Device, Tensor};
use mimlab_engine::data::{Dataset, SegmentationDataset, IGNORE};
use mimlab_engine::picture::{draw_text, font, from_chw, grid, text_height, text_width, RgbImage};
use mimlab_engine::rng::rng_for;

use crate::dense::PictureSpec;
use crate::segment::evaluate::predict_from_logits;
use crate::segment::model::Segmentor;

/// Colour of ignored pixels.
const IGNORED: [u8; 3] = [255, 255, 255];

/// A class map as colours: `palette[c]`, [`IGNORED`] for 255 (and any value without a colour).
pub fn colorize(ids: &[u32], width: usize, height: usize, palette: &[[u8; 3]]) -> RgbImage {
    let mut img = RgbImage::new(width as u32, height as u32, IGNORED);
    for (i, &c) in ids.iter().enumerate() {
        if c != IGNORE as u32 {
            if let Some(&rgb) = palette.get(c as usize) {
                img.put((i % width) as u32, (i / width) as u32, rgb);
            }
        }
    }
    img
}

/// A strip `width` px wide with a swatch and the name of each class, wrapped into lines.
pub fn legend(names: &[String], palette: &[[u8; 3]], width: u32) -> RgbImage {
    let size = font::BODY;
    let (sw, gap, line) = (11u32, 12u32, text_height(size) + 4);
    let mut items = vec![];
    let (mut x, mut y) = (4u32, 4u32);
    for (i, n) in names.iter().enumerate() {
        let w = sw + 4 + text_width(n, size);
        if x + w > width && x > 4 {
            (x, y) = (4, y + line);
        }
        items.push((x, y, i));
        x += w + gap;
    }
    let mut img = RgbImage::new(width, y + line + 2, [255, 255, 255]);
    for (x, y, i) in items {
        let c = palette.get(i).copied().unwrap_or(IGNORED);
        for dy in 0..sw {
            for dx in 0..sw {
                // a grey frame keeps white and near-white swatches visible
                let edge = dx == 0 || dy == 0 || dx == sw - 1 || dy == sw - 1;
                img.put(x + dx, y + dy, if edge { [128, 128, 128] } else { c });
            }
        }
        let (tx, ty) = (i64::from(x + sw + 4), i64::from(y) - 2);
        draw_text(&mut img, tx, ty, &names[i], [0, 0, 0], size);
    }
    img
}

/// One row per image of the first `spec.images` of `ds` (its eval transform): the image, its
/// ground truth and the prediction, drawn at least 256 px tall, and the legend below.
pub fn segmentation_picture(
    model: &Segmentor,
    ds: &SegmentationDataset,
    spec: &PictureSpec,
    device: &Device,
) -> Result<RgbImage> {
    let palette = ds.palette();
    let n = spec.images.min(ds.len());
    let mut panels = vec![];
    let mut side = 1;
    let mult = model.backbone().config().size_multiple().max(1);
    for i in 0..n {
        // the eval transform draws nothing; the rng only satisfies the trait
        let s = ds.get(i, &mut rng_for(0, &[i as u64]))?;
        let c = s.image.len() / (s.height * s.width);
        let x = Tensor::from_slice(&s.image, (1, c, s.height, s.width), device)?;
        let (ph, pw) = (
            s.height.div_ceil(mult) * mult,
            s.width.div_ceil(mult) * mult,
        );
        let x = x
            .pad_with_zeros(2, 0, ph - s.height)?
            .pad_with_zeros(3, 0, pw - s.width)?;
        let logits = model.infer(&x)?;
        let size = [(s.height, s.width)];
        let pred = predict_from_logits(&logits, &size, &size)?.remove(0);
        let gt = s.target.mask().map(|m| m.to_u32()).unwrap_or_default();
        let img = from_chw(&s.image, c, s.height, s.width, &spec.mean, &spec.std);
        side = side.max(s.height.max(s.width));
        panels.push((
            img,
            colorize(&gt, s.width, s.height, palette),
            colorize(&pred, s.width, s.height, palette),
        ));
    }
    let up = (256 / side).max(1) as u32;
    let rows: Vec<Vec<RgbImage>> = panels
        .into_iter()
        .map(|(a, b, c)| vec![a.upscale(up), b.upscale(up), c.upscale(up)])
        .collect();
    let g = grid(&rows, 4, &["image", "ground truth", "prediction"]);
    let l = legend(ds.classes(), palette, g.width);
    let mut out = RgbImage::new(g.width, g.height + l.height, [255, 255, 255]);
    out.blit(&g, 0, 0);
    out.blit(&l, 0, g.height);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_follow_the_palette_and_ignore_is_white() {
        let pal = [[0, 0, 0], [128, 0, 0]];
        let img = colorize(&[0, 1, 255, 7], 2, 2, &pal);
        assert_eq!(img.get(0, 0), [0, 0, 0]);
        assert_eq!(img.get(1, 0), [128, 0, 0]);
        assert_eq!(img.get(0, 1), IGNORED);
        assert_eq!(img.get(1, 1), IGNORED);
        let names: Vec<String> = (0..11).map(|i| format!("class{i}")).collect();
        let pal: Vec<[u8; 3]> = (0..11)
            .map(mimlab_engine::data::segmentation::voc_color)
            .collect();
        let l = legend(&names, &pal, 200);
        // 11 items of ~55 px (swatch, gap, "classN" at 14 px) + 12 px gaps in 200 px: 3 per
        // line, 4 lines
        let line = text_height(font::BODY) + 4;
        assert_eq!(l.height, 4 + 4 * line + 2);
        assert_eq!(l.get(5, 5), pal[0]);
        assert_eq!(l.get(4, 4), [128, 128, 128]);
    }
}
