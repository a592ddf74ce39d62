//! Feature pyramid necks (model stage): backbone stage maps -> one map per detection level, all
//! with `channels` channels. Two kinds, chosen by [`NeckConfig::kind`]:
//!
//! - `fpn`: mmdet's `FPN` as the Swin RetinaNet config uses it
//!   (mmdetection:configs/swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py, dense-tasks.md 1.1): 1x1
//!   laterals on the chosen stages, top-down `lateral[i-1] += nearest(lateral[i], size of
//!   lateral[i-1])`, 3x3 output convs, then extra levels by stride-2 3x3 convs on the last chosen
//!   stage (`add_extra_convs='on_input'`) or on the last output (`'on_output'`, the FCOS R50
//!   configs, with `relu_before_extra_convs=True`: ReLU before every extra conv but the first).
//!   Names: `lateral_convs.N.conv`, `fpn_convs.N.conv` (extras continue the `fpn_convs` index).
//!   Init: Xavier uniform, bias 0 (mmdet `FPN` init_cfg).
//! - `simple`: ViTDet's simple feature pyramid from one map
//!   (detectron2:detectron2/modeling/backbone/vit.py `SimpleFeaturePyramid`, dense-tasks.md 1.2):
//!   scale 4 = deconv 2x2 -> LN -> GELU -> deconv 2x2; 2 = deconv 2x2; 1 = identity;
//!   0.5 = max-pool 2x2; each then 1x1 conv + LN and 3x3 conv + LN (no conv bias). Names:
//!   `simfp_{log2 stride}.{i}` (`.norm` for a conv's LN), extra levels `top_block.p{log2 stride}`
//!   (detectron2's `LastLevelP6P7`). Init: convs `c2_xavier_fill` (U(+-sqrt(3 / fan_in))), bias 0.
//!
//! Odd maps: the Swin backbone pads odd maps before merging, so a stage is `ceil(h / 2)` of the one
//! before; the top-down upsample crops the doubled map to the lateral's size, which is exactly
//! `F.interpolate(size=...)` ([`upsample_nearest2x`]); max-pooling drops an odd last row/column as
//! PyTorch does (cropped first so that candle's max-pool backward stays exact).
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use mimlab_models::layers::{upsample_nearest2x, Conv2d, ConvTranspose2d, LayerNorm, LayerNorm2d};
use mimlab_models::swin_v2::Features;
use serde::{Deserialize, Serialize};

/// Which neck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeckKind {
    /// Multi-stage FPN (mmdet).
    Fpn,
    /// ViTDet's simple feature pyramid from one stage.
    Simple,
}

/// Where the first extra level's stride-2 conv reads from (mmdet `add_extra_convs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraFrom {
    /// The last chosen backbone stage (`'on_input'`; RetinaNet Swin).
    Input,
    /// The last pyramid output (`'on_output'`; FCOS R50, ViTDet's `LastLevelP6P7` on p5).
    Output,
}

/// The `neck:` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NeckConfig {
    /// `fpn` or `simple`.
    pub kind: NeckKind,
    /// Output channels of every level (256 in the references; CPU presets use e.g. 64).
    pub channels: usize,
    /// Backbone stages read: `fpn` several (Swin stages 1, 2, 3 = strides 8, 16, 32), `simple`
    /// exactly one (stage 2 = stride 16, ViTDet's input stride).
    pub in_stages: Vec<usize>,
    /// `simple`: scale factors of the outputs, each 4, 2, 1 or 0.5, from the finest.
    pub scale_factors: Vec<f32>,
    /// Extra levels by stride-2 3x3 convs (P6, P7: 2).
    pub extra_levels: usize,
    /// Input of the first extra conv.
    pub extra_from: ExtraFrom,
    /// ReLU before every extra conv but the first.
    pub relu_before_extra: bool,
    /// A LayerNorm (eps 1e-5) on each stage map read, but the backbone's last stage, which its
    /// final norm already covers: mmdet's Swin backbone adds `norm{i}` on every `out_indices`
    /// stage (mmdetection:mmdet/models/backbones/swin.py). Swin-V2's res-post-norm residual stream
    /// is otherwise unnormalized. Names: `stage_norms.N` (N = position in `in_stages`).
    pub stage_norm: bool,
}

