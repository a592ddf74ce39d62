//! Recipe, segmentation (`mimlab finetune` with `finetune.task: segment`, `mimlab eval` on a
//! segmentation run): the datasets through mmseg's pipeline, the finetuning run (AdamW, the
//! trainer's schedule, layer-wise lr decay on the backbone, mIoU at every evaluation, pictures),
//! and the reports in `RUN/eval/`: `final.json` / `eval.json` (mIoU, aAcc, mAcc, per-class IoU and
//! Acc) and, from `mimlab eval`, the predicted label maps `pred/<image stem>.png` (8-bit palette
//! PNGs in the dataset's stored convention, readable by `mimlab metrics miou`).
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mimlab_engine::data::segmentation::encode_label_png;
use mimlab_engine::data::{
    open_segmentation, DataConfig, DataLoader, Dataset, SegTransform, SegmentationDataset, Split,
};
use mimlab_engine::fsutil::{ensure_parent, write_atomic};
use mimlab_engine::log::progress::Progress;
use mimlab_engine::run_dir::{InitSource, RunDir};
use mimlab_engine::trainer::TrainSession;
use mimlab_models::swin_v2::SwinV2Config;

use crate::config::FinetuneConfig;
use crate::dense::{eval_loader, load_trained, report_dir, start_backbone, PictureSpec};
use crate::segment::config::SegmentSection;
use crate::segment::evaluate::{predict_batch, SegEval};
use crate::segment::objective::SegmentObjective;

/// Split `split` of the configured segmentation dataset at `img_size` (train: mmseg's random
/// resize, crop, flip, photometric distortion; eval: the keep-ratio resize).
pub fn segmentation_dataset(
    data: &DataConfig,
    split: Split,
    img_size: usize,
    in_chans: usize,
    train_aug: bool,
) -> Result<Arc<SegmentationDataset>> {
    let t = SegTransform::new(img_size, in_chans, train_aug, &data.seg_aug, &data.aug)?;
    let ds = open_segmentation(data, split, t)
        .with_context(|| format!("opening the {} split of `{}`", split.name(), data.dataset))?;
    if ds.is_empty() {
        bail!("{}: no images", ds.describe());
    }
    Ok(Arc::new(ds))
}

/// The head's class count must be the dataset's.
fn check_classes(section: &SegmentSection, ds: &SegmentationDataset) -> Result<()> {
    let n = ds.classes().len();
    if section.decode_head.num_classes != n {
        bail!(
            "segment.decode_head.num_classes is {} but {} has {n} classes ({}): set \
             segment.decode_head.num_classes: {n}",
            section.decode_head.num_classes,
            ds.describe(),
            ds.classes().join(", ")
        );
    }
    Ok(())
}

/// `mimlab finetune` for segmentation: trains the decode head (and auxiliary head) on the
/// backbone (from `init`, or from scratch), with mIoU at every evaluation, then writes the final
/// report to `RUN/eval/`.
pub fn finetune_segmentor(
    session: &TrainSession,
    model: &SwinV2Config,
    section: &SegmentSection,
    ft: &FinetuneConfig,
    init: Option<&InitSource>,
    device: &Device,
) -> Result<SegEval> {
    let data = session.data;
    let train_ds = segmentation_dataset(data, Split::Train, model.img_size, model.in_chans, true)
        .context("building the segmentation training set")?;
    mimlab_engine::rank0_eprintln!("data: {}", train_ds.describe());
    check_classes(section, &train_ds)?;
    let train_dyn: Arc<dyn Dataset> = train_ds;
    let loader = session
        .train_loader(train_dyn)?
        .pad_to_multiple(model.size_multiple().max(1));
    let eval_ds = segmentation_dataset(data, Split::Eval, model.img_size, model.in_chans, false)
        .context("building the segmentation eval set")?;
    mimlab_engine::rank0_eprintln!("eval: {}", eval_ds.describe());
    let evals = eval_loader(
        eval_ds.clone(),
        data,
        session.train.batch_size,
        session.run.seed,
        model.size_multiple().max(1),
    );
    let spec = PictureSpec::of(data);
    let mut objective =
        SegmentObjective::new(model, section, ft.layer_decay, session.run.seed, device)?
            .with_miou_eval(eval_ds.clone(), spec);
    start_backbone(init, session.start.resumed().is_some(), "heads", |w| {
        objective.load_backbone(w)
    })?;
    let d = &section.decode_head;
    mimlab_engine::rank0_eprintln!(
        "model: {:?} on Swin-V2 ({} backbone params), {} ch, {} classes, aux {}, layer decay {}",
        section.head,
        model.num_params(),
        d.channels,
        d.num_classes,
        section
            .auxiliary_head
            .stage
            .map_or("none".to_string(), |s| format!("on stage {s}")),
        ft.layer_decay
    );
    let summary = session.fit(&mut objective, &loader, Some(&evals))?;
    let report = objective.report(&evals, &eval_ds, device)?;
    write_report(&report, &RunDir::at(&summary.run_dir).eval(), "final")?;
    Ok(report)
}

