//! Global-norm gradient clipping (torch `clip_grad_norm_`, architecture.md 3.5: CLIP_GRAD 5.0).
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Global L2 norm of the gradients of `vars` (those without a gradient count as zero).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for v in vars {
        let Some(g) = grads.get(v.as_tensor()) else {
            continue;
        };
        // Per-tensor sum of squares in the grad's dtype, accumulated in f64 on the device: one
        // host sync for the whole model.
        let sq = g
            .sqr()
            .and_then(|s| s.sum_all())
            .and_then(|s| s.to_dtype(DType::F64))
            .context("grad norm: sum of squares")?;
        total = Some(match total {
            None => sq,
            Some(t) => (t + sq).context("grad norm: accumulate")?,
        });
    }
    match total {
        None => Ok(0.0),
        Some(t) => Ok(t.to_scalar::<f64>().context("grad norm: read back")?.sqrt()),
    }
}

/// Global L2 norm of all grads (f64) and in-place clip: if the norm exceeds `max_norm`, grads
/// are scaled by `max_norm/(norm+1e-6)` (torch clip_grad_norm_). Returns the pre-clip norm.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to <= 1.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let scaled = (g * coef).context("grad clip: scale")?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn norm_of_known_grads_and_clip_to_max() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1f32, 1.0], 2, &dev).unwrap();
        let b = Var::from_slice(&[1f32], 1, &dev).unwrap();
        // loss = 3*a0 + 4*a1 + 12*b -> grads (3,4) and (12): norm sqrt(9+16+144) = 13.
        let ca = Tensor::new(&[3f32, 4.0], &dev).unwrap();
        let cb = Tensor::new(&[12f32], &dev).unwrap();
        let loss = ((a.as_tensor() * &ca).unwrap().sum_all().unwrap()
            + (b.as_tensor() * &cb).unwrap().sum_all().unwrap())
        .unwrap();
        let mut g = loss.backward().unwrap();
        let vars = [a.clone(), b.clone()];
        let n = clip_grad_norm(&mut g, &vars, 5.0).unwrap();
        assert!((n - 13.0).abs() < 1e-9, "{n}");
        let after = grad_norm(&g, &vars).unwrap();
        assert!((after - 5.0).abs() < 1e-6, "{after}");
        let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!((ga[0] - 3.0 * 5.0 / 13.0).abs() < 1e-6);
        // Below the max: untouched.
        let n2 = clip_grad_norm(&mut g, &vars, 100.0).unwrap();
        assert!((n2 - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g, &vars).unwrap() - 5.0).abs() < 1e-6);
    }
}
