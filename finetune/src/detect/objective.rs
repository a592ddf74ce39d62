//! FCOS detection as a trainer [`Objective`] (objective stage): builds the detector, computes the
//! loss of a [`Batch`] whose targets are boxes ([`BatchTargets::Boxes`], batch pixels), hands the
//! backbone's MoE aux loss to the trainer, and applies layer-wise lr decay to the backbone only
//! (the neck and head train at the full lr). Evaluation here is the mean loss over a loader; the
//! COCO box AP comes from the detection evaluator.
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use candle_core::Device;
use candle_nn::VarMap;
use mimlab_engine::data::{Batch, BatchTargets, DataLoader, DetectionDataset, ObjectBox};
use mimlab_engine::log::TbWriter;
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::checkpoint::LoadReport;

use crate::dense::{save_picture, DenseCore, PictureSpec};
use crate::detect::evaluate::{evaluate_detector, DetEval};
use crate::detect::fcos_loss::{scalar, FcosLosses};
use crate::detect::model::{DetectorConfig, FcosDetector};
use crate::detect::picture::detection_picture;

/// FCOS finetuning (or training from scratch) of a Swin-V2 detector.
pub struct DetectObjective {
    core: DenseCore<DetectionDataset, DetEval>,
    model: FcosDetector,
}

/// The boxes of a detection batch, or an error naming what the batch has instead.
pub fn batch_boxes(batch: &Batch) -> Result<&[Vec<ObjectBox>]> {
    match &batch.targets {
        BatchTargets::Boxes(b) | BatchTargets::BoxesAndMasks { boxes: b, .. } => {
            ensure!(
                b.len() == batch.valid_sizes.len(),
                "detection batch: {} box lists for {} images",
                b.len(),
                batch.valid_sizes.len()
            );
            Ok(b)
        }
        BatchTargets::None => bail!("detection needs boxes; the dataset is unlabelled"),
        BatchTargets::Classes(_) => bail!("detection needs boxes; the dataset has class labels"),
        BatchTargets::Masks(_) => bail!("detection needs boxes; the dataset has class maps only"),
    }
}

impl DetectObjective {
    /// Builds the detector (weights seeded from `seed`) on `device`; `layer_decay` as the
    /// `finetune.layer_decay` key (1.0 = off).
    pub fn new(cfg: &DetectorConfig, layer_decay: f64, seed: u64, device: &Device) -> Result<Self> {
        let (core, vb) = DenseCore::new(&cfg.backbone.depths, layer_decay, seed, device)?;
        let model = FcosDetector::new(cfg, core.rng.clone(), vb)?;
        Ok(Self { core, model })
    }

    /// Evaluates with COCO box AP on `ds` (the eval split the trainer's eval loader serves) and
    /// draws pictures of its first images.
    pub fn with_coco_eval(mut self, ds: Arc<DetectionDataset>, pictures: PictureSpec) -> Self {
        self.core.set_eval(ds, pictures);
        self
    }

    /// The COCO evaluation of the current weights on `loader` over `ds`; the trainer's last one
    /// when no step ran since (the usual end of a run).
    pub fn report(
        &mut self,
        loader: &DataLoader,
        ds: &DetectionDataset,
        device: &Device,
    ) -> Result<DetEval> {
        self.core
            .report(|| evaluate_detector(&self.model, loader, ds, device))
    }

    /// Loads a pretrained backbone into `backbone.*` (the neck and head stay at their init).
    pub fn load_backbone(&self, weights: &Path) -> Result<LoadReport> {
        self.core.load_backbone(weights)
    }

    /// The detector.
    pub fn model(&self) -> &FcosDetector {
        &self.model
    }

    fn losses(&self, batch: &Batch, device: &Device, train: bool) -> Result<(FcosLosses, StepAux)> {
        let boxes = batch_boxes(batch)?;
        let x = batch.images.to_device(device)?;
        let (out, moe) = self.model.forward(&x, train)?;
        Ok((self.model.loss(&out, boxes)?, moe.aux_losses()?))
    }
}

type StepAux = Vec<mimlab_engine::trainer::AuxLoss>;

impl Objective for DetectObjective {
    fn name(&self) -> &str {
        "detect"
    }

    fn loss_name(&self) -> &str {
        "FCOS: focal + GIoU + centerness"
    }

    fn varmap(&self) -> &VarMap {
        &self.core.varmap
    }

    fn lr_scale(&self, name: &str) -> f64 {
        self.core.lr_scale(name)
    }

