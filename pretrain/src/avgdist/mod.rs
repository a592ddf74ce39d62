//! AvgDist (SimMIM paper Sec. 3, architecture.md 4): the mean Euclidean distance from each masked
//! pixel to its nearest visible pixel, averaged over random masks of the official mask rule.
pub mod distance;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use crate::avgdist::distance::distance_transform;
use crate::simmim::mask::{MaskGenerator, MaskStrategy};
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::picture::{Band, BandAxis, Heatmap, LinePlot, RgbImage, Series};
use mimlab_engine::rng::rng_for;

/// Stream tag of AvgDist mask draws.
const AVGDIST_STREAM: u64 = 0xA7D1;

/// AvgDist of one `height x width` pixel mask (1 = masked): the mean over masked pixels of the
/// distance to the nearest visible pixel. `None` when no pixel is visible (undefined); `Some(0)`
/// when nothing is masked.
pub fn avgdist_of_mask(mask_pixels: &[u8], height: usize, width: usize) -> Option<f64> {
    let visible: Vec<bool> = mask_pixels.iter().map(|&m| m == 0).collect();
    if !visible.iter().any(|&v| v) {
        return None;
    }
    let dist = distance_transform(&visible, height, width);
    let (sum, n) = dist
        .iter()
        .zip(&visible)
        .filter(|(_, &v)| !v)
        .fold((0.0, 0usize), |(s, n), (d, _)| (s + d, n + 1));
    Some(if n == 0 { 0.0 } else { sum / n as f64 })
}

/// AvgDist of one (mask patch size, ratio, strategy) combination.
#[derive(Debug, Clone, PartialEq)]
pub struct AvgDistRow {
    /// Side of one masked square in pixels.
    pub mask_patch_size: usize,
    /// Requested mask ratio.
    pub ratio: f64,
    /// Mask placement.
    pub strategy: MaskStrategy,
    /// Mean AvgDist over the sampled masks, in pixels.
    pub avgdist: f64,
    /// Sample standard deviation of the per-mask AvgDist.
    pub std: f64,
    /// Number of masks drawn.
    pub samples: usize,
}

/// Result of [`avgdist_table`]: rows in (patch size, ratio, strategy) order and one message per
/// skipped combination.
#[derive(Debug, Clone, Default)]
pub struct AvgDistTable {
    /// Computed combinations.
    pub rows: Vec<AvgDistRow>,
    /// Why a combination was skipped (size does not divide, everything masked, bad ratio).
    pub warnings: Vec<String>,
}

/// For every (patch size, ratio, strategy): mean and std over `samples` seeded masks of
/// [`avgdist_of_mask`], masks from [`MaskGenerator`] at model patch 1 (pixel resolution).
/// Combinations that cannot be computed are skipped with a warning. Parallel over combinations.
pub fn avgdist_table(
    img_size: usize,
    patch_sizes: &[usize],
    ratios: &[f64],
    strategies: &[MaskStrategy],
    samples: usize,
    seed: u64,
) -> Result<AvgDistTable> {
    ensure!(samples > 0, "avgdist: samples must be positive");
    ensure!(img_size > 0, "avgdist: img_size must be positive");
    let combos: Vec<(usize, f64, MaskStrategy)> = patch_sizes
        .iter()
        .flat_map(|&p| {
            ratios
                .iter()
                .flat_map(move |&r| strategies.iter().map(move |&s| (p, r, s)))
        })
        .collect();
    let results: Vec<std::result::Result<AvgDistRow, String>> = combos
        .par_iter()
        .map(|&(p, ratio, strategy)| avgdist_row(img_size, p, ratio, strategy, samples, seed))
        .collect();
    let mut table = AvgDistTable::default();
    for r in results {
        match r {
            Ok(row) => table.rows.push(row),
            Err(w) => table.warnings.push(w),
        }
    }
    Ok(table)
}

