//! SimMIM model (architecture.md 3.2-3.3): Swin-V2 encoder with a mask token, a 1x1-conv linear
//! pixel head + PixelShuffle, and the masked L1 loss on (optionally locally normalized) pixels.
use anyhow::Context;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use mimlab_engine::rng::SharedRng;
use mimlab_models::moe::MoeAux;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

use crate::simmim::mask::{MaskGenerator, SimMimConfig};

/// SimMIM: encoder (key prefix `encoder.`) + linear pixel head (`decoder.0`), official layout.
pub struct SimMim {
    /// Swin-V2 with a mask token.
    pub encoder: SwinV2,
    /// Weight of `Conv2d(num_features, stride^2 * in_chans, 1)` as `[out, num_features]` (the
    /// checkpoint's `decoder.0.weight` is `[out, num_features, 1, 1]`, the same numbers).
    decoder_w: Tensor,
    /// `decoder.0.bias`, `[out]`.
    decoder_b: Tensor,
    /// Model patch size (mask resolution -> pixels).
    patch_size: usize,
    /// Encoder output stride (PixelShuffle factor).
    stride: usize,
    /// `Some(p)` when targets are locally normalized over a p x p window.
    norm_target: Option<usize>,
}

impl SimMim {
    /// Builds the encoder under `encoder.` and the head under `decoder.0.`; checks the mask and
    /// target-normalization sizes against the model.
    pub fn new(
        model: &SwinV2Config,
        cfg: &SimMimConfig,
        rng: SharedRng,
        vb: VarBuilder,
    ) -> anyhow::Result<Self> {
        MaskGenerator::for_model(model, cfg)?;
        let norm_target = if cfg.norm_target {
            anyhow::ensure!(
                !cfg.norm_target_patch.is_multiple_of(2) && cfg.norm_target_patch >= 3,
                "simmim.norm_target_patch = {} must be odd and >= 3",
                cfg.norm_target_patch
            );
            Some(cfg.norm_target_patch)
        } else {
            None
        };
        // SwinTransformerV2ForSimMIM is built with num_classes=0 (no head keys).
        let enc_cfg = SwinV2Config {
            num_classes: 0,
            ..model.clone()
        };
        let encoder = SwinV2::new(&enc_cfg, true, rng, vb.pp("encoder"))
            .context("building the SimMIM encoder")?;
        let (nf, stride) = (model.num_features(), model.out_stride());
        let out = stride * stride * model.in_chans;
        // nn.Conv2d default init (SimMIM does not re-init the head): U(-1/sqrt(fan_in), ..) for
        // weight (kaiming_uniform a=sqrt(5)) and bias.
        let bound = 1.0 / (nf as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vbd = vb.pp("decoder").pp("0");
        let w = vbd
            .get_with_hints((out, nf, 1, 1), "weight", init)
            .context("decoder.0.weight")?;
        let b = vbd
            .get_with_hints(out, "bias", init)
            .context("decoder.0.bias")?;
        Ok(Self {
            encoder,
            decoder_w: w.reshape((out, nf))?,
            decoder_b: b,
            patch_size: model.patch_size,
            stride,
            norm_target,
        })
    }

    /// Forward multiply-adds per image of the SimMIM model on `model` ([`SwinV2Config::macs`]
    /// of the encoder, built without a classifier head, plus the linear pixel head: a 1x1
    /// convolution from the last stage's `num_features` to `stride^2 * in_chans` on every
    /// token of the last map). The mask token's blend is per element and not counted.
    pub fn macs(model: &SwinV2Config) -> u64 {
        let enc = SwinV2Config {
            num_classes: 0,
            ..model.clone()
        };
        let stride = model.out_stride();
        let tokens = (model.img_size / stride).pow(2);
        let head = tokens * model.num_features() * stride * stride * model.in_chans;
        enc.macs() + head as u64
    }

    /// Model patch size (the mask's pixel scale).
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// Target normalization window, if any.
    pub fn norm_target(&self) -> Option<usize> {
        self.norm_target
    }

    /// `x_rec [B, C, H, W] = pixel_shuffle(decoder(z), stride)`, z the encoder's last stage
    /// (after the final norm), `mask` `[B, H/patch, W/patch]` f32 with 1 = masked; and the
    /// encoder's MoE statistics.
    pub fn reconstruct(
        &self,
        x: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> anyhow::Result<(Tensor, MoeAux)> {
        let f = self.encoder.forward_features(x, Some(mask), train)?;
        // Invariant: Swin-V2 always has at least one stage.
        let z = f.stages.last().context("encoder returned no stages")?;
        // The 1x1 conv is a linear layer on the tokens: the last stage is a permuted view of the
        // token-major [B, H/s, W/s, C] map, so this permute is a free view. candle's conv2d
        // backward would also compute the input gradient through conv_transpose2d, ~3% of a
        // tiny_w8 step.
        let tokens = z.permute((0, 2, 3, 1))?;
        let y = mimlab_models::ops::linear(&tokens, &self.decoder_w, Some(&self.decoder_b))
            .context("decoder.0")?
            .permute((0, 3, 1, 2))?; // (B, s*s*C, H/s, W/s)
        Ok((pixel_shuffle(&y, self.stride)?, f.moe))
    }

    /// Target the loss compares against: the image, or its local normalization.
    pub fn target(&self, x: &Tensor) -> Result<Tensor> {
        match self.norm_target {
            Some(p) => norm_targets(x, p),
            None => Ok(x.clone()),
        }
    }

    /// (masked L1 loss, x_rec, the encoder's MoE statistics) of a batch of normalized images and
    /// model-patch masks.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> anyhow::Result<(Tensor, Tensor, MoeAux)> {
        let (x_rec, moe) = self.reconstruct(x, mask, train)?;
        let m = pixel_mask(&mask.to_dtype(x_rec.dtype())?, self.patch_size)?;
        let target = self.target(x)?;
        let loss = masked_l1(&x_rec, &target, &m)?;
        Ok((loss, x_rec, moe))
    }
}

/// PixelShuffle(r) exactly as torch: `[B, C*r*r, H, W] -> [B, C, H*r, W*r]` with
/// `out[b, c, h*r + i, w*r + j] = in[b, c*r*r + i*r + j, h, w]`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if r == 0 || c % (r * r) != 0 {
        bail!(
            "pixel_shuffle: {c} channels are not a multiple of r^2 = {}",
            r * r
        );
    }
    let oc = c / (r * r);
    // (B, oc, i, j, H, W) -> (B, oc, H, i, W, j)
    x.reshape((b, oc, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, oc, h * r, w * r))
}

