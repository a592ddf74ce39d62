//! Grids of equally sized tiles (reconstructions, segmentation rows) with column titles, and a
//! title bar above any picture.
use super::font::{draw_text, fit_text, text_height, text_width, BODY, TITLE};
use super::{RgbImage, BLACK, WHITE};

/// Size of column titles: large over tiles at least 96 px wide where every title fits.
fn title_size(tile_w: u32, pad: u32, titles: &[&str]) -> f32 {
    let big = 1.5 * BODY;
    if tile_w >= 96 && titles.iter().all(|t| text_width(t, big) <= tile_w + pad) {
        big
    } else {
        BODY
    }
}

/// Height of the column-title band of [`grid`]: 0 without titles.
pub fn title_band(tile_w: u32, pad: u32, titles: &[&str]) -> u32 {
    if titles.iter().any(|t| !t.is_empty()) {
        text_height(title_size(tile_w, pad, titles)) + 4
    } else {
        0
    }
}

/// A grid: rows of equally sized tiles, `pad` px white gaps, optional column titles drawn above.
///
/// Tile (r, c) sits at `x = pad + c * (tw + pad)`, `y = band + pad + r * (th + pad)`, where
/// `band` is [`title_band`] (titles at 1.5x the body size over tiles >= 96 px wide when all fit,
/// else the body size; a title wider than its column is cut with "..."). Short rows leave white
/// gaps; tiles larger than the first are clipped to its size.
pub fn grid(rows: &[Vec<RgbImage>], pad: u32, column_titles: &[&str]) -> RgbImage {
    let (tw, th) = rows
        .iter()
        .flatten()
        .next()
        .map_or((0, 0), |t| (t.width, t.height));
    let cols = rows
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(column_titles.len()) as u32;
    let size = title_size(tw, pad, column_titles);
    let band = title_band(tw, pad, column_titles);
    let width = cols * tw + (cols + 1) * pad;
    let height = band + rows.len() as u32 * th + (rows.len() as u32 + 1) * pad;
    let mut img = RgbImage::new(width, height, WHITE);
    for (c, title) in column_titles.iter().enumerate() {
        let title = fit_text(title, size, tw + pad);
        let tx = pad as i64
            + c as i64 * (tw + pad) as i64
            + (tw as i64 - text_width(&title, size) as i64) / 2;
        draw_text(&mut img, tx.max(0), pad as i64 + 1, &title, BLACK, size);
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = pad + c as u32 * (tw + pad);
            let y = band + pad + r as u32 * (th + pad);
            if tile.width == tw && tile.height == th {
                img.blit(tile, x, y);
            } else {
                let mut fitted = RgbImage::new(tw, th, WHITE);
                fitted.blit(tile, 0, 0);
                img.blit(&fitted, x, y);
            }
        }
    }
    img
}

/// `img` under a white title bar holding `title` (centred, cut with "..." when wider than the
/// picture), e.g. "SimMIM reconstructions, step 400, masked L1 0.6442".
pub fn titled(img: &RgbImage, title: &str) -> RgbImage {
    let bar = text_height(TITLE) + 10;
    let mut out = RgbImage::new(img.width, img.height + bar, WHITE);
    let t = fit_text(title, TITLE, img.width.saturating_sub(8));
    let tx = (img.width as i64 - text_width(&t, TITLE) as i64) / 2;
    draw_text(&mut out, tx.max(0), 5, &t, BLACK, TITLE);
    out.blit(img, 0, bar);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_size_and_placement() {
        let tile = |c: u8| RgbImage::new(4, 3, [c, 0, 0]);
        let rows = vec![vec![tile(1), tile(2), tile(3)], vec![tile(4), tile(5)]];
        let g = grid(&rows, 2, &[]);
        assert_eq!((g.width, g.height), (3 * 4 + 4 * 2, 2 * 3 + 3 * 2));
        assert_eq!(g.get(2, 2), [1, 0, 0]);
        assert_eq!(g.get(2 + 2 * 6 + 3, 2 + 2), [3, 0, 0]);
        assert_eq!(g.get(2 + 6, 2 + 5), [5, 0, 0]);
        assert_eq!(g.get(2 + 12, 2 + 5), [255, 255, 255]); // missing tile stays white
        assert_eq!(g.get(1, 1), [255, 255, 255]); // padding
        let titles = ["in", "out", "gt"];
        let band = title_band(4, 2, &titles);
        assert_eq!(band, text_height(BODY) + 4);
        let titled_grid = grid(&rows, 2, &titles);
        assert_eq!(titled_grid.height, g.height + band);
        assert_eq!(titled_grid.get(2, 2 + band), [1, 0, 0]);
        // 96 px tiles: titles at 1.5x while all of them fit ("original" and "predicted" do),
        // drawn as dark ink in the band over each column
        let big = vec![vec![RgbImage::new(96, 96, [0; 3]); 2]];
        let g = grid(&big, 4, &["original", "predicted"]);
        let band = text_height(1.5 * BODY) + 4;
        assert_eq!(g.height, 96 + 8 + band);
        for col in 0..2 {
            let dark = (0..band)
                .flat_map(|y| (4 + col * 100..4 + col * 100 + 96).map(move |x| (x, y)))
                .filter(|&(x, y)| g.get(x, y)[0] < 100)
                .count();
            assert!(dark > 40, "column {col}: {dark}");
        }
        let g = grid(&big, 4, &["original", "a title far wider than 96 pixels"]);
        assert_eq!(g.height, 96 + 8 + text_height(BODY) + 4);
    }

    #[test]
    fn titled_puts_a_readable_title_above() {
        let img = RgbImage::new(520, 40, [0, 0, 200]);
        let t = titled(&img, "SimMIM reconstructions, step 400, masked L1 0.6442");
        let bar = text_height(TITLE) + 10;
        assert_eq!((t.width, t.height), (520, 40 + bar));
        assert_eq!(t.get(150, bar + 1), [0, 0, 200]);
        // the title's ink spans most of the bar's width: the text is there and readable size
        let cols: Vec<u32> = (0..t.width)
            .filter(|&x| (0..bar).any(|y| t.get(x, y)[0] < 128))
            .collect();
        let span = cols.last().unwrap() - cols.first().unwrap();
        assert!(span > 200, "{span}");
        // ... and matches the laid-out width up to the side bearings of the first and last glyph
        let laid_out = text_width("SimMIM reconstructions, step 400, masked L1 0.6442", TITLE);
        assert!(span < laid_out && span + 6 >= laid_out, "{span} {laid_out}");
    }
}
