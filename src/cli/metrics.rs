//! `mimlab metrics coco --gt GT.json --dt DT.json [--per-class]`: COCO box AP/AR of a result file,
//! exactly as pycocotools computes it; `mimlab metrics miou --gt GT_DIR --pred PRED_DIR
//! --num-classes N [--ignore-index 255] [--reduce-zero-label]`: mIoU of label-map PNGs exactly as
//! mmsegmentation computes it. Each prints one JSON object.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mimlab_finetune::detect::coco_eval::evaluate_files;
use mimlab_finetune::segment::miou::{evaluate_dirs, MiouConfig};

/// Metrics subcommands.
#[derive(Debug, Subcommand)]
pub enum MetricsCmd {
    /// COCO box AP of a result file: prints `{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
    /// "AR10", "AR100", "ARs", "ARm", "ARl"}` (fractions; -1 where undefined), equal to
    /// pycocotools' `COCOeval(gt, dt, 'bbox').stats`.
    Coco(CocoArgs),
    /// mIoU of predicted label maps: prints `{"mIoU", "aAcc", "mAcc", "IoU": [..], "Acc": [..]}`
    /// (fractions; `null` for a class without pixels on either side, left out of the means),
    /// equal to mmsegmentation's `IoUMetric`.
    Miou(MiouArgs),
}

/// Arguments of `mimlab metrics miou`.
#[derive(Debug, Args)]
pub struct MiouArgs {
    /// Folder of ground-truth label maps (8-bit grey or palette PNGs; the value is the class).
    #[arg(long)]
    pub gt: PathBuf,
    /// Folder of predicted label maps, matched to the ground truth by file name.
    #[arg(long)]
    pub pred: PathBuf,
    /// Number of classes (values 0..N).
    #[arg(long)]
    pub num_classes: usize,
    /// Label value that is not evaluated.
    #[arg(long, default_value_t = 255)]
    pub ignore_index: u32,
    /// ADE20K-style labels: 0 is ignored and every other label shifts down by one.
    #[arg(long)]
    pub reduce_zero_label: bool,
}

/// Arguments of `mimlab metrics coco`.
#[derive(Debug, Args)]
pub struct CocoArgs {
    /// COCO annotation file (the ground truth).
    #[arg(long)]
    pub gt: PathBuf,
    /// COCO result file: a JSON list of `{image_id, category_id, bbox: [x,y,w,h], score}`.
    #[arg(long)]
    pub dt: PathBuf,
    /// Also print `per_class`: a list of `{"id", "name", "AP"}` in ascending category id (AP over
    /// IoU .50:.95, all areas, 100 detections; -1 for a category without GT).
    #[arg(long)]
    pub per_class: bool,
}

/// Runs a metrics subcommand.
pub fn run(cmd: MetricsCmd) -> Result<()> {
    match cmd {
        MetricsCmd::Coco(a) => {
            let stats = evaluate_files(&a.gt, &a.dt)?;
            println!("{}", stats.to_json(a.per_class));
            Ok(())
        }
        MetricsCmd::Miou(a) => {
            let cfg = MiouConfig {
                num_classes: a.num_classes,
                ignore_index: a.ignore_index,
                reduce_zero_label: a.reduce_zero_label,
            };
            let (areas, extra) = evaluate_dirs(&a.gt, &a.pred, &cfg)?;
            if !extra.is_empty() {
                eprintln!(
                    "note: {} prediction(s) in {} have no label map and were not evaluated: {}",
                    extra.len(),
                    a.pred.display(),
                    extra.join(", ")
                );
            }
            println!("{}", areas.summary().to_json());
            Ok(())
        }
    }
}
