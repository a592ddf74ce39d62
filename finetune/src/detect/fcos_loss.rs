//! FCOS losses (objective stage), mmdet 3.x `FCOSHead.loss_by_feat` with the improved variant's
//! settings (configs/fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py):
//!
//! - classification: sigmoid focal loss (alpha 0.25, gamma 2) summed over every point and class,
//!   divided by `max(num_pos, 1)`;
//! - box: GIoU loss `1 - giou` of the decoded boxes of the positives, weighted by their
//!   centerness targets and divided by the targets' sum (at least 1e-6);
//! - centerness: binary cross-entropy with logits against the centerness targets, summed over the
//!   positives and divided by `max(num_pos, 1)`.
//!
//! Everything goes through log-sigmoid, `log σ(x) = (x - |x|) / 2 - log(1 + exp(-|x|))`, which is
//! finite with finite gradients for any logit (candle's `binary_cross_entropy_with_logit` takes
//! the log of a sigmoid, which is -inf once the sigmoid underflows in f32, past about -100). The `(x - |x|) / 2` form (rather than
//! `min(x, 0)`) also gives the exact derivative 1/2 at 0 with candle's subgradients.
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};

use crate::detect::boxes::{centerness, giou_ltrb};
use crate::detect::fcos_targets::FcosTargets;

/// `log σ(x)` element-wise, stable for any `x` (module header).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?;
    let half = ((x - &a)? * 0.5)?;
    Ok((half - (a.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Sigmoid focal loss (Lin et al. 2017) element-wise, torchvision `sigmoid_focal_loss` /
/// mmdet `py_sigmoid_focal_loss` with binary `targets` (same shape as `logits`, 0 or 1):
/// `-alpha t (1 - p)^gamma log p - (1 - alpha)(1 - t) p^gamma log(1 - p)`, `p = σ(x)`,
/// with `(1 - p)^gamma = exp(gamma log σ(-x))` and `log σ(-x) = log σ(x) - x`.
pub fn sigmoid_focal_loss(
    logits: &Tensor,
    targets: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    ensure!(
        logits.dims() == targets.dims(),
        "focal loss: logits {:?} vs targets {:?}",
        logits.dims(),
        targets.dims()
    );
    let t = targets.to_dtype(logits.dtype())?;
    let ls_pos = log_sigmoid(logits)?; // log p
    let ls_neg = (&ls_pos - logits)?; // log (1 - p)
    let pos = ((ls_neg.clone() * gamma)?.exp()? * &ls_pos)?; // (1-p)^g log p
    let neg = ((ls_pos * gamma)?.exp()? * &ls_neg)?; // p^g log(1-p)
    let one_minus_t = t.affine(-1.0, 1.0)?;
    let l = ((pos * &t)? * (-alpha))?;
    Ok((l + ((neg * one_minus_t)? * (alpha - 1.0))?)?)
}

/// Binary cross-entropy with logits element-wise, stable:
/// `-(t log σ(x) + (1 - t) log σ(-x))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let t = targets.to_dtype(logits.dtype())?;
    let ls_pos = log_sigmoid(logits)?;
    let ls_neg = (&ls_pos - logits)?;
    let one_minus_t = t.affine(-1.0, 1.0)?;
    Ok(((ls_pos * &t)? + (ls_neg * one_minus_t)?)?.neg()?)
}

/// The three FCOS losses of a batch (scalars, differentiable) and the positive count.
#[derive(Debug, Clone)]
pub struct FcosLosses {
    /// Focal loss / max(num_pos, 1).
    pub cls: Tensor,
    /// Centerness-weighted GIoU loss.
    pub bbox: Tensor,
    /// Centerness BCE / max(num_pos, 1).
    pub centerness: Tensor,
    /// Positive points in the batch.
    pub num_pos: usize,
}

impl FcosLosses {
    /// `cls + bbox + centerness` (all loss weights 1, as the reference).
    pub fn total(&self) -> Result<Tensor> {
        Ok(((&self.cls + &self.bbox)? + &self.centerness)?)
    }
}

/// Focal/GIoU settings of [`fcos_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Focal loss alpha (0.25).
    pub alpha: f64,
    /// Focal loss gamma (2.0).
    pub gamma: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            alpha: 0.25,
            gamma: 2.0,
        }
    }
}