    fn set_seed(&mut self, seed: u64) {
        self.core.rng.reseed(seed);
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        self.core.count_step();
        let (l, aux) = self.losses(batch, device, true)?;
        let metrics = vec![
            ("loss_cls".to_string(), scalar(&l.cls)?),
            ("loss_bbox".to_string(), scalar(&l.bbox)?),
            ("loss_centerness".to_string(), scalar(&l.centerness)?),
            ("num_pos".to_string(), l.num_pos as f64),
        ];
        Ok(StepOutput {
            loss: l.total()?,
            aux,
            metrics,
        })
    }

    fn log_images(&mut self, step: u64, run_dir: &Path, tb: &mut TbWriter) -> Result<()> {
        let (Some(ds), Some(spec)) = (&self.core.eval_set, &self.core.pictures) else {
            return Ok(());
        };
        let img = detection_picture(&self.model, ds, spec, &self.core.device)?;
        save_picture(&img, "detections", step, run_dir, tb)
    }

    fn evaluate(&mut self, loader: &DataLoader, device: &Device) -> Result<Vec<(String, f64)>> {
        if let Some(ds) = self.core.eval_set.clone() {
            let e = evaluate_detector(&self.model, loader, &ds, device)?;
            let rows = e.rows();
            self.core.remember(e);
            return Ok(rows);
        }
        let mut sums = [0f64; 4];
        let mut n = 0usize;
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let (l, _) = self.losses(&batch, device, false)?;
            let b = batch.valid_sizes.len();
            for (s, t) in sums.iter_mut().zip([&l.cls, &l.bbox, &l.centerness]) {
                *s += scalar(t)? * b as f64;
            }
            sums[3] += scalar(&l.total()?)? * b as f64;
            n += b;
        }
        ensure!(
            n > 0,
            "evaluation: {} gave no batches",
            loader.dataset().describe()
        );
        let m = |i: usize| sums[i] / n as f64;
        Ok(vec![
            ("loss".into(), m(3)),
            ("loss_cls".into(), m(0)),
            ("loss_bbox".into(), m(1)),
            ("loss_centerness".into(), m(2)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::fcos_head::FcosHeadConfig;
    use crate::detect::fpn::NeckConfig;
    use candle_core::Tensor;
    use mimlab_models::swin_v2::SwinV2Config;

    fn cfg() -> Result<DetectorConfig> {
        Ok(DetectorConfig {
            backbone: SwinV2Config {
                preset: None,
                img_size: 64,
                embed_dim: 8,
                depths: vec![1, 1, 1, 1],
                num_heads: vec![1, 1, 2, 2],
                pretrained_window_sizes: vec![0, 0, 0, 0],
                ..SwinV2Config::preset("swinv2_nano")?
            },
            neck: NeckConfig {
                channels: 8,
                extra_levels: 1,
                ..NeckConfig::default()
            },
            head: FcosHeadConfig {
                num_classes: 2,
                channels: 8,
                stacked_convs: 1,
                strides: vec![8, 16, 32, 64],
                regress_ranges: vec![[-1.0, 64.0], [64.0, 128.0], [128.0, 256.0], [256.0, 1e8]],
                ..FcosHeadConfig::default()
            },
        })
    }

    #[test]
    fn train_step_lr_scales_and_target_errors() -> Result<()> {
        let dev = Device::Cpu;
        let mut obj = DetectObjective::new(&cfg()?, 0.9, 0, &dev)?;
        let images = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?;
        let o = |xyxy, class| ObjectBox {
            xyxy,
            class,
            crowd: false,
        };
        let boxes = vec![vec![o([8.0, 8.0, 40.0, 30.0], 1)], vec![]];
        let batch = Batch::new(images.clone(), BatchTargets::Boxes(boxes), vec![0, 1], 0)?;
        let out = obj.train_step(&batch, &dev)?;
        assert!(scalar(&out.loss)?.is_finite() && out.aux.is_empty());
        let names: Vec<&str> = out.metrics.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["loss_cls", "loss_bbox", "loss_centerness", "num_pos"]
        );
        assert!(out.metrics[3].1 > 0.0);
        // backbone: decayed by depth (n = 4 blocks: patch_embed 0.9^5); neck/head: 1
        assert!((obj.lr_scale("backbone.patch_embed.proj.weight") - 0.9f64.powi(5)).abs() < 1e-12);
        assert_eq!(obj.lr_scale("bbox_head.conv_cls.weight"), 1.0);
        assert_eq!(obj.lr_scale("neck.fpn_convs.0.conv.weight"), 1.0);
        let labels = Tensor::new(&[0u32, 1], &dev)?;
        let bad = Batch::new(images, BatchTargets::Classes(labels), vec![0, 1], 0)?;
        let e = obj
            .train_step(&bad, &dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("detection needs boxes"), "{e}");
        Ok(())
    }
}