impl Default for NeckConfig {
    fn default() -> Self {
        Self {
            kind: NeckKind::Fpn,
            channels: 256,
            in_stages: vec![1, 2, 3],
            scale_factors: vec![2.0, 1.0, 0.5],
            extra_levels: 2,
            extra_from: ExtraFrom::Input,
            relu_before_extra: false,
            stage_norm: false,
        }
    }
}

impl NeckConfig {
    /// Checks the config against a backbone of `num_stages` stages, naming the key.
    pub fn validate(&self, num_stages: usize) -> Result<()> {
        ensure!(self.channels > 0, "neck.channels must be at least 1");
        ensure!(!self.in_stages.is_empty(), "neck.in_stages is empty");
        for &s in &self.in_stages {
            ensure!(
                s < num_stages,
                "neck.in_stages: stage {s} but the backbone has {num_stages} stages"
            );
        }
        match self.kind {
            NeckKind::Fpn => ensure!(
                self.in_stages.windows(2).all(|w| w[1] == w[0] + 1),
                "neck.in_stages must be consecutive stages for an FPN, got {:?}",
                self.in_stages
            ),
            NeckKind::Simple => {
                ensure!(
                    self.in_stages.len() == 1,
                    "neck.in_stages: the simple pyramid reads one stage, got {:?}",
                    self.in_stages
                );
                ensure!(
                    !self.scale_factors.is_empty(),
                    "neck.scale_factors is empty"
                );
                for &f in &self.scale_factors {
                    ensure!(
                        [4.0, 2.0, 1.0, 0.5].contains(&f),
                        "neck.scale_factors: {f} is not one of 4, 2, 1, 0.5"
                    );
                }
                ensure!(
                    self.scale_factors.windows(2).all(|w| w[1] < w[0]),
                    "neck.scale_factors must go from the finest (largest) down"
                );
            }
        }
        Ok(())
    }

    /// Stride of each output level given the backbone's stage strides.
    pub fn out_strides(&self, stage_strides: &[usize]) -> Result<Vec<usize>> {
        let mut out: Vec<usize> = match self.kind {
            NeckKind::Fpn => self.in_stages.iter().map(|&s| stage_strides[s]).collect(),
            NeckKind::Simple => {
                let s = stage_strides[self.in_stages[0]] as f32;
                self.scale_factors
                    .iter()
                    .map(|f| (s / f) as usize)
                    .collect()
            }
        };
        let last = *out.last().context("neck without levels")?;
        for k in 1..=self.extra_levels {
            out.push(last << k);
        }
        Ok(out)
    }
}