/// Model-patch mask `[B, h, w]` -> pixel mask `[B, 1, h*p, w*p]` (torch
/// `mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)`), same dtype.
pub fn pixel_mask(mask: &Tensor, p: usize) -> Result<Tensor> {
    let (b, h, w) = mask.dims3()?;
    mask.reshape((b, h, 1, w, 1))?
        .broadcast_as((b, h, p, w, p))?
        .contiguous()?
        .reshape((b, 1, h * p, w * p))
}

/// SimMIM loss (3.3): `sum(|target - x_rec| * m) / (sum(m) + 1e-5) / in_chans`, `m` the pixel
/// mask `[B, 1, H, W]` (so `sum(m)` counts pixels, not pixel-channels).
pub fn masked_l1(x_rec: &Tensor, target: &Tensor, pixel_mask: &Tensor) -> Result<Tensor> {
    let c = x_rec.dim(1)?;
    let num = (target - x_rec)?
        .abs()?
        .broadcast_mul(pixel_mask)?
        .sum_all()?;
    let den = (pixel_mask.sum_all()? + 1e-5)?;
    num.div(&den)? / c as f64
}

/// `[n, n]` f32 band matrix, 1 where `|i - j| <= half`, and its row sums (window sizes clipped to
/// the image, i.e. `count_include_pad=False`).
fn band(n: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let mut m = vec![0f32; n * n];
    let mut counts = vec![0f32; n];
    for i in 0..n {
        let (lo, hi) = (i.saturating_sub(half), (i + half).min(n - 1));
        for j in lo..=hi {
            m[i * n + j] = 1.0;
        }
        counts[i] = (hi - lo + 1) as f32;
    }
    (m, counts)
}

