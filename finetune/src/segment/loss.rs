//! Objective stage of segmentation: per-pixel cross-entropy with an ignore index, as PyTorch's
//! `F.cross_entropy(logits, labels, weight=w, ignore_index=255, reduction="mean")` that mmseg's
//! `CrossEntropyLoss` calls (candle has no ignore index; dense-tasks.md 3):
//! `sum_i w[y_i] * -log_softmax(logits_i)[y_i] / sum_i w[y_i]` over the pixels `i` whose label is
//! not the ignore index (`w = 1` without class weights). One difference: a batch without any
//! labelled pixel gives 0 (with no gradient) where PyTorch gives NaN, so that a crop of only
//! ignored pixels does not stop a run. The sum is [`mimlab_models::ops::pixel_cross_entropy`]:
//! one fused node on the CPU (no channels-last copy, no composed `log_softmax`), candle's ops
//! elsewhere; the two agree to rounding (tested there).
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};

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
    // checks the labels (an out-of-range one is named) before they index the weights below
    let sum = mimlab_models::ops::pixel_cross_entropy(logits, &ids, ignore, cw.as_deref())?;
    let denom: f64 = ids
        .iter()
        .filter(|&&v| v != ignore)
        .map(|&v| cw.as_ref().map_or(1.0, |w| w[v as usize]))
        .sum();
    if denom == 0.0 {
        return Ok(Tensor::zeros((), logits.dtype(), logits.device())?);
    }
    Ok((sum / denom)?)
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
