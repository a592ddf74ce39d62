//! Reproducible parameter initialization.
//!
//! `VarBuilder::from_varmap` draws its random inits from candle's CPU RNG, which cannot be seeded.
//! [`seeded_var_builder`] is the same trainable `VarMap` store, but every new variable is drawn
//! from a `StdRng` seeded by (seed, variable name), so a model built twice from the same seed has
//! bit-identical weights whatever the construction order.
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::rng::{mix_seed, rng_for};

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// Draws `shape` values of `init` with a generator seeded by (seed, name).
pub fn draw_init(init: Init, shape: &Shape, name: &str, seed: u64) -> Vec<f32> {
    let n = shape.elem_count();
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    let mut rng = rng_for(mix_seed(seed, &[name_hash]), &[]);
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => {
            let normal = Normal::new(mean, stdev.max(0.0)).expect("finite normal parameters");
            (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
        }
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..=up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| rng.random_range(-bound..=bound) as f32)
                        .collect()
                }
                NormalOrUniform::Normal => {
                    let normal = Normal::new(0.0, std).expect("finite normal parameters");
                    (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap mutex poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "shape mismatch on {name}: asked {s:?}, stored {:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = draw_init(h, &s, name, self.seed);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("varmap mutex poisoned");
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap mutex poisoned")
            .contains_key(name)
    }
}

/// A `VarBuilder` whose new variables live in `varmap` (trainable) and are initialized from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        dev.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_stats() {
        let dev = Device::Cpu;
        let build = |seed| {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
            let w = vb
                .get_with_hints(
                    (64, 128),
                    "a.weight",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )
                .unwrap();
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let a = build(1);
        assert_eq!(a, build(1));
        assert_ne!(a, build(2));
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std - 0.02).abs() < 1e-3, "std {std}");
    }

    #[test]
    fn kaiming_uniform_bound_matches_pytorch() {
        // PyTorch default Linear/Conv init: kaiming_uniform(a=sqrt(5)) -> bound = 1/sqrt(fan_in);
        // candle's DEFAULT_KAIMING_UNIFORM uses ReLU gain: bound = sqrt(6/fan_in).
        let v = draw_init(
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            &Shape::from((8, 24)),
            "w",
            0,
        );
        let bound = (6.0f64 / 24.0).sqrt() as f32;
        assert!(v.iter().all(|x| x.abs() <= bound + 1e-6));
        assert!(v.iter().any(|x| x.abs() > 0.8 * bound));
    }
}