/// Local mean and `sqrt(var + 1e-6)` of `norm_targets` (per channel, `p x p` window, stride 1,
/// padding p/2, `count_include_pad=False`, unbiased variance clamped at 0).
fn local_stats(t: &Tensor, p: usize) -> Result<(Tensor, Tensor)> {
    if p.is_multiple_of(2) || p < 3 {
        bail!("simmim.norm_target_patch = {p} must be odd and >= 3");
    }
    let (b, c, h, w) = t.dims4()?;
    let dev = t.device();
    // Window sums as band-matrix products (exact sums, no cumulative-sum cancellation):
    // S = Bh · t · Bw with Bh, Bw symmetric.
    let (bh, ch) = band(h, p / 2);
    let (bw, cw) = band(w, p / 2);
    let bh = Tensor::from_vec(bh, (h, h), dev)?;
    let bw = Tensor::from_vec(bw, (w, w), dev)?;
    let window_sum = |x: &Tensor| -> Result<Tensor> {
        let xw = x
            .reshape((b * c * h, w))?
            .matmul(&bw)?
            .reshape((b, c, h, w))?;
        bh.broadcast_matmul(&xw)
    };
    let n: Vec<f32> = ch
        .iter()
        .flat_map(|&a| cw.iter().map(move |&bb| a * bb))
        .collect();
    let n = Tensor::from_vec(n, (1, 1, h, w), dev)?;
    let mean = window_sum(t)?.broadcast_div(&n)?;
    let sq_mean = window_sum(&t.sqr()?)?.broadcast_div(&n)?;
    let unbias = (&n / (&n - 1.0)?)?;
    let var = (sq_mean - mean.sqr()?)?.broadcast_mul(&unbias)?.relu()?;
    Ok((mean, (var + 1e-6)?.sqrt()?))
}

/// `norm_targets` (3.3, SwinV2 SimMIM): per channel, mean and variance over the `p x p` window
/// around each pixel (stride 1, padding p/2, `count_include_pad=False`), variance unbiased
/// (`* n/(n-1)`, n = in-image pixels of the window) and clamped at 0, then
/// `(t - mean) / sqrt(var + 1e-6)`. `p` must be odd and at least 3 (official asserts odd).
pub fn norm_targets(t: &Tensor, p: usize) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    let (mean, std) = local_stats(&t, p)?;
    (t - mean)?.div(&std)
}

/// Inverse of [`norm_targets`] for pictures: maps a prediction in locally normalized space back
/// to pixels with the local statistics of `reference` (the original image).
pub fn denorm_targets(pred: &Tensor, reference: &Tensor, p: usize) -> Result<Tensor> {
    let (mean, std) = local_stats(&reference.to_dtype(DType::F32)?, p)?;
    pred.to_dtype(DType::F32)?.mul(&std)?.add(&mean)
}

