//! Objective stage of segmentation: per-pixel cross-entropy with an ignore index, as PyTorch's
//! `F.cross_entropy(logits, labels, weight=w, ignore_index=255, reduction="mean")` that mmseg's
//! `CrossEntropyLoss` calls (candle has no ignore index; dense-tasks.md 3):
//! `sum_i w[y_i] * -log_softmax(logits_i)[y_i] / sum_i w[y_i]` over the pixels `i` whose label is
//! not the ignore index (`w = 1` without class weights). One difference: a batch without any
//! labelled pixel gives 0 (with no gradient) where PyTorch gives NaN, so that a crop of only
//! ignored pixels does not stop a run.
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};

/// The loss of `logits [B, C, H, W]` against `labels [B, H, W]` (u32 class ids or `ignore`),
/// with optional per-class `weight [C]`. A label that is neither a class nor `ignore` is an error
/// naming it (PyTorch: "Target N is out of bounds").
pub fn cross_entropy_ignore(
    logits: &Tensor,
    labels: &Tensor,
    ignore: u32,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, c, h, w) = logits
        .dims4()
        .context("segmentation logits must be [B, C, H, W]")?;
    ensure!(
        labels.dims() == [b, h, w],
        "segmentation labels have shape {:?}, expected [{b}, {h}, {w}] (the logits' batch and size)",
        labels.dims()
    );
    if let Some(wt) = weight {
        ensure!(
            wt.dims() == [c],
            "class weights have shape {:?}, expected [{c}]",
            wt.dims()
        );
    }
    let ids = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&v| v != ignore && v as usize >= c) {
        bail!(
            "segmentation label {bad} is neither a class of 0..{c} nor the ignore index {ignore}"
        );
    }
    let dev = logits.device();
    let valid: Vec<f32> = ids.iter().map(|&v| f32::from(v != ignore)).collect();
    let safe: Vec<u32> = ids
        .iter()
        .map(|&v| if v == ignore { 0 } else { v })
        .collect();
    let n = ids.len();
    let safe = Tensor::from_vec(safe, (n, 1), dev)?;
    let mut pix_w = Tensor::from_vec(valid, n, dev)?.to_dtype(logits.dtype())?;
    if let Some(wt) = weight {
        let per_pixel = wt
            .to_dtype(logits.dtype())?
            .index_select(&safe.flatten_all()?, 0)?;
        pix_w = (pix_w * per_pixel)?;
    }
    let denom = pix_w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if denom == 0.0 {
        return Ok(Tensor::zeros((), logits.dtype(), dev)?);
    }
    // [B, C, H, W] -> [B*H*W, C]
    let flat = logits.permute((0, 2, 3, 1))?.reshape((n, c))?;
    let logp = candle_nn::ops::log_softmax(&flat, D::Minus1)?;
    let picked = logp.gather(&safe, 1)?.squeeze(1)?;
    Ok(((picked * pix_w)?.sum_all()?.neg()? / denom)?)
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
}
