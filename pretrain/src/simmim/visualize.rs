//! Reconstruction pictures of a SimMIM model (SimMIM#9, architecture.md 3.3): per image, the
//! original, the masked input, the raw reconstruction and the reconstruction pasted into the
//! visible pixels. The head also predicts visible pixels without supervision, so those look wrong
//! in the raw reconstruction; that is expected.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::data::transforms::{channel_stats, ImageTransform};
use mimlab_engine::data::{decode_image, heldout_images, DataConfig};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::picture::{from_tensor, grid, titled, RgbImage};
use mimlab_engine::rng::{rng_for, SharedRng};
use mimlab_engine::run_dir::RunDir;
use mimlab_engine::trainer::checkpoint::{load_into_varmap, LoadOptions};
use mimlab_models::swin_v2::SwinV2Config;

use crate::simmim::mask::{MaskGenerator, SimMimConfig};
use crate::simmim::{denorm_targets, pixel_mask, SimMim};

/// Column titles of [`reconstruction_grid`] (short, so that `picture::grid` draws them at its
/// large size over 96 px tiles).
pub const COLUMNS: [&str; 4] = ["original", "masked", "recon", "pasted"];

/// Grey shown in place of masked pixels (pixel space, 0..1).
const MASK_GREY: f64 = 0.5;
/// Tiles narrower than this are upscaled (nearest) so the column titles fit.
const MIN_TILE: usize = 96;

/// Stream tag of the fixed picture masks.
pub const PICTURE_MASK_STREAM: u64 = 0x71C7;

/// Masks for `n` picture images from a fixed seed: `[n, grid, grid]` f32 on `device`.
pub fn picture_masks(gen: &MaskGenerator, n: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let g = gen.grid();
    let data: Vec<f32> = (0..n)
        .flat_map(|i| gen.generate(&mut rng_for(seed, &[PICTURE_MASK_STREAM, i as u64])))
        .map(f32::from)
        .collect();
    Ok(Tensor::from_vec(data, (n, g, g), device)?)
}

/// Rows per image: original | masked input (masked pixels grey) | reconstruction |
/// reconstruction pasted into the visible pixels; un-normalized with `mean`/`std` (per channel,
/// or one value for all). With `norm_target` the prediction is mapped back to pixels with the
/// original image's local statistics. The title bar reads `"{what}, masked L1 {loss}"`, the
/// SimMIM loss of these images under these masks (e.g. `what` = "SimMIM, step 400").
pub fn reconstruction_grid(
    model: &SimMim,
    images: &Tensor,
    masks: &Tensor,
    mean: &[f32],
    std: &[f32],
    what: &str,
) -> Result<RgbImage> {
    let (n, c, h, w) = images
        .dims4()
        .context("reconstruction_grid: images must be [B,C,H,W]")?;
    if masks.dim(0)? != n {
        bail!(
            "reconstruction_grid: {n} images but {} masks",
            masks.dim(0)?
        );
    }
    let mean = channel_stats(mean, c, "mean")?;
    let std = channel_stats(std, c, "std")?;
    let dev = images.device();
    let masks = masks.to_dtype(DType::F32)?.to_device(dev)?;
    let x = images.to_dtype(DType::F32)?;
    // pictures: the MoE statistics of this eval forward train nothing
    let (loss, x_rec, _moe) = model.forward(&x, &masks, false)?;
    let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let mut x_rec = x_rec.to_dtype(DType::F32)?;
    if let Some(p) = model.norm_target() {
        x_rec = denorm_targets(&x_rec, &x, p)?;
    }
    let m = pixel_mask(&masks, model.patch_size())?; // (n, 1, H, W)
    let keep = (1.0 - &m)?;
    let mean_t = Tensor::from_vec(mean, (1, c, 1, 1), dev)?;
    let std_t = Tensor::from_vec(std, (1, c, 1, 1), dev)?;
    let unnorm = |t: &Tensor| t.broadcast_mul(&std_t)?.broadcast_add(&mean_t);
    let orig = unnorm(&x)?;
    let rec = unnorm(&x_rec)?;
    let masked = (orig.broadcast_mul(&keep)? + (&m * MASK_GREY)?.broadcast_as(orig.shape())?)?;
    let pasted = (orig.broadcast_mul(&keep)? + rec.broadcast_mul(&m)?)?;
    let factor = MIN_TILE.div_ceil(w.min(h)).max(1) as u32;
    let cols: Vec<Vec<RgbImage>> = [&orig, &masked, &rec, &pasted]
        .iter()
        .map(|t| {
            Ok(from_tensor(t, &[], &[])?
                .into_iter()
                .map(|i| i.upscale(factor))
                .collect())
        })
        .collect::<Result<_>>()?;
    let rows: Vec<Vec<RgbImage>> = (0..n)
        .map(|i| cols.iter().map(|col| col[i].clone()).collect())
        .collect();
    let title = format!("{what}, masked L1 {loss:.4} ({n} images)");
    Ok(titled(&grid(&rows, 4, &COLUMNS), &title))
}

