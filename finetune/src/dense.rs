//! What the dense-task objectives (detection, segmentation) share, written once: the variables
//! and their seeded builder, layer-wise lr decay on `backbone.*` only (necks and heads train at
//! the full lr), loading a pretrained backbone, the eval set with its picture spec, the last
//! evaluation kept for the end-of-run report, picture files, and the eval loader.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use mimlab_engine::data::{DataConfig, DataLoader, Dataset, LoaderOptions};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::log::TbWriter;
use mimlab_engine::picture::RgbImage;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::run_dir::{InitSource, RunDir};
use mimlab_engine::trainer::checkpoint::{load_into_varmap, LoadOptions};
use mimlab_models::checkpoint::{read_weights, LoadReport};

use crate::init::load_backbone_into;
use crate::layer_decay::swin_lr_scale;

/// What the pictures show: how many eval images and how to undo their normalization.
#[derive(Debug, Clone, PartialEq)]
pub struct PictureSpec {
    /// Eval images drawn (the first ones of the split).
    pub images: usize,
    /// Normalization mean (`data.aug.mean`).
    pub mean: Vec<f32>,
    /// Normalization std (`data.aug.std`).
    pub std: Vec<f32>,
}

impl PictureSpec {
    /// The first 4 eval images, normalized as `data.aug` says.
    pub fn of(data: &DataConfig) -> Self {
        Self {
            images: 4,
            mean: data.aug.mean.clone(),
            std: data.aug.std.clone(),
        }
    }
}

/// The task-independent state of a dense objective over eval dataset `D` with evaluation `E`.
pub struct DenseCore<D, E> {
    /// Every variable: `backbone.*` and the task's neck and heads.
    pub varmap: VarMap,
    depths: Vec<usize>,
    layer_decay: f64,
    /// The model's randomness (drop path, dropout), reseeded by the trainer on resume.
    pub rng: SharedRng,
    /// The eval split with its ground truth: evaluation is then the task's metric, and
    /// pictures of its first images are drawn.
    pub eval_set: Option<Arc<D>>,
    /// What `log_images` draws.
    pub pictures: Option<PictureSpec>,
    /// Where pictures are computed.
    pub device: Device,
    /// The last evaluation and the training steps it came after.
    last_eval: Option<(u64, E)>,
    steps: u64,
}

impl<D, E: Clone> DenseCore<D, E> {
    /// The state for a backbone of `depths` with `layer_decay` (the `finetune.layer_decay` key,
    /// 1.0 = off), and the builder the task's model is made with (weights seeded from `seed`).
    pub fn new(
        depths: &[usize],
        layer_decay: f64,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, VarBuilder<'static>)> {
        anyhow::ensure!(
            layer_decay > 0.0 && layer_decay <= 1.0,
            "finetune.layer_decay must be in (0, 1], got {layer_decay}"
        );
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let core = Self {
            varmap,
            depths: depths.to_vec(),
            layer_decay,
            rng: SharedRng::new(seed),
            eval_set: None,
            pictures: None,
            device: device.clone(),
            last_eval: None,
            steps: 0,
        };
        Ok((core, vb))
    }

    /// Evaluate on `ds` with the task's metric and draw `pictures` of its first images.
    pub fn set_eval(&mut self, ds: Arc<D>, pictures: PictureSpec) {
        self.eval_set = Some(ds);
        self.pictures = Some(pictures);
    }

    /// Layer-wise lr decay for the backbone's variables, 1 for the others.
    pub fn lr_scale(&self, name: &str) -> f64 {
        match name.strip_prefix("backbone.") {
            Some(rest) => swin_lr_scale(rest, &self.depths, self.layer_decay),
            None => 1.0,
        }
    }

    /// Loads a pretrained backbone (any run folder's checkpoint or official / timm file, the
    /// layout detected as for classification) into `backbone.*`; every backbone tensor must
    /// load, the other variables stay at their init.
    pub fn load_backbone(&self, weights: &Path) -> Result<LoadReport> {
        load_backbone_into(&self.varmap, weights)
    }

    /// Counts a training step (a kept evaluation is stale after it).
    pub fn count_step(&mut self) {
        self.steps += 1;
    }

    /// Keeps `e` as the evaluation of the current weights.
    pub fn remember(&mut self, e: E) {
        self.last_eval = Some((self.steps, e));
    }

    /// The kept evaluation when no step ran since it (the usual end of a run), else `eval()`.
    pub fn report(&self, eval: impl FnOnce() -> Result<E>) -> Result<E> {
        match &self.last_eval {
            Some((s, e)) if *s == self.steps => Ok(e.clone()),
            _ => eval(),
        }
    }
}

/// Writes `img` to `RUN/pictures/<stem>_step<step>.png` and to TensorBoard under `stem`.
pub fn save_picture(
    img: &RgbImage,
    stem: &str,
    step: u64,
    run_dir: &Path,
    tb: &mut TbWriter,
) -> Result<()> {
    let dir = RunDir::at(run_dir).pictures();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    img.save_png(&dir.join(format!("{stem}_step{step}.png")))?;
    tb.add_image(stem, img, step)
}

/// The eval loader over `ds` (dataset order, batches of twice the training batch size), padded
/// to a multiple of `pad`.
pub fn eval_loader(
    ds: Arc<dyn Dataset>,
    data: &DataConfig,
    batch: usize,
    seed: u64,
    pad: usize,
) -> DataLoader {
    DataLoader::new(
        ds,
        LoaderOptions {
            batch_size: batch.max(1) * 2,
            shuffle: false,
            drop_last: false,
            seed,
            workers: data.num_workers,
            prefetch: data.prefetch_batches,
        },
    )
    .pad_to_multiple(pad)
}

/// Starts the backbone of a new or resumed run: `init`'s weights loaded with `load` (and said so;
/// `heads` names what stays at its init), "from scratch" for a new run without one, nothing on
/// resume (the checkpoint has every weight).
pub fn start_backbone(
    init: Option<&InitSource>,
    resumed: bool,
    heads: &str,
    load: impl FnOnce(&Path) -> Result<LoadReport>,
) -> Result<()> {
    match init {
        Some(src) => {
            let r = load(&src.weights)?;
            mimlab_engine::rank0_eprintln!(
                "init: loaded {} backbone tensors from {} ({:?} layout); {heads} newly initialized",
                r.loaded,
                src.weights.display(),
                r.layout
            );
        }
        None if !resumed => mimlab_engine::rank0_eprintln!("init: none (training from scratch)"),
        None => {}
    }
    Ok(())
}

/// Loads every weight of a trained dense model (`what`: "detector", "segmentor") from `weights`.
pub fn load_trained(varmap: &VarMap, weights: &Path, what: &str) -> Result<()> {
    let tensors = read_weights(weights)?;
    load_into_varmap(varmap, tensors, &LoadOptions::default())
        .with_context(|| format!("loading the {what} from {}", weights.display()))?;
    Ok(())
}

/// Where `mimlab eval` writes its reports: `out`, else the `eval/` folder of the run `weights`
/// belong to.
pub fn report_dir(out: Option<&Path>, weights: &Path) -> Result<PathBuf> {
    Ok(match (out, RunDir::of_checkpoint_file(weights)) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(run)) => run.eval(),
        (None, None) => bail!(
            "{}: not inside a run folder, so pass --out for the reports",
            weights.display()
        ),
    })
}
