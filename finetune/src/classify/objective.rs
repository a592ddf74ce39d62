//! Image classification as a trainer [`Objective`]: Swin-V2 + linear head on pooled features,
//! Mixup/CutMix with label smoothing, soft-target cross-entropy, layer-wise lr decay
//! (architecture.md 7.1), top-1/top-5 evaluation.
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use mimlab_engine::data::{Batch, DataLoader};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::{rng_for, SharedRng};
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::checkpoint::LoadReport;
use mimlab_models::pretrained::Head;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};
use mimlab_pretrain::backbone::load_backbone_weights;
use rand::rngs::StdRng;

use crate::classify::loss::{smoothed_targets, soft_target_cross_entropy};
use crate::classify::metrics::{ClassificationReport, Confusion};
use crate::classify::mixup::Mixup;
use crate::config::FinetuneConfig;
use crate::layer_decay::swin_lr_scale;

/// Stream tag of the per-step Mixup/CutMix draws (`rng_for(step seed, [MIX_STREAM])`).
pub const MIX_STREAM: u64 = 0x00D1_C3B0;

/// Classification finetuning (or training from scratch) of a Swin-V2.
pub struct ClassifyObjective {
    varmap: VarMap,
    model: SwinV2,
    cfg: FinetuneConfig,
    mixup: Mixup,
    classes: usize,
    rng: SharedRng,
    mix_rng: StdRng,
    /// Training batches seen so far, and the report of the last `evaluate` with that count: valid
    /// while no batch has trained since.
    batches: u64,
    last_eval: Option<(u64, ClassificationReport)>,
}

impl ClassifyObjective {
    /// Builds the classifier (weights seeded from `seed`, head of `model.num_classes`) on `device`.
    pub fn new(
        model: &SwinV2Config,
        cfg: &FinetuneConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        ensure!(
            model.num_classes > 0,
            "model.num_classes is 0: a classifier needs the number of classes of the dataset"
        );
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let rng = SharedRng::new(seed);
        let net = SwinV2::new(model, false, rng.clone(), vb)?;
        Ok(Self {
            varmap,
            model: net,
            cfg: cfg.clone(),
            mixup: Mixup::new(cfg, model.num_classes),
            classes: model.num_classes,
            rng,
            mix_rng: rng_for(seed, &[MIX_STREAM]),
            batches: 0,
            last_eval: None,
        })
    }

    /// Loads a pretrained backbone (SimMIM run, FD student, classifier, official/timm file); the
    /// head stays freshly initialized. Every backbone variable must be found.
    pub fn load_backbone(&self, weights: &Path) -> Result<LoadReport> {
        load_backbone_weights(&self.varmap, weights, Head::Reinit)
    }

    /// The classifier.
    pub fn model(&self) -> &SwinV2 {
        &self.model
    }

    /// Top-1/top-5, per-class accuracy and confusion over every batch of the eval `loader` (eval
    /// mode). When the trainer's last evaluation came after the last training batch (the usual
    /// end of a run), its report is returned instead of running the eval set again.
    pub fn report(&mut self, loader: &DataLoader, device: &Device) -> Result<ClassificationReport> {
        match &self.last_eval {
            Some((b, r)) if *b == self.batches => Ok(r.clone()),
            _ => evaluate_classifier(&self.model, self.classes, loader, device).map(|(r, _)| r),
        }
    }
}

/// Eval-mode accuracy of `model` over `loader`: the report and the mean cross-entropy.
pub fn evaluate_classifier(
    model: &SwinV2,
    classes: usize,
    loader: &DataLoader,
    device: &Device,
) -> Result<(ClassificationReport, f64)> {
    let mut m = Confusion::new(classes);
    let (mut loss_sum, mut n) = (0.0, 0usize);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let labels = batch_labels(&batch, loader)?;
        let x = batch.images.to_device(device)?;
        let (logits, _eval_moe) = model.forward(&x, false)?;
        let t = smoothed_targets(&labels, classes, 0.0, &logits)?;
        let loss = soft_target_cross_entropy(&logits, &t)?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * labels.len() as f64;
        n += labels.len();
        m.add(&logits, &labels)?;
    }
    ensure!(
        n > 0,
        "evaluation: {} gave no batches",
        loader.dataset().describe()
    );
    Ok((m.report(), loss_sum / n as f64))
}