/// Small model and config used by this crate's tests: swinv2_nano at 32 px, mask patch 8.
#[cfg(test)]
pub(crate) fn tiny_setup() -> (SwinV2Config, SimMimConfig) {
    let model = SwinV2Config {
        preset: None,
        img_size: 32,
        ..SwinV2Config::preset("swinv2_nano").unwrap()
    };
    let cfg = SimMimConfig {
        mask_patch_size: 8,
        ..SimMimConfig::default()
    };
    (model, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_engine::rng::rng_for;

    fn build(cfg: &SimMimConfig) -> (VarMap, SimMim) {
        let (model, _) = tiny_setup();
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let m = SimMim::new(&model, cfg, SharedRng::new(0), vb).unwrap();
        (vm, m)
    }

    fn masks(n: usize) -> Tensor {
        let g =
            MaskGenerator::new(32, 8, 4, 0.6, crate::simmim::mask::MaskStrategy::Random).unwrap();
        let v: Vec<f32> = (0..n)
            .flat_map(|i| g.generate(&mut rng_for(1, &[i as u64])))
            .map(f32::from)
            .collect();
        Tensor::from_vec(v, (n, 8, 8), &Device::Cpu).unwrap()
    }

    fn images(n: usize, seed: u64) -> Tensor {
        Tensor::randn(0f32, 1.0, (n, 3, 32, 32), &Device::Cpu)
            .unwrap()
            .affine(1.0, seed as f64 * 1e-3)
            .unwrap()
    }

    #[test]
    fn forward_shapes_and_official_keys() {
        let (_, cfg) = tiny_setup();
        let (vm, m) = build(&cfg);
        let x = images(2, 0);
        let (loss, x_rec, _) = m.forward(&x, &masks(2), false).unwrap();
        assert_eq!(x_rec.dims(), &[2, 3, 32, 32]);
        assert_eq!(loss.dims(), &[] as &[usize]);
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let data = vm.data().lock().unwrap();
        // nano: embed 32 -> 256 features, stride 32 -> 32*32*3 = 3072 outputs.
        assert_eq!(data["decoder.0.weight"].dims(), &[3072, 256, 1, 1]);
        assert_eq!(data["decoder.0.bias"].dims(), &[3072]);
        assert_eq!(data["encoder.mask_token"].dims(), &[1, 1, 32]);
        assert!(data.contains_key("encoder.patch_embed.proj.weight"));
        assert!(!data.keys().any(|k| k.starts_with("encoder.head")));
        assert!(data
            .keys()
            .all(|k| k.starts_with("encoder.") || k.starts_with("decoder.0.")));
    }

    #[test]
    fn macs_are_the_headless_encoder_plus_the_pixel_head() {
        // swinv2_tiny_window8_256 at 256 px: 5,939,690,496 with its 1000-class head
        // (models/tests/swin_v2.rs), less the head's 768 x 1000, plus the pixel head on the
        // 8 x 8 last map: 64 tokens x 768 features x 3,072 outputs
        let tiny = SwinV2Config::preset("swinv2_tiny_window8_256").unwrap();
        assert_eq!(
            SimMim::macs(&tiny),
            5_939_690_496 - 768 * 1000 + 64 * 768 * 3072
        );
        // the pixel head of the built model has that many weights per last-map token
        let (model, cfg) = tiny_setup();
        let (vm, _) = build(&cfg);
        let w = vm.data().lock().unwrap()["decoder.0.weight"].elem_count();
        let headless = SwinV2Config {
            num_classes: 0,
            ..model.clone()
        };
        assert_eq!(SimMim::macs(&model), headless.macs() + w as u64);
    }

    #[test]
    fn masked_input_pixels_do_not_reach_the_reconstruction() {
        // Masked patches are replaced by the mask token after the patch embedding (3.2).
        let (_, cfg) = tiny_setup();
        let (_, m) = build(&cfg);
        let mk = masks(1);
        let x = images(1, 0);
        let noise = images(1, 5)
            .broadcast_mul(&pixel_mask(&mk, 4).unwrap())
            .unwrap();
        let a = m.reconstruct(&x, &mk, false).unwrap().0;
        let b = m.reconstruct(&(&x + noise).unwrap(), &mk, false).unwrap().0;
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn loss_gradient_reaches_encoder_mask_token_and_decoder() {
        let (_, cfg) = tiny_setup();
        let (vm, m) = build(&cfg);
        let (loss, _, _) = m.forward(&images(2, 0), &masks(2), true).unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        for key in [
            "encoder.mask_token",
            "encoder.patch_embed.proj.weight",
            "encoder.layers.0.blocks.0.norm1.weight",
            "encoder.norm.weight",
            "decoder.0.weight",
            "decoder.0.bias",
        ] {
            let g = grads
                .get(data[key].as_tensor())
                .unwrap_or_else(|| panic!("no grad for {key}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0 && n.is_finite(), "{key}: |grad| = {n}");
        }
    }

    #[test]
    fn norm_target_loss_uses_normalized_target() {
        let (_, cfg) = tiny_setup();
        let cfg = SimMimConfig {
            norm_target: true,
            norm_target_patch: 5,
            ..cfg
        };
        let (_, m) = build(&cfg);
        let (x, mk) = (images(1, 0), masks(1));
        let (loss, x_rec, _) = m.forward(&x, &mk, false).unwrap();
        let want = masked_l1(
            &x_rec,
            &norm_targets(&x, 5).unwrap(),
            &pixel_mask(&mk, 4).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), want);
        let bad = SimMimConfig {
            norm_target: true,
            norm_target_patch: 4,
            ..SimMimConfig::default()
        };
        let (model, _) = tiny_setup();
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let e = SimMim::new(&model, &bad, SharedRng::new(0), vb)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("simmim.norm_target_patch = 4"),
            "{e:#}"
        );
    }

    #[test]
    fn pixel_shuffle_matches_torch_layout() {
        let (b, c, r, h, w) = (2, 3, 2, 2, 3);
        let n = b * c * r * r * h * w;
        let x = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let y = pixel_shuffle(&x.reshape((b, c * r * r, h, w)).unwrap(), r).unwrap();
        assert_eq!(y.dims(), &[b, c, h * r, w * r]);
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xv = x.to_vec1::<f32>().unwrap();
        for bi in 0..b {
            for ci in 0..c {
                for hi in 0..h {
                    for wi in 0..w {
                        for i in 0..r {
                            for j in 0..r {
                                let o = ((bi * c + ci) * h * r + hi * r + i) * w * r + wi * r + j;
                                let src =
                                    ((bi * c * r * r + ci * r * r + i * r + j) * h + hi) * w + wi;
                                assert_eq!(yv[o], xv[src]);
                            }
                        }
                    }
                }
            }
        }
        // Spot value: out[0, 1, 1, 0] (flat 1*4*6 + 1*6) = in[0, 1*4 + 1*2 + 0, 0, 0] = 6 * 6.
        assert_eq!(yv[4 * 6 + 6], 36.0);
    }

    #[test]
    fn pixel_mask_repeats() {
        let m = Tensor::new(&[[[1f32, 0.], [0., 1.]]], &Device::Cpu).unwrap();
        let p = pixel_mask(&m, 2).unwrap();
        assert_eq!(
            p.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![
                vec![1., 1., 0., 0.],
                vec![1., 1., 0., 0.],
                vec![0., 0., 1., 1.],
                vec![0., 0., 1., 1.]
            ]
        );
    }

    #[test]
    fn masked_l1_hand_value() {
        let dev = Device::Cpu;
        // 1 x 3 x 2 x 2, mask on pixels (0,0) and (1,1).
        let t = Tensor::new(
            &[[
                [[1f32, 2.], [3., 4.]],
                [[0., 0.], [0., 0.]],
                [[-1., 5.], [2., 2.]],
            ]],
            &dev,
        )
        .unwrap();
        let x = Tensor::new(
            &[[
                [[0f32, 9.], [9., 1.]],
                [[2., 9.], [9., 0.5]],
                [[1., 9.], [9., 2.]],
            ]],
            &dev,
        )
        .unwrap();
        let m = Tensor::new(&[[[[1f32, 0.], [0., 1.]]]], &dev).unwrap();
        // |1-0| + |4-1| + |0-2| + |0-0.5| + |-1-1| + |2-2| = 1 + 3 + 2 + 0.5 + 2 + 0 = 8.5
        // loss = 8.5 / (2 + 1e-5) / 3
        let want = 8.5f64 / (2.0 + 1e-5) / 3.0;
        let got = masked_l1(&x, &t, &m).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Changing visible pixels of x_rec or target leaves the loss bit-identical.
        let x2 = Tensor::new(
            &[[
                [[0f32, -7.], [3., 1.]],
                [[2., 1e3], [0., 0.5]],
                [[1., 0.], [4., 2.]],
            ]],
            &dev,
        )
        .unwrap();
        let t2 = Tensor::new(
            &[[
                [[1f32, 8.], [-3., 4.]],
                [[0., 5.], [1., 0.]],
                [[-1., 6.], [7., 2.]],
            ]],
            &dev,
        )
        .unwrap();
        let a = masked_l1(&x, &t, &m).unwrap().to_scalar::<f32>().unwrap();
        let b = masked_l1(&x2, &t2, &m).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(a.to_bits(), b.to_bits());
    }

    #[test]
    fn norm_targets_matches_brute_force() {
        let dev = Device::Cpu;
        let (b, c, h, w, p) = (2, 2, 5, 7, 3);
        let vals: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(vals.clone(), (b, c, h, w), &dev).unwrap();
        for p in [p, 5] {
            let got = norm_targets(&t, p)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let half = (p / 2) as i64;
            for bc in 0..b * c {
                for y in 0..h as i64 {
                    for x in 0..w as i64 {
                        let (mut s, mut s2, mut n) = (0f64, 0f64, 0f64);
                        for yy in (y - half).max(0)..=(y + half).min(h as i64 - 1) {
                            for xx in (x - half).max(0)..=(x + half).min(w as i64 - 1) {
                                let v = vals[bc * h * w + (yy as usize) * w + xx as usize] as f64;
                                s += v;
                                s2 += v * v;
                                n += 1.0;
                            }
                        }
                        let mean = s / n;
                        let var = ((s2 / n - mean * mean) * n / (n - 1.0)).max(0.0);
                        let i = bc * h * w + (y as usize) * w + x as usize;
                        let want = (vals[i] as f64 - mean) / (var + 1e-6).sqrt();
                        assert!(
                            (got[i] as f64 - want).abs() < 1e-4,
                            "p {p} {i}: {} vs {want}",
                            got[i]
                        );
                    }
                }
            }
        }
        assert!(norm_targets(&t, 4)
            .unwrap_err()
            .to_string()
            .contains("norm_target_patch = 4"));
    }
}
