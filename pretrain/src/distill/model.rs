//! Feature distillation (Wei et al. 2022, SwinTransformer/Feature-Distillation; architecture.md 5):
//! a student Swin-V2 + per-token projector regresses a frozen teacher's whitened final feature
//! map with smooth-L1 (beta 2).
//!
//! Parts in reading order: config, whitening, smooth-L1, resampling, the frozen [`Teacher`], the
//! student model [`Distill`] (`student.*` + `projector.*`: the backbone under
//! [`crate::backbone::DISTILL_PREFIX`]).
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::run_dir::resolve_init;
use mimlab_models::layers::{adaptive_pool_matrix, linear_interp_matrix, resample_separable};
use mimlab_models::moe::MoeAux;
use mimlab_models::pretrained::{load_backbone_tensors, Head};
use mimlab_models::swin_v2::{Features, SwinV2, SwinV2Config};
use serde::{Deserialize, Serialize};

use crate::backbone::{backbone_prefix, load_backbone, run_model_section, DISTILL_PREFIX};

/// The `distill:` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Teacher: a run folder (newest checkpoint + its config.yaml) or a weights file of any
    /// layout `load_backbone` reads. `mimlab distill --teacher` sets it.
    pub teacher: Option<PathBuf>,
    /// Teacher architecture; default: the `model:` section of the teacher run's config.yaml
    /// (required when the teacher is a bare file). Built with drop path 0 and no head.
    pub teacher_model: Option<SwinV2Config>,
    /// Smooth-L1 threshold (FD: 2.0): `0.5 d^2 / beta` below it, `|d| - beta/2` above.
    pub smooth_l1_beta: f64,
    /// Non-parametric LayerNorm (eps 1e-5) on the teacher features (FD: always on).
    pub whiten: bool,
    /// Start the student from this run folder or weights file (default: random init, as FD).
    pub student_init: Option<PathBuf>,
    /// One CPB MLP shared by all student blocks while distilling (FD's shared relative position
    /// bias); the checkpoint is unshared automatically when loaded into a per-block model.
    pub shared_cpb: bool,
    /// Folder of a teacher-feature cache: each sample gets one fixed crop (from the run seed and
    /// its index) for every epoch, and the teacher runs once per sample. Default: no cache, the
    /// teacher runs on every batch with fresh crops.
    pub cache_features: Option<PathBuf>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            teacher: None,
            teacher_model: None,
            smooth_l1_beta: 2.0,
            whiten: true,
            student_init: None,
            shared_cpb: false,
            cache_features: None,
        }
    }
}

/// FD "whitening": LayerNorm over the last dim without affine parameters, eps 1e-5
/// (`nn.LayerNorm(dim, elementwise_affine=False)`, biased variance).
pub fn whiten(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
}

/// `nn.SmoothL1Loss(beta)` mean over every element: `0.5 d^2 / beta` if `|d| < beta` else
/// `|d| - beta / 2`, written as `0.5 m^2 / beta + (|d| - m)` with `m = min(|d|, beta)` (same
/// value, differentiable without a select).
pub fn smooth_l1(pred: &Tensor, target: &Tensor, beta: f64) -> Result<Tensor> {
    ensure!(
        beta > 0.0,
        "distill.smooth_l1_beta = {beta} must be positive"
    );
    ensure!(
        pred.dims() == target.dims(),
        "smooth-L1: prediction {:?} and target {:?} differ in shape",
        pred.dims(),
        target.dims()
    );
    let ad = (pred - target)?.abs()?;
    let m = ad.minimum(beta)?;
    let loss = ((m.sqr()? * (0.5 / beta))? + (ad - m)?)?;
    Ok(loss.mean_all()?)
}

/// `[n_out, n_in]` row-major weights of a 1-D resampling: area averaging when shrinking (torch
/// `adaptive_avg_pool` / `interpolate(mode="area")` bins, [`adaptive_pool_matrix`]), linear
/// interpolation with `align_corners=False` when growing (torch `bilinear`,
/// [`linear_interp_matrix`]), identity when equal.
pub fn resample_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    if n_out <= n_in {
        adaptive_pool_matrix(n_out, n_in)
    } else {
        linear_interp_matrix(n_out, n_in)
    }
}

/// Separable resampling of `[B, C, H, W]` to `[B, C, out_h, out_w]` with [`resample_weights`]
/// (area when shrinking, bilinear when growing); a no-op at the same size.
pub fn resample_nchw(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let (ah, aw) = (resample_weights(h, out_h), resample_weights(w, out_w));
    Ok(resample_separable(x, ah, &aw, out_h, out_w)?)
}

/// The frozen teacher: any mimlab backbone checkpoint, built without drop path and run in eval
/// mode (`train = false`); its variables live in their own `VarMap`, outside the optimizer's.
pub struct Teacher {
    model: SwinV2,
    varmap: VarMap,
    whiten: bool,
    weights: PathBuf,
}

