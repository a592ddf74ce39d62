//! Swin Transformer V2 (Liu et al. 2022), following Swin-Transformer:models/swin_transformer_v2.py
//! (architecture.md sections 1-2). Variables are created under the official key names, so the
//! `VarMap` of a model IS an official-layout state dict (without the re-derived buffers).
//!
//! Parts in reading order: window partition/reverse, masks/tables, WindowAttention, Block,
//! PatchMerging, Stage, SwinV2. The config, presets and FLOP accounting are in `swin_v2/config.rs`
//! (re-exported here); linear, layer norm, dropout, drop path and the MLP in [`crate::layers`].
//!
//! Inside the stages tokens are kept as `[B, H, W, C]` (like timm); `Features` exposes NCHW views.
//!
//! Input sizes: the configured `img_size` fixes each stage's window and shift; any input whose
//! sides are multiples of the patch size runs with them, as timm's `dynamic_img_size=True`: each
//! block pads its shifted map with zeros to whole windows (bottom, right), masks on the padded
//! map and crops after the merge, and patch merging pads odd maps. The configured size needs no
//! padding and runs exactly as before.
//! The MoE statistics of a forward come back with its output ([`Features::moe`], the second value
//! of [`SwinV2::forward`] and [`Block::forward`]); see [`crate::moe`] for the contract.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use mimlab_engine::rng::SharedRng;

use crate::layers::{dropout, residual_drop_path, LayerNorm, Linear, Mlp};
use crate::moe::{MoeAux, MoeMlp, MoeStats};
mod config;
pub use config::{preset_layer, SwinV2Config, PRESETS};

pub use crate::ops::{window_partition, window_reverse};

// ------------------------------------------------------------------------------------------------
// Masks and tables (architecture.md 1.5, 1.6)
// ------------------------------------------------------------------------------------------------

/// Shifted-window attention mask `[nW, N, N]` (f32): 0 within a region, -100 across regions.
pub fn shifted_window_mask(
    h: usize,
    w: usize,
    ws: usize,
    shift: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    // 9 regions: slices (0:-ws, -ws:-s, -s:) on each axis
    let region = |i: usize, n: usize| -> usize {
        if i < n - ws {
            0
        } else if i < n - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw, n) = (h / ws, w / ws, ws * ws);
    let mut out = Vec::with_capacity(nh * nw * n * n);
    let mut ids = vec![0usize; n];
    for wr in 0..nh {
        for wc in 0..nw {
            for (t, id) in ids.iter_mut().enumerate() {
                let (r, c) = (wr * ws + t / ws, wc * ws + t % ws);
                *id = region(r, h) * 3 + region(c, w);
            }
            for &a in &ids {
                out.extend(ids.iter().map(|&b| if a == b { 0f32 } else { -100f32 }));
            }
        }
    }
    Tensor::from_vec(out, (nh * nw, n, n), dev)
}

/// Log-spaced relative coordinates `[(2ws-1), (2ws-1), 2]`, row-major (Swin-V2 eq. 4):
/// `t = sign(d) * log2(|d / den * 8| + 1) / log2(8)`, den = pretrained_ws - 1 if given else ws - 1.
pub fn relative_coords_table(ws: usize, pretrained_ws: usize) -> Vec<f32> {
    let den = if pretrained_ws > 0 {
        pretrained_ws - 1
    } else {
        ws - 1
    } as f32;
    let t = |d: i64| -> f32 {
        // den = 0 only for a 1x1 window, where a single token makes the bias irrelevant
        let v = if den > 0.0 { d as f32 / den * 8.0 } else { 0.0 };
        v.signum() * (v.abs() + 1.0).log2() / 3.0
    };
    let r = ws as i64 - 1;
    let mut out = Vec::with_capacity((2 * ws - 1).pow(2) * 2);
    for dh in -r..=r {
        for dw in -r..=r {
            out.push(if dh == 0 { 0.0 } else { t(dh) });
            out.push(if dw == 0 { 0.0 } else { t(dw) });
        }
    }
    out
}

/// Relative position index `[N*N]` (N = ws²): `(dh + ws-1) * (2ws-1) + (dw + ws-1)` for
/// query i, key j, dh = h_i - h_j.
pub fn relative_position_index(ws: usize) -> Vec<u32> {
    let n = ws * ws;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dh = (i / ws) as i64 - (j / ws) as i64 + ws as i64 - 1;
            let dw = (i % ws) as i64 - (j % ws) as i64 + ws as i64 - 1;
            out.push((dh * (2 * ws as i64 - 1) + dw) as u32);
        }
    }
    out
}

