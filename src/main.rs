//! `mimlab`: one command per job of a self-supervised pretraining study.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;
mod experiment;

#[derive(Debug, Parser)]
#[command(
    name = "mimlab",
    version,
    about = "Self-supervised visual pretraining workbench (Swin-V2, SimMIM)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Inspect experiment configs.
    #[command(subcommand)]
    Config(cli::config::ConfigCmd),
    /// SimMIM pretraining of a Swin-V2 on unlabelled images.
    Pretrain(cli::pretrain::PretrainArgs),
    /// Model facts (parameters, FLOPs) and a forward pass over saved tensors.
    #[command(subcommand)]
    Model(cli::model::ModelCmd),
    /// Reconstruction pictures of a SimMIM run.
    Visualize(cli::visualize::VisualizeArgs),
    /// AvgDist masking analysis over mask patch sizes x ratios x strategies.
    Avgdist(cli::avgdist::AvgDistArgs),
    /// Throughput and peak memory of inference, finetuning and SimMIM steps (see BENCHMARKS.md).
    Bench(cli::bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    mimlab_engine::device::tune_allocator();
    let result: Result<()> = match cli.cmd {
        Cmd::Config(c) => cli::config::run(c),
        Cmd::Pretrain(a) => cli::pretrain::run(a),
        Cmd::Model(c) => cli::model::run(c),
        Cmd::Visualize(a) => cli::visualize::run(a),
        Cmd::Avgdist(a) => cli::avgdist::run(a),
        Cmd::Bench(a) => cli::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
