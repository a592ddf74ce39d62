//! Recipe, detection (`mimlab finetune` with `finetune.task: detect`, `mimlab eval` on a detection
//! run): the COCO-indexed datasets, the finetuning run (AdamW, the trainer's schedule, layer-wise
//! lr decay on the backbone, COCO AP at every evaluation, pictures), and the reports in
//! `RUN/eval/`: `final.json` (the 12 COCO numbers and per-class AP) and `detections.json` (COCO
//! results format).
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mimlab_engine::data::coco::save_results;
use mimlab_engine::data::{
    open_detection, DataConfig, Dataset, DetTransform, DetectionDataset, Split,
};
use mimlab_engine::fsutil::{ensure_parent, write_atomic};
use mimlab_engine::run_dir::{InitSource, RunDir};
use mimlab_engine::trainer::{Objective, TrainSession};
use mimlab_models::swin_v2::SwinV2Config;

use crate::config::FinetuneConfig;
use crate::dense::{eval_loader, load_trained, report_dir, start_backbone, PictureSpec};
use crate::detect::evaluate::DetEval;
use crate::detect::model::{DetectSection, DetectorConfig};
use crate::detect::objective::DetectObjective;

/// Split `split` of the configured detection dataset at `img_size` (train: scale jitter, crop,
/// flip; eval: keep-aspect resize with its scale recorded).
pub fn detection_dataset(
    data: &DataConfig,
    split: Split,
    img_size: usize,
    in_chans: usize,
    train_aug: bool,
) -> Result<Arc<DetectionDataset>> {
    let t = DetTransform::new(img_size, in_chans, train_aug, &data.det_aug, &data.aug)?;
    let ds = open_detection(data, split, t)
        .with_context(|| format!("opening the {} split of `{}`", split.name(), data.dataset))?;
    if ds.is_empty() {
        bail!("{}: no images", ds.describe());
    }
    Ok(Arc::new(ds))
}

/// Batches are padded to a multiple of this: the backbone's patch size and mmdetection's 32.
fn pad_multiple(model: &SwinV2Config) -> usize {
    let m = model.size_multiple().max(1);
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    m / gcd(m, 32) * 32
}

/// The head's class count must be the dataset's.
fn check_classes(cfg: &DetectorConfig, ds: &DetectionDataset) -> Result<()> {
    let n = ds.categories().len();
    if cfg.head.num_classes != n {
        bail!(
            "detect.head.num_classes is {} but {} has {n} categories ({}): set \
             detect.head.num_classes: {n}",
            cfg.head.num_classes,
            ds.describe(),
            ds.categories().names().join(", ")
        );
    }
    Ok(())
}

/// `mimlab finetune` for detection: trains FPN + FCOS on the backbone (from `init`, or from
/// scratch), with COCO AP at every evaluation, then writes the final report to `RUN/eval/`.
pub fn finetune_detector(
    session: &TrainSession,
    model: &SwinV2Config,
    det: &DetectSection,
    ft: &FinetuneConfig,
    init: Option<&InitSource>,
    device: &Device,
) -> Result<DetEval> {
    let cfg = det.detector(model)?;
    let pad = pad_multiple(model);
    let train_ds = detection_dataset(
        session.data,
        Split::Train,
        model.img_size,
        model.in_chans,
        true,
    )
    .context("building the detection training set")?;
    mimlab_engine::rank0_eprintln!("data: {}", train_ds.describe());
    check_classes(&cfg, &train_ds)?;
    let train_dyn: Arc<dyn Dataset> = train_ds;
    let loader = session.train_loader(train_dyn)?.pad_to_multiple(pad);
    let eval_ds = detection_dataset(
        session.data,
        Split::Eval,
        model.img_size,
        model.in_chans,
        false,
    )
    .context("building the detection eval set")?;
    mimlab_engine::rank0_eprintln!("eval: {}", eval_ds.describe());
    let evals = eval_loader(
        eval_ds.clone(),
        session.data,
        session.train.batch_size,
        session.run.seed,
        pad,
    );

    let spec = PictureSpec::of(session.data);
    let mut objective = DetectObjective::new(&cfg, ft.layer_decay, session.run.seed, device)?
        .with_coco_eval(eval_ds.clone(), spec);
    start_backbone(
        init,
        session.start.resumed().is_some(),
        "neck and head",
        |w| objective.load_backbone(w),
    )?;
    mimlab_engine::rank0_eprintln!(
        "model: FCOS on Swin-V2 ({} backbone params), neck {:?} {} ch, head {} convs x {} ch, {} \
         classes, layer decay {}",
        model.num_params(),
        cfg.neck.kind,
        cfg.neck.channels,
        cfg.head.stacked_convs,
        cfg.head.channels,
        cfg.head.num_classes,
        ft.layer_decay
    );
    let summary = session.fit(&mut objective, &loader, Some(&evals))?;
    let report = objective.report(&evals, &eval_ds, device)?;
    write_report(
        &report,
        &RunDir::at(&summary.run_dir).eval(),
        &eval_ds,
        "final",
    )?;
    Ok(report)
}

/// `mimlab eval` on a detection run: the detector of `src` (a detection run's checkpoint) on the
/// eval split; reports in `out` (default `RUN/eval/`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_detection_weights(
    src: &InitSource,
    model: &SwinV2Config,
    det: &DetectSection,
    data: &DataConfig,
    batch_size: usize,
    seed: u64,
    out: Option<&Path>,
    device: &Device,
) -> Result<DetEval> {
    let cfg = det.detector(model)?;
    let eval_ds = detection_dataset(data, Split::Eval, model.img_size, model.in_chans, false)?;
    check_classes(&cfg, &eval_ds)?;
    let evals = eval_loader(eval_ds.clone(), data, batch_size, seed, pad_multiple(model));
    let mut objective = DetectObjective::new(&cfg, 1.0, seed, device)?;
    load_trained(objective.varmap(), &src.weights, "detector")?;
    let report = objective.report(&evals, &eval_ds, device)?;
    let dir = report_dir(out, &src.weights)?;
    write_report(&report, &dir, &eval_ds, "eval")?;
    Ok(report)
}

/// Writes `DIR/<stem>.json` (the 12 COCO numbers and per-class AP) and `DIR/detections.json`,
/// and prints them.
pub fn write_report(e: &DetEval, dir: &Path, ds: &DetectionDataset, stem: &str) -> Result<()> {
    let json_path = dir.join(format!("{stem}.json"));
    ensure_parent(&json_path)?;
    // the COCO object keeps pycocotools' stat order
    let losses = serde_json::json!({
        "loss": e.losses[0], "loss_cls": e.losses[1], "loss_bbox": e.losses[2],
        "loss_centerness": e.losses[3],
    });
    let json = format!(
        "{{\"coco\": {},\n \"dataset\": {},\n \"losses\": {}}}\n",
        e.stats.to_json(true),
        serde_json::Value::String(ds.describe()),
        losses
    );
    write_atomic(&json_path, json.as_bytes())?;
    let dets = dir.join("detections.json");
    save_results(&dets, &e.results)?;
    eprint!("{}", e.summary());
    mimlab_engine::rank0_eprintln!("wrote {} and {}", json_path.display(), dets.display());
    Ok(())
}
