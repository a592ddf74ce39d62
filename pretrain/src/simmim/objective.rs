//! The SimMIM trainer objective: per-sample seeded masks, masked L1 loss, reconstruction pictures.
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::data::{heldout_images, Batch, DataConfig};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::log::TbWriter;
use mimlab_engine::rng::{rng_for, SharedRng};
use mimlab_engine::run_dir::RunDir;
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::swin_v2::SwinV2Config;

use crate::simmim::mask::{MaskGenerator, SimMimConfig};
use crate::simmim::visualize::{picture_masks, reconstruction_grid};
use crate::simmim::SimMim;

/// Stream tag of training masks: sample `index` of `epoch` uses `rng_for(seed, [epoch, index,
/// MASK_STREAM])`, so a sample's mask does not depend on batch composition or resume point.
pub const MASK_STREAM: u64 = 0x0051_334D;

/// SimMIM pretraining as a trainer [`Objective`].
pub struct SimMimObjective {
    varmap: VarMap,
    model: SimMim,
    gen: MaskGenerator,
    seed: u64,
    rng: SharedRng,
    /// Fixed held-out images `[n, C, H, W]` (CPU) and their masks, for pictures.
    pictures: Option<(Tensor, Tensor)>,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl SimMimObjective {
    /// Builds the model (weights seeded from `seed`) on `device`, the mask generator, and loads
    /// `cfg.num_pictures` held-out images of `data` for reconstruction pictures (none if 0).
    pub fn new(
        model: &SwinV2Config,
        cfg: &SimMimConfig,
        data: &DataConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let rng = SharedRng::new(seed);
        let simmim = SimMim::new(model, cfg, rng.clone(), vb)?;
        let gen = MaskGenerator::for_model(model, cfg)?;
        let pictures = if cfg.num_pictures > 0 {
            let images = heldout_images(data, model.img_size, model.in_chans, cfg.num_pictures)
                .context("loading the reconstruction-picture images")?;
            let masks = picture_masks(&gen, images.dim(0)?, seed, &Device::Cpu)?;
            Some((images, masks))
        } else {
            None
        };
        Ok(Self {
            varmap,
            model: simmim,
            gen,
            seed,
            rng,
            pictures,
            mean: data.aug.mean.clone(),
            std: data.aug.std.clone(),
        })
    }

    /// The SimMIM model.
    pub fn model(&self) -> &SimMim {
        &self.model
    }

    /// The mask generator.
    pub fn mask_generator(&self) -> &MaskGenerator {
        &self.gen
    }

    /// Masks of a batch, `[B, grid, grid]` f32 on `device`, one seeded draw per sample.
    pub fn batch_masks(&self, batch: &Batch, device: &Device) -> Result<Tensor> {
        let g = self.gen.grid();
        let data: Vec<f32> = batch
            .indices
            .iter()
            .flat_map(|&i| {
                let mut rng = rng_for(self.seed, &[batch.epoch as u64, i as u64, MASK_STREAM]);
                self.gen.generate(&mut rng)
            })
            .map(f32::from)
            .collect();
        Ok(Tensor::from_vec(data, (batch.indices.len(), g, g), device)?)
    }
}

impl Objective for SimMimObjective {
    fn name(&self) -> &str {
        "simmim"
    }

    fn loss_name(&self) -> &str {
        "L1 on masked pixels"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng.reseed(seed);
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        let b = batch.images.dim(0)?;
        anyhow::ensure!(
            batch.indices.len() == b,
            "simmim: batch has {b} images but {} indices",
            batch.indices.len()
        );
        let x = batch.images.to_device(device)?;
        let masks = self.batch_masks(batch, device)?;
        let (loss, _, moe) = self.model.forward(&x, &masks, true)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let ratio = masks.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let metrics = vec![("loss".into(), value), ("mask_ratio".into(), ratio)];
        // MoE: the trainer adds aux_loss_weight * sum of the layers' aux losses (architecture.md 6)
        Ok(StepOutput {
            loss,
            aux: moe.aux_losses()?,
            metrics,
        })
    }

