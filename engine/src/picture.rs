//! Pictures people look at: RGB images, grids of reconstructions, line plots and heatmaps, all
//! saved as PNG and drawn with a built-in bitmap font (no font files, no plotting library).

pub mod boxes;
mod font;

use std::path::Path;

use anyhow::{bail, Context, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, row by row.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// An image filled with one colour.
    pub fn new(width: u32, height: u32, fill: [u8; 3]) -> Self {
        let n = width as usize * height as usize;
        let mut pixels = Vec::with_capacity(n * 3);
        for _ in 0..n {
            pixels.extend_from_slice(&fill);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    fn offset(&self, x: u32, y: u32) -> usize {
        (y as usize * self.width as usize + x as usize) * 3
    }

    /// The colour at (x, y). Panics if (x, y) is outside the image (a caller bug).
    pub fn get(&self, x: u32, y: u32) -> [u8; 3] {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) outside {}x{}",
            self.width,
            self.height
        );
        let o = self.offset(x, y);
        [self.pixels[o], self.pixels[o + 1], self.pixels[o + 2]]
    }

    /// Sets (x, y) to `c`; pixels outside the image are silently clipped.
    pub fn put(&mut self, x: u32, y: u32, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let o = self.offset(x, y);
            self.pixels[o..o + 3].copy_from_slice(&c);
        }
    }

    /// Fills a rectangle (clipped to the image).
    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y.max(0)..(y + h).min(self.height as i64) {
            for xx in x.max(0)..(x + w).min(self.width as i64) {
                self.put(xx as u32, yy as u32, c);
            }
        }
    }

    /// Outlines a rectangle one pixel wide.
    fn stroke_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        self.fill_rect(x, y, w, 1, c);
        self.fill_rect(x, y + h - 1, w, 1, c);
        self.fill_rect(x, y, 1, h, c);
        self.fill_rect(x + w - 1, y, 1, h, c);
    }

    /// Copies `src` with its top-left corner at (x, y), clipped to this image.
    pub fn blit(&mut self, src: &RgbImage, x: u32, y: u32) {
        if x >= self.width || y >= self.height {
            return;
        }
        let w = src.width.min(self.width - x) as usize;
        for sy in 0..src.height.min(self.height - y) {
            let s = src.offset(0, sy);
            let d = self.offset(x, y + sy);
            self.pixels[d..d + w * 3].copy_from_slice(&src.pixels[s..s + w * 3]);
        }
    }

    /// Nearest-neighbour upscaling by an integer factor (0 is treated as 1).
    pub fn upscale(&self, factor: u32) -> RgbImage {
        let f = factor.max(1);
        let mut out = RgbImage::new(self.width * f, self.height * f, [0; 3]);
        for y in 0..out.height {
            for x in 0..out.width {
                out.put(x, y, self.get(x / f, y / f));
            }
        }
        out
    }

    /// The image as PNG file bytes.
    pub fn encode_png(&self) -> Result<Vec<u8>> {
        let expected = self.width as usize * self.height as usize * 3;
        if self.pixels.len() != expected {
            bail!(
                "RgbImage {}x{} has {} bytes, expected {expected}",
                self.width,
                self.height,
                self.pixels.len()
            );
        }
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("writing PNG header")?;
        writer
            .write_image_data(&self.pixels)
            .context("writing PNG data")?;
        writer.finish().context("finishing PNG")?;
        Ok(out)
    }

    /// Writes a PNG file atomically ([`crate::fsutil::write_atomic`]); creates the parent
    /// folder if needed.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let bytes = self
            .encode_png()
            .with_context(|| format!("{}: encoding", path.display()))?;
        crate::fsutil::ensure_parent(path)?;
        crate::fsutil::write_atomic(path, &bytes)
    }
}