/// Everything a block derives from (input map size, its fixed window): built once per map size.
#[derive(Debug)]
struct Geometry {
    ws: usize,
    shift: usize,
    /// `[nW, N, N]` in the model dtype, shifted blocks only.
    mask: Option<Tensor>,
    /// `[(2ws-1)^2, 2]` in the model dtype.
    coords: Tensor,
    /// `[N*N]` u32.
    index: Tensor,
}

impl Geometry {
    /// `(h, w)`: the block's input map; the shift mask covers it padded to whole windows.
    fn new(
        cfg: &SwinV2Config,
        stage: usize,
        (ws, shift): (usize, usize),
        (h, w): (usize, usize),
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let mask = if shift > 0 {
            Some(shifted_window_mask(hp, wp, ws, shift, dev)?.to_dtype(dtype)?)
        } else {
            None
        };
        let side = 2 * ws - 1;
        let coords = relative_coords_table(ws, cfg.pretrained_window_sizes[stage]);
        let coords = Tensor::from_vec(coords, (side * side, 2), dev)?.to_dtype(dtype)?;
        let index = Tensor::from_vec(relative_position_index(ws), ws * ws * ws * ws, dev)?;
        Ok(Self {
            ws,
            shift,
            mask,
            coords,
            index,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// WindowAttention: cosine attention + continuous position bias (architecture.md 1.4)
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct WindowAttention {
    num_heads: usize,
    qkv_w: Tensor,
    q_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    proj: Linear,
    logit_scale: Tensor,
    cpb0: Linear,
    cpb2: Linear,
    attn_drop: f64,
    proj_drop: f64,
}

impl WindowAttention {
    /// `shared`: the model's one CPB MLP (`shared_cpb`), used instead of this block's own.
    fn new(
        dim: usize,
        heads: usize,
        cfg: &SwinV2Config,
        shared: Option<&(Linear, Linear)>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let std02 = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let qkv_w = vb
            .pp("qkv")
            .get_with_hints((3 * dim, dim), "weight", std02)?;
        let (q_bias, v_bias) = if cfg.qkv_bias {
            (
                Some(vb.get_with_hints(dim, "q_bias", Init::Const(0.0))?),
                Some(vb.get_with_hints(dim, "v_bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        let logit_scale =
            vb.get_with_hints((heads, 1, 1), "logit_scale", Init::Const(10f64.ln()))?;
        let (cpb0, cpb2) = match shared {
            Some((c0, c2)) => (c0.clone(), c2.clone()), // same Vars: one set of gradients
            None => (
                Linear::new(2, 512, true, vb.pp("cpb_mlp").pp("0"))?,
                Linear::new(512, heads, false, vb.pp("cpb_mlp").pp("2"))?,
            ),
        };
        Ok(Self {
            num_heads: heads,
            qkv_w,
            q_bias,
            v_bias,
            proj: Linear::new(dim, dim, true, vb.pp("proj"))?,
            logit_scale,
            cpb0,
            cpb2,
            attn_drop: cfg.attn_drop_rate,
            proj_drop: cfg.drop_rate,
        })
    }

    /// `16 * sigmoid(cpb_mlp(coords))[index]` as `[nH, N, N]`.
    fn position_bias(&self, g: &Geometry) -> candle_core::Result<Tensor> {
        let n = g.ws * g.ws;
        let t = self.cpb2.forward(&self.cpb0.forward(&g.coords)?.relu()?)?; // ((2ws-1)^2, nH)
                                                                            // shared CPB: max(num_heads) outputs, this stage uses the first nH
        let t = if t.dim(1)? > self.num_heads {
            t.narrow(1, 0, self.num_heads)?.contiguous()?
        } else {
            t
        };
        let b = t
            .index_select(&g.index, 0)?
            .reshape((n, n, self.num_heads))?;
        candle_nn::ops::sigmoid(&b.permute((2, 0, 1))?)? * 16.0
    }

    /// `x`: `[B_, N, C]` windows -> `[B_, N, C]`.
    fn forward(
        &self,
        x: &Tensor,
        g: &Geometry,
        rng: &SharedRng,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        let nh = self.num_heads;
        let hd = c / nh;
        // q, k, v `[B_, N, C]` (head h in columns h*hd..) from the three row blocks of the qkv
        // weight (bias: q_bias, none, v_bias): three linears instead of one sliced `[3, ...]`
        // output, whose slices' backward would zero-pad each gradient back to the full size
        let part = |i: usize, b: Option<&Tensor>| {
            crate::ops::linear(x, &self.qkv_w.narrow(0, i * c, c)?, b)
        };
        // cosine attention: F.normalize over each head's dims
        let q = crate::ops::normalize_groups(&part(0, self.q_bias.as_ref())?, hd)?;
        let k = crate::ops::normalize_groups(&part(1, None)?, hd)?;
        let v = part(2, self.v_bias.as_ref())?;
        // (B_, nH, N, N): the heads read in place from the token-major q, k (ops::heads_qk)
        let attn = crate::ops::heads_qk(&q, &k, nh)?;
        // clamp(max = ln(1/0.01)) then exp: scale <= 100
        let scale = self.logit_scale.minimum((1.0f64 / 0.01).ln())?.exp()?;
        let (bias, mask) = (self.position_bias(g)?, g.mask.as_ref());
        let attn = if train {
            crate::ops::window_softmax(&attn, &scale, &bias, mask)?
        } else if crate::ops::is_fused(&attn) {
            // eval: no graph through the softmax (see LayerNorm::forward)
            crate::ops::window_softmax(&attn, &scale, &bias, mask)?.detach()
        } else {
            // off the CPU outside training: candle's fused softmax kernel (no backward)
            let z = crate::ops::window_logits(&attn, &scale, &bias, mask)?;
            candle_nn::ops::softmax_last_dim(&z.contiguous()?)?
        };
        let attn = dropout(&attn, self.attn_drop, rng, train)?;
        // (B_, N, C), heads concatenated in the columns
        let out = crate::ops::heads_av(&attn, &v)?;
        dropout(&self.proj.forward(&out)?, self.proj_drop, rng, train)
    }
}

// ------------------------------------------------------------------------------------------------
// Block: res-post-norm (architecture.md 1.3)
// ------------------------------------------------------------------------------------------------

/// A block's feed-forward: the dense MLP or an MoE layer.
#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeMlp),
}

/// Map sizes (padded to whole windows) whose shift masks a block keeps.
const GEOMETRY_SIZES: usize = 8;

/// One Swin-V2 block (attention + MLP, res-post-norm); public for benchmarks of a block alone.
#[derive(Debug)]
pub struct Block {
    cfg: Arc<SwinV2Config>,
    stage: usize,
    index: usize,
    /// (window, shift), fixed by the configured map size.
    window: (usize, usize),
    /// The configured map size (whole windows), whose geometry stays cached.
    configured: (usize, usize),
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Ffn,
    drop_path: f64,
    rng: SharedRng,
    /// Geometry per map size padded to whole windows; the configured one is built at
    /// construction.
    geometry: Mutex<HashMap<(usize, usize), Arc<Geometry>>>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: Arc<SwinV2Config>,
        stage: usize,
        index: usize,
        res: (usize, usize),
        drop_path: f64,
        rng: SharedRng,
        shared_cpb: Option<&(Linear, Linear)>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let dim = cfg.stage_dim(stage);
        let heads = cfg.num_heads[stage];
        let norm1 = LayerNorm::new(dim, true, vb.pp("norm1"))?; // res-post-norm init: zero
        let attn = WindowAttention::new(dim, heads, &cfg, shared_cpb, vb.pp("attn"))?;
        let norm2 = LayerNorm::new(dim, true, vb.pp("norm2"))?;
        let hid = cfg.mlp_hidden(dim);
        let mlp = if cfg.moe.is_moe_block(&cfg.depths, stage, index) {
            Ffn::Moe(MoeMlp::new(
                dim,
                hid,
                &cfg.moe,
                cfg.drop_rate,
                vb.pp("mlp"),
            )?)
        } else {
            Ffn::Dense(Mlp::new(dim, hid, cfg.drop_rate, vb.pp("mlp"))?)
        };
        let (ws, s) = cfg.window_at(res.0, res.1);
        let window = (ws, if index % 2 == 1 { s } else { 0 });
        let g = Geometry::new(&cfg, stage, window, res, vb.dtype(), vb.device())?;
        let geometry = Mutex::new(HashMap::from([(res, Arc::new(g))]));
        Ok(Self {
            cfg,
            stage,
            index,
            window,
            configured: res,
            norm1,
            attn,
            norm2,
            mlp,
            drop_path,
            rng,
            geometry,
        })
    }

    /// Block `index` of stage `stage` of `cfg` on its own (odd index = shifted windows), with the
    /// window and shift of a `res` token map (it runs on maps of any size), variables under `vb`
    /// with the official block key names; no drop path.
    pub fn standalone(
        cfg: &SwinV2Config,
        stage: usize,
        index: usize,
        res: (usize, usize),
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let rng = SharedRng::new(0);
        Self::new(Arc::new(cfg.clone()), stage, index, res, 0.0, rng, None, vb)
    }

    /// The geometry of an `h` x `w` map, cached by its size padded to whole windows (which is
    /// all it depends on); past [`GEOMETRY_SIZES`] sizes, all but the configured one are dropped.
    fn geometry(&self, h: usize, w: usize, x: &Tensor) -> candle_core::Result<Arc<Geometry>> {
        let ws = self.window.0;
        let padded = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        // Invariant: the mutex is only held inside this function, which cannot panic while held.
        let mut cache = self.geometry.lock().expect("geometry cache poisoned");
        if let Some(g) = cache.get(&padded) {
            return Ok(g.clone());
        }
        let g = Arc::new(Geometry::new(
            &self.cfg,
            self.stage,
            self.window,
            padded,
            x.dtype(),
            x.device(),
        )?);
        if cache.len() >= GEOMETRY_SIZES {
            cache.retain(|k, _| *k == self.configured);
        }
        cache.insert(padded, g.clone());
        Ok(g)
    }

    /// `x`: `[B, H, W, C]` of any size (padded to whole windows inside, timm
    /// `SwinTransformerV2Block._attn`) -> `[B, H, W, C]`, and the stats of its MoE layer (`None`
    /// when dense).
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<(Tensor, Option<MoeStats>)> {
        let (b, h, w, _) = x.dims4()?;
        let g = self.geometry(h, w, x)?;
        let (ws, s) = (g.ws, g.shift);
        // (B*nW, N, C): rolled by -s, zero-padded to whole windows, cut into windows (one node
        // each way; no padding where the windows divide the map, as at the configured size)
        let win = crate::ops::partition_windows_padded(x, ws, s)?;
        let a = self.attn.forward(&win, &g, &self.rng, train)?;
        let a = crate::ops::merge_windows_cropped(&a, ws, s, (h, w))?;
        debug_assert_eq!(a.dim(0)?, b);
        let a = self.norm1.forward(&a, train)?;
        let x = residual_drop_path(x, &a, self.drop_path, &self.rng, train)?;
        let (m, stats) = match &self.mlp {
            Ffn::Dense(mlp) => (mlp.forward(&x, &self.rng, train)?, None),
            Ffn::Moe(moe) => {
                let (y, r, aux_loss) = moe.forward(&x, &self.rng, train)?;
                let stats = MoeStats {
                    stage: self.stage,
                    block: self.index,
                    aux_loss,
                    load: r.load(),
                    drop_fraction: r.drop_fraction(),
                    capacity: r.capacity,
                };
                (y, Some(stats))
            }
        };
        let m = self.norm2.forward(&m, train)?;
        let y = residual_drop_path(&x, &m, self.drop_path, &self.rng, train)?;
        Ok((y, stats))
    }
}

// ------------------------------------------------------------------------------------------------
// PatchMerging V2: reduction then norm (architecture.md 1.7)
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PatchMerging {
    reduction: Linear,
    norm: LayerNorm,
}

impl PatchMerging {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            reduction: Linear::new(4 * dim, 2 * dim, false, vb.pp("reduction"))?,
            norm: LayerNorm::new(2 * dim, false, vb.pp("norm"))?,
        })
    }

    /// `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), 2C]`; an odd map is padded with zeros at the
    /// bottom/right first (timm `PatchMerging`).
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let x = x.pad_with_zeros(1, 0, h % 2)?.pad_with_zeros(2, 0, w % 2)?;
        let (b, h, w, c) = x.dims4()?;
        // cat(x0, x1, x2, x3) = (h even, w even), (h odd, w even), (h even, w odd), (h odd, w odd)
        let x = x
            .reshape((b, h / 2, 2, w / 2, 2, c))?
            .permute((0, 1, 3, 4, 2, 5))?
            .reshape((b, h / 2, w / 2, 4 * c))?;
        self.norm.forward(&self.reduction.forward(&x)?, train)
    }
}

// ------------------------------------------------------------------------------------------------
// Stage (official BasicLayer: blocks, then the merge at the END)
// ------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Stage {
    blocks: Vec<Block>,
    downsample: Option<PatchMerging>,
}

// ------------------------------------------------------------------------------------------------
// SwinV2
// ------------------------------------------------------------------------------------------------

/// Per-stage feature maps and final tokens of [`SwinV2::forward_features`].
#[derive(Debug, Clone)]
pub struct Features {
    /// NCHW map of each stage (before its patch merging); the last one after the final norm.
    /// These are permuted views: call `contiguous()` where a kernel needs it.
    pub stages: Vec<Tensor>,
    /// `[B, L, C]` tokens after the final norm.
    pub last: Tensor,
    /// What the MoE layers of this forward recorded (no layers for a dense model).
    pub moe: MoeAux,
}

/// The Swin-V2 backbone with an optional linear head and SimMIM mask token.
#[derive(Debug)]
pub struct SwinV2 {
    cfg: Arc<SwinV2Config>,
    patch_w: Tensor,
    patch_b: Tensor,
    patch_norm: Option<LayerNorm>,
    mask_token: Option<Tensor>,
    layers: Vec<Stage>,
    norm: LayerNorm,
    head: Option<Linear>,
    rng: SharedRng,
}

impl SwinV2 {
    /// Builds from `vb` (official key names). `mask_token`: also create the SimMIM `mask_token`
    /// `[1, 1, C]` (N(0, .02)). `rng`: the shared RNG for drop path/dropout.
    pub fn new(
        cfg: &SwinV2Config,
        mask_token: bool,
        rng: SharedRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let cfg = Arc::new(cfg.clone());
        Self::build(cfg, mask_token, rng, vb).context("building the Swin-V2 model")
    }

