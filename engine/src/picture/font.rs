//! Text in pictures: DejaVu Sans (TrueType, embedded by the `dejavu` crate; the Bitstream Vera
//! licence, free to embed and redistribute), laid out and rasterized with `ab_glyph`
//! (kerning, anti-aliased coverage blended over what is there).
//!
//! Sizes are the pixel height of a line (ascent + descent, [`ab_glyph::PxScale`]): at 13 px a
//! capital letter is ~8 px tall, about matplotlib's default 10 pt at 100 dpi.
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};

use super::RgbImage;

/// Tick labels, cell values, box tags.
pub const SMALL: f32 = 12.0;
/// Axis titles, legends, column titles.
pub const BODY: f32 = 14.0;
/// Picture titles.
pub const TITLE: f32 = 16.0;

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(dejavu::sans::regular())
            .expect("the DejaVu Sans embedded by the dejavu crate parses")
    })
}

/// Pen positions of each character of `text` at `size`, and the advance after the last.
fn layout(text: &str, size: f32) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
    let f = font().as_scaled(PxScale::from(size));
    let mut caret = 0.0f32;
    let mut prev = None;
    let mut out = Vec::with_capacity(text.len());
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        if let Some(p) = prev {
            caret += f.kern(p, id);
        }
        out.push((id, caret));
        caret += f.h_advance(id);
        prev = Some(id);
    }
    (out, caret)
}

/// Width in pixels of `text` drawn at `size` (the pen advance, rounded up).
pub fn text_width(text: &str, size: f32) -> u32 {
    layout(text, size).1.ceil() as u32
}

/// Height in pixels of a line of text at `size` (ascent + descent, rounded up): the box that
/// [`draw_text`] fills below its `y`.
pub fn text_height(size: f32) -> u32 {
    let f = font().as_scaled(PxScale::from(size));
    (f.ascent() - f.descent()).ceil() as u32
}

/// Coverage of `text` at `size` in its own box, `text_width` x `text_height`, row-major.
fn coverage(text: &str, size: f32) -> (Vec<f32>, usize, usize) {
    let (glyphs, advance) = layout(text, size);
    let f = font().as_scaled(PxScale::from(size));
    let (w, h) = (advance.ceil().max(0.0) as usize, text_height(size) as usize);
    let mut cov = vec![0f32; w * h];
    for (id, x) in glyphs {
        let g = id.with_scale_and_position(PxScale::from(size), point(x, f.ascent()));
        let Some(outline) = font().outline_glyph(g) else {
            continue; // spaces and glyphs without contours
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, c| {
            let px = b.min.x as i64 + gx as i64;
            let py = b.min.y as i64 + gy as i64;
            if (0..w as i64).contains(&px) && (0..h as i64).contains(&py) {
                let v = &mut cov[py as usize * w + px as usize];
                *v = (*v + c).min(1.0);
            }
        });
    }
    (cov, w, h)
}

/// Draws `text` with the top-left of its box at (x, y); pixels outside the image are clipped.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, color: [u8; 3], size: f32) {
    draw(img, x, y, text, color, size, false);
}

/// Draws `text` reading bottom to top (rotated 90° counter-clockwise), its box `text_height`
/// wide and `text_width` tall with the top-left at (x, y).
pub fn draw_text_vertical(
    img: &mut RgbImage,
    x: i64,
    y: i64,
    text: &str,
    color: [u8; 3],
    size: f32,
) {
    draw(img, x, y, text, color, size, true);
}

fn draw(img: &mut RgbImage, x: i64, y: i64, text: &str, color: [u8; 3], size: f32, vertical: bool) {
    let (cov, w, h) = coverage(text, size);
    for ty in 0..h {
        for tx in 0..w {
            let a = cov[ty * w + tx];
            if a <= 0.0 {
                continue;
            }
            let (px, py) = if vertical {
                (x + ty as i64, y + w as i64 - 1 - tx as i64)
            } else {
                (x + tx as i64, y + ty as i64)
            };
            img.blend(px, py, color, a);
        }
    }
}

/// Cuts `text` to the longest prefix that fits `max_width` px at `size`, ending in "..." when
/// cut (nothing when not even that fits).
pub fn fit_text(text: &str, size: f32, max_width: u32) -> String {
    if text_width(text, size) <= max_width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for n in (0..chars.len()).rev() {
        let s: String = chars[..n].iter().collect::<String>() + "...";
        if text_width(&s, size) <= max_width {
            return s;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_the_font_metrics() {
        // DejaVu Sans: proportional ("i" narrower than "m"), kerned, linear in the size.
        assert!(text_width("iiii", 14.0) < text_width("mmmm", 14.0));
        // DejaVu Sans advances (units of 2048 per em, line height 1901 + 483 units):
        // o 1253 r 842 i 569 g 1300 i 569 n 1298 a 1255 l 569 = 7655 units, at 14 px per
        // 2384 units = 44.95 px
        let w = text_width("original", 14.0);
        assert_eq!(w, 45);
        let w2 = text_width("original", 28.0);
        assert!((2 * w).abs_diff(w2) <= 2, "{w} {w2}");
        assert_eq!(text_width("", 14.0), 0);
        assert_eq!(text_height(14.0), 14);
    }

    #[test]
    fn descenders_reach_below_the_baseline() {
        // "g" has a descender (the 5x7 bitmap font drew it as a "9"): its ink goes below the
        // lowest ink of "o", and the whole line stays in the box.
        let ink_rows = |s: &str| {
            let (cov, w, h) = coverage(s, 28.0);
            let rows: Vec<usize> = (0..h)
                .filter(|y| (0..w).any(|x| cov[y * w + x] > 0.5))
                .collect();
            (*rows.first().unwrap(), *rows.last().unwrap())
        };
        let (_, o_bottom) = ink_rows("o");
        let (_, g_bottom) = ink_rows("g");
        assert!(g_bottom >= o_bottom + 4, "g {g_bottom} o {o_bottom}");
        let (t_top, _) = ink_rows("T");
        assert!(t_top >= 1, "{t_top}");
    }

    #[test]
    fn text_draws_inside_its_box_and_vertical_is_the_rotation() {
        let mut img = RgbImage::new(120, 40, [255; 3]);
        draw_text(&mut img, 5, 6, "Avg% ly", [255, 0, 0], 16.0);
        let (w, h) = (text_width("Avg% ly", 16.0), text_height(16.0));
        let mut inked = 0;
        for y in 0..img.height {
            for x in 0..img.width {
                let p = img.get(x, y);
                let in_box = (5..5 + w).contains(&x) && (6..6 + h).contains(&y);
                assert!(
                    p == [255; 3] || in_box,
                    "pixel ({x},{y}) outside the text box"
                );
                inked += (p[1] < 128) as usize; // more than half covered
            }
        }
        assert!(inked > 60, "{inked}");
        let mut v = RgbImage::new(h, w, [255; 3]);
        draw_text_vertical(&mut v, 0, 0, "Avg% ly", [255, 0, 0], 16.0);
        for y in 0..h {
            for x in 0..w {
                assert_eq!(img.get(5 + x, 6 + y), v.get(y, w - 1 - x), "({x},{y})");
            }
        }
    }

    #[test]
    fn fit_text_cuts_with_an_ellipsis() {
        assert_eq!(fit_text("loss", 14.0, 200), "loss");
        let cut = fit_text("a long axis title that does not fit", 14.0, 80);
        assert!(
            cut.ends_with("...") && text_width(&cut, 14.0) <= 80,
            "{cut}"
        );
        assert_eq!(fit_text("wide", 14.0, 2), "");
    }
}
