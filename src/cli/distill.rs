//! `mimlab distill --config C --teacher RUN_DIR|FILE [--set ...] [--resume RUN_DIR]`:
//! feature distillation of the `model:` student from a frozen teacher (architecture.md 5).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::device::{parse_device, with_cpu_ranks};
use mimlab_pretrain::distill::recipe::distill;

use super::{ConfigArgs, ResumeArgs};

/// Arguments of `mimlab distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The teacher: a run folder (SimMIM, distillation or classifier run; newest checkpoint and
    /// its config.yaml) or a weights file (safetensors or PyTorch .pth/.pt/.bin; then set
    /// distill.teacher_model). Sets distill.teacher.
    #[arg(long, value_name = "RUN_DIR|FILE")]
    pub teacher: Option<PathBuf>,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

/// Loads the experiment and distills the teacher into the student.
pub fn run(args: DistillArgs) -> Result<()> {
    let mut exp =
        super::load_experiment(&args.config, args.resume.resume.as_deref(), &["distill"])?;
    if let Some(t) = &args.teacher {
        exp.distill.teacher = Some(t.clone());
    }
    let teacher = exp
        .distill
        .teacher
        .clone()
        .context("distill: no teacher: pass --teacher RUN_DIR|FILE (or set distill.teacher)")?;
    with_cpu_ranks(
        exp.run.threads,
        exp.run.ranks_to_start(),
        || -> Result<()> {
            let device = parse_device(&exp.run.device)?;
            let student = exp.model.clone();
            let session = super::session(&exp, "distill", &args.resume)?;
            distill(&session, &student, &exp.distill, &teacher, &device)?;
            Ok(())
        },
    )
}
