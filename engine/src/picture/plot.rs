//! Line plots: linear or log axes with round ticks, one colour per series with markers and
//! optional error bars, shaded bands (e.g. a range a paper recommends), a legend, TrueType text.
use super::font::{draw_text, draw_text_vertical, fit_text, text_height, text_width};
use super::{draw_line, series_color, RgbImage, BLACK, GRAY, LIGHT, WHITE};

/// One named curve of a line plot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y) points in drawing order; non-finite points (and values <= 0 on a log axis) are
    /// skipped.
    pub points: Vec<(f64, f64)>,
    /// Error bar half-heights, one per point (empty: none), drawn as y ± e with caps.
    pub errors: Vec<f64>,
}

/// Which axis a [`Band`] spans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BandAxis {
    /// A vertical strip between two x values.
    #[default]
    X,
    /// A horizontal strip between two y values.
    Y,
}

/// A shaded strip behind the data, with a legend entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Band {
    /// The axis whose values `lo` and `hi` are.
    pub axis: BandAxis,
    /// Lower end, data units.
    pub lo: f64,
    /// Upper end, data units.
    pub hi: f64,
    /// Legend text.
    pub label: String,
}

/// A line plot: axes with ticks, one colour per series, markers, error bars, bands, legend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinePlot {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label of the y axis (drawn vertically left of the tick labels).
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Shaded strips behind the data.
    pub bands: Vec<Band>,
}

/// Band colour: a light tint of the series blue, so data drawn over it stays readable.
const BAND: [u8; 3] = [222, 235, 247];