fn batch_labels(batch: &Batch, loader: &DataLoader) -> Result<Vec<u32>> {
    let y = batch.labels().with_context(|| {
        format!(
            "{}: classification needs labels",
            loader.dataset().describe()
        )
    })?;
    Ok(y.to_vec1::<u32>()?)
}

impl Objective for ClassifyObjective {
    fn name(&self) -> &str {
        "classify"
    }

    fn loss_name(&self) -> &str {
        "cross-entropy (soft targets)"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn lr_scale(&self, name: &str) -> f64 {
        swin_lr_scale(name, &self.model.config().depths, self.cfg.layer_decay)
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng.reseed(seed);
        self.mix_rng = rng_for(seed, &[MIX_STREAM]);
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        self.batches += 1;
        let labels = batch
            .labels()
            .context("classification needs a labelled dataset (the batch has no labels)")?
            .to_vec1::<u32>()?;
        let (_, _, h, w) = batch.images.dims4()?;
        let p = if self.cfg.mixing() {
            self.mixup.draw(h, w, &mut self.mix_rng)?
        } else {
            crate::classify::mixup::MixParams {
                lam: 1.0,
                cutmix_box: None,
            }
        };
        let (x, targets) = self.mixup.apply(&batch.images, &labels, &p)?;
        let (x, targets) = (x.to_device(device)?, targets.to_device(device)?);
        let (logits, moe) = self.model.forward(&x, true)?;
        let loss = soft_target_cross_entropy(&logits, &targets)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // accuracy against each image's own label (under mixing a lower bound of what it learnt)
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let hits = pred.iter().zip(&labels).filter(|(a, b)| a == b).count();
        let out = vec![
            ("loss".to_string(), value),
            (
                "top1".to_string(),
                100.0 * hits as f64 / labels.len() as f64,
            ),
            ("mix_lambda".to_string(), p.lam),
        ];
        // MoE: the trainer adds the aux loss to the cross-entropy
        Ok(StepOutput {
            loss,
            aux: moe.aux_losses()?,
            metrics: out,
        })
    }

    fn evaluate(&mut self, loader: &DataLoader, device: &Device) -> Result<Vec<(String, f64)>> {
        let (r, loss) = evaluate_classifier(&self.model, self.classes, loader, device)?;
        let metrics = vec![
            ("top1".into(), r.top1),
            ("top5".into(), r.top5),
            ("loss".into(), loss),
        ];
        self.last_eval = Some((self.batches, r));
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use mimlab_engine::data::BatchTargets;
    use std::collections::BTreeSet;

    fn cfg() -> SwinV2Config {
        SwinV2Config {
            preset: None,
            img_size: 16,
            embed_dim: 8,
            depths: vec![2, 1, 2],
            num_heads: vec![1, 2, 2],
            window_size: 2,
            pretrained_window_sizes: vec![0; 3],
            num_classes: 4,
            drop_path_rate: 0.1,
            ..SwinV2Config::preset("swinv2_nano").unwrap()
        }
    }

    #[test]
    fn every_parameter_gets_a_layer_scale_and_every_layer_is_used() -> Result<()> {
        let ft = FinetuneConfig {
            layer_decay: 0.5,
            ..FinetuneConfig::default()
        };
        let obj = ClassifyObjective::new(&cfg(), &ft, 0, &Device::Cpu)?;
        let names: Vec<String> = obj.varmap.data().lock().unwrap().keys().cloned().collect();
        let mut scales = BTreeSet::new();
        for n in &names {
            let s = obj.lr_scale(n);
            scales.insert((-s.log2()).round() as i64);
        }
        // n = 5 blocks: ids 0..=6 -> exponents 6..=0, each used by some parameter
        assert_eq!(
            scales.into_iter().collect::<Vec<_>>(),
            (0..=6).collect::<Vec<_>>()
        );
        assert_eq!(obj.lr_scale("head.weight"), 1.0);
        assert_eq!(obj.lr_scale("patch_embed.proj.weight"), 0.5f64.powi(6));
        assert_eq!(
            obj.lr_scale("layers.1.downsample.reduction.weight"),
            0.5f64.powi(3)
        );
        Ok(())
    }

    #[test]
    fn train_step_is_a_function_of_the_step_seed() -> Result<()> {
        let dev = Device::Cpu;
        let images = Tensor::randn(0f32, 1., (4, 3, 16, 16), &dev)?;
        let labels = BatchTargets::Classes(Tensor::new(&[0u32, 1, 2, 3], &dev)?);
        let batch = Batch::new(images, labels, vec![0, 1, 2, 3], 0)?;
        let ft = FinetuneConfig::default();
        let loss = |step_seed: u64| -> Result<(f64, f64)> {
            let mut obj = ClassifyObjective::new(&cfg(), &ft, 3, &dev)?;
            obj.set_seed(step_seed);
            let out = obj.train_step(&batch, &dev)?;
            let lam = out
                .metrics
                .iter()
                .find(|(k, _)| k == "mix_lambda")
                .unwrap()
                .1;
            Ok((out.loss.to_scalar::<f32>()? as f64, lam))
        };
        let (a, lam_a) = loss(11)?;
        assert_eq!(
            loss(11)?,
            (a, lam_a),
            "same seed, same mixing and drop path"
        );
        let others: Vec<f64> = (12..16).map(|s| loss(s).unwrap().1).collect();
        assert!(
            others.iter().any(|&l| l != lam_a),
            "the mix lambda follows the seed"
        );
        // at init the head is ~0: the loss is close to ln(4) whatever the mixing
        assert!((a - 4f64.ln()).abs() < 0.2, "{a}");
        Ok(())
    }

    #[test]
    fn moe_gate_gets_the_aux_gradient_without_the_objective_adding_it() -> Result<()> {
        // The objective only returns the forward's aux loss; the trainer's total_loss adds it.
        let dev = Device::Cpu;
        let batch = Batch::new(
            Tensor::randn(0f32, 1., (4, 3, 16, 16), &dev)?,
            BatchTargets::Classes(Tensor::new(&[0u32, 1, 2, 3], &dev)?),
            vec![0, 1, 2, 3],
            0,
        )?;
        // cfg(): depths [2, 1, 2], so the one MoE layer is block 1 of stage 2
        let gate = "layers.2.blocks.1.mlp._moe_layer.gates.0.wg.weight";
        let grads = |weight: f64| -> Result<(Vec<f32>, Vec<f32>)> {
            let c = SwinV2Config {
                moe: mimlab_models::moe::MoeConfig {
                    num_experts: 4,
                    aux_loss_weight: weight,
                    ..Default::default()
                },
                ..cfg()
            };
            let mut obj = ClassifyObjective::new(&c, &FinetuneConfig::default(), 3, &dev)?;
            obj.set_seed(5);
            let out = obj.train_step(&batch, &dev)?;
            assert_eq!(out.aux.len(), 1, "one MoE auxiliary loss");
            let var = obj.varmap.data().lock().unwrap()[gate].clone();
            let grad = |loss: &Tensor| -> Result<Option<Vec<f32>>> {
                let g = loss.backward()?;
                let g = g.get(var.as_tensor());
                Ok(g.map(|g| g.flatten_all()?.to_vec1()).transpose()?)
            };
            let total = grad(&out.total_loss()?)?.context("no gate gradient")?;
            // candle prunes a branch multiplied by 0 (weight 0): no gradient is a zero gradient
            let aux = grad(&out.aux[0].value)?.unwrap_or(vec![0.0; var.elem_count()]);
            Ok((total, aux))
        };
        let (with, aux) = grads(1.0)?;
        let (without, zero) = grads(0.0)?;
        assert!(zero.iter().all(|v| *v == 0.0));
        // with - without is the gradient of the aux loss alone, which is not zero
        let scale = with.iter().chain(&aux).fold(0f32, |m, v| m.max(v.abs()));
        let aux_max = aux.iter().fold(0f32, |m, v| m.max(v.abs()));
        // the tolerance below is 1e-5 * scale: the aux gradient must stand far above it
        assert!(
            aux_max > 1e-3 * scale,
            "aux gate gradient {aux_max} (scale {scale})"
        );
        assert_ne!(with, without, "the aux weight changes the gate gradient");
        for i in 0..aux.len() {
            let d = with[i] - without[i];
            assert!(
                (d - aux[i]).abs() <= 1e-5 * scale,
                "gate[{i}]: {d} vs aux alone {} (scale {scale})",
                aux[i]
            );
        }
        Ok(())
    }

    #[test]
    fn a_classifier_needs_classes() {
        let c = SwinV2Config {
            num_classes: 0,
            ..cfg()
        };
        let err = ClassifyObjective::new(&c, &FinetuneConfig::default(), 0, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.num_classes is 0"), "{err}");
    }
}
