//! `mimlab bench`: images/s and peak memory of inference, a finetuning step and a SimMIM
//! pretraining step. The rows and how they run are [`crate::bench`]; the measuring and the table
//! are [`mimlab_engine::bench`].
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mimlab_engine::bench::format_table;
use mimlab_engine::device::{parse_device, set_matmul_precision, Precision};

use crate::bench;

/// Arguments of `mimlab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where the rows run: `cpu`, `cuda` or `cuda:N` (a build with `--features cuda`). On a GPU
    /// each timed call waits for the device, and a column gives the peak device memory.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `f32`, or `bf16`: the matrix products in bfloat16 (autocast, `run.precision`; CUDA only).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Compute threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed iterations per row, exactly (default: at least 3, more for fast rows, within ~2 s).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed warm-up iterations per row.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Run only rows whose `NAME img=IMG batch=B` contains this text (e.g. `nano`, `simmim`,
    /// `img=256`); repeatable, a row runs if it matches any.
    #[arg(long)]
    pub filter: Vec<String>,
    /// One timed iteration, no warm-up (smoke test; numbers are not meaningful).
    #[arg(long)]
    pub quick: bool,
    /// Also write the rows as JSON (the schema `scripts/bench_pytorch.py` writes).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// List the rows that would run, and exit.
    #[arg(long)]
    pub list: bool,
}

/// Runs `mimlab bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let specs = bench::select(&args.filter)?;
    if args.list {
        for s in &specs {
            println!("{}", s.key());
        }
        return Ok(());
    }
    let iters = bench::iters(args.quick, args.warmup, args.iters);
    let dev = parse_device(&args.device)?;
    let precision = match args.precision.as_str() {
        "f32" => Precision::F32,
        "bf16" if !dev.is_cpu() => Precision::Bf16,
        "bf16" => anyhow::bail!("--precision bf16 is for CUDA devices (add --device cuda)"),
        other => anyhow::bail!("--precision: `{other}` is not f32 or bf16"),
    };
    set_matmul_precision(precision);
    let report = bench::run(&specs, args.threads, iters, &dev)?;
    print!("{}", format_table(&report.rows));
    if let Some(p) = &args.json {
        bench::write_json(&report, p)?;
    }
    Ok(())
}