/// Images under `dir` (sorted by path, recursive, as the folder datasets list them) through the eval transform (resize + centre crop):
/// `[n, C, S, S]` normalized, at most `n`.
pub fn folder_images(
    dir: &Path,
    img_size: usize,
    in_chans: usize,
    data: &DataConfig,
    n: usize,
) -> Result<Tensor> {
    let transform = ImageTransform::new(img_size, in_chans, false, &data.aug)?;
    let mut paths = mimlab_engine::data::list_images(dir)?;
    paths.truncate(n);
    if paths.is_empty() {
        bail!("{}: no JPEG/PNG images", dir.display());
    }
    let mut values = Vec::with_capacity(paths.len() * transform.output_len());
    for (i, p) in paths.iter().enumerate() {
        let img = decode_image(p)?;
        // The eval transform draws nothing; the rng only satisfies the signature.
        values.extend(transform.apply(&img, &mut rng_for(0, &[i as u64])));
    }
    Ok(Tensor::from_vec(
        values,
        (paths.len(), in_chans, img_size, img_size),
        &Device::Cpu,
    )?)
}

/// `mimlab visualize`: builds the SimMIM model, loads `weights` (a checkpoint's
/// `step_N.safetensors`), draws the reconstruction grid of `n` images (from `images_dir`, or the
/// held-out images of `data`) with masks from `seed`, and writes it to `out`.
#[allow(clippy::too_many_arguments)]
pub fn visualize_run(
    model_cfg: &SwinV2Config,
    cfg: &SimMimConfig,
    data: &DataConfig,
    weights: &Path,
    images_dir: Option<&Path>,
    n: usize,
    seed: u64,
    out: &Path,
    device: &Device,
) -> Result<PathBuf> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
    let model = SimMim::new(model_cfg, cfg, SharedRng::new(seed), vb)?;
    let tensors = candle_core::safetensors::load(weights, &Device::Cpu)
        .with_context(|| format!("reading {}", weights.display()))?;
    load_into_varmap(&varmap, tensors, &LoadOptions::default())
        .with_context(|| format!("loading {}", weights.display()))?;
    let (s, c) = (model_cfg.img_size, model_cfg.in_chans);
    let images = match images_dir {
        Some(dir) => folder_images(dir, s, c, data, n)?,
        None => heldout_images(data, s, c, n)?,
    };
    if images.dim(0)? == 0 {
        bail!("no images to reconstruct");
    }
    let gen = MaskGenerator::for_model(model_cfg, cfg)?;
    let masks = picture_masks(&gen, images.dim(0)?, seed, device)?;
    let what = format!(
        "SimMIM, {}",
        weights
            .file_stem()
            .map_or("".into(), |s| s.to_string_lossy())
    );
    let img = reconstruction_grid(
        &model,
        &images.to_device(device)?,
        &masks,
        &data.aug.mean,
        &data.aug.std,
        &what,
    )?;
    img.save_png(out)?;
    Ok(out.to_path_buf())
}

/// File name of the `mimlab visualize` picture in the run's `pictures/`.
pub const RECONSTRUCTION_PNG: &str = "reconstruction.png";

