//! Recipe, feature distillation (`mimlab distill`): the teacher, its feature cache (when
//! configured), the student objective and the trainer.
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use mimlab_engine::data::{DataLoader, LoaderOptions};
use mimlab_engine::trainer::{TrainSession, TrainSummary};
use mimlab_models::swin_v2::SwinV2Config;

use crate::distill::feature_cache::{config_hash, CacheHeader, FeatureCache, CACHE_VERSION};
use crate::distill::objective::{DistillObjective, Targets};
use crate::distill::{student_map, DistillConfig, Teacher};

/// Distills the frozen teacher at `teacher_path` (run folder or weights file) into `student`
/// (a backbone: `num_classes` is set to 0) on the train split of `session.data`.
pub fn distill(
    session: &TrainSession,
    student: &SwinV2Config,
    cfg: &DistillConfig,
    teacher_path: &Path,
    device: &Device,
) -> Result<TrainSummary> {
    let mut student = student.clone();
    student.num_classes = 0;
    let teacher = Teacher::load(teacher_path, cfg.teacher_model.as_ref(), cfg.whiten, device)?;
    let tcfg = teacher.config().clone();
    mimlab_engine::rank0_eprintln!(
        "teacher: {} ({} params, {}px, {} features)",
        teacher.weights().display(),
        tcfg.num_params(),
        tcfg.img_size,
        tcfg.num_features()
    );

    let dataset = session
        .train_dataset(student.img_size, student.in_chans)
        .context("building the distillation dataset")?;
    mimlab_engine::rank0_eprintln!("data: {}", dataset.describe());
    session.check_batch_size(dataset.as_ref())?;
    let opts = session.loader_options();
    let map = student_map(&student);
    let (loader, targets) = match &cfg.cache_features {
        None => (DataLoader::new(dataset, opts), Targets::OnTheFly(teacher)),
        Some(dir) => {
            // The features depend on: teacher weights + architecture, student input and map,
            // data and augmentation, seed (the fixed crops), whitening.
            let key = serde_json::json!({
                "teacher_model": tcfg,
                "img_size": student.img_size,
                "in_chans": student.in_chans,
                "map": [map.0, map.1],
                "data": session.data,
                "seed": session.run.seed,
                "whiten": cfg.whiten,
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
            let cache = FeatureCache::open_or_build(dir, &build, &teacher, map, header, device)?;
            mimlab_engine::rank0_eprintln!(
                "feature cache: {} ({} samples, fixed crops)",
                dir.display(),
                cache.header.num_samples
            );
            let loader = DataLoader::new(dataset, opts).fixed_augmentation();
            (loader, Targets::Cached(cache))
        }
    };
    let mut objective = DistillObjective::new(&student, cfg, targets, session.run.seed, device)?;
    mimlab_engine::rank0_eprintln!(
        "student: {} params, {:.2} GFLOPs/image (forward), map {}x{}",
        student.num_params(),
        student.flops() as f64 / 1e9,
        map.0,
        map.1
    );
    session.fit(&mut objective, &loader, None)
}
