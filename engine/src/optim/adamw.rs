//! AdamW exactly as `torch.optim.AdamW` (single-tensor path), with per-parameter weight decay and
//! lr multiplier (layer-wise lr decay in finetuning).
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::fused;

/// One trainable variable with its own weight decay and lr multiplier.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// Checkpoint key of the variable.
    pub name: String,
    /// The variable updated in place.
    pub var: Var,
    /// Decoupled weight decay (0 for no-decay parameters).
    pub weight_decay: f64,
    /// Multiplier of the scheduled lr (applies to the decay too, as torch param-group lrs do).
    pub lr_scale: f64,
}

/// Moments and step count of one parameter.
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates this parameter received (torch keeps a per-parameter `step`; a parameter without
    /// a gradient is skipped and does not advance).
    step: u64,
}

/// AdamW exactly as torch.optim.AdamW: `p -= lr*wd*p` (decoupled, applied first),
/// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
/// `p -= lr * (m/(1-b1^t)) / (sqrt(v)/sqrt(1-b2^t) + eps)`.
pub struct AdamW {
    params: Vec<ParamGroup>,
    state: Vec<Moments>,
    betas: (f64, f64),
    eps: f64,
    step_count: u64,
    /// Use the in-place CPU kernels where they apply (off only in tests, to compare).
    fused: bool,
}