    fn log_images(&mut self, step: u64, run_dir: &Path, tb: &mut TbWriter) -> Result<()> {
        let Some((images, masks)) = &self.pictures else {
            return Ok(());
        };
        let dev = self.varmap.all_vars().first().map(|v| v.device().clone());
        let dev = dev.unwrap_or(Device::Cpu);
        let img = reconstruction_grid(
            &self.model,
            &images.to_device(&dev)?,
            &masks.to_device(&dev)?,
            &self.mean,
            &self.std,
            &format!("SimMIM, step {step}"),
        )?;
        let path = RunDir::at(run_dir)
            .pictures()
            .join(format!("recon_step{step}.png"));
        img.save_png(&path)?;
        tb.add_image("recon", &img, step)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::simmim::tiny_setup;
    use mimlab_engine::data::BatchTargets;
    use mimlab_engine::log::{read_events, TbEvent};

    /// Test support for the MoE contract: one `train_step` of `obj` on `batch` (step seed 5),
    /// and the gradient on the variable `gate` of the loss the trainer backpropagates
    /// ([`StepOutput::total_loss`]) and of the step's one auxiliary loss alone.
    pub(crate) fn moe_gate_gradients(
        obj: &mut dyn Objective,
        batch: &Batch,
        gate: &str,
    ) -> (Vec<f32>, Vec<f32>) {
        obj.set_seed(5);
        let out = obj.train_step(batch, &Device::Cpu).unwrap();
        assert_eq!(out.aux.len(), 1, "one MoE auxiliary loss");
        let var = obj.varmap().data().lock().unwrap()[gate].clone();
        let grad = |loss: &Tensor| -> Option<Vec<f32>> {
            let g = loss.backward().unwrap();
            let g = g.get(var.as_tensor())?;
            Some(g.flatten_all().unwrap().to_vec1().unwrap())
        };
        let total = grad(&out.total_loss().unwrap()).expect("no gate gradient");
        // candle prunes a branch multiplied by 0 (weight 0): no gradient is a zero gradient
        let aux = grad(&out.aux[0].value).unwrap_or(vec![0.0; var.elem_count()]);
        (total, aux)
    }

    /// Test support: `with - without == aux` (the gate gradient of a step with the MoE aux
    /// weight w, of the same step with weight 0, and of w * aux alone) to float tolerance, and
    /// `aux != 0`.
    pub(crate) fn assert_aux_gradient(with: &[f32], without: &[f32], aux: &[f32]) {
        let scale = with.iter().chain(aux).fold(0f32, |m, v| m.max(v.abs()));
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
                "gate[{i}]: {} - {} = {d}, aux alone {} (scale {scale})",
                with[i],
                without[i],
                aux[i]
            );
        }
    }

    fn batch(indices: &[usize], epoch: usize) -> Batch {
        let n = indices.len();
        let images = Tensor::randn(0f32, 1.0, (n, 3, 32, 32), &Device::Cpu).unwrap();
        Batch::new(images, BatchTargets::None, indices.to_vec(), epoch).unwrap()
    }

    fn objective(num_pictures: usize) -> SimMimObjective {
        let (model, cfg) = tiny_setup();
        let cfg = SimMimConfig {
            num_pictures,
            ..cfg
        };
        let data = DataConfig {
            root: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data"),
            ..DataConfig::default()
        };
        SimMimObjective::new(&model, &cfg, &data, 11, &Device::Cpu).unwrap()
    }

