//! Objective stage of segmentation: per-pixel cross-entropy with an ignore index, as PyTorch's
//! `F.cross_entropy(logits, labels, weight=w, ignore_index=255, reduction="mean")` that mmseg's
//! `CrossEntropyLoss` calls (candle has no ignore index; dense-tasks.md 3):
//! `sum_i w[y_i] * -log_softmax(logits_i)[y_i] / sum_i w[y_i]` over the pixels `i` whose label is
//! not the ignore index (`w = 1` without class weights). One difference: a batch without any
//! labelled pixel gives 0 (with no gradient) where PyTorch gives NaN, so that a crop of only
//! ignored pixels does not stop a run. On the CPU the sum is one fused node
//! ([`mimlab_models::ops::pixel_cross_entropy`]: no channels-last copy, no composed
//! `log_softmax`), elsewhere candle's ops; the two agree to rounding (tested).
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};

/// The loss of `logits [B, C, H, W]` against `labels [B, H, W]` (u32 class ids or `ignore`),
/// with optional per-class `weight [C]`. A label that is neither a class nor `ignore` is an error
/// naming it (PyTorch: "Target N is out of bounds"). On the CPU it is one node
/// ([`mimlab_models::ops::pixel_cross_entropy`]), elsewhere candle's composed ops; both give the
/// same value and gradient (tested).
pub fn cross_entropy_ignore(
    logits: &Tensor,
    labels: &Tensor,
    ignore: u32,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let (ids, cw) = checked(logits, labels, ignore, weight)?;
    let denom: f64 = ids
        .iter()
        .filter(|&&v| v != ignore)
        .map(|&v| cw.as_ref().map_or(1.0, |w| w[v as usize]))
        .sum();
    if denom == 0.0 {
        return Ok(Tensor::zeros((), logits.dtype(), logits.device())?);
    }
    let sum = if mimlab_models::ops::is_fused(logits) {
        mimlab_models::ops::pixel_cross_entropy(logits, &ids, ignore, cw.as_deref())?
    } else {
        composed_sum(logits, &ids, ignore, cw.as_deref())?
    };
    Ok((sum / denom)?)
}

/// The labels as ids and the class weights as f64, checked against the logits.
fn checked(
    logits: &Tensor,
    labels: &Tensor,
    ignore: u32,
    weight: Option<&Tensor>,
) -> Result<(Vec<u32>, Option<Vec<f64>>)> {
    let (b, c, h, w) = logits
        .dims4()
        .context("segmentation logits must be [B, C, H, W]")?;
    ensure!(
        labels.dims() == [b, h, w],
        "segmentation labels have shape {:?}, expected [{b}, {h}, {w}] (the logits' batch and size)",
        labels.dims()
    );
    let cw = match weight {
        Some(wt) => {
            ensure!(
                wt.dims() == [c],
                "class weights have shape {:?}, expected [{c}]",
                wt.dims()
            );
            Some(wt.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        }
        None => None,
    };
    let ids = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&v| v != ignore && v as usize >= c) {
        bail!(
            "segmentation label {bad} is neither a class of 0..{c} nor the ignore index {ignore}"
        );
    }
    Ok((ids, cw))
}

/// `sum_i w[y_i] * -log_softmax(logits_i)[y_i]` from candle's ops (any device): channels-last,
/// `log_softmax`, a gather and the pixel weights.
fn composed_sum(logits: &Tensor, ids: &[u32], ignore: u32, cw: Option<&[f64]>) -> Result<Tensor> {
    let c = logits.dim(1)?;
    let dev = logits.device();
    let n = ids.len();
    let pix_w: Vec<f32> = ids
        .iter()
        .map(|&v| match (v == ignore, cw) {
            (true, _) => 0.0,
            (false, Some(w)) => w[v as usize] as f32,
            (false, None) => 1.0,
        })
        .collect();
    let safe: Vec<u32> = ids
        .iter()
        .map(|&v| if v == ignore { 0 } else { v })
        .collect();
    let safe = Tensor::from_vec(safe, (n, 1), dev)?;
    let pix_w = Tensor::from_vec(pix_w, n, dev)?.to_dtype(logits.dtype())?;
    // [B, C, H, W] -> [B*H*W, C]
    let flat = logits.permute((0, 2, 3, 1))?.reshape((n, c))?;
    let logp = candle_nn::ops::log_softmax(&flat, D::Minus1)?;
    let picked = logp.gather(&safe, 1)?.squeeze(1)?;
    Ok((picked * pix_w)?.sum_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two pixels, one ignored: the loss is the kept pixel's -log softmax; an all-ignored batch
    /// is 0; a label out of range is named.
    #[test]
    fn hand_case_and_errors() -> Result<()> {
        let dev = Device::Cpu;
        // [1, 2, 1, 2]: pixel 0 logits (0, ln 3), pixel 1 (5, -5)
        let logits = Tensor::from_vec(vec![0f32, 5.0, 3f32.ln(), -5.0], (1, 2, 1, 2), &dev)?;
        let labels = Tensor::from_vec(vec![1u32, 255], (1, 1, 2), &dev)?;
        let l = cross_entropy_ignore(&logits, &labels, 255, None)?.to_scalar::<f32>()?;
        assert!((l - (4f32 / 3.0).ln()).abs() < 1e-6, "{l}");
        let none = Tensor::from_vec(vec![255u32, 255], (1, 1, 2), &dev)?;
        assert_eq!(
            cross_entropy_ignore(&logits, &none, 255, None)?.to_scalar::<f32>()?,
            0.0
        );
        let bad = Tensor::from_vec(vec![1u32, 7], (1, 1, 2), &dev)?;
        let e = cross_entropy_ignore(&logits, &bad, 255, None).unwrap_err();
        assert!(e.to_string().contains("label 7"), "{e}");
        Ok(())
    }

    /// The CPU's fused loss against the composed one, value and gradient, with class weights
    /// and ignored pixels on an 11-class odd-sized map.
    #[test]
    fn fused_and_composed_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 4.0, (2, 11, 9, 13), &dev)?)?;
        let ids: Vec<u32> = (0..2 * 9 * 13)
            .map(|i| if i % 5 == 0 { 255 } else { (i * 7 % 11) as u32 })
            .collect();
        let cw: Vec<f64> = (0..11)
            .map(|k| if k == 0 { 0.2 } else { 1.0 + k as f64 * 0.1 })
            .collect();
        let labels = Tensor::from_vec(ids.clone(), (2, 9, 13), &dev)?;
        let wt = Tensor::from_vec(cw.clone(), 11, &dev)?;
        let fused = cross_entropy_ignore(&x, &labels, 255, Some(&wt))?;
        let denom: f64 = ids
            .iter()
            .filter(|&&v| v != 255)
            .map(|&v| cw[v as usize])
            .sum();
        let plain = (composed_sum(&x, &ids, 255, Some(&cw))? / denom)?;
        let (f, p) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((f - p).abs() < 1e-5 * p.abs(), "{f} vs {p}");
        let gf = fused.backward()?;
        let gp = plain.backward()?;
        let d = (gf.get(&x).unwrap() - gp.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