impl Teacher {
    /// Resolves `path` (run folder or file), takes the architecture from `model` or else the
    /// run's config.yaml, and loads the backbone (head dropped).
    pub fn load(
        path: &Path,
        model: Option<&SwinV2Config>,
        whiten: bool,
        device: &Device,
    ) -> Result<Self> {
        let src = resolve_init(path).context("distill.teacher")?;
        let mut cfg = match (model, &src.run_config) {
            (Some(m), _) => m.clone(),
            (None, Some(cfg)) => run_model_section(cfg)?,
            (None, None) => bail!(
                "distill.teacher {}: no config.yaml next to the weights to read the teacher's \
                 architecture from; set distill.teacher_model (a model: section)",
                path.display()
            ),
        };
        cfg.drop_path_rate = 0.0; // asymmetric drop path: none in the teacher
        cfg.drop_rate = 0.0;
        cfg.attn_drop_rate = 0.0;
        cfg.num_classes = 0;
        let (model, varmap, _) = load_backbone(&cfg, &src.weights, device)
            .with_context(|| format!("loading the teacher {}", path.display()))?;
        Ok(Self {
            model,
            varmap,
            whiten,
            weights: src.weights,
        })
    }

    /// A teacher from a model already built (tests, tools).
    pub fn from_model(model: SwinV2, varmap: VarMap, whiten: bool) -> Self {
        Self {
            model,
            varmap,
            whiten,
            weights: PathBuf::new(),
        }
    }

    /// The teacher's architecture.
    pub fn config(&self) -> &SwinV2Config {
        self.model.config()
    }

    /// The teacher's variables (never handed to the optimizer).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The weights file it was loaded from (empty for [`Teacher::from_model`]).
    pub fn weights(&self) -> &Path {
        &self.weights
    }

    /// Target features for a student batch `x` `[B, C, H, W]`: the input resampled to the
    /// teacher's `img_size` if it differs (bilinear up / area down), the teacher's final tokens
    /// (after its final norm), resampled to the student's `map` (h, w) if they differ, then
    /// whitened (after resampling, so the target tokens are exactly normalized). `[B, h*w, C_t]`,
    /// detached.
    pub fn features(&self, x: &Tensor, map: (usize, usize)) -> Result<Tensor> {
        let cfg = self.model.config();
        let (b, c, _, _) = x.dims4()?;
        ensure!(
            c == cfg.in_chans,
            "student images have {c} channels, the teacher takes {}",
            cfg.in_chans
        );
        let x = resample_nchw(x, cfg.img_size, cfg.img_size)?;
        // a frozen teacher contributes no auxiliary loss: its MoE statistics are dropped here
        let Features { stages, moe: _, .. } = self.model.forward_features(&x, None, false)?;
        let t = stages.last().context("teacher has no stages")?; // (B, C_t, h_t, w_t)
        let t = resample_nchw(t, map.0, map.1)?;
        let ct = t.dim(1)?;
        let t = t.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (B, h*w, C_t)
        debug_assert_eq!(t.dim(0)?, b);
        let t = if self.whiten { whiten(&t)? } else { t };
        debug_assert_eq!(t.dim(2)?, ct);
        Ok(t.detach())
    }
}

/// Student feature map side of a config: `(img_size / out_stride)` squared.
pub fn student_map(cfg: &SwinV2Config) -> (usize, usize) {
    let s = cfg.img_size / cfg.out_stride();
    (s, s)
}

/// The distilled model: student Swin-V2 (`student.*`) and the per-token projector
/// (`projector.weight [C_t, C_s]`, `projector.bias [C_t]`; FD's Conv1d(k=1) as a Linear).
pub struct Distill {
    /// The student backbone (no head).
    pub student: SwinV2,
    proj_w: Tensor,
    proj_b: Tensor,
    beta: f64,
}