/// An axis: data range (in log10 units on a log axis) and tick positions with labels.
pub(super) struct Axis {
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) log: bool,
    pub(super) ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis over [lo, hi] widened to round tick values (1, 2, 5 x 10^k steps).
    pub(super) fn linear(lo: f64, hi: f64) -> Axis {
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
        // one notation for every tick: scientific when the step or the largest tick needs it
        let top = (a.abs().max(b.abs()) as f64) * step;
        let sci = step < 1e-3 || top >= 1e5;
        let ticks = (a..=b)
            .map(|k| {
                let v = k as f64 * step;
                let label = if sci {
                    fmt_sci(v, step, top)
                } else {
                    fmt_tick(v, step)
                };
                (v, label)
            })
            .collect();
        Axis {
            lo: a as f64 * step,
            hi: b as f64 * step,
            log: false,
            ticks,
        }
    }

    /// A log axis over positive [lo, hi], widened to whole decades; ticks at the decades, and
    /// at 2 and 5 times them when the axis spans at most two decades.
    pub(super) fn log(lo: f64, hi: f64) -> Axis {
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

    fn of(lo: f64, hi: f64, log: bool) -> Axis {
        if log {
            Axis::log(lo, hi)
        } else {
            Axis::linear(lo, hi)
        }
    }

    /// Position of data value `v` in [0, 1] along the axis.
    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        (v - self.lo) / (self.hi - self.lo)
    }

    /// The data value of a tick position (log10 units on a log axis).
    fn value(&self, t: f64) -> f64 {
        if self.log {
            10f64.powf(t)
        } else {
            t
        }
    }

    /// The data value at the low end.
    fn low(&self) -> f64 {
        self.value(self.lo)
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

/// A tick label in scientific notation ("0" for 0), with the mantissa digits that tell ticks
/// `step` apart at the largest tick `top`, so that all ticks of an axis read alike.
fn fmt_sci(v: f64, step: f64, top: f64) -> String {
    if v.abs() < step * 1e-9 {
        return "0".into();
    }
    let digits = (top.log10().floor() - step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.digits$e}")
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
pub(super) struct Frame {
    pub(super) x0: i64,
    pub(super) y0: i64,
    pub(super) x1: i64,
    pub(super) y1: i64,
    pub(super) xa: Axis,
    pub(super) ya: Axis,
}

/// Pixels between the plot area's border and the data range, so markers stay inside.
const INSET: i64 = 6;

impl Frame {
    /// Pixel of data point (x, y).
    pub(super) fn pixel(&self, x: f64, y: f64) -> (i64, i64) {
        let px = self.x0
            + INSET
            + (self.xa.frac(x) * (self.x1 - self.x0 - 2 * INSET) as f64).round() as i64;
        let py = self.y1
            - INSET
            - (self.ya.frac(y) * (self.y1 - self.y0 - 2 * INSET) as f64).round() as i64;
        (px, py)
    }
}

/// Text sizes of a plot `width` px wide: ticks, labels and legend, title.
fn sizes(width: u32) -> (f32, f32, f32) {
    let k = if width >= 900 { 1.25 } else { 1.0 };
    (
        super::font::SMALL * k,
        super::font::BODY * k,
        super::font::TITLE * k,
    )
}

impl LinePlot {
    /// Points that can be drawn (finite; positive on a log axis), with their error (0: none).
    fn drawable(&self, s: &Series) -> Vec<(f64, f64, f64)> {
        let ok = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
        s.points
            .iter()
            .enumerate()
            .filter(|(_, &(x, y))| ok(x, self.log_x) && ok(y, self.log_y))
            .map(|(i, &(x, y))| {
                let e = s.errors.get(i).copied().filter(|e| e.is_finite());
                (x, y, e.unwrap_or(0.0).abs())
            })
            .collect()
    }

    pub(super) fn frame(&self, width: u32, height: u32) -> Frame {
        let mut xs: Vec<f64> = vec![];
        let mut ys: Vec<f64> = vec![];
        for s in &self.series {
            for (x, y, e) in self.drawable(s) {
                xs.push(x);
                ys.extend([y, y + e]);
                if !self.log_y || y - e > 0.0 {
                    ys.push(y - e);
                }
            }
        }
        for b in &self.bands {
            let (v, log) = match b.axis {
                BandAxis::X => (&mut xs, self.log_x),
                BandAxis::Y => (&mut ys, self.log_y),
            };
            v.extend([b.lo, b.hi].into_iter().filter(|&t| !log || t > 0.0));
        }
        let range = |v: &[f64], log: bool| {
            let (lo, hi) = v
                .iter()
                .filter(|t| t.is_finite())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &t| {
                    (a.min(t), b.max(t))
                });
            if lo.is_finite() {
                (lo, hi)
            } else if log {
                (0.1, 1.0)
            } else {
                (0.0, 1.0)
            }
        };
        let ((xl, xh), (yl, yh)) = (range(&xs, self.log_x), range(&ys, self.log_y));
        let xa = Axis::of(xl, xh, self.log_x);
        let ya = Axis::of(yl, yh, self.log_y);
        let (tick, label, title) = sizes(width);
        let (th, lh, tth) = (
            text_height(tick) as i64,
            text_height(label) as i64,
            text_height(title) as i64,
        );
        let label_w = ya
            .ticks
            .iter()
            .map(|(_, l)| text_width(l, tick))
            .max()
            .unwrap_or(0) as i64;
        let y_title = if self.y_label.is_empty() { 0 } else { lh + 6 };
        let x0 = 8 + y_title + label_w + 6;
        let y0 = 8 + if self.title.is_empty() { 0 } else { tth + 8 };
        let x1 = width as i64 - 14;
        let y1 = height as i64 - 8 - th - 6 - if self.x_label.is_empty() { 0 } else { lh + 6 };
        Frame {
            x0,
            y0,
            x1: x1.max(x0 + 2 * INSET + 1),
            y1: y1.max(y0 + 2 * INSET + 1),
            xa,
            ya,
        }
    }

    /// Renders the plot: bands, axes, ~5 ticks with numeric labels, one colour per series,
    /// markers (when there are few enough points to tell apart), error bars, legend.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let mut img = RgbImage::new(width, height, WHITE);
        let f = self.frame(width, height);
        let (tick, label, title) = sizes(width);
        let th = text_height(tick) as i64;
        let lh = text_height(label) as i64;
        if !self.title.is_empty() {
            let t = fit_text(&self.title, title, width.saturating_sub(16));
            let tx = (width as i64 - text_width(&t, title) as i64) / 2;
            draw_text(&mut img, tx.max(0), 8, &t, BLACK, title);
        }
        if !self.y_label.is_empty() {
            let t = fit_text(&self.y_label, label, (f.y1 - f.y0).max(0) as u32);
            let tw = text_width(&t, label) as i64;
            draw_text_vertical(&mut img, 8, (f.y0 + f.y1 - tw) / 2, &t, BLACK, label);
        }
        if !self.x_label.is_empty() {
            let t = fit_text(&self.x_label, label, (f.x1 - f.x0).max(0) as u32);
            let tx = (f.x0 + f.x1 - text_width(&t, label) as i64) / 2;
            draw_text(&mut img, tx, f.y1 + 6 + th + 6, &t, BLACK, label);
        }
        // Bands, clipped to the plot area.
        for b in &self.bands {
            let (lo, hi) = (b.lo.min(b.hi), b.lo.max(b.hi));
            match b.axis {
                BandAxis::X => {
                    let (pa, _) = f.pixel(lo, f.ya.low());
                    let (pb, _) = f.pixel(hi, f.ya.low());
                    let (a, z) = (pa.max(f.x0 + 1), pb.min(f.x1 - 1));
                    img.fill_rect(a, f.y0 + 1, z - a + 1, f.y1 - f.y0 - 1, BAND);
                }
                BandAxis::Y => {
                    let (_, pa) = f.pixel(f.xa.low(), hi);
                    let (_, pb) = f.pixel(f.xa.low(), lo);
                    let (a, z) = (pa.max(f.y0 + 1), pb.min(f.y1 - 1));
                    img.fill_rect(f.x0 + 1, a, f.x1 - f.x0 - 1, z - a + 1, BAND);
                }
            }
        }
        // Grid lines and tick labels.
        for (v, l) in &f.ya.ticks {
            let (_, py) = f.pixel(f.xa.low(), f.ya.value(*v));
            img.fill_rect(f.x0 + 1, py, f.x1 - f.x0 - 1, 1, LIGHT);
            img.fill_rect(f.x0 - 4, py, 4, 1, BLACK);
            let lw = text_width(l, tick) as i64;
            draw_text(&mut img, f.x0 - 6 - lw, py - th / 2, l, BLACK, tick);
        }
        for (v, l) in &f.xa.ticks {
            let (px, _) = f.pixel(f.xa.value(*v), f.ya.low());
            img.fill_rect(px, f.y0 + 1, 1, f.y1 - f.y0 - 1, LIGHT);
            img.fill_rect(px, f.y1, 1, 4, BLACK);
            let lw = text_width(l, tick) as i64;
            draw_text(&mut img, px - lw / 2, f.y1 + 6, l, BLACK, tick);
        }
        img.stroke_rect(f.x0, f.y0, f.x1 - f.x0 + 1, f.y1 - f.y0 + 1, BLACK);
        // Series: lines, then error bars and markers on top.
        let max_markers = ((f.x1 - f.x0) / 8).max(1) as usize;
        for (i, series) in self.series.iter().enumerate() {
            let color = series_color(i);
            let pts = self.drawable(series);
            let px: Vec<(i64, i64)> = pts.iter().map(|&(x, y, _)| f.pixel(x, y)).collect();
            for w in px.windows(2) {
                draw_line(&mut img, w[0], w[1], color, 2);
            }
            for (&(x, y, e), &(cx, _)) in pts.iter().zip(&px) {
                if e > 0.0 {
                    let top = f.pixel(x, y + e).1;
                    let low = if self.log_y && y - e <= 0.0 {
                        f.y1 - INSET
                    } else {
                        f.pixel(x, y - e).1
                    };
                    img.fill_rect(cx, top, 1, low - top + 1, color);
                    img.fill_rect(cx - 4, top, 9, 1, color);
                    img.fill_rect(cx - 4, low, 9, 1, color);
                }
            }
            if px.len() <= max_markers {
                for &(cx, cy) in &px {
                    img.fill_rect(cx - 2, cy - 2, 5, 5, color);
                }
            }
        }
        self.legend(&mut img, &f, label, lh);
        img
    }

    /// The corner of the plot area (top-right, top-left, bottom-right, bottom-left, in that
    /// order of preference) where a `bw x bh` legend hides the fewest points of the curves
    /// (their points and 8 samples along each segment).
    fn legend_corner(&self, f: &Frame, bw: i64, bh: i64) -> (i64, i64) {
        let mut samples = vec![];
        for s in &self.series {
            let px: Vec<(i64, i64)> = self
                .drawable(s)
                .iter()
                .map(|&(x, y, _)| f.pixel(x, y))
                .collect();
            samples.extend(&px);
            for w in px.windows(2) {
                for k in 1..8 {
                    let t = k as f64 / 8.0;
                    let lerp = |a: i64, b: i64| a + ((b - a) as f64 * t).round() as i64;
                    samples.push((lerp(w[0].0, w[1].0), lerp(w[0].1, w[1].1)));
                }
            }
        }
        let corners = [
            (f.x1 - bw - 4, f.y0 + 4),
            (f.x0 + 5, f.y0 + 4),
            (f.x1 - bw - 4, f.y1 - bh - 4),
            (f.x0 + 5, f.y1 - bh - 4),
        ];
        let hidden = |&(x, y): &(i64, i64)| {
            samples
                .iter()
                .filter(|&&(px, py)| {
                    (x - 3..x + bw + 3).contains(&px) && (y - 3..y + bh + 3).contains(&py)
                })
                .count()
        };
        // min_by_key keeps the first of equal counts: the order above is the preference
        *corners
            .iter()
            .min_by_key(|c| hidden(c))
            .expect("four corners")
    }

    /// Legend inside the plot area, in the corner where it hides the least: a line per named
    /// series, a swatch per band.
    fn legend(&self, img: &mut RgbImage, f: &Frame, size: f32, lh: i64) {
        let mut rows: Vec<(Option<usize>, &str)> = self
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
            .map(|(i, s)| (Some(i), s.name.as_str()))
            .collect();
        rows.extend(
            self.bands
                .iter()
                .filter(|b| !b.label.is_empty())
                .map(|b| (None, b.label.as_str())),
        );
        if rows.is_empty() {
            return;
        }
        let row_h = lh + 3;
        let max_w = ((f.x1 - f.x0) as u32).saturating_sub(40);
        let names: Vec<String> = rows.iter().map(|r| fit_text(r.1, size, max_w)).collect();
        let lw = names.iter().map(|n| text_width(n, size)).max().unwrap_or(0) as i64;
        let (bw, bh) = (lw + 32, rows.len() as i64 * row_h + 6);
        let (bx, by) = self.legend_corner(f, bw, bh);
        img.fill_rect(bx, by, bw, bh, WHITE);
        img.stroke_rect(bx, by, bw, bh, GRAY);
        for (row, ((series, _), name)) in rows.iter().zip(&names).enumerate() {
            let y = by + 4 + row as i64 * row_h;
            match series {
                Some(i) => {
                    let color = series_color(*i);
                    img.fill_rect(bx + 5, y + lh / 2 - 1, 18, 2, color);
                    img.fill_rect(bx + 12, y + lh / 2 - 2, 5, 5, color);
                }
                None => {
                    img.fill_rect(bx + 5, y + 2, 18, lh - 4, BAND);
                    img.stroke_rect(bx + 5, y + 2, 18, lh - 4, GRAY);
                }
            }
            draw_text(img, bx + 27, y, name, BLACK, size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    ..Default::default()
                },
                Series {
                    name: "eval".into(),
                    points: vec![(0.0, 0.9), (20.0, 0.45), (15.0, f64::NAN)],
                    ..Default::default()
                },
            ],
            ..Default::default()
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
        // a learning rate: every tick in the same notation
        let lr = Axis::linear(0.0, 0.002);
        let labels: Vec<&str> = lr.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, vec!["0", "5.0e-4", "1.0e-3", "1.5e-3", "2.0e-3"]);
        // AvgDist at 32 px spans ~1-8 px: one decade with 2 and 5 between.
        let d = Axis::log(1.2, 7.5);
        let labels: Vec<&str> = d.ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, vec!["1", "2", "5", "10"]);
    }

    #[test]
    fn log_x_band_and_error_bars() {
        let plot = LinePlot {
            x_label: "AvgDist (px)".into(),
            y_label: "top-1 (%)".into(),
            series: vec![Series {
                name: "finetune".into(),
                points: vec![(2.0, 70.0), (8.0, 75.0), (30.0, 72.0)],
                errors: vec![1.0, 3.0, 0.5],
            }],
            log_x: true,
            bands: vec![Band {
                axis: BandAxis::X,
                lo: 10.0,
                hi: 20.0,
                label: "10-20 px".into(),
            }],
            ..Default::default()
        };
        let (w, h) = (640, 420);
        let img = plot.render(w, h);
        let f = plot.frame(w, h);
        assert_eq!((f.xa.lo, f.xa.hi), (0.0, 2.0), "decades 1 to 100");
        // log x: 10 sits half way between 1 and 100
        let (p1, _) = f.pixel(1.0, 70.0);
        let (p10, _) = f.pixel(10.0, 70.0);
        let (p100, _) = f.pixel(100.0, 70.0);
        assert!((p10 - p1 - (p100 - p10)).abs() <= 1);
        // the band is shaded between 10 and 20 px, not outside it
        let (b_in, y_mid) = f.pixel(14.0, 66.0);
        assert_eq!(img.get(b_in as u32 + 3, y_mid as u32), BAND);
        let (b_out, _) = f.pixel(40.0, 66.0);
        assert_ne!(img.get(b_out as u32 + 3, y_mid as u32), BAND);
        // the error bar of the middle point reaches y ± 3 in the series colour, and the y
        // range widened to hold it
        assert!(
            f.ya.lo <= 69.0 && f.ya.hi >= 78.0,
            "{} {}",
            f.ya.lo,
            f.ya.hi
        );
        let (ex, ey) = f.pixel(8.0, 78.0);
        assert_eq!(img.get(ex as u32, ey as u32), series_color(0));
        let (ex, ey) = f.pixel(8.0, 72.0);
        assert_eq!(img.get(ex as u32, ey as u32), series_color(0));
    }

    #[test]
    fn the_legend_goes_where_it_hides_no_data() {
        // a curve through the top-right corner: the legend moves to the top left
        let plot = LinePlot {
            series: vec![Series {
                name: "rising".into(),
                points: (0..=20).map(|i| (i as f64, (i * i) as f64)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let f = plot.frame(400, 300);
        let (bx, by) = plot.legend_corner(&f, 80, 20);
        assert_eq!((bx, by), (f.x0 + 5, f.y0 + 4));
        // a falling curve leaves the top right free
        let falling = LinePlot {
            series: vec![Series {
                name: "falling".into(),
                points: (0..20).map(|i| (i as f64, (400 - i * i) as f64)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let f = falling.frame(400, 300);
        assert_eq!(falling.legend_corner(&f, 80, 20), (f.x1 - 84, f.y0 + 4));
    }

    #[test]
    fn every_text_is_drawn_where_its_frame_left_room() {
        // Title band, y title column and x title row all get ink.
        let plot = LinePlot {
            title: "SimMIM: train loss (masked L1)".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![Series {
                name: "simmim loss".into(),
                points: vec![(1.0, 1.0), (2.0, 0.5)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (w, h) = (640u32, 400u32);
        let img = plot.render(w, h);
        let f = plot.frame(w, h);
        let ink = |x0: i64, y0: i64, x1: i64, y1: i64| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| img.get(x as u32, y as u32) != WHITE)
                .count()
        };
        assert!(ink(0, 0, w as i64, f.y0 - 2) > 100, "title");
        assert!(ink(0, f.y0, 8 + 16, f.y1) > 20, "y title");
        assert!(ink(f.x0, f.y1 + 20, f.x1, h as i64) > 20, "x title");
    }
}