/// `mimlab visualize --run RUN`: the run's config and newest checkpoint ->
/// `RUN/pictures/reconstruction.png` (see [`visualize_run`]). Returns the picture's path.
#[allow(clippy::too_many_arguments)]
pub fn visualize_run_dir(
    run: &RunDir,
    model_cfg: &SwinV2Config,
    cfg: &SimMimConfig,
    data: &DataConfig,
    images_dir: Option<&Path>,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<PathBuf> {
    let weights = run.latest_weights()?;
    let out = run.pictures().join(RECONSTRUCTION_PNG);
    visualize_run(
        model_cfg, cfg, data, &weights, images_dir, n, seed, &out, device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simmim::tiny_setup;
    use mimlab_engine::picture::{font, text_height, title_band};

    fn tiny_model(vm: &VarMap) -> SimMim {
        let (model, cfg) = tiny_setup();
        let vb = seeded_var_builder(vm, 3, DType::F32, &Device::Cpu);
        SimMim::new(&model, &cfg, SharedRng::new(0), vb).unwrap()
    }

    #[test]
    fn grid_layout_grey_masks_and_pasted_visible_pixels() {
        let vm = VarMap::new();
        let model = tiny_model(&vm);
        let gen = MaskGenerator::new(32, 8, 4, 0.6, crate::MaskStrategy::Random).unwrap();
        let masks = picture_masks(&gen, 2, 0, &Device::Cpu).unwrap();
        let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let img =
            reconstruction_grid(&model, &images, &masks, &mean, &std, "SimMIM, step 7").unwrap();
        // 32 px tiles upscaled x3 to 96; 4 columns, pad 4: 4*96 + 5*4 = 404 wide; a title bar,
        // the column titles, 2 rows: bar + band + 2*96 + 3*4 high.
        let bar = text_height(font::TITLE) + 10;
        let band = title_band(96, 4, &COLUMNS);
        assert_eq!((img.width, img.height), (404, bar + band + 2 * 96 + 3 * 4));
        let top = bar + band;
        // the title bar has ink: "SimMIM, step 7, masked L1 ..." is drawn
        assert!((0..bar).any(|y| (0..404).any(|x| img.get(x, y)[0] < 100)));
        let m = masks.to_vec3::<f32>().unwrap();
        let tile = |r: u32, c: u32, py: u32, px: u32| {
            img.get(4 + c * 100 + px * 3 + 1, top + 4 + r * 100 + py * 3 + 1)
        };
        let (mut seen_masked, mut seen_visible) = (false, false);
        for r in 0..2u32 {
            for py in 0..32u32 {
                for px in 0..32u32 {
                    if m[r as usize][(py / 4) as usize][(px / 4) as usize] == 1.0 {
                        assert_eq!(tile(r, 1, py, px), [128, 128, 128]);
                        assert_eq!(tile(r, 3, py, px), tile(r, 2, py, px));
                        seen_masked = true;
                    } else {
                        assert_eq!(tile(r, 1, py, px), tile(r, 0, py, px));
                        assert_eq!(tile(r, 3, py, px), tile(r, 0, py, px));
                        seen_visible = true;
                    }
                }
            }
        }
        assert!(seen_masked && seen_visible);
    }

    #[test]
    fn visualize_run_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        tiny_model(&vm);
        let run = RunDir::at(dir.path());
        std::fs::create_dir_all(run.checkpoints()).unwrap();
        let weights = run.checkpoint(5).weights;
        vm.save(&weights).unwrap();
        std::fs::write(run.checkpoint(5).meta, "{}").unwrap();
        assert_eq!(run.latest_weights().unwrap(), weights);
        let imgs = dir.path().join("imgs");
        std::fs::create_dir_all(&imgs).unwrap();
        for (i, c) in [[200u8, 30, 30], [20, 90, 240], [10, 10, 10]]
            .iter()
            .enumerate()
        {
            RgbImage::new(48, 40, *c)
                .save_png(&imgs.join(format!("{i}.png")))
                .unwrap();
        }
        let (model, cfg) = tiny_setup();
        let data = DataConfig::default();
        let out = dir.path().join("pictures/reconstruction.png");
        let p = visualize_run(
            &model,
            &cfg,
            &data,
            &weights,
            Some(&imgs),
            2,
            0,
            &out,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(p, out);
        let back = decode_image(&out).unwrap();
        let top = text_height(font::TITLE) + 10 + title_band(96, 4, &COLUMNS);
        assert_eq!(
            (back.width, back.height),
            (404, (top + 2 * 96 + 3 * 4) as usize)
        );
        // Loading checks the keys: a file missing one is refused with its name.
        let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        t.remove("decoder.0.bias");
        candle_core::safetensors::save(&t, &weights).unwrap();
        let e = visualize_run(
            &model,
            &cfg,
            &data,
            &weights,
            Some(&imgs),
            2,
            0,
            &out,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("decoder.0.bias"), "{e:#}");
    }
}
