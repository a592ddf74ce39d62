//! Prints the AvgDist table of the SimMIM paper setting (192 px, random masks) and its wall time.
//! `cargo run -p mimlab-pretrain --example avgdist_table -- [samples] [plot.png]`
use mimlab_pretrain::{avgdist_csv, avgdist_table, MaskStrategy};

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let ratios: Vec<f64> = (1..=9).map(|i| i as f64 / 10.0).collect();
    let strategies = [
        MaskStrategy::Random,
        MaskStrategy::Blockwise,
        MaskStrategy::Central,
    ];
    let t0 = std::time::Instant::now();
    let t = avgdist_table(
        192,
        &[4, 8, 16, 32, 64],
        &ratios,
        &strategies[..1],
        samples,
        0,
    )?;
    let wall = t0.elapsed();
    if let Some(png) = std::env::args().nth(2) {
        mimlab_pretrain::avgdist_plot(&t.rows, 192).save_png(std::path::Path::new(&png))?;
    }
    print!("{}", avgdist_csv(&t.rows));
    for w in &t.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "random: {} rows x {samples} samples in {:.2?}",
        t.rows.len(),
        wall
    );
    let t1 = std::time::Instant::now();
    let t = avgdist_table(192, &[32], &[0.6], &strategies, samples, 0)?;
    for r in &t.rows {
        eprintln!(
            "{} {} {}: {:.4} +- {:.4}",
            r.mask_patch_size, r.ratio, r.strategy, r.avgdist, r.std
        );
    }
    eprintln!("strategies at 32/0.6 in {:.2?}", t1.elapsed());
    Ok(())
}
