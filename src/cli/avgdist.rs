//! `mimlab avgdist`: the AvgDist masking analysis of SimMIM (architecture.md section 4).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use mimlab_pretrain::avgdist::{avgdist_csv, avgdist_table, write_avgdist};
use mimlab_pretrain::simmim::mask::MaskStrategy;

use super::ConfigArgs;
use crate::experiment::Experiment;

/// Output format on stdout.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    /// Aligned columns, one row per line.
    Plain,
    /// `mask_patch_size,ratio,strategy,avgdist`.
    Csv,
}

/// Arguments of `mimlab avgdist`.
#[derive(Debug, Args)]
pub struct AvgDistArgs {
    /// Image side in pixels.
    #[arg(long, default_value_t = 192)]
    pub img_size: usize,
    /// Mask patch sizes in pixels, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    pub mask_patch_sizes: Vec<usize>,
    /// Mask ratios, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
    )]
    pub ratios: Vec<f64>,
    /// Masking strategies, comma separated: random, blockwise, central.
    #[arg(long, value_delimiter = ',', default_value = "random")]
    pub strategy: Vec<String>,
    /// Random masks averaged per cell.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// The seed of the masks is `run.seed` (`--set run.seed=N`), as in every command.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Folder for avgdist.csv and avgdist.png.
    #[arg(long, value_name = "DIR", default_value = "runs/avgdist")]
    pub out: PathBuf,
    /// Table format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Plain)]
    pub format: Format,
}

fn parse_strategy(s: &str) -> Result<MaskStrategy> {
    Ok(match s.trim() {
        "random" => MaskStrategy::Random,
        "blockwise" => MaskStrategy::Blockwise,
        "central" => MaskStrategy::Central,
        other => bail!("--strategy: unknown `{other}` (expected random, blockwise or central)"),
    })
}

/// Computes the table, prints it, writes CSV and PNG.
pub fn run(a: AvgDistArgs) -> Result<()> {
    let strategies = a
        .strategy
        .iter()
        .map(|s| parse_strategy(s))
        .collect::<Result<Vec<_>>>()?;
    for &r in &a.ratios {
        if !(r > 0.0 && r < 1.0) {
            bail!("--ratios: {r} is outside (0, 1); AvgDist needs masked and visible pixels");
        }
    }
    let table = avgdist_table(
        a.img_size,
        &a.mask_patch_sizes,
        &a.ratios,
        &strategies,
        a.samples,
        Experiment::load(a.config.config.as_deref(), &a.config.sets)?
            .run
            .seed,
    )?;
    for w in &table.warnings {
        eprintln!("warning: {w}");
    }
    let rows = table.rows;
    anyhow::ensure!(
        !rows.is_empty(),
        "no (mask patch size, ratio) pair could be evaluated"
    );
    let csv = avgdist_csv(&rows);
    match a.format {
        Format::Csv => print!("{csv}"),
        Format::Plain => {
            println!(
                "{:>15} {:>6} {:>10} {:>9}",
                "mask_patch_size", "ratio", "strategy", "avgdist"
            );
            for line in csv.lines().skip(1) {
                let f: Vec<&str> = line.split(',').collect();
                println!("{:>15} {:>6} {:>10} {:>9}", f[0], f[1], f[2], f[3]);
            }
        }
    }
    let (csv_path, pngs) = write_avgdist(&a.out, &rows, a.img_size)?;
    let pngs: Vec<String> = pngs.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {} and {}", csv_path.display(), pngs.join(", "));
    Ok(())
}
