//! `mimlab distill --config C --teacher RUN_DIR|CHECKPOINT [--set ...] [--resume RUN_DIR]`:
//! feature distillation of the `model:` student from a frozen teacher (architecture.md 5).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mimlab_engine::data::{build_dataset, DataLoader, LoaderOptions, Split};
use mimlab_engine::device::{parse_device, with_cpu_threads};
use mimlab_pretrain::distill::{student_map, Teacher};
use mimlab_pretrain::distill_objective::{DistillObjective, Targets};
use mimlab_pretrain::feature_cache::{config_hash, CacheHeader, FeatureCache, CACHE_VERSION};

use super::ConfigArgs;

/// Arguments of `mimlab distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The teacher: a run folder (SimMIM, distillation or classifier run; newest checkpoint and
    /// its config.yaml) or a weights file (then set distill.teacher_model). Sets distill.teacher.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Continue this run folder from its newest checkpoint (its config.yaml is the config).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
}

/// Loads the experiment, the teacher (and its feature cache) and trains the student.
pub fn run(args: DistillArgs) -> Result<()> {
    let mut exp = super::load_experiment(&args.config, args.resume.as_deref())?;
    if let Some(t) = &args.teacher {
        exp.distill.teacher = Some(t.clone());
    }
    let teacher_path = exp.distill.teacher.clone().context(
        "distill: no teacher: pass --teacher RUN_DIR|CHECKPOINT (or set distill.teacher)",
    )?;
    with_cpu_threads(exp.run.threads, move || -> Result<()> {
        let device = parse_device(&exp.run.device)?;
        let mut student = exp.model.clone();
        student.num_classes = 0;
        let teacher = Teacher::load(
            &teacher_path,
            exp.distill.teacher_model.as_ref(),
            exp.distill.whiten,
            &device,
        )?;
        let tcfg = teacher.config().clone();
        eprintln!(
            "teacher: {} ({} params, {}px, {} features)",
            teacher.weights().display(),
            tcfg.num_params(),
            tcfg.img_size,
            tcfg.num_features()
        );

        let dataset = build_dataset(
            &exp.data,
            Split::Train,
            student.img_size,
            student.in_chans,
            true,
        )
        .context("building the distillation dataset")?;
        eprintln!("data: {}", dataset.describe());
        let opts = super::train_options(&exp);
        let map = student_map(&student);
        let (loader, targets) = match &exp.distill.cache_features {
            None => (DataLoader::new(dataset, opts), Targets::OnTheFly(teacher)),
            Some(dir) => {
                // The features depend on: teacher weights + architecture, student input and map,
                // data and augmentation, seed (the fixed crops), whitening.
                let key = serde_json::json!({
                    "teacher_model": tcfg,
                    "img_size": student.img_size,
                    "in_chans": student.in_chans,
                    "map": [map.0, map.1],
                    "data": exp.data,
                    "seed": exp.run.seed,
                    "whiten": exp.distill.whiten,
                });
                let header = CacheHeader {
                    version: CACHE_VERSION,
                    teacher_weights: teacher.weights().to_path_buf(),
                    config_hash: config_hash(&key.to_string()),
                    num_samples: 0,
                    tokens: 0,
                    channels: 0,
                    crops: false,
                };
                let build = DataLoader::new(
                    dataset.clone(),
                    LoaderOptions {
                        shuffle: false,
                        drop_last: false,
                        ..opts.clone()
                    },
                )
                .fixed_augmentation();
                let cache =
                    FeatureCache::open_or_build(dir, &build, &teacher, map, header, &device)?;
                eprintln!(
                    "feature cache: {} ({} samples, fixed crops)",
                    dir.display(),
                    cache.header.num_samples
                );
                let loader = DataLoader::new(dataset, opts).fixed_augmentation();
                (loader, Targets::Cached(cache))
            }
        };
        let mut objective =
            DistillObjective::new(&student, &exp.distill, targets, exp.run.seed, &device)?;
        eprintln!(
            "student: {} params, {:.2} GFLOPs/image (forward), map {}x{}",
            student.num_params(),
            student.flops() as f64 / 1e9,
            map.0,
            map.1
        );
        super::train_and_report(&mut objective, &exp, args.resume.as_deref(), &loader, None)?;
        Ok(())
    })
}