/// Un-normalizes one CHW image (x*std+mean, clamp to `[0, 1]`, `*255`); 1 channel -> gray RGB.
///
/// `mean`/`std` are per channel (a single value applies to all; empty means 0 and 1). With 2
/// channels blue is 0; channels past the third are ignored. Panics if
/// `data.len() != channels * height * width` (a caller bug).
pub fn from_chw(
    data: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    mean: &[f32],
    std: &[f32],
) -> RgbImage {
    assert_eq!(
        data.len(),
        channels * height * width,
        "from_chw: data length vs {channels}x{height}x{width}"
    );
    let stat = |v: &[f32], c: usize, default: f32| match v.len() {
        0 => default,
        1 => v[0],
        n => v[c % n],
    };
    let plane = height * width;
    let to_byte = |c: usize, i: usize| {
        let x = data[c * plane + i] * stat(std, c, 1.0) + stat(mean, c, 0.0);
        // NaN maps to 0 (clamp keeps NaN, `as u8` saturates it to 0).
        (x.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let mut img = RgbImage::new(width as u32, height as u32, [0; 3]);
    for i in 0..plane {
        let rgb = match channels {
            0 => [0; 3],
            1 => [to_byte(0, i); 3],
            2 => [to_byte(0, i), to_byte(1, i), 0],
            _ => [to_byte(0, i), to_byte(1, i), to_byte(2, i)],
        };
        img.pixels[i * 3..i * 3 + 3].copy_from_slice(&rgb);
    }
    img
}

/// `[B,C,H,W]` tensor (any device/dtype) -> one image per batch item.
pub fn from_tensor(t: &candle_core::Tensor, mean: &[f32], std: &[f32]) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4().with_context(|| {
        format!(
            "picture::from_tensor: expected [B,C,H,W], got {:?}",
            t.shape()
        )
    })?;
    if c != 1 && c != 3 {
        bail!(
            "picture::from_tensor: expected 1 or 3 channels, got shape {:?}",
            t.shape()
        );
    }
    for (name, v) in [("mean", mean), ("std", std)] {
        if v.len() > 1 && v.len() != c {
            bail!(
                "picture::from_tensor: {name} has {} values for {c} channels",
                v.len()
            );
        }
    }
    let data = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_device(&candle_core::Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .context("picture::from_tensor: copying to CPU f32")?;
    let per = c * h * w;
    Ok((0..b)
        .map(|i| from_chw(&data[i * per..(i + 1) * per], c, h, w, mean, std))
        .collect())
}

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GRAY: [u8; 3] = [128, 128, 128];
const LIGHT: [u8; 3] = [225, 225, 225];

/// A grid: rows of equally sized tiles, `pad` px white gaps, optional column titles drawn above.
///
/// Tile (r, c) sits at `x = pad + c * (tw + pad)`, `y = title_h + pad + r * (th + pad)`, where
/// `title_h` is 0 without titles and `7 * scale + 4` with them (scale 2 for tiles >= 96 px wide).
/// Short rows leave white gaps; tiles larger than the first are clipped to its size.
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
    // titles twice the size on large tiles, where every title fits its column at that size
    let fits = |scale| {
        column_titles
            .iter()
            .all(|t| text_width(t, scale) <= tw + pad)
    };
    let scale = if tw >= 96 && fits(2) { 2 } else { 1 };
    let title_h = if column_titles.iter().any(|t| !t.is_empty()) {
        font::GLYPH_H * scale + 4
    } else {
        0
    };
    let width = cols * tw + (cols + 1) * pad;
    let height = title_h + rows.len() as u32 * th + (rows.len() as u32 + 1) * pad;
    let mut img = RgbImage::new(width, height, WHITE);
    for (c, title) in column_titles.iter().enumerate() {
        let max_chars = ((tw + pad) / (font::ADVANCE * scale)).max(1) as usize;
        let title: String = title.chars().take(max_chars).collect();
        let tx = pad as i64
            + c as i64 * (tw + pad) as i64
            + (tw as i64 - text_width(&title, scale) as i64) / 2;
        draw_text_i(
            &mut img,
            tx.max(0),
            pad as i64 + 1,
            &title,
            BLACK,
            scale,
            false,
        );
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = pad + c as u32 * (tw + pad);
            let y = title_h + pad + r as u32 * (th + pad);
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

/// Width in pixels of `text` drawn at `scale` (6 px advance per character, no trailing gap).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    (n * font::ADVANCE).saturating_sub(1) * scale
}

/// Text with a built-in bitmap font (at least 0-9 A-Z a-z and . , : ; - + = _ / ( ) % < > [ ] #
/// space), `scale` x 5x7 px.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, color: [u8; 3], scale: u32) {
    draw_text_i(img, x as i64, y as i64, text, color, scale, false);
}

/// Draws text with (x, y) the top-left of its box; `vertical` reads bottom-to-top (rotated 90°
/// counter-clockwise) with the box `7*scale` wide and `text_width` tall.
fn draw_text_i(
    img: &mut RgbImage,
    x: i64,
    y: i64,
    text: &str,
    color: [u8; 3],
    scale: u32,
    vertical: bool,
) {
    let s = scale.max(1) as i64;
    let len = text_width(text, scale) as i64;
    for (i, ch) in text.chars().enumerate() {
        let rows = font::glyph(ch);
        for (gy, bits) in rows.iter().enumerate() {
            for gx in 0..font::GLYPH_W as i64 {
                if bits & (1 << (font::GLYPH_W as i64 - 1 - gx)) == 0 {
                    continue;
                }
                // Position in the horizontal text box.
                let tx = (i as i64 * font::ADVANCE as i64 + gx) * s;
                let ty = gy as i64 * s;
                let (px, py) = if vertical {
                    (x + ty, y + len - 1 - tx - (s - 1))
                } else {
                    (x + tx, y + ty)
                };
                img.fill_rect(px, py, s, s, color);
            }
        }
    }
}

/// Draws a line `thick` px wide (Bresenham, square pen).
fn draw_line(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    c: [u8; 3],
    thick: i64,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    let off = (thick - 1) / 2;
    loop {
        img.fill_rect(x - off, y - off, thick, thick, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// One named curve of a line plot.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y) points in drawing order; non-finite points (and y <= 0 on a log axis) are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line plot: axes with ticks, one colour per series, markers, legend.
#[derive(Clone, Debug, PartialEq)]
pub struct LinePlot {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label above the y axis.
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
    /// Logarithmic y axis.
    pub log_y: bool,
}

/// Tableau-10 colours, one per series.
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// The colour of series `i` in plots.
pub fn series_color(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// An axis: data range (in log10 units on a log axis) and tick positions with labels.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis over [lo, hi] widened to round tick values (1, 2, 5 x 10^k steps).
    fn linear(lo: f64, hi: f64) -> Axis {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - d, hi + d)
        };
        let raw = (hi - lo) / 4.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let (a, b) = ((lo / step).floor() as i64, (hi / step).ceil() as i64);
        let ticks = (a..=b)
            .map(|k| (k as f64 * step, fmt_tick(k as f64 * step, step)))
            .collect();
        Axis {
            lo: a as f64 * step,
            hi: b as f64 * step,
            log: false,
            ticks,
        }
    }

    /// A log axis over positive [lo, hi], widened to whole decades.
    fn log(lo: f64, hi: f64) -> Axis {
        let a = lo.log10().floor() as i64;
        let b = (hi.log10().ceil() as i64).max(a + 1);
        let every = ((b - a) as f64 / 6.0).ceil().max(1.0) as i64;
        let mut ticks = Vec::new();
        for k in a..=b {
            let v = 10f64.powi(k as i32);
            if (k - a) % every == 0 {
                ticks.push((v.log10(), fmt_decade(k)));
            }
            if b - a <= 2 && k < b {
                for m in [2.0, 5.0] {
                    ticks.push(((m * v).log10(), fmt_tick(m * v, v)));
                }
            }
        }
        Axis {
            lo: a as f64,
            hi: b as f64,
            log: true,
            ticks,
        }
    }

    /// Position of data value `v` in [0, 1] along the axis.
    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        (v - self.lo) / (self.hi - self.lo)
    }
}

/// A tick label with as many decimals as the tick step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Label of the tick 10^k.
fn fmt_decade(k: i64) -> String {
    match k {
        -3..=-1 => format!("{:.*}", (-k) as usize, 10f64.powi(k as i32)),
        0..=4 => format!("{}", 10i64.pow(k as u32)),
        _ => format!("1e{k}"),
    }
}

/// Where a plot's data lands in pixels (plot area and axes), shared by drawing and tests.
struct Frame {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    xa: Axis,
    ya: Axis,
}

/// Pixels between the plot area's border and the data range, so markers stay inside.
const INSET: i64 = 6;

impl Frame {
    /// Pixel of data point (x, y).
    fn pixel(&self, x: f64, y: f64) -> (i64, i64) {
        let px = self.x0
            + INSET
            + (self.xa.frac(x) * (self.x1 - self.x0 - 2 * INSET) as f64).round() as i64;
        let py = self.y1
            - INSET
            - (self.ya.frac(y) * (self.y1 - self.y0 - 2 * INSET) as f64).round() as i64;
        (px, py)
    }
}

impl LinePlot {
    /// Points that can be drawn (finite; y > 0 on a log axis).
    fn drawable(&self, s: &Series) -> Vec<(f64, f64)> {
        let ok = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0);
        s.points.iter().copied().filter(ok).collect()
    }

    /// Text scale for a canvas of this width.
    fn scale(width: u32) -> u32 {
        if width >= 900 {
            2
        } else {
            1
        }
    }

    fn frame(&self, width: u32, height: u32) -> Frame {
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| self.drawable(s)).collect();
        let (mut xl, mut xh, mut yl, mut yh) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for &(x, y) in &pts {
            (xl, xh, yl, yh) = (xl.min(x), xh.max(x), yl.min(y), yh.max(y));
        }
        if pts.is_empty() {
            (xl, xh, yl, yh) = (0.0, 1.0, if self.log_y { 0.1 } else { 0.0 }, 1.0);
        }
        let xa = Axis::linear(xl, xh);
        let ya = if self.log_y {
            Axis::log(yl, yh)
        } else {
            Axis::linear(yl, yh)
        };
        let s = Self::scale(width) as i64;
        let ch = 7 * s;
        let label_w = ya
            .ticks
            .iter()
            .map(|(_, l)| text_width(l, s as u32))
            .max()
            .unwrap_or(0) as i64;
        let x0 = 8 + label_w + 6;
        let y0 = 8
            + if self.title.is_empty() { 0 } else { ch + 8 }
            + if self.y_label.is_empty() { 0 } else { ch + 6 };
        let x1 = width as i64 - 12;
        let y1 = height as i64 - 8 - ch - 6 - if self.x_label.is_empty() { 0 } else { ch + 6 };
        Frame {
            x0,
            y0,
            x1: x1.max(x0 + 2 * INSET + 1),
            y1: y1.max(y0 + 2 * INSET + 1),
            xa,
            ya,
        }
    }

    /// Renders the plot: axes, ~5 ticks with numeric labels, one colour per series, markers
    /// (when there are few enough points to tell apart), legend.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let mut img = RgbImage::new(width, height, WHITE);
        let f = self.frame(width, height);
        let s = Self::scale(width);
        let ch = 7 * s as i64;
        // Title, y label, x label.
        if !self.title.is_empty() {
            let tx = (width as i64 - text_width(&self.title, s) as i64) / 2;
            draw_text_i(&mut img, tx.max(0), 8, &self.title, BLACK, s, false);
        }
        if !self.y_label.is_empty() {
            draw_text_i(
                &mut img,
                f.x0,
                f.y0 - ch - 6,
                &self.y_label,
                BLACK,
                s,
                false,
            );
        }
        if !self.x_label.is_empty() {
            let tx = (f.x0 + f.x1 - text_width(&self.x_label, s) as i64) / 2;
            draw_text_i(
                &mut img,
                tx,
                f.y1 + 6 + ch + 6,
                &self.x_label,
                BLACK,
                s,
                false,
            );
        }
        // Grid lines and tick labels.
        for (v, label) in &f.ya.ticks {
            let (_, py) = f.pixel(f.xa.lo, if f.ya.log { 10f64.powf(*v) } else { *v });
            img.fill_rect(f.x0 + 1, py, f.x1 - f.x0 - 1, 1, LIGHT);
            img.fill_rect(f.x0 - 4, py, 4, 1, BLACK);
            let lw = text_width(label, s) as i64;
            draw_text_i(&mut img, f.x0 - 6 - lw, py - ch / 2, label, BLACK, s, false);
        }
        for (v, label) in &f.xa.ticks {
            let (px, _) = f.pixel(
                *v,
                if f.ya.log {
                    10f64.powf(f.ya.lo)
                } else {
                    f.ya.lo
                },
            );
            img.fill_rect(px, f.y0 + 1, 1, f.y1 - f.y0 - 1, LIGHT);
            img.fill_rect(px, f.y1, 1, 4, BLACK);
            let lw = text_width(label, s) as i64;
            draw_text_i(&mut img, px - lw / 2, f.y1 + 6, label, BLACK, s, false);
        }
        img.stroke_rect(f.x0, f.y0, f.x1 - f.x0 + 1, f.y1 - f.y0 + 1, BLACK);
        // Series: lines first, then markers on top.
        let max_markers = ((f.x1 - f.x0) / 8).max(1) as usize;
        for (i, series) in self.series.iter().enumerate() {
            let color = series_color(i);
            let pts: Vec<(i64, i64)> = self
                .drawable(series)
                .iter()
                .map(|&(x, y)| f.pixel(x, y))
                .collect();
            for w in pts.windows(2) {
                draw_line(&mut img, w[0], w[1], color, 2);
            }
            if pts.len() <= max_markers {
                for &(px, py) in &pts {
                    img.fill_rect(px - 2, py - 2, 5, 5, color);
                }
            }
        }
        // Legend, top-right inside the plot area.
        let named: Vec<(usize, &Series)> = self
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
            .collect();
        if !named.is_empty() {
            let row_h = ch + 4;
            let lw = named
                .iter()
                .map(|(_, s)| text_width(&s.name, LinePlot::scale(width)))
                .max()
                .unwrap_or(0) as i64;
            let (bw, bh) = (lw + 30, named.len() as i64 * row_h + 6);
            let (bx, by) = (f.x1 - bw - 4, f.y0 + 4);
            img.fill_rect(bx, by, bw, bh, WHITE);
            img.stroke_rect(bx, by, bw, bh, GRAY);
            for (row, (i, series)) in named.iter().enumerate() {
                let y = by + 4 + row as i64 * row_h;
                let color = series_color(*i);
                img.fill_rect(bx + 5, y + ch / 2 - 1, 16, 2, color);
                img.fill_rect(bx + 11, y + ch / 2 - 2, 5, 5, color);
                draw_text_i(&mut img, bx + 25, y, &series.name, BLACK, s, false);
            }
        }
        img
    }
}

