//! Recipe, SimMIM (`mimlab pretrain`): the pretraining dataset, the objective and the trainer.
use anyhow::{Context, Result};
use candle_core::Device;
use mimlab_engine::trainer::{TrainSession, TrainSummary};
use mimlab_models::swin_v2::SwinV2Config;

use crate::simmim::mask::SimMimConfig;
use crate::simmim::objective::SimMimObjective;

/// Pretrains `model` with SimMIM on the train split of `session.data`.
pub fn pretrain_simmim(
    session: &TrainSession,
    model: &SwinV2Config,
    simmim: &SimMimConfig,
    device: &Device,
) -> Result<TrainSummary> {
    let dataset = session
        .train_dataset(model.img_size, model.in_chans)
        .context("building the pretraining dataset")?;
    mimlab_engine::rank0_eprintln!("data: {}", dataset.describe());
    let loader = session.train_loader(dataset)?;
    let mut objective =
        SimMimObjective::new(model, simmim, session.data, session.run.seed, device)?;
    mimlab_engine::rank0_eprintln!(
        "model: {} params, {:.2} GFLOPs/image (forward)",
        model.num_params(),
        model.flops() as f64 / 1e9
    );
    session.fit(&mut objective, &loader, None)
}
