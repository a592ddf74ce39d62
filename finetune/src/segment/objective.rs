//! Semantic segmentation as a trainer [`Objective`] (objective stage): builds the segmentor,
//! computes the loss of a [`Batch`] whose targets are class maps ([`BatchTargets::Masks`]), hands
//! the backbone's MoE aux loss to the trainer, and applies layer-wise lr decay to the backbone
//! only (the heads train at the full lr). Evaluation is mIoU on the eval split when it is given
//! ([`SegmentObjective::with_miou_eval`]), else the mean loss.
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use mimlab_engine::data::{Batch, DataLoader, SegmentationDataset};
use mimlab_engine::log::TbWriter;
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::checkpoint::LoadReport;
use mimlab_models::swin_v2::SwinV2Config;

use crate::dense::{save_picture, DenseCore, PictureSpec};
use crate::segment::config::SegmentSection;
use crate::segment::evaluate::{batch_masks, evaluate_segmentor, SegEval};
use crate::segment::model::{SegLosses, Segmentor};
use crate::segment::picture::segmentation_picture;

/// Segmentation finetuning (or training from scratch) of a Swin-V2 segmentor.
pub struct SegmentObjective {
    core: DenseCore<SegmentationDataset, SegEval>,
    model: Segmentor,
}

fn scalar(t: &candle_core::Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl SegmentObjective {
    /// Builds the segmentor (weights seeded from `seed`) on `device`; `layer_decay` as the
    /// `finetune.layer_decay` key (1.0 = off).
    pub fn new(
        backbone: &SwinV2Config,
        section: &SegmentSection,
        layer_decay: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let (core, vb) = DenseCore::new(&backbone.depths, layer_decay, seed, device)?;
        let model = Segmentor::new(backbone, section, core.rng.clone(), vb)?;
        Ok(Self { core, model })
    }

    /// Evaluates with mIoU on `ds` (the eval split the trainer's eval loader serves) and draws
    /// pictures of its first images.
    pub fn with_miou_eval(mut self, ds: Arc<SegmentationDataset>, pictures: PictureSpec) -> Self {
        self.core.set_eval(ds, pictures);
        self
    }

    /// The mIoU of the current weights on `loader` over `ds`; the trainer's last one when no
    /// step ran since (the usual end of a run).
    pub fn report(
        &mut self,
        loader: &DataLoader,
        ds: &SegmentationDataset,
        device: &Device,
    ) -> Result<SegEval> {
        self.core
            .report(|| evaluate_segmentor(&self.model, loader, ds, device))
    }

    /// Loads a pretrained backbone into `backbone.*` (the heads stay at their init).
    pub fn load_backbone(&self, weights: &Path) -> Result<LoadReport> {
        self.core.load_backbone(weights)
    }

    /// The segmentor.
    pub fn model(&self) -> &Segmentor {
        &self.model
    }

    fn losses(&self, batch: &Batch, device: &Device, train: bool) -> Result<(SegLosses, StepAux)> {
        let masks = batch_masks(batch)?.to_device(device)?;
        let x = batch.images.to_device(device)?;
        let (out, moe) = self.model.forward(&x, train)?;
        Ok((self.model.loss(&out, &masks)?, moe.aux_losses()?))
    }
}

type StepAux = Vec<mimlab_engine::trainer::AuxLoss>;

impl Objective for SegmentObjective {
    fn name(&self) -> &str {
        "segment"
    }

    fn loss_name(&self) -> &str {
        "per-pixel cross-entropy"
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
        let mut metrics = vec![("loss_seg".to_string(), scalar(&l.main)?)];
        if let Some(a) = &l.aux {
            metrics.push(("loss_aux".to_string(), scalar(a)?));
        }
        Ok(StepOutput {
            loss: l.total,
            aux,
            metrics,
        })
    }

    fn log_images(&mut self, step: u64, run_dir: &Path, tb: &mut TbWriter) -> Result<()> {
        let (Some(ds), Some(spec)) = (&self.core.eval_set, &self.core.pictures) else {
            return Ok(());
        };
        let img = segmentation_picture(&self.model, ds, spec, &self.core.device)?;
        save_picture(&img, "segmentation", step, run_dir, tb)
    }

    fn evaluate(&mut self, loader: &DataLoader, device: &Device) -> Result<Vec<(String, f64)>> {
        if let Some(ds) = self.core.eval_set.clone() {
            let e = evaluate_segmentor(&self.model, loader, &ds, device)?;
            let rows = e.rows();
            self.core.remember(e);
            return Ok(rows);
        }
        let (mut sum, mut n) = (0f64, 0usize);
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let (l, _) = self.losses(&batch, device, false)?;
            let b = batch.indices.len();
            sum += scalar(&l.total)? * b as f64;
            n += b;
        }
        ensure!(
            n > 0,
            "evaluation: {} gave no batches",
            loader.dataset().describe()
        );
        Ok(vec![("loss".into(), sum / n as f64)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::config::HeadKind;
    use candle_core::Tensor;
    use mimlab_engine::data::BatchTargets;

    #[test]
    fn train_step_lr_scales_and_target_errors() -> Result<()> {
        let dev = Device::Cpu;
        let backbone = crate::segment::model::tests::tiny_backbone(Default::default())?;
        let section = crate::segment::model::tests::tiny_section(HeadKind::Upernet);
        let mut obj = SegmentObjective::new(&backbone, &section, 0.9, 0, &dev)?;
        let images = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev)?;
        let masks = Tensor::from_vec(
            (0..2 * 64 * 64)
                .map(|i| (i % 4) as u32 % 3)
                .collect::<Vec<_>>(),
            (2, 64, 64),
            &dev,
        )?;
        let batch = Batch::new(images.clone(), BatchTargets::Masks(masks), vec![0, 1], 0)?;
        let out = obj.train_step(&batch, &dev)?;
        assert!(scalar(&out.loss)?.is_finite() && out.aux.is_empty());
        let names: Vec<&str> = out.metrics.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["loss_seg", "loss_aux"]);
        assert!((obj.lr_scale("backbone.patch_embed.proj.weight") - 0.9f64.powi(5)).abs() < 1e-12);
        assert_eq!(obj.lr_scale("decode_head.conv_seg.weight"), 1.0);
        let bad = Batch::new(
            images,
            BatchTargets::Boxes(vec![vec![], vec![]]),
            vec![0, 1],
            0,
        )?;
        let e = obj
            .train_step(&bad, &dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("segmentation needs class maps"), "{e}");
        Ok(())
    }
}
