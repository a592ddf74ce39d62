//! `mimlab metrics coco --gt GT.json --dt DT.json [--per-class]`: COCO box AP/AR of a result file,
//! exactly as pycocotools computes it, printed as one JSON object.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mimlab_finetune::detect::coco_eval::evaluate_files;

/// Metrics subcommands.
#[derive(Debug, Subcommand)]
pub enum MetricsCmd {
    /// COCO box AP of a result file: prints `{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
    /// "AR10", "AR100", "ARs", "ARm", "ARl"}` (fractions; -1 where undefined), equal to
    /// pycocotools' `COCOeval(gt, dt, 'bbox').stats`.
    Coco(CocoArgs),
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
    }
}
