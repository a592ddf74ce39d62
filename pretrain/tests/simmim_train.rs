//! SimMIM through the real trainer: 8 CPU steps on a fixed batch more than halve the masked L1
//! loss (measured 0.599 -> 0.207), and the run folder gets a checkpoint `visualize_run` loads.
use anyhow::Result;
use candle_core::{Device, Tensor};
use mimlab_engine::data::{Batch, BatchTargets, DataConfig};
use mimlab_engine::run_dir::RunDir;
use mimlab_engine::trainer::{BatchSource, RunConfig, RunStart, TrainConfig, Trainer};
use mimlab_models::swin_v2::SwinV2Config;
use mimlab_pretrain::{visualize_run, SimMimConfig, SimMimObjective};

/// The same 4 images every epoch (masks still change with the epoch).
struct Fixed(Tensor);

impl BatchSource for Fixed {
    fn batches_per_epoch(&self) -> usize {
        1
    }

    fn epoch_batches(
        &self,
        epoch: usize,
        start_batch: usize,
    ) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let b = Batch::new(self.0.clone(), BatchTargets::None, vec![0, 1, 2, 3], epoch);
        Box::new(std::iter::once(b).skip(start_batch))
    }
}

#[test]
fn training_lowers_the_loss_and_checkpoints_visualize() {
    let model = SwinV2Config {
        preset: None,
        img_size: 32,
        ..SwinV2Config::preset("swinv2_nano").unwrap()
    };
    let cfg = SimMimConfig {
        mask_patch_size: 8,
        num_pictures: 0,
        ..SimMimConfig::default()
    };
    let data = DataConfig::default();
    let mut obj = SimMimObjective::new(&model, &cfg, &data, 0, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let train = TrainConfig {
        epochs: 8,
        batch_size: 4,
        base_lr: 2e-3,
        lr_scale_batch: None,
        warmup_epochs: 0.0,
        ..TrainConfig::default()
    };
    let run = RunConfig {
        output_dir: dir.path().to_path_buf(),
        name: Some("t".into()),
        threads: 2,
        log_every: 0,
        image_every: 0,
        eval_every_epochs: 0,
        checkpoint_every_epochs: 0,
        ..RunConfig::default()
    };
    // Smooth images (a colour ramp per channel) are learnable from the visible context.
    let ramp: Vec<f32> = (0..4 * 3 * 32 * 32)
        .map(|i| {
            let (img, c, y, x) = (i / 3072, (i / 1024) % 3, (i / 32) % 32, i % 32);
            ((x + y) as f32 / 62.0 - 0.5) * (1.0 + c as f32) + img as f32 * 0.1
        })
        .collect();
    let images = Tensor::from_vec(ramp, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let summary = {
        let mut t =
            Trainer::new(&mut obj, &train, &run, "model: {}\n", &RunStart::fresh()).unwrap();
        t.fit_source(&Fixed(images), None).unwrap()
    };
    assert_eq!(summary.steps, 8);
    let (first, last) = (summary.first_loss, summary.last_loss);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let weights = RunDir::at(&summary.run_dir).latest_weights().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    mimlab_engine::picture::RgbImage::new(40, 40, [90, 160, 30])
        .save_png(&imgs.join("a.png"))
        .unwrap();
    let out = summary.run_dir.join("pictures/reconstruction.png");
    let dev = Device::Cpu;
    visualize_run(&model, &cfg, &data, &weights, Some(&imgs), 8, 0, &out, &dev).unwrap();
    assert!(out.exists());
}