impl Distill {
    /// Builds the student (`cfg`, its own drop path) under `student.` in `varmap` and a projector
    /// to `teacher_dim`, all seeded from `seed`. `init`: start the student from this run folder or
    /// weights file.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &SwinV2Config,
        teacher_dim: usize,
        beta: f64,
        init: Option<&Path>,
        rng: SharedRng,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            cfg.num_classes == 0,
            "the student is a backbone: num_classes must be 0"
        );
        // The student lives in its own VarMap (backbone key names, so a checkpoint loads with
        // load_backbone_tensors), then its Vars are registered under DISTILL_PREFIX in `varmap`.
        let svm = VarMap::new();
        let student = SwinV2::new(
            cfg,
            false,
            rng,
            seeded_var_builder(&svm, seed, DType::F32, device),
        )?;
        if let Some(p) = init {
            let src = resolve_init(p).context("distill.student_init")?;
            let t = mimlab_models::checkpoint::read_weights(&src.weights)?;
            let keys: Vec<&String> = t.keys().collect();
            let prefix = backbone_prefix(&keys);
            load_backbone_tensors(&svm, t, prefix, Head::Reinit)
                .with_context(|| format!("distill.student_init {}", src.weights.display()))?;
        }
        {
            // Invariant: these mutexes are only poisoned if a thread panicked holding them.
            let mut all = varmap.data().lock().expect("varmap mutex poisoned");
            for (k, v) in svm.data().lock().expect("varmap mutex poisoned").iter() {
                all.insert(format!("{DISTILL_PREFIX}{k}"), v.clone());
            }
        }
        let vb: VarBuilder = seeded_var_builder(varmap, seed, DType::F32, device);
        let pv = vb.pp("projector");
        let cs = cfg.num_features();
        let std02 = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let proj_w = pv.get_with_hints((teacher_dim, cs), "weight", std02)?;
        let proj_b = pv.get_with_hints(teacher_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            student,
            proj_w,
            proj_b,
            beta,
        })
    }

    /// Student tokens after its final norm, projected: `[B, L, C_t]`; and the student's MoE
    /// statistics.
    pub fn predict(&self, x: &Tensor, train: bool) -> Result<(Tensor, MoeAux)> {
        let f = self.student.forward_features(x, None, train)?;
        let z = f.last; // (B, L, C_s)
        let (b, l, c) = z.dims3()?;
        let y = z
            .reshape((b * l, c))?
            .matmul(&self.proj_w.t()?)?
            .broadcast_add(&self.proj_b)?;
        Ok((y.reshape((b, l, ()))?, f.moe))
    }

    /// Smooth-L1 between the projected student tokens and `target` `[B, L, C_t]`; and the
    /// student's MoE statistics.
    pub fn loss(&self, x: &Tensor, target: &Tensor, train: bool) -> Result<(Tensor, MoeAux)> {
        let (pred, moe) = self.predict(x, train)?;
        let loss = smooth_l1(&pred, target, self.beta).context("distillation loss")?;
        Ok((loss, moe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn whitening_is_a_layer_norm_without_affine() {
        let x = [1.0, 2.0, 4.0, 9.0, -3.0, 0.5, 0.5, 2.0];
        let y = whiten(&t(&x, &[2, 4])).unwrap().to_vec2::<f64>().unwrap();
        for (row, got) in x.chunks(4).zip(&y) {
            let mean = row.iter().sum::<f64>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
            for (v, g) in row.iter().zip(got) {
                let want = (v - mean) / (var + 1e-5).sqrt();
                assert!((g - want).abs() < 1e-12, "{g} vs {want}");
            }
        }
        // first row by hand: mean 4, var (9+4+0+25)/4 = 9.5
        assert!((y[0][3] - 5.0 / 9.50001f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn smooth_l1_beta_2_matches_hand_values_on_both_sides() {
        // d = 0.5: 0.5*0.25/2 = 0.0625; d = -1.5: 0.5*2.25/2 = 0.5625;
        // d = 2 (the threshold): 2 - 1 = 1 (= 0.5*4/2); d = -3: 3 - 1 = 2; d = 5: 4.
        let d = [0.5, -1.5, 2.0, -3.0, 5.0];
        let want = [0.0625, 0.5625, 1.0, 2.0, 4.0];
        let zeros = t(&[0.0; 5], &[5]);
        for (di, wi) in d.iter().zip(want) {
            let l = smooth_l1(&t(&[*di], &[1]), &t(&[0.0], &[1]), 2.0).unwrap();
            assert!((l.to_scalar::<f64>().unwrap() - wi).abs() < 1e-12, "d={di}");
        }
        let mean = smooth_l1(&t(&d, &[5]), &zeros, 2.0).unwrap();
        assert!((mean.to_scalar::<f64>().unwrap() - 7.625 / 5.0).abs() < 1e-12);
        // gradient: d/beta inside, sign(d) outside
        let p = candle_core::Var::from_tensor(&t(&d, &[5])).unwrap();
        let g = smooth_l1(p.as_tensor(), &zeros, 2.0)
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(p.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let want_g = [0.25, -0.75, 1.0, -1.0, 1.0].map(|v| v / 5.0);
        for (a, b) in g.iter().zip(want_g) {
            assert!((a - b).abs() < 1e-12, "{g:?}");
        }
    }

    #[test]
    fn resampling_averages_areas_and_interpolates_bilinearly() {
        // 4 -> 2: mean of pairs; 2 -> 4: torch bilinear (align_corners=False) 1, 1.25, 1.75, 2.
        assert_eq!(resample_weights(4, 2), [0.5, 0.5, 0., 0., 0., 0., 0.5, 0.5]);
        let up = resample_weights(2, 4);
        let y: Vec<f32> = up.chunks(2).map(|r| r[0] * 1.0 + r[1] * 2.0).collect();
        assert_eq!(y, [1.0, 1.25, 1.75, 2.0]);
        let x = t(
            &(0..16).map(|v| v as f64).collect::<Vec<_>>(),
            &[1, 1, 4, 4],
        );
        let x = x.to_dtype(DType::F32).unwrap();
        let y = resample_nchw(&x, 2, 2).unwrap().flatten_all().unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [2.5, 4.5, 10.5, 12.5]);
    }
}
