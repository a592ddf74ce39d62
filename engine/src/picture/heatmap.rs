//! Heatmaps: a value per cell (confusion matrices, a result over a patch size x ratio grid) with
//! row and column labels, axis titles and a colour bar.
use super::font::{draw_text, draw_text_vertical, fit_text, text_height, text_width, BODY, SMALL};
use super::{RgbImage, BLACK, GRAY, WHITE};

/// A heatmap to render.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heatmap {
    /// Title above it.
    pub title: String,
    /// `values[row][col]`; non-finite cells are gray.
    pub values: Vec<Vec<f64>>,
    /// A label per row (missing ones: the index).
    pub row_labels: Vec<String>,
    /// A label per column (missing ones: the index).
    pub col_labels: Vec<String>,
    /// What the rows are (drawn vertically at the left), e.g. "true class".
    pub row_title: String,
    /// What the columns are (drawn above the column labels), e.g. "predicted class".
    pub col_title: String,
}

/// Viridis colormap (5 stops, linearly interpolated) at t in [0, 1].
pub(super) fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let mut c = [0u8; 3];
    for (k, v) in c.iter_mut().enumerate() {
        *v = (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8;
    }
    c
}

/// A cell value as short text: integers plainly, others with 2 significant decimals.
fn fmt_cell(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Where the cells of a rendered heatmap are: top-left of the grid and the cell size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellGrid {
    /// Left edge of the first column, pixels.
    pub x: i64,
    /// Top edge of the first row, pixels.
    pub y: i64,
    /// Side of a cell, pixels.
    pub cell: i64,
}

impl Heatmap {
    /// Renders it: colours (viridis) from the smallest to the largest finite value, values
    /// printed in cells when they fit, column labels vertical when wider than a cell.
    pub fn render(&self) -> RgbImage {
        self.render_with_grid().0
    }

    /// [`Heatmap::render`] and where its cells landed.
    pub fn render_with_grid(&self) -> (RgbImage, CellGrid) {
        let rows = self.values.len();
        let cols = self.values.iter().map(Vec::len).max().unwrap_or(0);
        let n = rows.max(cols).max(1) as i64;
        let cell = (720 / n).clamp(6, 56);
        let label = |labels: &[String], i: usize| -> String {
            let l = labels.get(i).cloned().unwrap_or_else(|| i.to_string());
            fit_text(&l, SMALL, 140)
        };
        let rl: Vec<String> = (0..rows).map(|i| label(&self.row_labels, i)).collect();
        let cl: Vec<String> = (0..cols).map(|i| label(&self.col_labels, i)).collect();
        let lh = text_height(SMALL) as i64;
        let bh = text_height(BODY) as i64;
        // labels only where a cell is at least 10 px: one per row / column still reads there
        let show = cell >= 10;
        let rl_w = if show {
            rl.iter().map(|l| text_width(l, SMALL)).max().unwrap_or(0) as i64
        } else {
            0
        };
        let cl_wmax = cl.iter().map(|l| text_width(l, SMALL)).max().unwrap_or(0) as i64;
        let vertical = cl_wmax + 4 > cell;
        let cl_h = match (show, vertical) {
            (false, _) => 0,
            (true, true) => cl_wmax,
            (true, false) => lh,
        };
        let title_h = if self.title.is_empty() { 0 } else { bh + 8 };
        let col_title_h = if self.col_title.is_empty() { 0 } else { bh + 4 };
        let row_title_w = if self.row_title.is_empty() { 0 } else { bh + 6 };
        let (gx, gy) = (
            8 + row_title_w + rl_w + 6,
            8 + title_h + col_title_h + cl_h + 6,
        );
        let grid_w = cols as i64 * cell;
        let grid_h = rows as i64 * cell;
        let width = (gx + grid_w + 12)
            .max(8 + text_width(&self.title, BODY) as i64 + 8)
            .max(220); // room for the colour bar and its two value labels
        let height = gy + grid_h + 10 + lh + 10;
        let mut img = RgbImage::new(width as u32, height as u32, WHITE);
        if !self.title.is_empty() {
            draw_text(&mut img, 8, 8, &self.title, BLACK, BODY);
        }
        if !self.col_title.is_empty() {
            let t = fit_text(&self.col_title, BODY, (width - gx - 8).max(0) as u32);
            let tx = gx + (grid_w - text_width(&t, BODY) as i64) / 2;
            draw_text(&mut img, tx.max(gx.min(8)), 8 + title_h, &t, BLACK, BODY);
        }
        if !self.row_title.is_empty() {
            let t = fit_text(&self.row_title, BODY, grid_h.max(0) as u32);
            let tw = text_width(&t, BODY) as i64;
            draw_text_vertical(&mut img, 8, gy + (grid_h - tw) / 2, &t, BLACK, BODY);
        }
        let finite = self
            .values
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let span = if hi > lo { hi - lo } else { 1.0 };
        for (r, row) in self.values.iter().enumerate() {
            let y = gy + r as i64 * cell;
            if show {
                let lw = text_width(&rl[r], SMALL) as i64;
                draw_text(
                    &mut img,
                    gx - 6 - lw,
                    y + (cell - lh) / 2,
                    &rl[r],
                    BLACK,
                    SMALL,
                );
            }
            for (c, &v) in row.iter().enumerate() {
                let x = gx + c as i64 * cell;
                let color = if v.is_finite() {
                    viridis((v - lo) / span)
                } else {
                    GRAY
                };
                img.fill_rect(x, y, cell, cell, color);
                let text = fmt_cell(v);
                let tw = text_width(&text, SMALL) as i64;
                if v.is_finite() && tw + 4 <= cell && cell >= lh + 2 {
                    let lum =
                        0.299 * color[0] as f64 + 0.587 * color[1] as f64 + 0.114 * color[2] as f64;
                    let tc = if lum > 128.0 { BLACK } else { WHITE };
                    let (tx, ty) = (x + (cell - tw) / 2, y + (cell - lh) / 2);
                    draw_text(&mut img, tx, ty, &text, tc, SMALL);
                }
            }
        }
        if show {
            for (c, l) in cl.iter().enumerate() {
                let x = gx + c as i64 * cell;
                let lw = text_width(l, SMALL) as i64;
                if vertical {
                    draw_text_vertical(&mut img, x + (cell - lh) / 2, gy - 6 - lw, l, BLACK, SMALL);
                } else {
                    draw_text(&mut img, x + (cell - lw) / 2, gy - 6 - lh, l, BLACK, SMALL);
                }
            }
        }
        // Colour bar with the value range.
        if lo.is_finite() {
            let by = gy + grid_h + 10;
            let (lo_t, hi_t) = (fmt_cell(lo), fmt_cell(hi));
            let lx = 8i64;
            draw_text(&mut img, lx, by, &lo_t, BLACK, SMALL);
            let bx = lx + text_width(&lo_t, SMALL) as i64 + 4;
            for i in 0..100 {
                img.fill_rect(bx + i, by + 2, 1, lh - 4, viridis(i as f64 / 99.0));
            }
            draw_text(&mut img, bx + 104, by, &hi_t, BLACK, SMALL);
        }
        (img, CellGrid { x: gx, y: gy, cell })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confusion() -> Heatmap {
        let labels: Vec<String> = vec!["cat".into(), "dog".into()];
        Heatmap {
            title: "confusion".into(),
            values: vec![vec![5.0, 0.0], vec![1.0, 3.0]],
            row_labels: labels.clone(),
            col_labels: labels,
            row_title: "true class".into(),
            col_title: "predicted class".into(),
        }
    }

    #[test]
    fn colours_extremes_and_places_cells() {
        let (img, g) = confusion().render_with_grid();
        assert!(img.pixels.chunks(3).any(|p| p == viridis(1.0)));
        assert!(img.pixels.chunks(3).any(|p| p == viridis(0.0)));
        // cell (0, 0) holds the maximum, (0, 1) the minimum: corners keep the fill colour
        assert_eq!(img.get((g.x + 1) as u32, (g.y + 1) as u32), viridis(1.0));
        assert_eq!(
            img.get((g.x + g.cell + 1) as u32, (g.y + 1) as u32),
            viridis(0.0)
        );
    }

    #[test]
    fn axis_titles_take_room_and_ink() {
        let with = confusion();
        let without = Heatmap {
            row_title: String::new(),
            col_title: String::new(),
            ..confusion()
        };
        let (a, ga) = with.render_with_grid();
        let (_, gb) = without.render_with_grid();
        assert!(ga.x > gb.x && ga.y > gb.y, "{ga:?} {gb:?}");
        // ink in the row-title column left of the row labels, over the grid's rows
        let ink = (ga.y..ga.y + 2 * ga.cell)
            .flat_map(|y| (8..8 + text_height(BODY) as i64).map(move |x| (x, y)))
            .filter(|&(x, y)| a.get(x as u32, y as u32) != WHITE)
            .count();
        assert!(ink > 20, "{ink}");
    }
}
