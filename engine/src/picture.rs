//! Pictures people look at: RGB images, grids of reconstructions, line plots and heatmaps, all
//! saved as PNG, text in a TrueType font (DejaVu Sans, embedded; see [`font`]).

pub mod boxes;
pub mod font;
mod grid;
mod heatmap;
mod plot;

pub use font::{draw_text, draw_text_vertical, fit_text, text_height, text_width};
pub use grid::{grid, title_band, titled};
pub use heatmap::{CellGrid, Heatmap};
pub use plot::{Band, BandAxis, LinePlot, Series};

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

    /// Blends `c` over (x, y) with opacity `alpha` in [0, 1]; pixels outside are clipped.
    pub fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let a = alpha.clamp(0.0, 1.0);
        let o = self.offset(x as u32, y as u32);
        for (d, s) in self.pixels[o..o + 3].iter_mut().zip(c) {
            *d = (*d as f32 + (s as f32 - *d as f32) * a).round() as u8;
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

/// Draws a line `thick` px wide (Bresenham, square pen).
pub(crate) fn draw_line(
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
    fn blend_mixes_and_clips() {
        let mut img = RgbImage::new(2, 1, [0, 100, 200]);
        img.blend(0, 0, [255, 0, 0], 0.5);
        assert_eq!(img.get(0, 0), [128, 50, 100]);
        img.blend(1, 0, [9, 9, 9], 1.0);
        assert_eq!(img.get(1, 0), [9, 9, 9]);
        img.blend(-1, 0, [9, 9, 9], 1.0);
        img.blend(2, 0, [9, 9, 9], 1.0);
        assert_eq!(img.get(0, 0), [128, 50, 100]);
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
                ..Default::default()
            })
            .collect();
        let plot = LinePlot {
            title: "SimMIM loss (masked L1)".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series,
            ..Default::default()
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
        Heatmap {
            title: "CIFAR-10 confusion".into(),
            values: vals,
            row_labels: names.clone(),
            col_labels: names,
            row_title: "true class".into(),
            col_title: "predicted class".into(),
        }
        .render()
        .save_png(Path::new("/tmp/example_heatmap.png"))
        .unwrap();
        let mut text = RgbImage::new(520, 90, WHITE);
        draw_text(
            &mut text,
            4,
            4,
            "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            BLACK,
            14.0,
        );
        draw_text(
            &mut text,
            4,
            24,
            "abcdefghijklmnopqrstuvwxyz .,:;-+=_/()%<>[]# original AvgDist",
            BLACK,
            14.0,
        );
        draw_text(
            &mut text,
            4,
            48,
            "loss 0.4312 lr 1.2e-4 (masked L1)",
            BLACK,
            24.0,
        );
        text.save_png(Path::new("/tmp/example_font.png")).unwrap();
        let tiles: Vec<Vec<RgbImage>> = (0..2)
            .map(|r| {
                (0..3)
                    .map(|c| RgbImage::new(96, 96, [(r * 100) as u8, (c * 80) as u8, 150]))
                    .collect()
            })
            .collect();
        titled(
            &grid(&tiles, 4, &["original", "masked", "reconstruction"]),
            "SimMIM, step 400, masked L1 0.6442",
        )
        .save_png(Path::new("/tmp/example_grid.png"))
        .unwrap();
    }
}
