//! The feature-distillation trainer objective: student + projector trained, teacher frozen (its
//! variables are not in the objective's `VarMap`, so the optimizer never sees them; it runs with
//! `train = false` and its output is detached), targets on the fly or from a [`FeatureCache`].
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::data::Batch;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::trainer::{Objective, StepOutput};
use mimlab_models::swin_v2::SwinV2Config;

use crate::distill::feature_cache::FeatureCache;
use crate::distill::{student_map, Distill, DistillConfig, Teacher};

/// Where the regression targets come from.
pub enum Targets {
    /// Teacher forward on every batch (the default).
    OnTheFly(Teacher),
    /// Features computed once per sample on fixed crops.
    Cached(FeatureCache),
}

impl Targets {
    /// Teacher channels.
    pub fn channels(&self) -> usize {
        match self {
            Targets::OnTheFly(t) => t.config().num_features(),
            Targets::Cached(c) => c.header.channels,
        }
    }
}

/// Feature distillation as a trainer [`Objective`].
pub struct DistillObjective {
    varmap: VarMap,
    model: Distill,
    targets: Targets,
    map: (usize, usize),
    rng: SharedRng,
}

impl DistillObjective {
    /// The student from `student` (with `cfg.shared_cpb` applied, head removed), seeded from
    /// `seed`, and the projector to the targets' width.
    pub fn new(
        student: &SwinV2Config,
        cfg: &DistillConfig,
        targets: Targets,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut scfg = student.clone();
        scfg.num_classes = 0;
        scfg.shared_cpb |= cfg.shared_cpb;
        let varmap = VarMap::new();
        let rng = SharedRng::new(seed);
        let model = Distill::new(
            &scfg,
            targets.channels(),
            cfg.smooth_l1_beta,
            cfg.student_init.as_deref(),
            rng.clone(),
            &varmap,
            seed,
            device,
        )?;
        let map = student_map(&scfg);
        if let Targets::Cached(c) = &targets {
            ensure!(
                c.header.tokens == map.0 * map.1,
                "feature cache has {} tokens per sample, the student map is {}x{}",
                c.header.tokens,
                map.0,
                map.1
            );
        }
        Ok(Self {
            varmap,
            model,
            targets,
            map,
            rng,
        })
    }

    /// The student and projector.
    pub fn model(&self) -> &Distill {
        &self.model
    }

    /// Where the targets come from.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Targets of a batch `[B, L, C_t]` on `device` (already on `device` images `x`).
    pub fn batch_targets(&self, batch: &Batch, x: &Tensor, device: &Device) -> Result<Tensor> {
        match &self.targets {
            Targets::OnTheFly(t) => t.features(x, self.map),
            Targets::Cached(c) => c.batch_features(&batch.indices, device),
        }
    }
}

impl Objective for DistillObjective {
    fn name(&self) -> &str {
        "distill"
    }