/// `mimlab eval` on a segmentation run: the segmentor of `src` on the eval split; the report and
/// the predicted label maps in `out` (default `RUN/eval/`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_segmentation_weights(
    src: &InitSource,
    model: &SwinV2Config,
    section: &SegmentSection,
    data: &DataConfig,
    batch_size: usize,
    seed: u64,
    out: Option<&Path>,
    device: &Device,
) -> Result<SegEval> {
    let eval_ds = segmentation_dataset(data, Split::Eval, model.img_size, model.in_chans, false)?;
    check_classes(section, &eval_ds)?;
    let evals = eval_loader(
        eval_ds.clone(),
        data,
        batch_size,
        seed,
        model.size_multiple().max(1),
    );
    let mut objective = SegmentObjective::new(model, section, 1.0, seed, device)?;
    load_trained(
        mimlab_engine::trainer::Objective::varmap(&objective),
        &src.weights,
        "segmentor",
    )?;
    let dir = report_dir(out, &src.weights)?;
    let report = objective.report(&evals, &eval_ds, device)?;
    write_predictions(&objective, &evals, &eval_ds, &dir.join("pred"), device)?;
    write_report(&report, &dir, "eval")?;
    Ok(report)
}

/// Writes the predicted class map of every eval image as `dir/<image stem>.png` at its original
/// size (with `reduce_zero_label`, shifted back to the stored convention: class `c` -> `c + 1`).
fn write_predictions(
    objective: &SegmentObjective,
    loader: &DataLoader,
    ds: &SegmentationDataset,
    dir: &Path,
    device: &Device,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let progress = Progress::new("predictions", ds.len() as u64, 0);
    let shift = u8::from(ds.reduce_zero_label());
    let mut palette = ds.palette().to_vec();
    if shift == 1 {
        palette.insert(0, [0, 0, 0]);
    }
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let labels = batch
            .indices
            .iter()
            .map(|&i| ds.label(i))
            .collect::<Result<Vec<_>>>()?;
        let sizes: Vec<(usize, usize)> = labels.iter().map(|m| (m.height(), m.width())).collect();
        let preds = predict_batch(objective.model(), &batch, &sizes, device)?;
        for ((p, &(h, w)), &i) in preds.iter().zip(&sizes).zip(&batch.indices) {
            let stem = ds
                .image_path(i)
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .with_context(|| format!("eval image {i} has no file name"))?;
            let ids: Vec<u8> = p.iter().map(|&c| c as u8 + shift).collect();
            let path = dir.join(format!("{stem}.png"));
            write_atomic(&path, &encode_label_png(w, h, &ids, &palette)?)?;
        }
        progress.inc(batch.indices.len() as u64);
    }
    progress.finish(&format!(
        "wrote {} predicted label maps to {}",
        ds.len(),
        dir.display()
    ));
    Ok(())
}

/// Writes `DIR/<stem>.json` (mIoU, aAcc, mAcc, per-class IoU and Acc, the classes, the loss) and
/// prints the table.
pub fn write_report(e: &SegEval, dir: &Path, stem: &str) -> Result<()> {
    let path = dir.join(format!("{stem}.json"));
    ensure_parent(&path)?;
    let json = serde_json::to_string_pretty(&e.to_json())? + "\n";
    write_atomic(&path, json.as_bytes())?;
    eprint!("{}", e.summary());
    mimlab_engine::rank0_eprintln!("wrote {}", path.display());
    Ok(())
}
