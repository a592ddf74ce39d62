//! Benchmark machinery shared by `mimlab bench` and the PyTorch comparison: warm-up and timed
//! iterations, median and spread, peak resident memory per row, the table and its JSON rows.
//!
//! The row *definitions* (which model, which step) live in the binary crate's `src/bench.rs`; this
//! module only measures. Benchmarks measure, tests assert: nothing here judges a number.
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Iteration counts of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iters {
    /// Untimed calls first (allocator, caches, lazily built tables).
    pub warmup: usize,
    /// Timed calls, at least (and at least 1).
    pub timed: usize,
    /// Keep timing (up to [`MAX_TIMED`] calls) until this many seconds were timed; 0 = exactly
    /// `timed` calls. Fast rows get more samples, slow rows stay cheap.
    pub budget_s: f64,
}

/// Most timed calls of a row with a time budget.
pub const MAX_TIMED: usize = 20;

/// One measured row; `scripts/bench_pytorch.py` writes the same fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `preset/task` or `layer/variant`, e.g. `swinv2_nano/simmim`.
    pub name: String,
    /// Images per iteration.
    pub batch: usize,
    /// Image side in pixels (0 for rows without an image, e.g. a layer on tokens).
    pub img: usize,
    /// Median milliseconds per iteration.
    pub median_ms: f64,
    /// Fastest iteration, ms.
    pub min_ms: f64,
    /// Slowest iteration, ms.
    pub max_ms: f64,
    /// Timed iterations.
    pub iters: usize,
    /// `batch / median`.
    pub images_per_s: f64,
    /// Peak resident set of the process during the row (setup included), MiB.
    pub peak_rss_mib: f64,
    /// Peak device memory during the row (setup included), MiB, on a GPU
    /// ([`crate::device::peak_device_memory_mib`]; PyTorch: `torch.cuda.max_memory_allocated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    /// Floating-point operations of one iteration, in GFLOP, where the row knows them: a
    /// model's analytic count (2 per multiply-add; a training step 3x the forward, the backward
    /// computing two products per forward product) or a [`GEMM_PREFIX`] row's `2 m n k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflop: Option<f64>,
}

/// Name prefix of the rows that time one large matrix product: the machine's GEMM peak, which
/// [`format_table`] gives every row with a FLOP count as a fraction of.
pub const GEMM_PREFIX: &str = "gemm/";

impl Row {
    /// GFLOP/s at the median time, where the row has a FLOP count.
    pub fn gflop_per_s(&self) -> Option<f64> {
        self.gflop.map(|g| g / (self.median_ms / 1e3))
    }

    /// The text `--filter` matches: `name img=IMG batch=B` (e.g. `swinv2_nano/simmim img=64 batch=8`).
    pub fn key(name: &str, img: usize, batch: usize) -> String {
        format!("{name} img={img} batch={batch}")
    }
}

