//! Classification losses: soft-target cross-entropy, which is timm's `SoftTargetCrossEntropy`
//! on mixed targets and `LabelSmoothingCrossEntropy` on smoothed one-hot targets.
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

/// `mean_b sum_c -targets[b, c] * log_softmax(logits)[b, c]` (differentiable).
pub fn soft_target_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    ensure!(
        logits.dims() == targets.dims(),
        "cross-entropy: logits {:?} vs targets {:?}",
        logits.dims(),
        targets.dims()
    );
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = targets.to_dtype(logp.dtype())?;
    Ok((logp * t)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Smoothed one-hot targets `[B, classes]` (on `1 - s + s/C`, off `s/C`), as f32 on `logits`'
/// device: the label-smoothing cross-entropy target.
pub fn smoothed_targets(
    labels: &[u32],
    classes: usize,
    smoothing: f64,
    like: &Tensor,
) -> Result<Tensor> {
    let t = crate::classify::mixup::mix_targets(labels, classes, 1.0, smoothing)?;
    Ok(Tensor::from_vec(t, (labels.len(), classes), like.device())?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn label_smoothing_loss_equals_hand_values() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f64, 0., 0.], [0., 1., -1.]], &dev)?;
        let t = smoothed_targets(&[0, 2], 3, 0.1, &logits)?.to_dtype(DType::F64)?;
        let loss = soft_target_cross_entropy(&logits, &t)?.to_scalar::<f64>()?;
        // per sample: -(on*logp[y] + off*sum of the others), on = 0.9 + 0.1/3, off = 0.1/3
        let want = (0.372_878_099_555_217_5 + 2.307_605_964_444_381) / 2.0;
        assert!((loss - want).abs() < 1e-7, "{loss} vs {want}");
        // no smoothing = plain NLL of the label
        let t = smoothed_targets(&[0], 3, 0.0, &logits)?.to_dtype(DType::F64)?;
        let first = logits.narrow(0, 0, 1)?;
        let nll = soft_target_cross_entropy(&first, &t)?.to_scalar::<f64>()?;
        let lse = (2f64.exp() + 2.0).ln();
        assert!((nll - (lse - 2.0)).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradient_is_softmax_minus_target() -> Result<()> {
        let dev = Device::Cpu;
        let var = candle_core::Var::new(&[[0.5f64, -1.0, 2.0]], &dev)?;
        let t = Tensor::new(&[[0.1f64, 0.2, 0.7]], &dev)?;
        let loss = soft_target_cross_entropy(var.as_tensor(), &t)?;
        let g = loss.backward()?;
        let g: Vec<f64> = g.get(&var).unwrap().flatten_all()?.to_vec1()?;
        let e: Vec<f64> = [0.5f64, -1.0, 2.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        for (k, gk) in g.iter().enumerate() {
            assert!((gk - (e[k] / z - [0.1, 0.2, 0.7][k])).abs() < 1e-12);
        }
        Ok(())
    }
}