/// The FCOS losses of flattened predictions: `cls [N, K]` logits, `reg [N, 4]` distances in
/// strides (after the scale and ReLU), `ctr [N]` centerness logits, all in the order of
/// `targets` (see [`crate::detect::fcos_targets`]).
pub fn fcos_loss(
    cls: &Tensor,
    reg: &Tensor,
    ctr: &Tensor,
    targets: &FcosTargets,
    cfg: &LossConfig,
) -> Result<FcosLosses> {
    let (n, k) = cls.dims2().context("FCOS loss: cls must be [N, K]")?;
    ensure!(
        reg.dims() == [n, 4] && ctr.dims() == [n] && targets.labels.len() == n,
        "FCOS loss: cls {:?}, reg {:?}, ctr {:?} and {} targets disagree",
        cls.dims(),
        reg.dims(),
        ctr.dims(),
        targets.labels.len()
    );
    let dev = cls.device();
    let mut onehot = vec![0f32; n * k];
    for &p in &targets.positives {
        let c = targets.labels[p] as usize;
        ensure!(c < k, "FCOS loss: label {c} with {k} classes");
        onehot[p * k + c] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (n, k), dev)?;
    let num_pos = targets.num_pos();
    let denom = num_pos.max(1) as f64;
    let cls_loss = (sigmoid_focal_loss(cls, &onehot, cfg.alpha, cfg.gamma)?.sum_all()? / denom)?;
    if num_pos == 0 {
        // mmdet: pos_bbox_preds.sum() of nothing, 0 with a graph
        let bbox = (reg.sum_all()? * 0.0)?;
        let centerness = (ctr.sum_all()? * 0.0)?;
        return Ok(FcosLosses {
            cls: cls_loss,
            bbox,
            centerness,
            num_pos,
        });
    }
    let idx: Vec<u32> = targets.positives.iter().map(|&p| p as u32).collect();
    let idx = Tensor::from_vec(idx, num_pos, dev)?;
    let pos_reg = reg.index_select(&idx, 0)?;
    let pos_ctr = ctr.index_select(&idx, 0)?;
    let flat: Vec<f32> = targets.ltrb.iter().flatten().copied().collect();
    let tgt = Tensor::from_vec(flat, (num_pos, 4), dev)?.to_dtype(reg.dtype())?;
    let ct = centerness(&targets.ltrb);
    let ct_sum: f64 = ct.iter().map(|&c| c as f64).sum();
    let ct = Tensor::from_vec(ct, num_pos, dev)?.to_dtype(reg.dtype())?;
    let giou = giou_ltrb(&pos_reg, &tgt)?;
    // (1 - giou) * w, summed, / max(sum w, 1e-6)
    let bbox = ((giou.affine(-1.0, 1.0)? * &ct)?.sum_all()? / ct_sum.max(1e-6))?;
    let centerness = (bce_with_logits(&pos_ctr, &ct)?.sum_all()? / denom)?;
    Ok(FcosLosses {
        cls: cls_loss,
        bbox,
        centerness,
        num_pos,
    })
}