/// Median of a non-empty slice (mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `f` `iters.warmup` times untimed, then at least `iters.timed` times and on until
/// `iters.budget_s` seconds were timed (at most [`MAX_TIMED`]); seconds of each timed call.
pub fn time_iters(iters: Iters, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..iters.warmup {
        f()?;
    }
    let mut secs = vec![];
    while secs.len() < iters.timed.max(1)
        || (secs.len() < MAX_TIMED && secs.iter().sum::<f64>() < iters.budget_s)
    {
        let t = Instant::now();
        f()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(secs)
}

/// Returns freed heap to the OS and resets the kernel's peak-RSS mark (`VmHWM`) to the current
/// resident set, so that [`peak_rss_mib`] afterwards reports the peak of what follows.
///
/// `malloc_trim` matters because [`crate::device::tune_allocator`] keeps freed buffers in the
/// process: without it the previous row's buffers would count as this row's baseline. The same
/// for the large blocks [`crate::alloc::CachingAlloc`] keeps.
pub fn reset_peak_rss() {
    crate::alloc::release();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    // Linux >= 4.0: writing 5 to clear_refs resets VmHWM; elsewhere the peak is since start.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set (`VmHWM`) in MiB since start or the last [`reset_peak_rss`]; NaN where
/// `/proc` is missing.
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:").map_or(f64::NAN, |k| k as f64 / 1024.0)
}

/// Current resident set (`VmRSS`) in MiB; NaN where `/proc` is missing.
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:").map_or(f64::NAN, |k| k as f64 / 1024.0)
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Measures one row: resets the peak-memory mark, runs `setup` (build the model, optimizer and
/// inputs; its memory counts, its time does not), then times the step it returns.
pub fn measure<S>(
    name: &str,
    batch: usize,
    img: usize,
    iters: Iters,
    setup: impl FnOnce() -> Result<S>,
) -> Result<Row>
where
    S: FnMut() -> Result<()>,
{
    let ctx = || Row::key(name, img, batch);
    reset_peak_rss();
    let step = setup().with_context(ctx)?;
    let secs = time_iters(iters, step).with_context(ctx)?;
    let med = median(&secs);
    let ms = |s: f64| s * 1e3;
    Ok(Row {
        name: name.to_string(),
        batch,
        img,
        median_ms: ms(med),
        min_ms: ms(secs.iter().copied().fold(f64::INFINITY, f64::min)),
        max_ms: ms(secs.iter().copied().fold(0.0, f64::max)),
        iters: secs.len(),
        images_per_s: batch as f64 / med,
        peak_rss_mib: peak_rss_mib(),
        peak_device_mib: None,
        gflop: None,
    })
}

/// The fastest [`GEMM_PREFIX`] row's GFLOP/s: the GEMM peak of the run.
pub fn gemm_peak(rows: &[Row]) -> Option<f64> {
    rows.iter()
        .filter(|r| r.name.starts_with(GEMM_PREFIX))
        .filter_map(Row::gflop_per_s)
        .reduce(f64::max)
}

/// The table `mimlab bench` prints: one line per row, fixed-width columns. Where a row has a
/// FLOP count, `GFLOP/s`; where the run also timed a [`GEMM_PREFIX`] row, `% gemm` = the row's
/// GFLOP/s over the fastest GEMM row's ([`gemm_peak`]). On a GPU a last column holds the peak
/// device memory.
pub fn format_table(rows: &[Row]) -> String {
    let gpu = rows.iter().any(|r| r.peak_device_mib.is_some());
    let flops = rows.iter().any(|r| r.gflop.is_some());
    let peak = gemm_peak(rows);
    let mut s = format!(
        "{:<34} {:>5} {:>4} {:>10} {:>19} {:>9} {:>9}",
        "row", "batch", "img", "median ms", "min-max ms", "images/s", "peak MiB"
    );
    if flops {
        s += &format!(" {:>8}", "GFLOP/s");
    }
    if peak.is_some() {
        s += &format!(" {:>7}", "% gemm");
    }
    if gpu {
        s += &format!(" {:>9}", "GPU MiB");
    }
    s.push('\n');
    for r in rows {
        s += &format!(
            "{:<34} {:>5} {:>4} {:>10.1} {:>19} {:>9.1} {:>9.0}",
            r.name,
            r.batch,
            r.img,
            r.median_ms,
            format!("{:.1}-{:.1}", r.min_ms, r.max_ms),
            r.images_per_s,
            r.peak_rss_mib
        );
        let rate = r.gflop_per_s();
        if flops {
            s += &match rate {
                Some(g) => format!(" {g:>8.1}"),
                None => format!(" {:>8}", "-"),
            };
        }
        if let Some(p) = peak {
            s += &match rate {
                Some(g) => format!(" {:>6.1}%", 100.0 * g / p),
                None => format!(" {:>7}", "-"),
            };
        }
        if gpu {
            s += &format!(" {:>9.0}", r.peak_device_mib.unwrap_or(f64::NAN));
        }
        s.push('\n');
    }
    s
}

fn cpu_device() -> String {
    "cpu".into()
}

/// The machine-readable form (`--json`): `{"threads": N, "tool": "mimlab", "rows": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `mimlab` or `pytorch`.
    pub tool: String,
    /// Where the rows ran: `cpu`, or `cuda` with the GPU's name (`cuda: NVIDIA H200`).
    #[serde(default = "cpu_device")]
    pub device: String,
    /// Compute threads used.
    pub threads: usize,
    /// Measured rows, in table order.
    pub rows: Vec<Row>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn measure_counts_iterations_and_reports_memory() -> Result<()> {
        let mut calls = 0;
        let row = measure(
            "test/row",
            4,
            32,
            Iters {
                warmup: 2,
                timed: 3,
                budget_s: 0.0,
            },
            || {
                Ok(|| {
                    calls += 1;
                    Ok(())
                })
            },
        )?;
        assert_eq!(calls, 5);
        assert_eq!(row.iters, 3);
        assert!(row.min_ms <= row.median_ms && row.median_ms <= row.max_ms);
        assert!(row.images_per_s > 0.0);
        if cfg!(target_os = "linux") {
            assert!(row.peak_rss_mib > 0.0);
        }
        Ok(())
    }

    fn row(name: &str, median_ms: f64, gflop: Option<f64>) -> Row {
        Row {
            name: name.into(),
            batch: 8,
            img: 64,
            median_ms,
            min_ms: median_ms,
            max_ms: median_ms,
            iters: 3,
            images_per_s: 8e3 / median_ms,
            peak_rss_mib: 100.0,
            peak_device_mib: None,
            gflop,
        }
    }

    #[test]
    fn table_gives_flop_rows_their_share_of_the_fastest_gemm_row() {
        let rows = [
            // 17.18 GFLOP in 100 ms and 200 GFLOP in 1 s: 171.8 and 200 GFLOP/s, peak 200
            row("gemm/matmul_2048", 100.0, Some(17.18)),
            row("gemm/linear_2048", 1000.0, Some(200.0)),
            // 60 GFLOP in 500 ms = 120 GFLOP/s = 60% of the peak
            row("swinv2_nano/simmim", 500.0, Some(60.0)),
            row("mlp/dense", 10.0, None),
        ];
        assert_eq!(gemm_peak(&rows), Some(200.0));
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("GFLOP/s  % gemm"), "{t}");
        assert!(lines[1].ends_with("171.8   85.9%"), "{t}");
        assert!(lines[3].ends_with("120.0   60.0%"), "{t}");
        assert!(lines[4].ends_with("-       -"), "{t}");
        // no FLOP counts: the columns are left out; FLOP counts without a GEMM row: no share
        assert!(!format_table(&rows[3..]).contains("GFLOP/s"));
        let t = format_table(&rows[2..]);
        assert!(t.contains("GFLOP/s") && !t.contains("% gemm"), "{t}");
        assert_eq!(gemm_peak(&rows[2..]), None);
    }

    #[test]
    fn rows_without_a_flop_count_read_and_write_the_old_schema() -> Result<()> {
        // scripts/bench_pytorch.py writes no `gflop`; such a row reads as None and writes back
        // without the key
        let json = r#"{"name": "x/y", "batch": 8, "img": 64, "median_ms": 2.0, "min_ms": 1.0,
            "max_ms": 3.0, "iters": 3, "images_per_s": 4000.0, "peak_rss_mib": 10.0}"#;
        let r: Row = serde_json::from_str(json)?;
        assert_eq!(r.gflop, None);
        assert!(!serde_json::to_string(&r)?.contains("gflop"));
        let g = Row {
            gflop: Some(1.5),
            ..r
        };
        let back: Row = serde_json::from_str(&serde_json::to_string(&g)?)?;
        assert_eq!(back, g);
        Ok(())
    }

    #[test]
    fn peak_rss_reset_forgets_an_earlier_allocation() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // touch 256 MiB, free it, reset: the new peak must be well below the old one
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        let before = peak_rss_mib();
        drop(big);
        reset_peak_rss();
        let after = peak_rss_mib();
        assert!(before - after > 128.0, "before {before} after {after}");
    }
}