    fn loss_name(&self) -> &str {
        "smooth-L1 to whitened teacher features"
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn set_seed(&mut self, seed: u64) {
        self.rng.reseed(seed);
    }

    fn train_step(&mut self, batch: &Batch, device: &Device) -> Result<StepOutput> {
        let x = batch.images.to_device(device)?;
        let target = self.batch_targets(batch, &x, device)?;
        let (loss, moe) = self.model.loss(&x, &target, true)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // MoE student: the trainer adds its aux loss to the smooth-L1 (as in SimMIM)
        Ok(StepOutput {
            loss,
            aux: moe.aux_losses()?,
            metrics: vec![("loss".into(), value)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use mimlab_engine::data::{
        build_dataset, BatchTargets, DataConfig, DataLoader, LoaderOptions, Split,
    };
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_engine::trainer::{BatchSource, RunConfig, RunStart, TrainConfig, Trainer};
    use mimlab_models::swin_v2::SwinV2;

    use crate::distill::feature_cache::CacheHeader;
    use crate::simmim::objective::tests::{assert_aux_gradient, moe_gate_gradients};
    use mimlab_models::moe::MoeConfig;

    fn student_cfg() -> SwinV2Config {
        SwinV2Config {
            preset: None,
            img_size: 16,
            patch_size: 2,
            embed_dim: 8,
            depths: vec![1, 1],
            num_heads: vec![1, 2],
            window_size: 4,
            num_classes: 0,
            drop_path_rate: 0.1,
            pretrained_window_sizes: vec![0, 0],
            in_chans: 1,
            ..SwinV2Config::preset("swinv2_nano").unwrap()
        }
    }

    /// A teacher of another width, input and map size: 32 px, patch 2, embed 12 -> 8x8 map of 24
    /// channels, area-averaged to the student's 4x4 map after its input went 16 -> 32 px.
    fn teacher(seed: u64) -> Teacher {
        teacher_with(MoeConfig::default(), seed)
    }

    /// [`teacher`] with MoE layers `moe`.
    fn teacher_with(moe: MoeConfig, seed: u64) -> Teacher {
        let cfg = SwinV2Config {
            preset: None,
            img_size: 32,
            embed_dim: 12,
            patch_size: 2,
            drop_path_rate: 0.0,
            moe,
            ..student_cfg()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb).unwrap();
        // non-zero post-norms so the blocks are not the identity
        for (k, v) in vm.data().lock().unwrap().iter() {
            if k.contains("norm1.weight") || k.contains("norm2.weight") {
                v.set(&v.as_tensor().ones_like().unwrap()).unwrap();
            }
        }
        Teacher::from_model(m, vm, true)
    }

    fn bits(vm: &VarMap) -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<_> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let x = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (k.clone(), x.iter().map(|f| f.to_bits()).collect())
            })
            .collect();
        v.sort();
        v
    }

    struct Random;
    impl BatchSource for Random {
        fn batches_per_epoch(&self) -> usize {
            2
        }
        fn epoch_batches(
            &self,
            epoch: usize,
            start: usize,
        ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
            Box::new((start..2).map(move |k| {
                let images = Tensor::randn(0f32, 1.0, (2, 1, 16, 16), &Device::Cpu)?;
                Batch::new(images, BatchTargets::None, vec![2 * k, 2 * k + 1], epoch)
            }))
        }
    }

    /// MoE in block 0 of both stages (the default placement needs odd blocks), aux weight `w`.
    fn moe(weight: f64) -> MoeConfig {
        MoeConfig {
            num_experts: 4,
            aux_loss_weight: weight,
            blocks: vec![vec![0], vec![0]],
            ..MoeConfig::default()
        }
    }

    #[test]
    fn moe_student_gate_gets_the_aux_gradient_and_the_moe_teacher_adds_nothing() -> Result<()> {
        let b = Random.epoch_batches(0, 0).next().unwrap()?;
        let grads = |weight: f64| {
            let student = SwinV2Config {
                moe: moe(weight),
                ..student_cfg()
            };
            // an MoE teacher too: its forward's aux loss must not reach the step
            let t = Targets::OnTheFly(teacher_with(moe(1.0), 3));
            let mut obj =
                DistillObjective::new(&student, &DistillConfig::default(), t, 1, &Device::Cpu)
                    .unwrap();
            obj.set_seed(5);
            let out = obj.train_step(&b, &Device::Cpu).unwrap();
            // the student's two MoE layers only
            let names: Vec<String> = out.into_metrics().into_iter().map(|(k, _)| k).collect();
            assert_eq!(
                names,
                [
                    "loss",
                    "moe_aux",
                    "moe_drop",
                    "moe_load_l0_max",
                    "moe_load_l1_max"
                ]
            );
            let gate = "student.layers.1.blocks.0.mlp._moe_layer.gates.0.wg.weight";
            moe_gate_gradients(&mut obj, &b, gate)
        };
        let (with, aux) = grads(1.0);
        let (without, zero) = grads(0.0);
        assert!(zero.iter().all(|v| *v == 0.0));
        assert_aux_gradient(&with, &without, &aux);
        Ok(())
    }

    #[test]
    fn teacher_gets_no_gradient_and_stays_bit_identical_after_a_step() -> Result<()> {
        let cfg = DistillConfig::default();
        let mut obj = DistillObjective::new(
            &student_cfg(),
            &cfg,
            Targets::OnTheFly(teacher(3)),
            1,
            &Device::Cpu,
        )?;
        let Targets::OnTheFly(t) = obj.targets() else {
            unreachable!()
        };
        let tvm = t.varmap().clone();
        let before = bits(&tvm);
        // every trainable key is FD layout; no teacher key among them
        let keys: Vec<String> = obj
            .varmap()
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(keys
            .iter()
            .all(|k| k.starts_with("student.") || k.starts_with("projector.")));
        assert!(keys.contains(&"projector.weight".to_string()));
        // the GradStore of a step has the student's gradients and none of the teacher's
        let b = Random.epoch_batches(0, 0).next().unwrap()?;
        let out = obj.train_step(&b, &Device::Cpu)?;
        let grads: GradStore = out.loss.backward()?;
        let student_w =
            obj.varmap().data().lock().unwrap()["student.patch_embed.proj.weight"].clone();
        assert!(grads.get(student_w.as_tensor()).is_some());
        for (k, v) in tvm.data().lock().unwrap().iter() {
            assert!(
                grads.get(v.as_tensor()).is_none(),
                "teacher {k} has a gradient"
            );
        }
        // one Trainer step: the student moves, the teacher does not
        let dir = tempfile::tempdir()?;
        let train = TrainConfig {
            epochs: 1,
            max_steps: Some(1),
            batch_size: 2,
            lr_scale_batch: None,
            ..TrainConfig::default()
        };
        let run = RunConfig {
            output_dir: dir.path().to_path_buf(),
            name: Some("fd".into()),
            image_every: 0,
            ..RunConfig::default()
        };
        let student_before = bits(obj.varmap());
        let mut trainer = Trainer::new(&mut obj, &train, &run, "", &RunStart::fresh())?;
        let s = trainer.fit_source(&Random, None)?;
        assert_eq!(s.steps, 1);
        assert_eq!(bits(&tvm), before, "teacher weights changed");
        assert_ne!(bits(obj.varmap()), student_before, "student did not move");
        Ok(())
    }

    #[test]
    fn cached_features_equal_on_the_fly_ones_for_the_same_crops() -> Result<()> {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
        if !root.join("fashion-mnist").exists() {
            eprintln!("skipped: no bundled fashion-mnist (run scripts/setup-data.sh)");
            return Ok(());
        }
        let data = DataConfig {
            root,
            max_samples: Some(6),
            ..DataConfig::default()
        };
        let ds = build_dataset(&data, Split::Train, 16, 1, true)?;
        let opts = |shuffle| LoaderOptions {
            batch_size: 4,
            shuffle,
            drop_last: false,
            seed: 9,
            workers: 0,
            prefetch: 1,
        };
        let t = teacher(3);
        let header = CacheHeader {
            version: crate::distill::feature_cache::CACHE_VERSION,
            teacher_weights: "teacher.safetensors".into(),
            config_hash: "abc".into(),
            num_samples: 0,
            tokens: 0,
            channels: 0,
            crops: false,
        };
        let map = student_map(&student_cfg());
        let dir = tempfile::tempdir()?;
        let build_loader = DataLoader::new(ds.clone(), opts(false)).fixed_augmentation();
        let cache = FeatureCache::open_or_build(
            dir.path(),
            &build_loader,
            &t,
            map,
            header.clone(),
            &Device::Cpu,
        )?;
        assert_eq!(cache.features.dims(), [6, 16, 24]);
        // reopened from disk: same features and crops, and the crops do not depend on the epoch
        let again = FeatureCache::load(dir.path(), &header)?;
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&again.features), flat(&cache.features));
        let crops = again
            .crops
            .clone()
            .expect("idx datasets report their crops");
        for (i, c) in crops.iter().enumerate() {
            let (b, f) = ds
                .crop_params(i, &mut build_loader.sample_rng(7, i))?
                .unwrap();
            assert_eq!(
                *c,
                [b.top, b.left, b.height, b.width, f as usize].map(|v| v as u32)
            );
        }
        // the shuffled training loader of a later epoch serves the cached crops
        let train_loader = DataLoader::new(ds, opts(true)).fixed_augmentation();
        let obj = DistillObjective::new(
            &student_cfg(),
            &DistillConfig::default(),
            Targets::Cached(again),
            1,
            &Device::Cpu,
        )?;
        for batch in train_loader.epoch(3, 0) {
            let batch = batch?;
            let live = t.features(&batch.images, map)?;
            let cached = obj.batch_targets(&batch, &batch.images, &Device::Cpu)?;
            let d = (live - cached)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "max abs diff {d}");
        }
        // a cache made for another teacher or config is refused, naming the folder
        let other = CacheHeader {
            config_hash: "def".into(),
            ..header.clone()
        };
        let err = FeatureCache::load(dir.path(), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("config hash abc") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
        let other = CacheHeader {
            teacher_weights: "other.safetensors".into(),
            ..header
        };
        let err = FeatureCache::load(dir.path(), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("teacher teacher.safetensors"), "{err}");
        Ok(())
    }
}