    fn build(
        cfg: Arc<SwinV2Config>,
        mask_token: bool,
        rng: SharedRng,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let c = cfg.embed_dim;
        let (p, ic) = (cfg.patch_size, cfg.in_chans);
        // PyTorch Conv2d default init: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in))
        let bound = 1.0 / ((ic * p * p) as f64).sqrt();
        let uni = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let pe = vb.pp("patch_embed");
        let patch_w = pe.pp("proj").get_with_hints((c, ic, p, p), "weight", uni)?;
        let patch_b = pe.pp("proj").get_with_hints(c, "bias", uni)?;
        let patch_norm = if cfg.patch_norm {
            Some(LayerNorm::new(c, false, pe.pp("norm"))?)
        } else {
            None
        };
        let mask_token = if mask_token {
            Some(vb.get_with_hints(
                (1, 1, c),
                "mask_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?)
        } else {
            None
        };
        // shared CPB (feature distillation): one MLP at top-level `cpb_mlp.*`, max(heads) outputs
        let shared_cpb = if cfg.shared_cpb {
            let heads = cfg.num_heads.iter().copied().max().unwrap_or(1);
            Some((
                Linear::new(2, 512, true, vb.pp("cpb_mlp").pp("0"))?,
                Linear::new(512, heads, false, vb.pp("cpb_mlp").pp("2"))?,
            ))
        } else {
            None
        };
        let dpr = cfg.drop_path_rates();
        let mut k = 0;
        let mut res = (cfg.img_size / p, cfg.img_size / p);
        let mut layers = Vec::with_capacity(cfg.num_stages());
        for i in 0..cfg.num_stages() {
            let lv = vb.pp("layers").pp(i);
            let mut blocks = Vec::with_capacity(cfg.depths[i]);
            for j in 0..cfg.depths[i] {
                let bv = lv.pp("blocks").pp(j);
                let (r, shared) = (rng.clone(), shared_cpb.as_ref());
                blocks.push(Block::new(cfg.clone(), i, j, res, dpr[k], r, shared, bv)?);
                k += 1;
            }
            let downsample = if i + 1 < cfg.num_stages() {
                res = (res.0 / 2, res.1 / 2);
                Some(PatchMerging::new(cfg.stage_dim(i), lv.pp("downsample"))?)
            } else {
                None
            };
            layers.push(Stage { blocks, downsample });
        }
        let nf = cfg.num_features();
        let norm = LayerNorm::new(nf, false, vb.pp("norm"))?;
        let head = if cfg.num_classes > 0 {
            Some(Linear::new(nf, cfg.num_classes, true, vb.pp("head"))?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            patch_w,
            patch_b,
            patch_norm,
            mask_token,
            layers,
            norm,
            head,
            rng,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &SwinV2Config {
        &self.cfg
    }

    /// Patch embedding as a matmul (kernel = stride): `[B, Cin, H, W]` -> `[B, H/p, W/p, C]`.
    fn patch_embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, ci, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (hp, wp) = (h / p, w / p);
        let cols = x
            .reshape((b, ci, hp, p, wp, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, hp, wp, ci * p * p))?;
        let wt = self.patch_w.reshape((self.cfg.embed_dim, ci * p * p))?;
        // ops::linear: candle's broadcast_add backward would sum the bias gradient over every
        // patch with its strided reduction
        crate::ops::linear(&cols, &wt, Some(&self.patch_b))
    }

    /// Runs the backbone on `x [B, C, H, W]`, H and W any multiples of the patch size (the
    /// windows of the configured size, padded; see the module header). `mask`: optional
    /// `[B, H/patch, W/patch]` (1 = masked), replaced by
    /// `mask_token` after the patch embedding and its norm (SimMIM 3.2). `train` enables drop path
    /// and dropout; the MoE statistics come back in [`Features::moe`] (training objectives hand
    /// them to the trainer). On the CPU (f32/f64) both modes run the same fused ops, which have a
    /// backward; elsewhere `train = false` uses candle's fused kernels, which have none (call
    /// with `train = true` to take gradients).
    pub fn forward_features(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Features> {
        let (_, ci, h, w) = x.dims4().context("Swin-V2 input must be [B, C, H, W]")?;
        ensure!(
            ci == self.cfg.in_chans,
            "Swin-V2 input has {ci} channels, model.in_chans is {}",
            self.cfg.in_chans
        );
        self.cfg.check_resolution(h, w)?;
        self.run(x, mask, train).context("Swin-V2 forward")
    }

    fn run(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Features> {
        let mut x = self.patch_embed(x)?;
        if let Some(n) = &self.patch_norm {
            x = n.forward(&x, train)?;
        }
        if let Some(m) = mask {
            let tok = self.mask_token.as_ref().context(
                "a mask was given but the model was built without a mask_token (mask_token = false)",
            )?;
            let (b, hp, wp, _) = x.dims4()?;
            ensure!(
                m.dims() == [b, hp, wp],
                "mask has shape {:?}, expected [{b}, {hp}, {wp}] (one value per patch)",
                m.dims()
            );
            // x (1 - m) + tok m as one node (ops::mask_token)
            x = crate::ops::mask_token(&x, tok, m)?;
        }
        x = dropout(&x, self.cfg.drop_rate, &self.rng, train)?;
        let mut stages = Vec::with_capacity(self.layers.len());
        let mut moe = MoeAux {
            layers: vec![],
            weight: self.cfg.moe.aux_loss_weight,
        };
        for layer in &self.layers {
            for blk in &layer.blocks {
                let (y, stats) = blk.forward(&x, train)?;
                x = y;
                moe.layers.extend(stats);
            }
            match &layer.downsample {
                Some(ds) => {
                    stages.push(x.permute((0, 3, 1, 2))?);
                    x = ds.forward(&x, train)?;
                }
                None => {
                    x = self.norm.forward(&x, train)?;
                    stages.push(x.permute((0, 3, 1, 2))?);
                }
            }
        }
        let (b, h, w, c) = x.dims4()?;
        let last = x.reshape((b, h * w, c))?;
        Ok(Features { stages, last, moe })
    }

    /// Mean over tokens of the final features: `[B, C]`.
    pub fn pre_logits(&self, f: &Features) -> Result<Tensor> {
        Ok(f.last.mean(1)?)
    }

    /// Logits `[B, num_classes]` (the pre-logits when `num_classes == 0`) and the MoE statistics
    /// of the forward.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, MoeAux)> {
        let f = self.forward_features(x, None, train)?;
        let p = self.pre_logits(&f)?;
        let y = match &self.head {
            Some(h) => h.forward(&p)?,
            None => p,
        };
        Ok((y, f.moe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::MoeConfig;
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;
    use mimlab_engine::trainer::AuxLoss;
    use rand::Rng;

    #[test]
    fn block_gradient_matches_finite_differences() -> Result<()> {
        // 8x8 map, window 4, shifted block (odd index), f64.
        block_gradient_matches_finite_differences_on(8, 8)
    }

    /// The same block (configured for an 8x8 map: window 4, shift 2) on a 7x10 map, which its
    /// windows do not divide: padded to 8x12, masked on the padded map, cropped back.
    #[test]
    fn padded_shifted_block_gradient_matches_finite_differences() -> Result<()> {
        block_gradient_matches_finite_differences_on(7, 10)
    }

    fn block_gradient_matches_finite_differences_on(h: usize, w: usize) -> Result<()> {
        let cfg = SwinV2Config {
            preset: None,
            img_size: 32,
            patch_size: 4,
            in_chans: 3,
            num_classes: 0,
            embed_dim: 8,
            depths: vec![2],
            num_heads: vec![2],
            window_size: 4,
            mlp_ratio: 2.0,
            qkv_bias: true,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            drop_path_rate: 0.0,
            pretrained_window_sizes: vec![0],
            patch_norm: true,
            moe: MoeConfig::default(),
            shared_cpb: false,
        };
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F64, &dev);
        let r = SharedRng::new(0);
        let blk = Block::new(Arc::new(cfg), 0, 1, (8, 8), 0.0, r, None, vb)?;
        // Re-randomize everything (norm1/norm2 start at zero = identity block).
        let mut rng = mimlab_engine::rng::rng_for(11, &[]);
        // sorted: HashMap order is random per process and would make the draws (and the test) vary
        let mut vars: Vec<_> = vm.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars.iter() {
            let n = var.elem_count();
            let s = if name.contains("logit_scale") {
                1.0
            } else {
                0.5
            };
            let v: Vec<f64> = (0..n)
                .map(|_| rng.random_range(-s..s) + if name.contains("norm") { 1.0 } else { 0.0 })
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &dev)?)?;
        }
        let xv: Vec<f64> = (0..h * w * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x = candle_core::Var::from_tensor(&Tensor::from_vec(xv, (1, h, w, 8), &dev)?)?;
        let wv: Vec<f64> = (0..h * w * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let wt = Tensor::from_vec(wv, (1, h, w, 8), &dev)?;
        let loss = |t: &Tensor| -> Result<f64> {
            Ok((blk.forward(t, true)?.0 * &wt)?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        let l = (blk.forward(x.as_tensor(), true)?.0 * &wt)?.sum_all()?;
        let grads = l.backward()?;
        let data = vm.data().lock().unwrap().clone();
        let mut checks: Vec<(String, candle_core::Var)> = [
            "attn.qkv.weight",
            "attn.q_bias",
            "attn.v_bias",
            "attn.logit_scale",
            "attn.cpb_mlp.0.weight",
            "attn.cpb_mlp.2.weight",
            "norm1.weight",
            "mlp.fc1.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), data[*k].clone()))
        .collect();
        checks.push(("input".into(), x.clone()));
        let eps = 1e-5;
        for (name, var) in checks {
            let g = grads
                .get(var.as_tensor())
                .context("no grad")?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for idx in [0, base.len() / 2, base.len() - 1] {
                let mut plus = base.clone();
                plus[idx] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), &dev)?)?;
                let lp = loss(x.as_tensor())?;
                let mut minus = base.clone();
                minus[idx] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), &dev)?)?;
                let lm = loss(x.as_tensor())?;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev)?)?;
                let fd = (lp - lm) / (2.0 * eps);
                let rel = (fd - g[idx]).abs() / fd.abs().max(g[idx].abs()).max(1e-3);
                assert!(
                    rel < 1e-5,
                    "{name}[{idx}]: analytic {} vs numeric {fd} (rel {rel})",
                    g[idx]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn moe_model_keys_params_stats_and_gradients() -> Result<()> {
        let moe = MoeConfig {
            num_experts: 4,
            ..MoeConfig::default()
        };
        let cfg = SwinV2Config {
            preset: None,
            img_size: 32,
            embed_dim: 16,
            depths: vec![2, 2],
            num_heads: vec![1, 2],
            pretrained_window_sizes: vec![0, 0],
            moe,
            ..SwinV2Config::preset("swinv2_nano")?
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        let data = vm.data().lock().unwrap().clone();
        let n: usize = data.values().map(|v| v.elem_count()).sum();
        assert_eq!(n, cfg.num_params());
        // default placement with 2 stages: block 1 of both; 4 experts, hidden 4C
        let e = "layers.1.blocks.1.mlp._moe_layer.experts.";
        assert_eq!(data[&format!("{e}batched_fc1_w")].dims(), &[4, 128, 32]);
        assert_eq!(data[&format!("{e}batched_fc2_w")].dims(), &[4, 128, 32]);
        assert_eq!(data[&format!("{e}batched_fc1_bias")].dims(), &[4, 1, 128]);
        assert_eq!(data[&format!("{e}batched_fc2_bias")].dims(), &[4, 1, 32]);
        let wg = &data["layers.0.blocks.1.mlp._moe_layer.gates.0.wg.weight"];
        assert_eq!(wg.dims(), &[4, 16]);
        assert!(data.contains_key("layers.0.blocks.0.mlp.fc1.weight"));
        assert!(!data.contains_key("layers.0.blocks.1.mlp.fc1.weight"));

        let x = Tensor::from_vec(
            (0..2 * 3 * 32 * 32)
                .map(|i| ((i * 7919) % 255) as f32 / 255.0)
                .collect(),
            (2, 3, 32, 32),
            &Device::Cpu,
        )?;
        let (_, first) = m.forward(&x, true)?;
        let (_, moe) = m.forward(&x, true)?; // each forward returns its own stats
        assert_eq!(first.layers.len(), 2);
        let stats = moe.layers;
        assert_eq!(stats.len(), 2);
        assert_eq!((stats[0].stage, stats[0].block), (0, 1));
        // stage 0: S = 2 * 8 * 8 = 128 tokens, capacity int(1.25 * 32) = 40
        assert_eq!(stats[0].capacity, 40);
        assert!((stats[0].load.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let (y, moe) = m.forward(&x, true)?;
        let mut losses = moe.aux_losses()?;
        assert_eq!(losses.len(), 1);
        let AuxLoss {
            value: aux,
            metrics,
        } = losses.pop().context("MoE is on")?;
        let names: Vec<&str> = metrics.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["moe_aux", "moe_drop", "moe_load_l0_max", "moe_load_l1_max"]
        );
        assert_eq!(metrics[0].1, aux.to_scalar::<f32>()? as f64);
        let g = (y.sqr()?.mean_all()? + aux)?.backward()?;
        let gw = g.get(wg.as_tensor()).context("no gate gradient")?;
        assert!(gw.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

        // dense: no stats, no loss
        let dense = SwinV2Config {
            moe: MoeConfig::default(),
            ..cfg.clone()
        };
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let d = SwinV2::new(&dense, false, SharedRng::new(0), vb)?;
        let (_, moe) = d.forward(&x, false)?;
        assert!(moe.layers.is_empty() && moe.aux_losses()?.is_empty());

        // the config resolves with the placement spelled out; bad blocks name the key
        let two = SwinV2Config {
            depths: vec![2, 2],
            num_heads: vec![1, 2],
            pretrained_window_sizes: vec![0, 0],
            moe: MoeConfig {
                num_experts: 2,
                ..MoeConfig::default()
            },
            ..SwinV2Config::default()
        };
        assert_eq!(two.clone().resolved()?.moe.blocks, vec![vec![1], vec![1]]);
        let mut bad = two;
        bad.moe.blocks = vec![vec![-1], vec![2]];
        let e = format!("{:#}", bad.resolved().unwrap_err());
        assert!(
            e.contains("model.moe.blocks[1]: block 2 is out of range"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn geometry_is_built_once_for_the_config_resolution() -> Result<()> {
        let cfg = SwinV2Config::preset("swinv2_nano")?;
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        let blk = &m.layers[0].blocks[1];
        assert_eq!(blk.geometry.lock().unwrap().len(), 1);
        let g = blk.geometry.lock().unwrap()[&(16, 16)].clone();
        assert_eq!((g.ws, g.shift), (4, 2));
        assert_eq!(g.mask.as_ref().unwrap().dims(), &[16, 16, 16]);
        // stage 3 at 64 px is 2x2: window clamped to 2, no shift
        let g3 = m.layers[3].blocks[1].geometry.lock().unwrap()[&(2, 2)].clone();
        assert_eq!((g3.ws, g3.shift), (2, 0));
        assert!(g3.mask.is_none());
        // other sizes: cached by the map padded to whole windows; 17x23 and 20x21 share 20x24
        let x = |h, w| Tensor::zeros((1, 3, h, w), DType::F32, &Device::Cpu);
        m.forward(&x(68, 92)?, false)?;
        m.forward(&x(80, 84)?, false)?;
        let cache = blk.geometry.lock().unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache[&(20, 24)].mask.as_ref().unwrap().dims(),
            &[30, 16, 16]
        );
        drop(cache);
        // at most GEOMETRY_SIZES sizes: then all but the configured one go
        for i in 1..=GEOMETRY_SIZES {
            m.forward(&x(64, 64 + 16 * i)?, false)?;
        }
        let cache = blk.geometry.lock().unwrap();
        assert!(cache.len() <= GEOMETRY_SIZES && cache.contains_key(&(16, 16)));
        Ok(())
    }
}