fn avgdist_row(
    img: usize,
    p: usize,
    ratio: f64,
    strategy: MaskStrategy,
    samples: usize,
    seed: u64,
) -> std::result::Result<AvgDistRow, String> {
    let skip = |why: String| format!("skipped patch {p}, ratio {ratio}, {strategy}: {why}");
    let gen = MaskGenerator::new(img, p, 1, ratio, strategy).map_err(|e| skip(format!("{e:#}")))?;
    let r = gen.mask_patches_per_side();
    if gen.mask_count() >= r * r {
        return Err(skip("every pixel is masked, AvgDist is undefined".into()));
    }
    let strategy_id = strategy as u64;
    let values: Vec<f64> = (0..samples)
        .map(|s| {
            let mut rng = rng_for(
                seed,
                &[
                    AVGDIST_STREAM,
                    p as u64,
                    ratio.to_bits(),
                    strategy_id,
                    s as u64,
                ],
            );
            let m = gen.generate(&mut rng);
            // At least one mask patch is visible (checked above), so AvgDist is defined.
            avgdist_of_mask(&m, img, img).unwrap_or(f64::NAN)
        })
        .collect();
    let (mean, std) = mimlab_engine::stats::mean_sd(&values);
    Ok(AvgDistRow {
        mask_patch_size: p,
        ratio,
        strategy,
        avgdist: mean,
        std,
        samples,
    })
}

/// CSV of the rows; header exactly `mask_patch_size,ratio,strategy,avgdist`.
pub fn avgdist_csv(rows: &[AvgDistRow]) -> String {
    let mut s = String::from("mask_patch_size,ratio,strategy,avgdist\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.6}\n",
            r.mask_patch_size, r.ratio, r.strategy, r.avgdist
        ));
    }
    s
}

/// The SimMIM paper's best AvgDist range, 10-20 px at 192 px images (SimMIM Fig. 3 / Sec. 4.1,
/// architecture.md 4), scaled to `img_size` (AvgDist is a length: the same masks on an image
/// `img_size / 192` as large have AvgDist that much smaller).
pub fn paper_band(img_size: usize) -> (f64, f64) {
    let k = img_size as f64 / 192.0;
    (10.0 * k, 20.0 * k)
}

/// The legend text of [`paper_band`] at `img_size`.
pub fn paper_band_label(img_size: usize) -> String {
    let (lo, hi) = paper_band(img_size);
    if img_size == 192 {
        "SimMIM's best AvgDist, 10-20 px".into()
    } else {
        format!("SimMIM's best 10-20 px at 192 px = {lo:.2}-{hi:.2} px at {img_size} px")
    }
}

/// Writes `dir/avgdist.csv` ([`avgdist_csv`]), `dir/avgdist.png` ([`avgdist_plot`]) and
/// `dir/avgdist_heatmap.png` ([`avgdist_heatmap`]), creating `dir`; returns the CSV path and the
/// picture paths.
pub fn write_avgdist(
    dir: &Path,
    rows: &[AvgDistRow],
    img_size: usize,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv = dir.join("avgdist.csv");
    write_atomic(&csv, avgdist_csv(rows).as_bytes())?;
    let png = dir.join("avgdist.png");
    avgdist_plot(rows, img_size).save_png(&png)?;
    let heat = dir.join("avgdist_heatmap.png");
    avgdist_heatmap(rows, img_size).save_png(&heat)?;
    Ok((csv, vec![png, heat]))
}

/// The (patch size, strategy) pairs of `rows` in first-seen order.
fn curves_of(rows: &[AvgDistRow]) -> Vec<(usize, MaskStrategy)> {
    let mut keys: Vec<(usize, MaskStrategy)> = vec![];
    for r in rows {
        if !keys.contains(&(r.mask_patch_size, r.strategy)) {
            keys.push((r.mask_patch_size, r.strategy));
        }
    }
    keys
}

