//! FCOS detection as a trainer [`Objective`] (objective stage): builds the detector, computes the
//! loss of a [`Batch`] whose targets are boxes ([`BatchTargets::Boxes`], batch pixels), hands the
//! backbone's MoE aux loss to the trainer, and applies layer-wise lr decay to the backbone only
//! (the neck and head train at the full lr). Evaluation here is the mean loss over a loader; the
//! COCO box AP comes from the detection evaluator.
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use mimlab_engine::data::{Batch, BatchTargets, DataLoader, DetectionDataset, ObjectBox};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::log::TbWriter;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::run_dir::RunDir;
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::checkpoint::LoadReport;

use crate::detect::evaluate::{evaluate_detector, DetEval};
use crate::detect::fcos_loss::{scalar, FcosLosses};
use crate::detect::model::{DetectorConfig, FcosDetector};
use crate::detect::picture::{detection_picture, PictureSpec};
use crate::init::load_backbone_into;
use crate::layer_decay::swin_lr_scale;

/// FCOS finetuning (or training from scratch) of a Swin-V2 detector.
pub struct DetectObjective {
    varmap: VarMap,
    model: FcosDetector,
    depths: Vec<usize>,
    layer_decay: f64,
    rng: SharedRng,
    /// The eval split with its COCO ground truth: evaluation is then COCO box AP, and pictures
    /// of its first images are drawn.
    eval_set: Option<Arc<DetectionDataset>>,
    /// What `log_images` draws.
    pictures: Option<PictureSpec>,
    device: Device,
    /// The last evaluation and the training steps it came after.
    last_eval: Option<(u64, DetEval)>,
    steps: u64,
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
        ensure!(
            layer_decay > 0.0 && layer_decay <= 1.0,
            "finetune.layer_decay must be in (0, 1], got {layer_decay}"
        );
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let rng = SharedRng::new(seed);
        let model = FcosDetector::new(cfg, rng.clone(), vb)?;
        Ok(Self {
            varmap,
            model,
            depths: cfg.backbone.depths.clone(),
            layer_decay,
            rng,
            eval_set: None,
            pictures: None,
            device: device.clone(),
            last_eval: None,
            steps: 0,
        })
    }

    /// Evaluates with COCO box AP on `ds` (the eval split the trainer's eval loader serves) and
    /// draws pictures of its first images.
    pub fn with_coco_eval(mut self, ds: Arc<DetectionDataset>, pictures: PictureSpec) -> Self {
        self.eval_set = Some(ds);
        self.pictures = Some(pictures);
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
        match &self.last_eval {
            Some((s, e)) if *s == self.steps => Ok(e.clone()),
            _ => evaluate_detector(&self.model, loader, ds, device),
        }
    }

    /// Loads a pretrained backbone (any run folder's checkpoint or official / timm file, the
    /// layout detected as for classification) into `backbone.*`; every backbone tensor must
    /// load, the neck and head stay at their init.
    pub fn load_backbone(&self, weights: &Path) -> Result<LoadReport> {
        load_backbone_into(&self.varmap, weights)
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

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn lr_scale(&self, name: &str) -> f64 {
        match name.strip_prefix("backbone.") {
            Some(rest) => swin_lr_scale(rest, &self.depths, self.layer_decay),
            None => 1.0,
        }
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng.reseed(seed);
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        self.steps += 1;
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
        let (Some(ds), Some(spec)) = (&self.eval_set, &self.pictures) else {
            return Ok(());
        };
        let img = detection_picture(&self.model, ds, spec, &self.device)?;
        let dir = RunDir::at(run_dir).pictures();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        img.save_png(&dir.join(format!("detections_step{step}.png")))?;
        tb.add_image("detections", &img, step)
    }

    fn evaluate(&mut self, loader: &DataLoader, device: &Device) -> Result<Vec<(String, f64)>> {
        if let Some(ds) = self.eval_set.clone() {
            let e = evaluate_detector(&self.model, loader, &ds, device)?;
            let rows = e.rows();
            self.last_eval = Some((self.steps, e));
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
