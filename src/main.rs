//! `mimlab`: one command per job of a self-supervised pretraining study.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod cli;
mod experiment;
mod sweep;

#[derive(Debug, Parser)]
#[command(
    name = "mimlab",
    version,
    about = "Self-supervised visual pretraining workbench (Swin-V2, SimMIM, finetuning)"
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
    /// Classification finetuning of a pretrained backbone (--init), or training from scratch.
    Finetune(cli::finetune::FinetuneArgs),
    /// Top-1/top-5, per-class accuracy and confusion matrix of a classifier on the eval split.
    Eval(cli::eval::EvalArgs),
    /// Metrics of prediction files (COCO box AP exactly as pycocotools).
    #[command(subcommand)]
    Metrics(cli::metrics::MetricsCmd),
    /// Frozen-feature evaluations of a backbone: k-NN and linear probe at several label fractions.
    Probe(cli::probe::ProbeArgs),
    /// Feature distillation: a student Swin-V2 regresses a frozen teacher's whitened features.
    Distill(cli::distill::DistillArgs),
    /// Model facts (parameters, FLOPs) and a forward pass over saved tensors.
    #[command(subcommand)]
    Model(cli::model::ModelCmd),
    /// Reconstruction pictures of a SimMIM run.
    Visualize(cli::visualize::VisualizeArgs),
    /// AvgDist masking analysis over mask patch sizes x ratios x strategies.
    Avgdist(cli::avgdist::AvgDistArgs),
    /// Derived datasets: `data prepare digits-det|trees`.
    #[command(subcommand)]
    Data(cli::data::DataCmd),
    /// Throughput and peak memory of inference, finetuning and SimMIM steps (see BENCHMARKS.md).
    Bench(cli::bench::BenchArgs),
    /// A grid of overrides and seeds over a pipeline of stages, resumable, with a results table.
    Sweep(cli::sweep::SweepArgs),
}

/// Freed large blocks (activations, gradients) are kept for the next step instead of going back to
/// the kernel and faulting in again (`engine/src/alloc.rs`).
#[global_allocator]
static ALLOC: mimlab_engine::alloc::CachingAlloc = mimlab_engine::alloc::CachingAlloc;

fn main() {
    let cli = Cli::parse();
    mimlab_engine::device::tune_allocator();
    // Under `mpirun`, join the MPI group first (data-parallel training, engine/src/dist).
    let group = match mimlab_engine::dist::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::exit(1);
        }
    };
    let result: Result<()> = match cli.cmd {
        Cmd::Config(c) => cli::config::run(c),
        Cmd::Pretrain(a) => cli::pretrain::run(a),
        Cmd::Finetune(a) => cli::finetune::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Metrics(c) => cli::metrics::run(c),
        Cmd::Probe(a) => cli::probe::run(a),
        Cmd::Distill(a) => cli::distill::run(a),
        Cmd::Model(c) => cli::model::run(c),
        Cmd::Visualize(a) => cli::visualize::run(a),
        Cmd::Avgdist(a) => cli::avgdist::run(a),
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::Sweep(a) => cli::sweep::run(a),
        Cmd::Data(c) => cli::data::run(c),
    };
    if let Err(e) = result {
        // no MPI_Finalize: the other ranks may be waiting in a collective; the launcher ends them
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
    drop(group);
}

/// The error and its causes joined by ": " (as `{:#}`), leaving out a cause whose text the
/// error before it already ends with (candle's and safetensors' I/O errors print their source
/// themselves: "I/O error: No space left on device" then "No space left on device" again).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn a_cause_its_wrapper_already_printed_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let wrapped = anyhow::Error::new(io)
            .context("I/O error: No space left on device")
            .context("writing runs/x/step_2.safetensors");
        assert_eq!(
            format!("{wrapped:#}"),
            "writing runs/x/step_2.safetensors: I/O error: No space left on device: No space \
             left on device"
        );
        assert_eq!(
            error_text(&wrapped),
            "writing runs/x/step_2.safetensors: I/O error: No space left on device"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&plain), "outer: inner");
    }
}
