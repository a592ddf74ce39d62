//! Pictures of detections: boxes with a label tag (class name and score) drawn on an image, the
//! ground truth and the predictions of one image side by side.
use super::{draw_text, series_color, text_height, text_width, RgbImage};

/// One box to draw: `[x1, y1, x2, y2]` in pixels of the image, its class and an optional score.
#[derive(Debug, Clone, PartialEq)]
pub struct DrawBox {
    /// Corners in pixels.
    pub xyxy: [f32; 4],
    /// Class index (picks the colour).
    pub class: u32,
    /// The tag text, e.g. `"7"` or `"7 0.93"`.
    pub label: String,
}

/// Draws `boxes` on `img`: a `thickness`-pixel outline in the class colour and a filled tag with
/// the label in white at the box's top-left corner (inside the box when it would leave the
/// image). Text at `size` px ([`super::font`]).
pub fn draw_boxes(img: &mut RgbImage, boxes: &[DrawBox], thickness: u32, size: f32) {
    let t = i64::from(thickness.max(1));
    for b in boxes {
        let c = series_color(b.class as usize);
        let [x1, y1, x2, y2] = b.xyxy.map(|v| v.round() as i64);
        let (w, h) = ((x2 - x1).max(1), (y2 - y1).max(1));
        for k in 0..t {
            img.stroke_rect(x1 - k, y1 - k, w + 2 * k, h + 2 * k, c);
        }
        if b.label.is_empty() {
            continue;
        }
        let th = i64::from(text_height(size)) + 1;
        let tw = i64::from(text_width(&b.label, size)) + 4;
        let ty = if y1 - t - th >= 0 { y1 - t - th } else { y1 };
        let tx = x1.clamp(0, (i64::from(img.width) - tw).max(0));
        img.fill_rect(tx, ty, tw, th, c);
        draw_text(img, tx + 2, ty + 1, &b.label, [255, 255, 255], size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outline_in_the_class_colour_and_a_tag_above_the_box() {
        let mut img = RgbImage::new(40, 40, [0, 0, 0]);
        let b = DrawBox {
            xyxy: [10.0, 20.0, 30.0, 35.0],
            class: 2,
            label: "7 0.9".into(),
        };
        draw_boxes(&mut img, &[b], 1, 8.0);
        let c = series_color(2);
        // the outline: corners and edges, not the inside
        for (x, y) in [(10, 20), (29, 20), (10, 34), (29, 34), (20, 20), (10, 27)] {
            assert_eq!(img.get(x, y), c, "({x}, {y})");
        }
        assert_eq!(img.get(20, 27), [0, 0, 0]);
        // the tag: 9 px tall (8 px text) above the top edge (rows 10..19), white text on the
        // class colour
        let tag: Vec<[u8; 3]> = (10..19)
            .flat_map(|y| (10..38).map(move |x| (x, y)))
            .map(|(x, y)| img.get(x, y))
            .collect();
        let bright = |p: &[u8; 3]| p.iter().all(|&v| v > 200);
        assert!(tag.iter().any(bright) && tag.contains(&c));
        assert_eq!(img.get(10, 9), [0, 0, 0], "nothing above the tag");
        // a box at the top edge gets its tag inside
        let mut top = RgbImage::new(40, 40, [0, 0, 0]);
        let b = DrawBox {
            xyxy: [0.0, 0.0, 20.0, 20.0],
            class: 0,
            label: "1".into(),
        };
        draw_boxes(&mut top, &[b], 2, 8.0);
        assert_eq!(top.get(1, 1), series_color(0));
        // white text blended over the class blue (red channel 31) inside the box
        assert!((2..11).any(|y| (2..9).any(|x| top.get(x, y)[0] > 120)));
    }
}