/// A scalar loss as f64 (logging).
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// torchvision's formula, plainly, in f64 (moderate logits only).
    fn naive_focal(x: f64, t: f64, alpha: f64, gamma: f64) -> f64 {
        let p = 1.0 / (1.0 + (-x).exp());
        let ce = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
        let pt = p * t + (1.0 - p) * (1.0 - t);
        let at = alpha * t + (1.0 - alpha) * (1.0 - t);
        at * ce * (1.0 - pt).powf(gamma)
    }

    #[test]
    fn focal_loss_matches_the_plain_formula() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [-3.0f64, -0.5, 0.0, 0.7, 2.5, 4.0];
        let ts = [0.0f64, 1.0, 1.0, 0.0, 1.0, 0.0];
        let x = Tensor::new(&xs, &dev)?;
        let t = Tensor::new(&ts, &dev)?;
        let l = sigmoid_focal_loss(&x, &t, 0.25, 2.0)?.to_vec1::<f64>()?;
        for i in 0..xs.len() {
            let want = naive_focal(xs[i], ts[i], 0.25, 2.0);
            assert!((l[i] - want).abs() < 1e-12, "{i}: {} vs {want}", l[i]);
        }
        Ok(())
    }

    #[test]
    fn focal_loss_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let xs = vec![-4.0f64, -1.3, -0.2, 0.0, 0.4, 1.1, 2.9, 6.0];
        let ts = vec![1.0f64, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let t = Tensor::new(ts.as_slice(), &dev)?;
        let var = Var::new(xs.as_slice(), &dev)?;
        let f =
            |x: &Tensor| -> Result<Tensor> { Ok(sigmoid_focal_loss(x, &t, 0.25, 2.0)?.sum_all()?) };
        let g = f(var.as_tensor())?.backward()?;
        let g = g.get(&var).context("no grad")?.to_vec1::<f64>()?;
        let eps = 1e-6;
        for i in 0..xs.len() {
            let (mut p, mut m) = (xs.clone(), xs.clone());
            p[i] += eps;
            m[i] -= eps;
            let lp = f(&Tensor::new(p.as_slice(), &dev)?)?.to_scalar::<f64>()?;
            let lm = f(&Tensor::new(m.as_slice(), &dev)?)?.to_scalar::<f64>()?;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-7,
                "x = {}: analytic {} vs numeric {fd}",
                xs[i],
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn extreme_logits_give_finite_losses_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [-100.0f32, 100.0, -100.0, 100.0, -1e4, 1e4];
        let ts = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0];
        let var = Var::new(&xs, &dev)?;
        let t = Tensor::new(&ts, &dev)?;
        let fl = sigmoid_focal_loss(var.as_tensor(), &t, 0.25, 2.0)?;
        let bce = bce_with_logits(var.as_tensor(), &t)?;
        let v = fl.to_vec1::<f32>()?;
        // confidently wrong: alpha_t * |x|; confidently right: 0
        assert!(
            (v[0] - 25.0).abs() < 1e-4 && (v[1] - 75.0).abs() < 1e-4,
            "{v:?}"
        );
        assert!(v[2].abs() < 1e-30 && v[3].abs() < 1e-30);
        let b = bce.to_vec1::<f32>()?;
        assert!((b[0] - 100.0).abs() < 1e-4 && (b[1] - 100.0).abs() < 1e-4 && b[2] == 0.0);
        let g = (fl.sum_all()? + bce.sum_all()?)?.backward()?;
        let g = g.get(&var).context("no grad")?.to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // d/dx at x = -100, t = 1: focal -alpha, bce -1
        assert!((g[0] + 1.25).abs() < 1e-4, "{g:?}");
        Ok(())
    }

    #[test]
    fn log_sigmoid_derivative_at_zero_is_one_half() -> Result<()> {
        let var = Var::new(&[0.0f64], &Device::Cpu)?;
        let g = log_sigmoid(var.as_tensor())?.sum_all()?.backward()?;
        let g = g.get(&var).context("no grad")?.to_vec1::<f64>()?;
        assert!((g[0] - 0.5).abs() < 1e-12, "{g:?}");
        Ok(())
    }

    /// The fixture of scripts/make_det_fixtures.py (torchvision's focal loss, mmdet's GIoU and
    /// centerness formulas, float64): the same losses in f64 here.
    #[test]
    fn losses_equal_the_pytorch_reference() -> Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/det/fcos_loss.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{path:?}"))?;
        let f: serde_json::Value = serde_json::from_str(&text)?;
        let mat = |k: &str| -> Vec<Vec<f64>> { serde_json::from_value(f[k].clone()).unwrap() };
        let vec1 = |k: &str| -> Vec<f64> { serde_json::from_value(f[k].clone()).unwrap() };
        let dev = Device::Cpu;
        let t2 = |m: Vec<Vec<f64>>| -> Result<Tensor> {
            let (r, c) = (m.len(), m[0].len());
            Ok(Tensor::from_vec(m.concat(), (r, c), &dev)?)
        };
        let cls = t2(mat("cls"))?;
        let reg = t2(mat("reg"))?;
        let ctr = Tensor::new(vec1("ctr"), &dev)?;
        let labels: Vec<u32> = serde_json::from_value(f["labels"].clone())?;
        let positives: Vec<usize> = serde_json::from_value(f["positives"].clone())?;
        let ltrb: Vec<[f32; 4]> = mat("ltrb")
            .iter()
            .map(|r| [r[0] as f32, r[1] as f32, r[2] as f32, r[3] as f32])
            .collect();
        let targets = FcosTargets {
            box_index: vec![0; positives.len()],
            labels,
            positives,
            ltrb,
        };
        // element-wise focal loss (no f32 round trip of the inputs)
        let k = cls.dim(1)?;
        let mut onehot = vec![0f64; cls.elem_count()];
        for &p in &targets.positives {
            onehot[p * k + targets.labels[p] as usize] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, cls.dims(), &dev)?;
        let focal = sigmoid_focal_loss(&cls, &onehot, 0.25, 2.0)?.to_vec2::<f64>()?;
        for (got, want) in focal.iter().flatten().zip(mat("focal").iter().flatten()) {
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        // the targets went through f32 (FcosTargets holds f32 distances): 1e-6 relative
        let l = fcos_loss(&cls, &reg, &ctr, &targets, &LossConfig::default())?;
        for (name, got, key) in [
            ("cls", &l.cls, "loss_cls"),
            ("bbox", &l.bbox, "loss_bbox"),
            ("centerness", &l.centerness, "loss_centerness"),
        ] {
            let (got, want) = (scalar(got)?, f[key].as_f64().context("number")?);
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{name}: {got} vs {want}"
            );
        }
        assert_eq!(l.num_pos, 4);
        Ok(())
    }
}