/// AvgDist vs mask ratio, one line per (patch size, strategy), like the SimMIM paper figure:
/// AvgDist on a log axis (small patches are not squashed), the paper's best range shaded
/// ([`paper_band`]).
pub fn avgdist_plot(rows: &[AvgDistRow], img_size: usize) -> RgbImage {
    let keys = curves_of(rows);
    let multi = keys.iter().any(|k| k.1 != keys[0].1);
    let series = keys
        .iter()
        .map(|&(p, s)| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.mask_patch_size == p && r.strategy == s)
                .map(|r| (r.ratio, r.avgdist))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let name = if multi {
                format!("mask patch {p} px, {s}")
            } else {
                format!("mask patch {p} px")
            };
            Series {
                name,
                points,
                ..Default::default()
            }
        })
        .collect();
    let (lo, hi) = paper_band(img_size);
    LinePlot {
        title: format!("AvgDist vs mask ratio ({img_size} px images)"),
        x_label: "mask ratio".into(),
        y_label: "AvgDist (px, log axis)".into(),
        series,
        log_y: true,
        bands: vec![Band {
            axis: BandAxis::Y,
            lo,
            hi,
            label: paper_band_label(img_size),
        }],
        ..Default::default()
    }
    .render(720, 460)
}

/// AvgDist as a heatmap: a row per mask patch size (and strategy), a column per mask ratio.
pub fn avgdist_heatmap(rows: &[AvgDistRow], img_size: usize) -> RgbImage {
    let keys = curves_of(rows);
    let multi = keys.iter().any(|k| k.1 != keys[0].1);
    let mut ratios: Vec<f64> = rows.iter().map(|r| r.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    ratios.dedup();
    let values = keys
        .iter()
        .map(|&(p, s)| {
            ratios
                .iter()
                .map(|&q| {
                    rows.iter()
                        .find(|r| r.mask_patch_size == p && r.strategy == s && r.ratio == q)
                        .map_or(f64::NAN, |r| r.avgdist)
                })
                .collect()
        })
        .collect();
    Heatmap {
        title: format!("AvgDist (px) at {img_size} px images"),
        values,
        row_labels: keys
            .iter()
            .map(|&(p, s)| {
                if multi {
                    format!("{p} {s}")
                } else {
                    format!("{p}")
                }
            })
            .collect(),
        col_labels: ratios.iter().map(|q| format!("{q}")).collect(),
        row_title: "mask patch (px)".into(),
        col_title: "mask ratio".into(),
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_from(rows: &[&str]) -> (Vec<u8>, usize, usize) {
        let h = rows.len();
        let w = rows[0].len();
        let m = rows
            .iter()
            .flat_map(|r| r.bytes().map(|b| (b == b'#') as u8))
            .collect();
        (m, h, w)
    }

    #[test]
    fn hand_made_masks() {
        // One masked pixel: nearest visible pixel at distance 1.
        let (m, h, w) = mask_from(&["...", ".#.", "..."]);
        assert_eq!(avgdist_of_mask(&m, h, w), Some(1.0));
        // 3x3 masked block in a 5x5 image: centre 2, the 8 others 1 -> 10/9.
        let (m, h, w) = mask_from(&[".....", ".###.", ".###.", ".###.", "....."]);
        assert!((avgdist_of_mask(&m, h, w).unwrap() - 10.0 / 9.0).abs() < 1e-12);
        // 2-wide stripe across a 6-wide image: every masked pixel is 1 from a visible row.
        let (m, h, w) = mask_from(&["......", "######", "######", "......"]);
        assert_eq!(avgdist_of_mask(&m, h, w), Some(1.0));
        // 4-wide stripe: rows at 1 and 2 -> 1.5.
        let (m, h, w) = mask_from(&["...", "###", "###", "###", "###", "..."]);
        assert_eq!(avgdist_of_mask(&m, h, w), Some(1.5));
        // Corner: visible only top-left of 2x2 -> (1 + 1 + sqrt 2) / 3.
        let (m, h, w) = mask_from(&[".#", "##"]);
        assert!((avgdist_of_mask(&m, h, w).unwrap() - (2.0 + 2f64.sqrt()) / 3.0).abs() < 1e-12);
        // Nothing visible: undefined. Nothing masked: 0.
        assert_eq!(avgdist_of_mask(&[1, 1, 1, 1], 2, 2), None);
        assert_eq!(avgdist_of_mask(&[0, 0], 1, 2), Some(0.0));
    }

    #[test]
    fn central_square_equals_closed_form() {
        // Central 4x4-patch square of 8 px patches in 64 px: a 32x32 masked square with a visible
        // frame; distance = 1 + min distance to the square's border, per pixel.
        let t = avgdist_table(64, &[8], &[0.25], &[MaskStrategy::Central], 3, 0).unwrap();
        let mut sum = 0.0;
        for y in 0..32i64 {
            for x in 0..32i64 {
                sum += (1 + y.min(31 - y).min(x).min(31 - x)) as f64;
            }
        }
        let row = &t.rows[0];
        assert!(
            (row.avgdist - sum / 1024.0).abs() < 1e-12,
            "{}",
            row.avgdist
        );
        assert_eq!(row.std, 0.0);
    }

    #[test]
    fn table_skips_and_is_reproducible() {
        let strategies = [MaskStrategy::Random, MaskStrategy::Blockwise];
        let a = avgdist_table(64, &[8, 16, 24], &[0.3, 1.0], &strategies, 4, 7).unwrap();
        // 24 does not divide 64 (2 ratios x 2 strategies) and ratio 1.0 masks everything
        // (patches 8, 16 x 2 strategies): 8 warnings, 4 rows.
        assert_eq!(a.rows.len(), 4);
        assert_eq!(a.warnings.len(), 8);
        assert!(a.warnings.iter().any(|w| w.contains("undefined")));
        assert!(a
            .warnings
            .iter()
            .any(|w| w.contains("simmim.mask_patch_size = 24")));
        let b = avgdist_table(64, &[8, 16, 24], &[0.3, 1.0], &strategies, 4, 7).unwrap();
        assert_eq!(a.rows, b.rows);
        assert!(a
            .rows
            .iter()
            .all(|r| r.avgdist.is_finite() && r.avgdist >= 1.0));
        // Bigger patches at the same ratio -> farther from visible pixels.
        let r8 = a
            .rows
            .iter()
            .find(|r| r.mask_patch_size == 8 && r.strategy == strategies[0]);
        let r16 = a
            .rows
            .iter()
            .find(|r| r.mask_patch_size == 16 && r.strategy == strategies[0]);
        assert!(r16.unwrap().avgdist > r8.unwrap().avgdist);
        let csv = avgdist_csv(&a.rows);
        assert!(csv.starts_with("mask_patch_size,ratio,strategy,avgdist\n8,0.3,random,"));
        assert_eq!(csv.lines().count(), 5);
        let img = avgdist_plot(&a.rows, 64);
        assert_eq!((img.width, img.height), (720, 460));
        let heat = avgdist_heatmap(&a.rows, 64);
        assert!(heat.width >= 220 && heat.height > 100);
        // the paper's band scales with the image: 10-20 px at 192, a third of it at 64
        assert_eq!(paper_band(192), (10.0, 20.0));
        let (lo, hi) = paper_band(64);
        assert!((lo - 10.0 / 3.0).abs() < 1e-12 && (hi - 20.0 / 3.0).abs() < 1e-12);
        assert_eq!(paper_band_label(192), "SimMIM's best AvgDist, 10-20 px");
        assert_eq!(
            paper_band_label(32),
            "SimMIM's best 10-20 px at 192 px = 1.67-3.33 px at 32 px"
        );
    }
}