impl AdamW {
    /// Zero moments for every parameter; errors on duplicate names or bad hyper-parameters.
    pub fn new(params: Vec<ParamGroup>, betas: (f64, f64), eps: f64) -> Result<Self> {
        let (b1, b2) = betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            bail!("AdamW: betas must lie in [0, 1), got ({b1}, {b2})");
        }
        if eps.is_nan() || eps <= 0.0 {
            bail!("AdamW: eps must be > 0, got {eps}");
        }
        let mut seen = std::collections::HashSet::new();
        let mut state = Vec::with_capacity(params.len());
        for p in &params {
            if !seen.insert(p.name.as_str()) {
                bail!("AdamW: parameter `{}` given twice", p.name);
            }
            // two buffers of their own: the CPU update writes them in place
            let zeros = || {
                p.var
                    .as_tensor()
                    .zeros_like()
                    .with_context(|| format!("AdamW: allocating moments of `{}`", p.name))
            };
            state.push(Moments {
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                step: 0,
            });
        }
        Ok(Self {
            params,
            state,
            betas,
            eps,
            step_count: 0,
            fused: true,
        })
    }

    /// One update with learning rate `lr * lr_scale` per parameter; parameters without a
    /// gradient are skipped.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_with(grads, &|scale| lr * scale)
    }

    /// One update where each parameter's lr is `lr_for(its lr_scale)` (layer-wise decay with
    /// [`crate::optim::LrSchedule::lr_scaled`]).
    pub fn step_with(&mut self, grads: &GradStore, lr_for: &dyn Fn(f64) -> f64) -> Result<()> {
        let (b1, b2) = self.betas;
        self.step_count += 1;
        for (p, s) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let ctx = || format!("AdamW: updating `{}`", p.name);
            // Gradients of leaf variables can still carry candle's op history (products with the
            // weights); detach so the moments never chain one step's graph onto the next.
            let g = g.detach().to_dtype(p.var.dtype()).with_context(ctx)?;
            s.step += 1;
            let lr = lr_for(p.lr_scale);
            let bc1 = 1.0 - b1.powf(s.step as f64);
            let bc2_sqrt = (1.0 - b2.powf(s.step as f64)).sqrt();
            let step_size = lr / bc1;
            let decay = (p.weight_decay != 0.0).then_some(1.0 - lr * p.weight_decay);
            let g = g.contiguous().with_context(ctx)?;
            let var = p.var.as_tensor();
            if self.fused && fused::applies(&[var, &s.exp_avg, &s.exp_avg_sq, &g]) {
                // the same arithmetic in place, one pass per buffer
                s.exp_avg
                    .inplace_op2(
                        &g,
                        &fused::Ema {
                            beta: b1,
                            square: false,
                        },
                    )
                    .with_context(ctx)?;
                s.exp_avg_sq
                    .inplace_op2(
                        &g,
                        &fused::Ema {
                            beta: b2,
                            square: true,
                        },
                    )
                    .with_context(ctx)?;
                let update = fused::Update {
                    decay,
                    inv_bc2_sqrt: 1.0 / bc2_sqrt,
                    eps: self.eps,
                    step_size,
                };
                var.inplace_op3(&s.exp_avg, &s.exp_avg_sq, &update)
                    .with_context(ctx)?;
                continue;
            }
            let mut param = var.detach();
            if let Some(decay) = decay {
                // param.mul_(1 - lr * weight_decay)
                param = param.affine(decay, 0.0).with_context(ctx)?;
            }
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            s.exp_avg = ((&s.exp_avg * b1)? + (&g * (1.0 - b1))?)
                .with_context(ctx)?
                .detach();
            s.exp_avg_sq = ((&s.exp_avg_sq * b2)? + (g.sqr()? * (1.0 - b2))?)
                .with_context(ctx)?
                .detach();
            // denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
            let denom = s
                .exp_avg_sq
                .sqrt()?
                .affine(1.0 / bc2_sqrt, self.eps)
                .with_context(ctx)?;
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            let update = (s.exp_avg.div(&denom)? * step_size).with_context(ctx)?;
            let param = (param - update).with_context(ctx)?;
            p.var.set(&param).with_context(ctx)?;
        }
        Ok(())
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// Moments by `<name>.exp_avg` / `<name>.exp_avg_sq`, plus each parameter's own update count
    /// as a 1-element F64 tensor `<name>.step` (differs from `step_count` only for skipped params).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (p, s) in self.params.iter().zip(&self.state) {
            // copies: the CPU update keeps writing the moments in place
            let snapshot = |t: &Tensor| t.copy().expect("copy of a moment buffer");
            out.insert(format!("{}.exp_avg", p.name), snapshot(&s.exp_avg));
            out.insert(format!("{}.exp_avg_sq", p.name), snapshot(&s.exp_avg_sq));
            // Invariant: a 1-element CPU tensor from a slice of matching length cannot fail.
            let step = Tensor::new(&[s.step as f64], &candle_core::Device::Cpu)
                .expect("1-element CPU tensor");
            out.insert(format!("{}.step", p.name), step);
        }
        out
    }

    /// Restores moments (and per-parameter steps, defaulting to `step_count` when absent); the
    /// error names the missing or mis-shaped moment.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step_count: u64) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.state.len());
        for p in &self.params {
            let want = p.var.as_tensor();
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors
                    .get(&key)
                    .with_context(|| format!("optimizer state: missing moment `{key}`"))?;
                if t.dims() != want.dims() {
                    bail!(
                        "optimizer state: moment `{key}` has shape {:?}, parameter has {:?}",
                        t.dims(),
                        want.dims()
                    );
                }
                // a buffer of its own (updated in place later), on the parameter's device/dtype
                t.to_device(want.device())
                    .and_then(|t| t.to_dtype(want.dtype()))
                    .and_then(|t| t.copy())
                    .with_context(|| format!("optimizer state: moving `{key}`"))
            };
            let step = match tensors.get(&format!("{}.step", p.name)) {
                Some(t) => t
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f64>())
                    .ok()
                    .and_then(|v| v.first().copied())
                    .with_context(|| format!("optimizer state: bad `{}.step`", p.name))?
                    as u64,
                None => step_count,
            };
            loaded.push(Moments {
                exp_avg: get("exp_avg")?,
                exp_avg_sq: get("exp_avg_sq")?,
                step,
            });
        }
        self.state = loaded;
        self.step_count = step_count;
        Ok(())
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[ParamGroup] {
        &self.params
    }

    /// The variables, in the order given to [`AdamW::new`].
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn group(name: &str, init: &[f32], wd: f64) -> ParamGroup {
        let var = Var::from_slice(init, init.len(), &Device::Cpu).unwrap();
        ParamGroup {
            name: name.into(),
            var,
            weight_decay: wd,
            lr_scale: 1.0,
        }
    }

    /// Gradient of sum(c * p) is c.
    fn grads_of(params: &[ParamGroup], coef: &[f32]) -> GradStore {
        let c = Tensor::new(coef, &Device::Cpu).unwrap();
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for p in params {
            loss = (loss + (p.var.as_tensor() * &c).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    fn values(p: &ParamGroup) -> Vec<f32> {
        p.var.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn first_step_matches_hand_values() {
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g)
        // (up to eps), after decay p *= 1 - lr*wd.
        let params = vec![
            group("w", &[1.0, -2.0, 0.5], 0.1),
            group("b", &[1.0, -2.0, 0.5], 0.0),
        ];
        let mut opt = AdamW::new(params, (0.9, 0.999), 1e-8).unwrap();
        let g = grads_of(opt.params(), &[0.5, -1.0, 2.0]);
        opt.step(&g, 0.01).unwrap();
        // w: p*(1 - 0.01*0.1) - 0.01*sign(g): 0.999-0.01, -1.998+0.01, 0.4995-0.01
        let want_w = [0.989f32, -1.988, 0.4895];
        let want_b = [0.99f32, -1.99, 0.49];
        for (a, b) in values(&opt.params()[0]).iter().zip(want_w) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for (a, b) in values(&opt.params()[1]).iter().zip(want_b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn two_steps_match_f64_reference_and_state_round_trips() {
        let init = [0.3f32, -0.7, 1.5];
        let gs = [[0.2f32, -0.4, 1.0], [-0.1f32, 0.3, 0.5]];
        let (lr, wd, b1, b2, eps) = (0.05, 0.05, 0.9, 0.999, 1e-8);
        let mut opt = AdamW::new(vec![group("p", &init, wd)], (b1, b2), eps).unwrap();
        // f64 reference, torch order.
        let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0f64; 3], vec![0f64; 3]);
        for (t, g) in gs.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..3 {
                let gi = g[i] as f64;
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
            let grads = grads_of(opt.params(), g);
            opt.step(&grads, lr).unwrap();
        }
        for (a, b) in values(&opt.params()[0]).iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Moments round trip into a fresh optimizer; a missing key is named.
        let st = opt.state_tensors();
        let m_got = st["p.exp_avg"].to_vec1::<f32>().unwrap();
        assert!((m_got[2] as f64 - m[2]).abs() < 1e-7);
        let mut fresh = AdamW::new(vec![group("p", &init, wd)], (b1, b2), eps).unwrap();
        fresh.load_state(&st, 2).unwrap();
        assert_eq!(fresh.step_count(), 2);
        assert_eq!(
            fresh.state_tensors()["p.exp_avg_sq"]
                .to_vec1::<f32>()
                .unwrap(),
            st["p.exp_avg_sq"].to_vec1::<f32>().unwrap()
        );
        let mut partial = st.clone();
        partial.remove("p.exp_avg_sq");
        let err = fresh.load_state(&partial, 2).unwrap_err().to_string();
        assert!(
            err.contains("p.exp_avg_sq") && err.contains("missing"),
            "{err}"
        );
        partial.insert(
            "p.exp_avg_sq".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = fresh.load_state(&partial, 2).unwrap_err().to_string();
        assert!(
            err.contains("p.exp_avg_sq") && err.contains("shape"),
            "{err}"
        );
    }

    #[test]
    fn params_without_grad_are_skipped() {
        let used = group("used", &[1.0], 0.1);
        let unused = group("unused", &[1.0], 0.1);
        let mut opt = AdamW::new(vec![used, unused], (0.9, 0.999), 1e-8).unwrap();
        let g = grads_of(&opt.params()[..1], &[1.0]);
        opt.step(&g, 0.1).unwrap();
        assert_ne!(values(&opt.params()[0]), vec![1.0]);
        assert_eq!(values(&opt.params()[1]), vec![1.0]); // no decay either, as torch
        let st = opt.state_tensors();
        assert_eq!(st["unused.step"].to_vec1::<f64>().unwrap(), vec![0.0]);
        assert_eq!(st["used.step"].to_vec1::<f64>().unwrap(), vec![1.0]);
    }

    /// Regression: a leaf gradient can carry op history (here d(w*x)/dx = w, a variable); if the
    /// moments kept it, every step would chain its whole graph onto the next and memory would grow
    /// without bound (seen as an OOM after ~200 SimMIM steps).
    #[test]
    fn moments_hold_no_graph() {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let x = candle_core::Var::new(&[3.0f32, 4.0], &dev).unwrap();
        let loss = (w.as_tensor() * x.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(x.as_tensor()).unwrap().track_op(),
            "premise: x's grad is tracked"
        );
        let group = |name: &str, var: &candle_core::Var| ParamGroup {
            name: name.into(),
            var: var.clone(),
            weight_decay: 0.0,
            lr_scale: 1.0,
        };
        let mut opt = AdamW::new(vec![group("w", &w), group("x", &x)], (0.9, 0.999), 1e-8).unwrap();
        opt.step(&grads, 0.1).unwrap();
        for (name, t) in opt.state_tensors() {
            assert!(!t.track_op(), "{name} keeps an op graph");
        }
        assert!(!x.as_tensor().track_op() || x.as_tensor().is_variable());
    }

    /// The in-place CPU kernels give exactly the tensor-op path's parameters and moments (f32,
    /// weight decay and lr scales, more elements than one parallel chunk), with each copy of the
    /// kernels this CPU runs (baseline, AVX2, AVX-512).
    #[test]
    fn fused_update_is_bit_identical_to_tensor_ops() {
        for level in crate::simd::levels() {
            crate::simd::with_max_level(level, fused_update_matches_tensor_ops);
        }
    }

    fn fused_update_matches_tensor_ops() {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dev = Device::Cpu;
        let n = 70_000;
        let make = || {
            vec![
                ParamGroup {
                    name: "w".into(),
                    var: Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &dev).unwrap()).unwrap(),
                    weight_decay: 0.05,
                    lr_scale: 0.7,
                },
                ParamGroup {
                    name: "b".into(),
                    var: Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap())
                        .unwrap(),
                    weight_decay: 0.0,
                    lr_scale: 1.0,
                },
            ]
        };
        let pa = make();
        // same start values in separate buffers
        let pb: Vec<ParamGroup> = pa
            .iter()
            .map(|p| ParamGroup {
                var: Var::from_tensor(&p.var.as_tensor().copy().unwrap()).unwrap(),
                ..p.clone()
            })
            .collect();
        let mut fused = AdamW::new(pa.clone(), (0.9, 0.999), 1e-8).unwrap();
        let mut plain = AdamW::new(pb.clone(), (0.9, 0.999), 1e-8).unwrap();
        plain.fused = false;
        for step in 0..3 {
            let grads = |ps: &[ParamGroup]| {
                // d/dp sum(p * c) = c, with c = sin(p) * (1 + i + step) fixed
                let mut loss = Tensor::new(0f32, &dev).unwrap();
                for (i, p) in ps.iter().enumerate() {
                    let c = (p.var.as_tensor().sin().unwrap() * (1.0 + i as f64 + step as f64))
                        .unwrap()
                        .detach();
                    let term = (p.var.as_tensor() * c).unwrap().sum_all().unwrap();
                    loss = (loss + term).unwrap();
                }
                loss.backward().unwrap()
            };
            fused.step(&grads(&pa), 1e-3).unwrap();
            plain.step(&grads(&pb), 1e-3).unwrap();
            let (sa, sb) = (fused.state_tensors(), plain.state_tensors());
            for (a, b) in pa.iter().zip(&pb) {
                assert_eq!(
                    flat(a.var.as_tensor()),
                    flat(b.var.as_tensor()),
                    "param {} step {step}",
                    a.name
                );
                for m in ["exp_avg", "exp_avg_sq"] {
                    let key = format!("{}.{m}", a.name);
                    let (ma, mb) = (flat(&sa[&key]), flat(&sb[&key]));
                    assert_eq!(ma, mb, "{key} step {step}");
                }
            }
        }
        // and the update moved the parameters
        assert_ne!(
            pa[0].var.as_tensor().to_vec1::<f32>().unwrap()[..4],
            make()[0].var.as_tensor().to_vec1::<f32>().unwrap()[..4]
        );
    }
}