    #[test]
    fn train_step_metrics_and_per_sample_masks() {
        let mut obj = objective(0);
        assert_eq!(obj.name(), "simmim");
        let out = obj.train_step(&batch(&[3, 7], 1), &Device::Cpu).unwrap();
        let metric = |k: &str| out.metrics.iter().find(|(n, _)| n == k).unwrap().1;
        // 32/8 = 4 -> 16 mask patches, ceil(9.6) = 10 masked: ratio 10/16 exactly.
        assert_eq!(metric("mask_ratio"), 0.625);
        assert_eq!(metric("loss"), out.loss.to_scalar::<f32>().unwrap() as f64);
        assert!(metric("loss") > 0.0);
        // A sample's mask depends on (seed, epoch, index) only, not on its batch.
        let pair = obj.batch_masks(&batch(&[3, 7], 1), &Device::Cpu).unwrap();
        let single = obj.batch_masks(&batch(&[7], 1), &Device::Cpu).unwrap();
        let row = pair
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(row, single.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let other_epoch = obj.batch_masks(&batch(&[7], 2), &Device::Cpu).unwrap();
        assert_ne!(
            row,
            other_epoch.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Every trainable key is official SimMIM layout.
        assert!(obj.varmap().all_vars().len() > 10);
        assert!(obj
            .varmap()
            .data()
            .lock()
            .unwrap()
            .contains_key("decoder.0.weight"));
    }

    #[test]
    fn moe_aux_loss_is_added_and_logged() {
        let (model, cfg) = tiny_setup();
        let model = SwinV2Config {
            moe: mimlab_models::moe::MoeConfig {
                num_experts: 4,
                ..Default::default()
            },
            ..model
        };
        let cfg = SimMimConfig {
            num_pictures: 0,
            ..cfg
        };
        let mut obj =
            SimMimObjective::new(&model, &cfg, &DataConfig::default(), 11, &Device::Cpu).unwrap();
        let b = batch(&[3, 7], 1);
        // the metrics the trainer logs: the objective's, then the aux loss's
        let metrics = obj.train_step(&b, &Device::Cpu).unwrap().into_metrics();
        let metric = |k: &str| metrics.iter().find(|(n, _)| n == k).unwrap().1;
        // nano at 32 px (4 stages): block 1 of stages 2 and 3 are MoE layers
        let names: Vec<&str> = metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss",
                "mask_ratio",
                "moe_aux",
                "moe_drop",
                "moe_load_l0_max",
                "moe_load_l1_max"
            ]
        );
        // the same masks and (re-seeded) noise: loss - moe_aux is the plain masked L1
        obj.set_seed(5);
        let out = obj.train_step(&b, &Device::Cpu).unwrap();
        // the loss the trainer backpropagates and logs as `loss`
        let loss = out.total_loss().unwrap().to_scalar::<f32>().unwrap() as f64;
        let metrics = out.into_metrics();
        let m = |k: &str| metrics.iter().find(|(n, _)| n == k).unwrap().1;
        let x = b.images.clone();
        let masks = obj.batch_masks(&b, &Device::Cpu).unwrap();
        obj.set_seed(5);
        let (l1, _, _) = obj.model.forward(&x, &masks, true).unwrap();
        let l1 = l1.to_scalar::<f32>().unwrap() as f64;
        assert!(m("moe_aux") >= 0.0 && metric("moe_drop") <= 1.0);
        assert!((loss - (l1 + m("moe_aux"))).abs() < 1e-6);
        // the expert biases ([E, 1, n]) get no weight decay, the expert weights do
        let groups = mimlab_engine::optim::param_groups(
            obj.varmap(),
            0.05,
            &obj.no_decay_keywords(),
            &|_| 1.0,
        );
        let wd = |frag: &str| -> Vec<f64> {
            groups
                .iter()
                .filter(|g| g.name.contains(frag))
                .map(|g| g.weight_decay)
                .collect()
        };
        assert!(!wd("batched_fc1_bias").is_empty());
        assert!(wd("batched_fc1_bias").iter().all(|&w| w == 0.0));
        assert!(wd("batched_fc2_bias").iter().all(|&w| w == 0.0));
        assert!(wd("batched_fc1_w").iter().all(|&w| w == 0.05));
    }

    #[test]
    fn moe_gate_gets_the_aux_gradient_without_the_objective_adding_it() {
        // The objective only returns the forward's aux loss; the trainer's total_loss adds it.
        let (model, cfg) = tiny_setup();
        let cfg = SimMimConfig {
            num_pictures: 0,
            ..cfg
        };
        let b = batch(&[3, 7], 1);
        let grads = |weight: f64| {
            let model = SwinV2Config {
                moe: mimlab_models::moe::MoeConfig {
                    num_experts: 4,
                    aux_loss_weight: weight,
                    ..Default::default()
                },
                ..model.clone()
            };
            let mut obj =
                SimMimObjective::new(&model, &cfg, &DataConfig::default(), 11, &Device::Cpu)
                    .unwrap();
            let gate = "encoder.layers.2.blocks.1.mlp._moe_layer.gates.0.wg.weight";
            moe_gate_gradients(&mut obj, &b, gate)
        };
        let (with, aux) = grads(1.0);
        let (without, zero) = grads(0.0);
        assert!(zero.iter().all(|v| *v == 0.0));
        assert_aux_gradient(&with, &without, &aux);
    }

    #[test]
    fn log_images_writes_png_and_tensorboard() {
        let data_root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
        if !data_root.join("fashion-mnist").exists() {
            eprintln!("skipped: no bundled fashion-mnist (run scripts/setup-data.sh)");
            return;
        }
        let mut obj = objective(3);
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TbWriter::create(&dir.path().join("tb")).unwrap();
        obj.log_images(4, dir.path(), &mut tb).unwrap();
        tb.flush().unwrap();
        let png = dir.path().join("pictures/recon_step4.png");
        let img = mimlab_engine::data::decode_image(&png).unwrap();
        // a title bar, column titles, 3 rows of 96 px tiles with 4 px gaps, 4 columns
        use mimlab_engine::picture::{font, text_height, title_band};
        let top =
            text_height(font::TITLE) + 10 + title_band(96, 4, &crate::simmim::visualize::COLUMNS);
        assert_eq!(
            (img.width, img.height),
            (404, (top + 3 * 96 + 4 * 4) as usize)
        );
        let events = read_events(tb.path()).unwrap();
        assert!(events
            .iter()
            .any(|e| matches!(e, TbEvent::Image { tag, step: 4, .. } if tag == "recon")));
    }
}