fn xavier(i: usize, o: usize, k: usize) -> Init {
    let b = (6.0 / ((i + o) * k * k) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

fn c2_xavier(i: usize, k: usize) -> Init {
    let b = (3.0 / (i * k * k) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// A conv followed by an optional channels-first LN (detectron2 `Conv2d(norm=...)`).
#[derive(Debug, Clone)]
struct ConvLn {
    conv: Conv2d,
    norm: LayerNorm2d,
}

impl ConvLn {
    fn new(i: usize, o: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(i, o, k, 1, k / 2, c2_xavier(i, k), None, vb.clone())?,
            norm: LayerNorm2d::new(o, 1e-6, vb.pp("norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm.forward(&self.conv.forward(x)?)
    }
}

/// One output branch of the simple pyramid.
#[derive(Debug, Clone)]
enum SimpleStage {
    /// deconv -> LN -> GELU -> deconv.
    Up4(ConvTranspose2d, LayerNorm2d, ConvTranspose2d),
    Up2(ConvTranspose2d),
    Same,
    Down2,
}

#[derive(Debug, Clone)]
enum Body {
    Fpn {
        laterals: Vec<Conv2d>,
        outputs: Vec<Conv2d>,
    },
    Simple {
        stages: Vec<(SimpleStage, ConvLn, ConvLn)>,
    },
}

/// The neck: `forward` gives one `[B, channels, H_l, W_l]` map per level, finest first.
#[derive(Debug, Clone)]
pub struct Neck {
    cfg: NeckConfig,
    body: Body,
    extras: Vec<Conv2d>,
    /// Per `in_stages` entry: the `stage_norm` LayerNorm, if any.
    norms: Vec<Option<LayerNorm>>,
    strides: Vec<usize>,
}

impl Neck {
    /// Builds the neck for a backbone whose stages have `stage_channels` channels at
    /// `stage_strides` (Swin: `patch_size * 2^i`), under `vb`.
    pub fn new(
        cfg: &NeckConfig,
        stage_channels: &[usize],
        stage_strides: &[usize],
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate(stage_channels.len())?;
        ensure!(
            stage_strides.len() == stage_channels.len(),
            "neck: {} stage strides for {} stages",
            stage_strides.len(),
            stage_channels.len()
        );
        let c = cfg.channels;
        let zero = Some(Init::Const(0.0));
        let strides = cfg.out_strides(stage_strides)?;
        let levels = strides.len() - cfg.extra_levels;
        let (body, extra_in, extra_names) = match cfg.kind {
            NeckKind::Fpn => {
                let mut laterals = vec![];
                let mut outputs = vec![];
                for (i, &s) in cfg.in_stages.iter().enumerate() {
                    let ci = stage_channels[s];
                    let lv = vb.pp("lateral_convs").pp(i).pp("conv");
                    laterals.push(Conv2d::new(ci, c, 1, 1, 0, xavier(ci, c, 1), zero, lv)?);
                    let ov = vb.pp("fpn_convs").pp(i).pp("conv");
                    outputs.push(Conv2d::new(c, c, 3, 1, 1, xavier(c, c, 3), zero, ov)?);
                }
                let last = stage_channels[*cfg.in_stages.last().context("no stages")?];
                let ein = match cfg.extra_from {
                    ExtraFrom::Input => last,
                    ExtraFrom::Output => c,
                };
                let names = (0..cfg.extra_levels)
                    .map(|k| format!("fpn_convs.{}.conv", levels + k))
                    .collect::<Vec<_>>();
                (Body::Fpn { laterals, outputs }, ein, names)
            }
            NeckKind::Simple => {
                ensure!(
                    cfg.extra_from == ExtraFrom::Output || cfg.extra_levels == 0,
                    "neck.extra_from: the simple pyramid's extra levels read its last output \
                     (extra_from: output)"
                );
                let dim = stage_channels[cfg.in_stages[0]];
                let mut stages = vec![];
                for (&f, &stride) in cfg.scale_factors.iter().zip(&strides) {
                    // detectron2: simfp_{log2(output stride)}
                    let v = vb.pp(format!("simfp_{}", stride.ilog2()));
                    let (stage, out_dim, first) = if f == 4.0 {
                        ensure!(dim >= 4, "neck: scale 4 needs at least 4 input channels");
                        let d0 = ConvTranspose2d::new(dim, dim / 2, 2, v.pp(0))?;
                        let ln = LayerNorm2d::new(dim / 2, 1e-6, v.pp(1))?;
                        let d1 = ConvTranspose2d::new(dim / 2, dim / 4, 2, v.pp(3))?;
                        (SimpleStage::Up4(d0, ln, d1), dim / 4, 4)
                    } else if f == 2.0 {
                        ensure!(dim >= 2, "neck: scale 2 needs at least 2 input channels");
                        let d0 = ConvTranspose2d::new(dim, dim / 2, 2, v.pp(0))?;
                        (SimpleStage::Up2(d0), dim / 2, 1)
                    } else if f == 1.0 {
                        (SimpleStage::Same, dim, 0)
                    } else {
                        (SimpleStage::Down2, dim, 1)
                    };
                    let c1 = ConvLn::new(out_dim, c, 1, v.pp(first))?;
                    let c3 = ConvLn::new(c, c, 3, v.pp(first + 1))?;
                    stages.push((stage, c1, c3));
                }
                let names = strides[levels..]
                    .iter()
                    .map(|s| format!("top_block.p{}", s.ilog2()))
                    .collect::<Vec<_>>();
                (Body::Simple { stages }, c, names)
            }
        };
        let last_stage = stage_channels.len() - 1;
        let norms = cfg
            .in_stages
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let v = vb.pp("stage_norms").pp(i);
                (cfg.stage_norm && s != last_stage)
                    .then(|| LayerNorm::new(stage_channels[s], false, v))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut extras = vec![];
        for (k, name) in extra_names.iter().enumerate() {
            let ci = if k == 0 { extra_in } else { c };
            let init = match cfg.kind {
                NeckKind::Fpn => xavier(ci, c, 3),
                NeckKind::Simple => c2_xavier(ci, 3),
            };
            extras.push(Conv2d::new(ci, c, 3, 2, 1, init, zero, vb.pp(name))?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            body,
            extras,
            norms,
            strides,
        })
    }

    /// Stride of each output level, finest first.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The configuration.
    pub fn config(&self) -> &NeckConfig {
        &self.cfg
    }

    /// The pyramid of the backbone's `features`, finest level first (`train`: keep the graph
    /// through the stage norms).
    pub fn forward(&self, features: &Features, train: bool) -> Result<Vec<Tensor>> {
        let stage = |s: usize| -> Result<Tensor> {
            let t = features
                .stages
                .get(s)
                .with_context(|| format!("neck: backbone has no stage {s}"))?;
            let pos = self.cfg.in_stages.iter().position(|&i| i == s);
            match pos.and_then(|p| self.norms[p].as_ref()) {
                // the stage maps are NCHW views of the backbone's NHWC tokens
                Some(n) => Ok(n
                    .forward(&t.permute((0, 2, 3, 1))?, train)?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?),
                None => Ok(t.contiguous()?),
            }
        };
        let mut outs = vec![];
        match &self.body {
            Body::Fpn { laterals, outputs } => {
                let mut lat = self
                    .cfg
                    .in_stages
                    .iter()
                    .zip(laterals)
                    .map(|(&s, l)| Ok(l.forward(&stage(s)?)?))
                    .collect::<Result<Vec<_>>>()?;
                for i in (1..lat.len()).rev() {
                    let (_, _, h, w) = lat[i - 1].dims4()?;
                    let up = upsample_nearest2x(&lat[i], h, w)
                        .with_context(|| format!("FPN top-down path into level {}", i - 1))?;
                    lat[i - 1] = (&lat[i - 1] + up)?;
                }
                for (l, conv) in lat.iter().zip(outputs) {
                    outs.push(conv.forward(l)?);
                }
            }
            Body::Simple { stages } => {
                let x = stage(self.cfg.in_stages[0])?;
                for (s, c1, c3) in stages {
                    let y = match s {
                        SimpleStage::Up4(d0, ln, d1) => {
                            d1.forward(&ln.forward(&d0.forward(&x)?)?.gelu_erf()?)?
                        }
                        SimpleStage::Up2(d0) => d0.forward(&x)?,
                        SimpleStage::Same => x.clone(),
                        SimpleStage::Down2 => {
                            let (_, _, h, w) = x.dims4()?;
                            if h < 2 || w < 2 {
                                bail!("neck: a {h}x{w} map cannot be max-pooled by 2");
                            }
                            // PyTorch floors odd sizes; cropping first keeps candle's backward
                            // (which upsamples the pooled map back) aligned
                            x.narrow(2, 0, h / 2 * 2)?
                                .narrow(3, 0, w / 2 * 2)?
                                .max_pool2d(2)?
                        }
                    };
                    outs.push(c3.forward(&c1.forward(&y)?)?);
                }
            }
        }
        let mut src = match (self.cfg.kind, self.cfg.extra_from) {
            (NeckKind::Fpn, ExtraFrom::Input) => {
                stage(*self.cfg.in_stages.last().context("no stages")?)?
            }
            _ => outs.last().context("neck without levels")?.clone(),
        };
        for (k, conv) in self.extras.iter().enumerate() {
            if k > 0 && self.cfg.relu_before_extra {
                src = src.relu()?;
            }
            let y = conv.forward(&src)?;
            outs.push(y.clone());
            src = y;
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_models::moe::MoeAux;

    fn features(sizes: &[(usize, usize, usize)]) -> Result<(Features, Vec<Var>)> {
        let vars = sizes
            .iter()
            .map(|&(c, h, w)| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &Device::Cpu)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let stages = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let f = Features {
            stages,
            last: Tensor::zeros((2, 1, 1), DType::F32, &Device::Cpu)?,
            moe: MoeAux {
                layers: vec![],
                weight: 0.0,
            },
        };
        Ok((f, vars))
    }

    /// Odd, non-square maps (a 72x40 image at patch 4: stages 18x10, 9x5, 5x3, 3x2): shapes,
    /// names and a backward that reaches every stage and every conv.
    #[test]
    fn fpn_shapes_names_and_gradients_on_odd_maps() -> Result<()> {
        let cfg = NeckConfig {
            channels: 8,
            ..NeckConfig::default()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let neck = Neck::new(&cfg, &[4, 8, 16, 32], &[4, 8, 16, 32], vb)?;
        let (f, vars) = features(&[(4, 18, 10), (8, 9, 5), (16, 5, 3), (32, 3, 2)])?;
        let outs = neck.forward(&f, true)?;
        let dims: Vec<Vec<usize>> = outs.iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(
            dims,
            vec![
                vec![2, 8, 9, 5],
                vec![2, 8, 5, 3],
                vec![2, 8, 3, 2],
                vec![2, 8, 2, 1],
                vec![2, 8, 1, 1]
            ]
        );
        assert_eq!(cfg.out_strides(&[4, 8, 16, 32])?, vec![8, 16, 32, 64, 128]);
        let data = vm.data().lock().unwrap().clone();
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort();
        assert_eq!(keys.len(), 2 * (3 + 5));
        assert!(keys.contains(&&"lateral_convs.2.conv.weight".to_string()));
        assert!(keys.contains(&&"fpn_convs.4.conv.bias".to_string()));
        // on_input: P6 reads the 32-channel stage
        assert_eq!(data["fpn_convs.3.conv.weight"].dims(), &[8, 32, 3, 3]);
        let loss = outs
            .iter()
            .map(|t| t.sqr().and_then(|s| s.sum_all()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let loss = loss
            .iter()
            .skip(1)
            .try_fold(loss[0].clone(), |a, b| a + b)?;
        let g = loss.backward()?;
        for v in &vars[1..] {
            let gs = g.get(v).context("stage without gradient")?;
            assert!(gs.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        assert!(g.get(&vars[0]).is_none(), "stage 0 is not read");
        for (k, v) in &data {
            let gv = g.get(v).with_context(|| format!("{k} has no gradient"))?;
            assert_eq!(gv.dims(), v.dims(), "{k}");
        }
        Ok(())
    }

    /// `stage_norm`: a LayerNorm on each stage read but the backbone's last one (its final norm
    /// covers it), named `stage_norms.N`; the neck then equals the plain neck with the same convs
    /// fed the per-pixel normalized stage maps.
    #[test]
    fn stage_norm_normalizes_all_but_the_last_stage() -> Result<()> {
        let plain = NeckConfig {
            channels: 8,
            extra_levels: 1,
            ..NeckConfig::default()
        };
        let normed = NeckConfig {
            stage_norm: true,
            ..plain.clone()
        };
        let (c, s) = ([4, 8, 16, 32], [4, 8, 16, 32]);
        let vm = VarMap::new();
        let neck = Neck::new(
            &normed,
            &c,
            &s,
            seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
        )?;
        let mut keys: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        keys.retain(|k| k.starts_with("stage_norms"));
        keys.sort();
        let want = [
            "stage_norms.0.bias",
            "stage_norms.0.weight",
            "stage_norms.1.bias",
        ];
        assert_eq!(keys[..3], want.map(String::from), "{keys:?}");
        assert_eq!(keys.len(), 4, "stage 3 (the last) gets no norm: {keys:?}");
        let vm2 = VarMap::new();
        let base = Neck::new(
            &plain,
            &c,
            &s,
            seeded_var_builder(&vm2, 0, DType::F32, &Device::Cpu),
        )?;
        let (f, _) = features(&[(4, 18, 10), (8, 9, 5), (16, 5, 3), (32, 3, 2)])?;
        let ln = |t: &Tensor| -> Result<Tensor> {
            let mu = t.mean_keepdim(1)?;
            let xc = t.broadcast_sub(&mu)?;
            let var = xc.sqr()?.mean_keepdim(1)?;
            Ok(xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
        };
        let mut g = f.clone();
        g.stages = vec![
            f.stages[0].clone(),
            ln(&f.stages[1])?,
            ln(&f.stages[2])?,
            f.stages[3].clone(),
        ];
        let (a, b) = (neck.forward(&f, false)?, base.forward(&g, false)?);
        assert_eq!(a.len(), 4);
        for (x, y) in a.iter().zip(&b) {
            let d = (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                d < 1e-5,
                "normed neck differs from the plain one on normed maps by {d}"
            );
        }
        // the plain neck on the raw maps is not the same network
        let raw = base.forward(&f, false)?;
        let d = (&a[0] - &raw[0])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d > 1e-3);
        Ok(())
    }

    /// The top-down sum: with 1x1 laterals and 3x3 outputs set to identities, level 0 is its
    /// lateral plus the nearest upsample of level 1 (cropped to the odd size).
    #[test]
    fn top_down_path_is_lateral_plus_nearest_upsample() -> Result<()> {
        let cfg = NeckConfig {
            channels: 1,
            in_stages: vec![0, 1],
            extra_levels: 0,
            ..NeckConfig::default()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let neck = Neck::new(&cfg, &[1, 1], &[4, 8], vb)?;
        let data = vm.data().lock().unwrap().clone();
        let dev = Device::Cpu;
        let mut id3 = vec![0f32; 9];
        id3[4] = 1.0;
        for (k, v) in &data {
            let t = if k.ends_with("bias") {
                Tensor::zeros(1, DType::F32, &dev)?
            } else if k.starts_with("lateral") {
                Tensor::ones((1, 1, 1, 1), DType::F32, &dev)?
            } else {
                Tensor::from_vec(id3.clone(), (1, 1, 3, 3), &dev)?
            };
            v.set(&t)?;
        }
        let c0 = Tensor::zeros((1, 1, 3, 3), DType::F32, &dev)?;
        let c1 = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &dev)?;
        let f = Features {
            stages: vec![c0, c1],
            last: Tensor::zeros((1, 1, 1), DType::F32, &dev)?,
            moe: MoeAux {
                layers: vec![],
                weight: 0.0,
            },
        };
        let outs = neck.forward(&f, false)?;
        // F.interpolate(2x2 -> 3x3, nearest): source index floor(i * 2 / 3) = 0, 0, 1
        let want = vec![
            vec![1f32, 1.0, 2.0],
            vec![1.0, 1.0, 2.0],
            vec![3.0, 3.0, 4.0],
        ];
        assert_eq!(outs[0].squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn simple_pyramid_shapes_names_and_gradients() -> Result<()> {
        let cfg = NeckConfig {
            kind: NeckKind::Simple,
            channels: 8,
            in_stages: vec![2],
            scale_factors: vec![4.0, 2.0, 1.0, 0.5],
            extra_levels: 1,
            extra_from: ExtraFrom::Output,
            relu_before_extra: true,
            stage_norm: false,
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let neck = Neck::new(&cfg, &[4, 8, 16, 32], &[4, 8, 16, 32], vb)?;
        let (f, vars) = features(&[(4, 20, 12), (8, 10, 6), (16, 5, 3), (32, 3, 2)])?;
        let outs = neck.forward(&f, true)?;
        let dims: Vec<Vec<usize>> = outs.iter().map(|t| t.dims()[2..].to_vec()).collect();
        // 5x3 at stride 16 -> 20x12, 10x6, 5x3, 2x1 (pool floors), then P6 1x1
        assert_eq!(
            dims,
            vec![
                vec![20, 12],
                vec![10, 6],
                vec![5, 3],
                vec![2, 1],
                vec![1, 1]
            ]
        );
        assert_eq!(cfg.out_strides(&[4, 8, 16, 32])?, vec![4, 8, 16, 32, 64]);
        let data = vm.data().lock().unwrap().clone();
        for k in [
            "simfp_2.0.weight",
            "simfp_2.1.weight",
            "simfp_2.3.bias",
            "simfp_2.4.weight",
            "simfp_2.4.norm.weight",
            "simfp_2.5.norm.bias",
            "simfp_3.0.weight",
            "simfp_3.2.weight",
            "simfp_4.0.weight",
            "simfp_4.1.norm.weight",
            "simfp_5.1.weight",
            "simfp_5.2.norm.weight",
            "top_block.p6.weight",
        ] {
            assert!(data.contains_key(k), "{k} missing: {:?}", data.keys());
        }
        assert!(
            !data.contains_key("simfp_4.0.bias"),
            "convs with LN have no bias"
        );
        assert_eq!(data["simfp_2.0.weight"].dims(), &[16, 8, 2, 2]);
        let loss = outs
            .iter()
            .map(|t| t.sqr().and_then(|s| s.sum_all()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let loss = loss
            .iter()
            .skip(1)
            .try_fold(loss[0].clone(), |a, b| a + b)?;
        let g = loss.backward()?;
        assert!(g.get(&vars[2]).is_some());
        for (k, v) in &data {
            let gv = g.get(v).with_context(|| format!("{k} has no gradient"))?;
            assert_eq!(gv.dims(), v.dims(), "{k}");
        }
        Ok(())
    }

    /// The shared layers the necks rely on: the strided `Conv2d` (explicit pad + crop) equals
    /// candle's own padded conv and its input gradient matches finite differences on a 5x4 map
    /// (uneven parities, where candle's conv2d backward alone gets the width wrong); the 2x
    /// nearest upsample equals `interpolate2d` and sums each block in its backward.
    #[test]
    fn strided_conv_and_upsample_match_candle_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F64, &dev);
        let init = Init::Uniform { lo: -1.0, up: 1.0 };
        let conv = Conv2d::new(2, 3, 3, 2, 1, init, Some(init), vb.pp("c"))?;
        let data = vm.data().lock().unwrap().clone();
        let (w, b) = (data["c.weight"].as_tensor(), data["c.bias"].as_tensor());
        let xv: Vec<f64> = (0..40)
            .map(|i| ((i * 37) % 17) as f64 / 8.0 - 1.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (1, 2, 5, 4), &dev)?)?;
        let y = conv.forward(x.as_tensor())?;
        let want = x
            .as_tensor()
            .conv2d(w, 1, 2, 1, 1)?
            .broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        assert_eq!(y.dims(), &[1, 3, 3, 2]);
        let d = (&y - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        let wt = Tensor::from_vec(
            (0..18).map(|i| i as f64 - 8.5).collect(),
            (1, 3, 3, 2),
            &dev,
        )?;
        let f = |t: &Tensor| -> Result<f64> {
            Ok((conv.forward(t)? * &wt)?.sum_all()?.to_scalar::<f64>()?)
        };
        // candle 0.11.1's own strided backward fails here (a 5x3 gradient for the 5x4 input);
        // when this starts to pass, Conv2d's workaround can go
        let plain = (x.as_tensor().conv2d(w, 1, 2, 1, 1)? * &wt)?.sum_all()?;
        assert!(plain.backward().is_err());
        let g = (y * &wt)?.sum_all()?.backward()?;
        let gx = g
            .get(&x)
            .context("no input grad")?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_eq!(gx.len(), 40);
        for i in [0, 7, 19, 23, 39] {
            let (mut p, mut m) = (xv.clone(), xv.clone());
            p[i] += 1e-6;
            m[i] -= 1e-6;
            let fd = (f(&Tensor::from_vec(p, (1, 2, 5, 4), &dev)?)?
                - f(&Tensor::from_vec(m, (1, 2, 5, 4), &dev)?)?)
                / 2e-6;
            assert!((fd - gx[i]).abs() < 1e-6, "x[{i}]: {} vs {fd}", gx[i]);
        }
        // upsample: 2x3 -> 3x5 (odd crop) equals interpolate2d; backward counts each copy
        let u = Var::from_tensor(&Tensor::new(
            &[[[[1f64, 2.0, 3.0], [4.0, 5.0, 6.0]]]],
            &dev,
        )?)?;
        let up = upsample_nearest2x(u.as_tensor(), 3, 5)?;
        assert_eq!(up.dims(), &[1, 1, 3, 5]);
        let ref_up = u.as_tensor().interpolate2d(3, 5)?;
        assert_eq!(
            up.flatten_all()?.to_vec1::<f64>()?,
            ref_up.flatten_all()?.to_vec1::<f64>()?
        );
        let g = up.sum_all()?.backward()?;
        let gu = g
            .get(&u)
            .context("no grad")?
            .flatten_all()?
            .to_vec1::<f64>()?;
        // rows 0, 1 -> source row 0; row 2 -> row 1; columns 0,1 / 2,3 / 4 -> 0 / 1 / 2
        assert_eq!(gu, vec![4.0, 4.0, 2.0, 2.0, 2.0, 1.0]);
        Ok(())
    }
}