/// Viridis colormap (5 stops, linearly interpolated) at t in [0, 1].
fn viridis(t: f64) -> [u8; 3] {
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

/// A heatmap with a value per cell and row/column labels (for confusion matrices), values
/// printed in cells when they fit. Colours run (viridis) from the smallest to the largest finite
/// value; non-finite cells are gray. Column labels are drawn vertically when wider than a cell.
pub fn heatmap(
    values: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    title: &str,
) -> RgbImage {
    let rows = values.len();
    let cols = values.iter().map(Vec::len).max().unwrap_or(0);
    let n = rows.max(cols).max(1) as i64;
    let cell = (720 / n).clamp(6, 48);
    let label = |labels: &[String], i: usize| -> String {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| i.to_string())
            .chars()
            .take(16)
            .collect()
    };
    let rl: Vec<String> = (0..rows).map(|i| label(row_labels, i)).collect();
    let cl: Vec<String> = (0..cols).map(|i| label(col_labels, i)).collect();
    let show_rows = cell >= 8;
    let show_cols = cell >= 8;
    let rl_w = if show_rows {
        rl.iter().map(|l| text_width(l, 1)).max().unwrap_or(0) as i64
    } else {
        0
    };
    let cl_wmax = cl.iter().map(|l| text_width(l, 1)).max().unwrap_or(0) as i64;
    let vertical = cl_wmax + 2 > cell;
    let cl_h = if !show_cols {
        0
    } else if vertical {
        cl_wmax
    } else {
        7
    };
    let title_h = if title.is_empty() { 0 } else { 7 + 8 };
    let (gx, gy) = (8 + rl_w + 6, 8 + title_h + cl_h + 6);
    let grid_w = cols as i64 * cell;
    let width = (gx + grid_w + 10)
        .max(8 + text_width(title, 1) as i64 + 8)
        .max(170);
    let height = gy + rows as i64 * cell + 8 + 7 + 10;
    let mut img = RgbImage::new(width as u32, height as u32, WHITE);
    if !title.is_empty() {
        draw_text_i(&mut img, 8, 8, title, BLACK, 1, false);
    }
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    for (r, row) in values.iter().enumerate() {
        let y = gy + r as i64 * cell;
        if show_rows {
            let lw = text_width(&rl[r], 1) as i64;
            draw_text_i(
                &mut img,
                gx - 6 - lw,
                y + (cell - 7) / 2,
                &rl[r],
                BLACK,
                1,
                false,
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
            let tw = text_width(&text, 1) as i64;
            if v.is_finite() && tw + 2 <= cell && cell >= 9 {
                let lum =
                    0.299 * color[0] as f64 + 0.587 * color[1] as f64 + 0.114 * color[2] as f64;
                let tc = if lum > 128.0 { BLACK } else { WHITE };
                draw_text_i(
                    &mut img,
                    x + (cell - tw) / 2,
                    y + (cell - 7) / 2,
                    &text,
                    tc,
                    1,
                    false,
                );
            }
        }
    }
    if show_cols {
        for (c, l) in cl.iter().enumerate() {
            let x = gx + c as i64 * cell;
            let lw = text_width(l, 1) as i64;
            if vertical {
                draw_text_i(&mut img, x + (cell - 7) / 2, gy - 6 - lw, l, BLACK, 1, true);
            } else {
                draw_text_i(
                    &mut img,
                    x + (cell - lw) / 2,
                    gy - 6 - 7,
                    l,
                    BLACK,
                    1,
                    false,
                );
            }
        }
    }
    // Colour bar with the value range.
    if lo.is_finite() {
        let by = gy + rows as i64 * cell + 8;
        let (lo_t, hi_t) = (fmt_cell(lo), fmt_cell(hi));
        let lx = 8i64;
        draw_text_i(&mut img, lx, by, &lo_t, BLACK, 1, false);
        let bx = lx + text_width(&lo_t, 1) as i64 + 4;
        for i in 0..100 {
            img.fill_rect(bx + i, by, 1, 7, viridis(i as f64 / 99.0));
        }
        draw_text_i(&mut img, bx + 104, by, &hi_t, BLACK, 1, false);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip() {
        let mut img = RgbImage::new(7, 5, [10, 20, 30]);
        img.put(3, 2, [255, 0, 128]);
        img.put(6, 4, [1, 2, 3]);
        let bytes = img.encode_png().unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!((decoded.width(), decoded.height()), (7, 5));
        assert_eq!(decoded.into_raw(), img.pixels);
    }

    #[test]
    fn save_png_is_atomic_and_names_path_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.png");
        let img = RgbImage::new(3, 2, [9, 8, 7]);
        img.save_png(&p).unwrap();
        let back = image::open(&p).unwrap().to_rgb8();
        assert_eq!(back.into_raw(), img.pixels);
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.png")]);
        // A file where a folder should be makes the write fail.
        let bad = dir.path().join("sub/a.png/b.png");
        let err = img.save_png(&bad).unwrap_err().to_string();
        assert!(
            err.contains(&bad.parent().unwrap().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn from_chw_unnormalizes_exactly() {
        // 3 channels, 2x2: x*std+mean, clamp, *255, round.
        let data = [
            0.0, 1.0, -10.0, 10.0, // R: mean .5 std .25 -> .5 .75 0 1
            0.0, 2.0, -2.0, 0.5, // G: mean .2 std .1 -> .2 .4 0 .25
            1.0, -1.0, 0.0, 0.0, // B: mean 0 std 1 -> 1 0 0 0
        ];
        let img = from_chw(&data, 3, 2, 2, &[0.5, 0.2, 0.0], &[0.25, 0.1, 1.0]);
        assert_eq!(
            img.pixels,
            vec![128, 51, 255, 191, 102, 0, 0, 0, 0, 255, 64, 0]
        );
        let gray = from_chw(&[0.0, 0.5, 1.0, 2.0], 1, 2, 2, &[], &[]);
        assert_eq!(
            gray.pixels,
            vec![0, 0, 0, 128, 128, 128, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn from_tensor_splits_batch() {
        use candle_core::{Device, Tensor};
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 2, 2))
            .unwrap();
        let t = (t / 8.0)
            .unwrap()
            .to_dtype(candle_core::DType::F16)
            .unwrap();
        let imgs = from_tensor(&t, &[0.0], &[1.0]).unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[1].get(1, 1), [223; 3]); // 7/8 * 255 = 223.1
        let bad = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = from_tensor(&bad, &[], &[]).unwrap_err().to_string();
        assert!(err.contains("expected [B,C,H,W]"), "{err}");
    }

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
        let titled = grid(&rows, 2, &["in", "out", "gt"]);
        assert_eq!(titled.height, g.height + 11);
        assert_eq!(titled.get(2, 2 + 11), [1, 0, 0]);
        assert!(titled.pixels[..(titled.width * 11 * 3) as usize].contains(&0));
        // 96 px tiles: titles at twice the size while all of them fit, else at 1x (whole words,
        // never cut: "predicted" is 9 glyphs, 106 px at 2x)
        let big = vec![vec![RgbImage::new(96, 96, [0; 3]); 2]];
        assert_eq!(grid(&big, 4, &["original", "pasted"]).height, 96 + 8 + 18);
        assert_eq!(
            grid(&big, 4, &["original", "predicted"]).height,
            96 + 8 + 11
        );
    }

    #[test]
    fn upscale_and_blit() {
        let mut img = RgbImage::new(2, 1, [0; 3]);
        img.put(1, 0, [9, 9, 9]);
        let up = img.upscale(3);
        assert_eq!((up.width, up.height), (6, 3));
        assert_eq!(up.get(2, 2), [0; 3]);
        assert_eq!(up.get(3, 0), [9; 3]);
        let mut big = RgbImage::new(4, 4, [1; 3]);
        big.blit(&up, 2, 2); // clipped to 2x2
        assert_eq!(big.get(3, 3), [0; 3]);
        assert_eq!(big.get(1, 1), [1; 3]);
    }

    #[test]
    fn text_draws_inside_its_box() {
        let mut img = RgbImage::new(60, 30, WHITE);
        draw_text(&mut img, 5, 6, "Ab1%", [255, 0, 0], 2);
        let (w, h) = (text_width("Ab1%", 2), 14);
        assert_eq!(w, (4 * 6 - 1) * 2);
        let mut inside = 0;
        for y in 0..img.height {
            for x in 0..img.width {
                let red = img.get(x, y) == [255, 0, 0];
                let in_box = (5..5 + w).contains(&x) && (6..6 + h).contains(&y);
                assert!(!red || in_box, "pixel ({x},{y}) outside the text box");
                inside += red as usize;
            }
        }
        assert!(inside > 50, "{inside}");
    }

    #[test]
    fn plot_has_series_colour_at_data_point() {
        let plot = LinePlot {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            series: vec![
                Series {
                    name: "train".into(),
                    points: vec![(0.0, 1.0), (10.0, 0.5), (20.0, 0.3)],
                },
                Series {
                    name: "eval".into(),
                    points: vec![(0.0, 0.9), (20.0, 0.45), (15.0, f64::NAN)],
                },
            ],
            log_y: false,
        };
        let img = plot.render(320, 240);
        let f = plot.frame(320, 240);
        assert_eq!((f.xa.lo, f.xa.hi, f.ya.lo, f.ya.hi), (0.0, 20.0, 0.2, 1.0));
        let (px, py) = f.pixel(10.0, 0.5);
        assert_eq!(img.get(px as u32, py as u32), series_color(0));
        let (px, py) = f.pixel(20.0, 0.45);
        assert_eq!(img.get(px as u32, py as u32), series_color(1));
        let non_white = img.pixels.chunks(3).filter(|p| *p != WHITE).count();
        assert!(non_white > 2000, "{non_white}");
    }

    #[test]
    fn log_axis_ticks_are_decades() {
        let a = Axis::log(0.003, 2.0);
        assert_eq!((a.lo, a.hi), (-3.0, 1.0));
        let labels: Vec<&str> = a.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, vec!["0.001", "0.01", "0.1", "1", "10"]);
        let lin = Axis::linear(0.13, 0.92);
        let labels: Vec<&str> = lin.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, vec!["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
    }

    #[test]
    fn heatmap_colours_extremes() {
        let v = vec![vec![5.0, 0.0], vec![1.0, 3.0]];
        let labels: Vec<String> = vec!["cat".into(), "dog".into()];
        let img = heatmap(&v, &labels, &labels, "confusion");
        assert!(img.pixels.chunks(3).any(|p| p == viridis(1.0)));
        assert!(img.pixels.chunks(3).any(|p| p == viridis(0.0)));
    }

    #[test]
    #[ignore = "writes example pictures to /tmp for a person to look at"]
    fn example_pictures() {
        let series = (0..3)
            .map(|k| Series {
                name: format!("lr {}e-4", k + 1),
                points: (0..40)
                    .map(|i| {
                        (
                            i as f64 * 50.0,
                            2.0 * (-(i as f64) / (8.0 + 4.0 * k as f64)).exp() + 0.05,
                        )
                    })
                    .collect(),
            })
            .collect();
        let plot = LinePlot {
            title: "SimMIM loss (L1, masked)".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series,
            log_y: false,
        };
        plot.render(640, 400)
            .save_png(Path::new("/tmp/example_plot.png"))
            .unwrap();
        let log = LinePlot {
            log_y: true,
            ..plot
        };
        log.render(640, 400)
            .save_png(Path::new("/tmp/example_plot_log.png"))
            .unwrap();
        let names: Vec<String> = [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vals: Vec<Vec<f64>> = (0..10)
            .map(|r| {
                (0..10)
                    .map(|c| {
                        if r == c {
                            850.0 + r as f64
                        } else {
                            ((r * 7 + c * 3) % 23) as f64
                        }
                    })
                    .collect()
            })
            .collect();
        heatmap(
            &vals,
            &names,
            &names,
            "CIFAR-10 confusion (rows: true, cols: predicted)",
        )
        .save_png(Path::new("/tmp/example_heatmap.png"))
        .unwrap();
        let mut text = RgbImage::new(420, 60, WHITE);
        draw_text(
            &mut text,
            4,
            4,
            "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            BLACK,
            1,
        );
        draw_text(
            &mut text,
            4,
            16,
            "abcdefghijklmnopqrstuvwxyz .,:;-+=_/()%<>[]#",
            BLACK,
            1,
        );
        draw_text(&mut text, 4, 30, "loss 0.4312 lr 1.2e-4", BLACK, 2);
        text.upscale(2)
            .save_png(Path::new("/tmp/example_font.png"))
            .unwrap();
        let tiles: Vec<Vec<RgbImage>> = (0..2)
            .map(|r| {
                (0..3)
                    .map(|c| RgbImage::new(32, 32, [(r * 100) as u8, (c * 80) as u8, 150]))
                    .collect()
            })
            .collect();
        grid(&tiles, 4, &["input", "masked", "recon"])
            .upscale(2)
            .save_png(Path::new("/tmp/example_grid.png"))
            .unwrap();
    }
}
