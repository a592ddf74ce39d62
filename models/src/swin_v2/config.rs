//! Model configuration (pipeline stage: model): the Swin-V2 hyper-parameters [`SwinV2Config`],
//! the named presets ([`PRESETS`], timm model names, architecture.md 1.2), their structural
//! validation (`check_resolution`, the window clamp `window_at`) and the analytic accounting of
//! parameters (`num_params`) and forward FLOPs (`flops`, counted like the official `flops()`).
//! The model itself is in [`crate::swin_v2`], which re-exports everything here.
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::moe::MoeConfig;

/// Hyper-parameters of a Swin-V2 backbone (timm / official names). This is the `model:` config
/// section itself: its `preset` is a layer of the config merge ([`preset_layer`]: preset values,
/// then the files, then `--set`), so every other key overrides the named preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinV2Config {
    /// The preset the values started from (see [`PRESETS`]); informational once loaded, since
    /// every key is spelled out. `None` for configs built in code or read from fixtures.
    #[serde(default)]
    pub preset: Option<String>,
    /// Configured image size (square). It fixes every stage's window and shift; an input of any
    /// other size that is a multiple of `patch_size` runs with the same windows, its maps padded
    /// to whole windows (timm `dynamic_img_size=True`, see [`SwinV2Config::check_resolution`]).
    pub img_size: usize,
    /// Patch-embedding stride and kernel.
    pub patch_size: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Classes of the linear head; 0 = no head.
    pub num_classes: usize,
    /// Channels of stage 0 (doubled at every patch merging).
    pub embed_dim: usize,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub num_heads: Vec<usize>,
    /// Attention window (clamped to a stage's resolution when that is smaller or equal).
    pub window_size: usize,
    /// MLP hidden size = floor(dim * mlp_ratio).
    pub mlp_ratio: f64,
    /// Learnable q and v biases (no k bias).
    pub qkv_bias: bool,
    /// Dropout after the patch embedding, the attention projection and in the MLP.
    pub drop_rate: f64,
    /// Dropout on the attention probabilities.
    pub attn_drop_rate: f64,
    /// Stochastic depth, linearly increasing over all blocks from 0.
    pub drop_path_rate: f64,
    /// Per stage: window size of pretraining (normalizes the CPB coordinates), 0 = this window.
    pub pretrained_window_sizes: Vec<usize>,
    /// LayerNorm after the patch embedding.
    pub patch_norm: bool,
    /// Mixture-of-experts MLPs (off by default; see [`crate::moe`]).
    #[serde(default)]
    pub moe: MoeConfig,
    /// One continuous-position-bias MLP for all blocks (feature-distillation students), stored at
    /// the top-level key `cpb_mlp.*` with max(num_heads) outputs; a block with h heads uses the
    /// first h. [`crate::checkpoint::unshare_cpb`] turns such a checkpoint into per-block tables for finetuning.
    #[serde(default)]
    pub shared_cpb: bool,
}

/// Names accepted by [`SwinV2Config::preset`].
pub const PRESETS: &[&str] = &[
    "swinv2_nano",
    "swinv2_micro",
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_small_window8_256",
    "swinv2_small_window16_256",
    "swinv2_base_window8_256",
    "swinv2_base_window16_256",
    "swinv2_base_window12_192",
    "swinv2_base_window12to16_192to256",
    "swinv2_base_window12to24_192to384",
    "swinv2_large_window12_192",
    "swinv2_large_window12to16_192to256",
    "swinv2_large_window12to24_192to384",
];

impl SwinV2Config {
    #[allow(clippy::too_many_arguments)]
    fn base(
        img_size: usize,
        embed_dim: usize,
        depths: &[usize],
        num_heads: &[usize],
        window_size: usize,
        num_classes: usize,
        drop_path_rate: f64,
        pretrained_window_sizes: &[usize],
    ) -> Self {
        Self {
            preset: None,
            img_size,
            patch_size: 4,
            in_chans: 3,
            num_classes,
            embed_dim,
            depths: depths.to_vec(),
            num_heads: num_heads.to_vec(),
            window_size,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            drop_path_rate,
            pretrained_window_sizes: pretrained_window_sizes.to_vec(),
            patch_norm: true,
            moe: MoeConfig::default(),
            shared_cpb: false,
        }
    }

    /// A named preset (timm model names; drop path from the official configs, architecture.md 1.2).
    /// `swinv2_nano` / `swinv2_micro` are mimlab's own small models for CPU experiments.
    pub fn preset(name: &str) -> Result<Self> {
        const T: (&[usize], &[usize]) = (&[2, 2, 6, 2], &[3, 6, 12, 24]);
        const S: (&[usize], &[usize]) = (&[2, 2, 18, 2], &[3, 6, 12, 24]);
        const B: (&[usize], &[usize]) = (&[2, 2, 18, 2], &[4, 8, 16, 32]);
        const L: (&[usize], &[usize]) = (&[2, 2, 18, 2], &[6, 12, 24, 48]);
        const Z: &[usize] = &[0, 0, 0, 0];
        const P12: &[usize] = &[12, 12, 12, 6];
        let c = match name {
            "swinv2_nano" => Self::base(64, 32, &[2, 2, 2, 2], &[1, 2, 4, 8], 4, 1000, 0.1, Z),
            "swinv2_micro" => Self::base(128, 48, &[2, 2, 6, 2], &[2, 4, 8, 16], 8, 1000, 0.1, Z),
            "swinv2_tiny_window8_256" => Self::base(256, 96, T.0, T.1, 8, 1000, 0.2, Z),
            "swinv2_tiny_window16_256" => Self::base(256, 96, T.0, T.1, 16, 1000, 0.2, Z),
            "swinv2_small_window8_256" => Self::base(256, 96, S.0, S.1, 8, 1000, 0.3, Z),
            "swinv2_small_window16_256" => Self::base(256, 96, S.0, S.1, 16, 1000, 0.3, Z),
            "swinv2_base_window8_256" => Self::base(256, 128, B.0, B.1, 8, 1000, 0.5, Z),
            "swinv2_base_window16_256" => Self::base(256, 128, B.0, B.1, 16, 1000, 0.5, Z),
            "swinv2_base_window12_192" => Self::base(192, 128, B.0, B.1, 12, 21841, 0.2, Z),
            "swinv2_base_window12to16_192to256" => {
                Self::base(256, 128, B.0, B.1, 16, 1000, 0.2, P12)
            }
            "swinv2_base_window12to24_192to384" => {
                Self::base(384, 128, B.0, B.1, 24, 1000, 0.2, P12)
            }
            "swinv2_large_window12_192" => Self::base(192, 192, L.0, L.1, 12, 21841, 0.2, Z),
            "swinv2_large_window12to16_192to256" => {
                Self::base(256, 192, L.0, L.1, 16, 1000, 0.2, P12)
            }
            "swinv2_large_window12to24_192to384" => {
                Self::base(384, 192, L.0, L.1, 24, 1000, 0.2, P12)
            }
            _ => bail!(
                "unknown model preset `{name}`; known presets: {}",
                PRESETS.join(", ")
            ),
        };
        Ok(Self {
            preset: Some(name.to_string()),
            ..c
        })
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Channels of stage `i`.
    pub fn stage_dim(&self, i: usize) -> usize {
        // Saturating (so a config with absurd sizes reaches `validate`'s error, not a panic).
        self.embed_dim
            .saturating_mul(1usize.checked_shl(i as u32).unwrap_or(usize::MAX))
    }

    /// Channels of the final feature map: embed_dim * 2^(stages-1).
    pub fn num_features(&self) -> usize {
        self.stage_dim(self.num_stages().saturating_sub(1))
    }

    /// Stride of the final feature map: patch_size * 2^(stages-1).
    pub fn out_stride(&self) -> usize {
        let stages = self.num_stages().saturating_sub(1) as u32;
        self.patch_size
            .saturating_mul(1usize.checked_shl(stages).unwrap_or(usize::MAX))
    }

    /// MLP hidden size of a block of width `dim` (`int(dim * mlp_ratio)`).
    pub(crate) fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks every structural constraint; errors name the offending `model.*` key.
    pub fn validate(&self) -> Result<()> {
        let n = self.depths.len();
        ensure!(n > 0, "model.depths: needs at least one stage");
        ensure!(
            self.num_heads.len() == n,
            "model.num_heads: has {} entries but model.depths has {n}",
            self.num_heads.len()
        );
        ensure!(
            self.pretrained_window_sizes.len() == n,
            "model.pretrained_window_sizes: has {} entries but model.depths has {n}",
            self.pretrained_window_sizes.len()
        );
        ensure!(
            self.depths.iter().all(|&d| d > 0),
            "model.depths: every stage needs >= 1 block"
        );
        ensure!(self.patch_size > 0, "model.patch_size: must be > 0");
        ensure!(self.in_chans > 0, "model.in_chans: must be > 0");
        ensure!(self.embed_dim > 0, "model.embed_dim: must be > 0");
        ensure!(self.window_size > 0, "model.window_size: must be > 0");
        ensure!(
            self.mlp_ratio > 0.0,
            "model.mlp_ratio: must be > 0, got {}",
            self.mlp_ratio
        );
        for (key, v) in [
            ("drop_rate", self.drop_rate),
            ("attn_drop_rate", self.attn_drop_rate),
            ("drop_path_rate", self.drop_path_rate),
        ] {
            ensure!(
                (0.0..1.0).contains(&v),
                "model.{key}: must be in [0, 1), got {v}"
            );
        }
        for (i, &p) in self.pretrained_window_sizes.iter().enumerate() {
            ensure!(
                p != 1,
                "model.pretrained_window_sizes[{i}]: must be 0 (none) or >= 2, got 1"
            );
        }
        ensure!(
            self.img_size.is_multiple_of(self.patch_size) && self.img_size >= self.patch_size,
            "model.img_size: {} is not a multiple of model.patch_size {}",
            self.img_size,
            self.patch_size
        );
        for (i, &h) in self.num_heads.iter().enumerate() {
            let dim = self.stage_dim(i);
            ensure!(
                h > 0 && dim.is_multiple_of(h),
                "model.num_heads[{i}]: {h} heads do not divide stage {i}'s {dim} channels"
            );
        }
        self.check_configured_resolution()
            .context("model.img_size")?;
        self.moe.validate(&self.depths)?;
        self.check_sizes(machine_memory_bytes())
    }

    /// Checks that the model's weights (f32) and one image's stage-0 activations fit in `mem`
    /// bytes, naming the key that makes them too large. Estimates are in f64 (an absurd size
    /// gives infinity, never an overflow).
    fn check_sizes(&self, mem: u64) -> Result<()> {
        let mem_f = mem as f64;
        let gib = |bytes: f64| format!("{:.1} GiB", bytes / (1u64 << 30) as f64);
        let over = |bytes: f64| bytes.is_nan() || bytes > mem_f;
        let n = self.num_stages();
        let widest = self.embed_dim as f64 * 2f64.powi(n as i32 - 1);
        // One attention layer of the widest stage: qkv + proj, 4 C^2 weights.
        let attn = 4.0 * widest * widest * 4.0;
        ensure!(
            !over(attn),
            "model.embed_dim: {} channels ({widest} in the last stage) need {} for one attention \
             layer's weights, more than this machine's memory ({})",
            self.embed_dim,
            gib(attn),
            gib(mem_f)
        );
        ensure!(
            self.mlp_ratio.is_finite(),
            "model.mlp_ratio: must be finite, got {}",
            self.mlp_ratio
        );
        let mlp = 2.0 * widest * (widest * self.mlp_ratio) * 4.0;
        ensure!(
            !over(mlp),
            "model.mlp_ratio: {} makes the last stage's MLP {widest}x{} with {} of weights, more \
             than this machine's memory ({})",
            self.mlp_ratio,
            widest * self.mlp_ratio,
            gib(mlp),
            gib(mem_f)
        );
        let moe_dim = (0..n)
            .filter(|&i| (0..self.depths[i]).any(|j| self.moe.is_moe_block(&self.depths, i, j)))
            .map(|i| self.stage_dim(i))
            .max();
        if let Some(d) = moe_dim {
            self.moe.check_size(d, self.mlp_hidden(d), mem)?;
        }
        let params = self.checked_num_params();
        let weights = params.map_or(f64::INFINITY, |p| p as f64 * 4.0);
        ensure!(
            !over(weights),
            "model: {} parameters need {} of weights, more than this machine's memory ({}); \
             lower model.embed_dim, model.depths, model.mlp_ratio, model.moe.num_experts or \
             model.num_classes",
            params.map_or("more than 2^64".to_string(), |p| p.to_string()),
            gib(weights),
            gib(mem_f)
        );
        // One image's stage-0 token map at its widest (the MLP's hidden layer).
        let side = (self.img_size / self.patch_size) as f64;
        let c0 = self.embed_dim as f64 * self.mlp_ratio.max(1.0);
        let act = side * side * c0 * 4.0;
        ensure!(
            !over(act),
            "model.img_size: {} px gives a {side}x{side} stage-0 map; one image's activations \
             there need {}, more than this machine's memory ({})",
            self.img_size,
            gib(act),
            gib(mem_f)
        );
        Ok(())
    }

    /// Checks that an input of `h` x `w` pixels runs: any positive multiple of the patch size
    /// ([`Self::size_multiple`]; the model does not pad the image, the data stage does). Maps
    /// that the windows do not divide are padded to whole windows in each block and odd maps are
    /// padded before a patch merging (timm `dynamic_img_size=True`); the configured size takes
    /// no padding.
    pub fn check_resolution(&self, h: usize, w: usize) -> Result<()> {
        let p = self.size_multiple();
        ensure!(
            h.is_multiple_of(p) && w.is_multiple_of(p) && h > 0 && w > 0,
            "image {h}x{w} is not a multiple of the patch size {p} (pad or resize it to one)"
        );
        Ok(())
    }

    /// What an input's height and width must be a multiple of: the patch size.
    pub fn size_multiple(&self) -> usize {
        self.patch_size
    }

    /// The configured size splits into whole windows at every stage and into even maps at every
    /// patch merging (so that it runs without any padding).
    fn check_configured_resolution(&self) -> Result<()> {
        let (h, w) = (self.img_size, self.img_size);
        self.check_resolution(h, w)?;
        let (mut rh, mut rw) = (h / self.patch_size, w / self.patch_size);
        for i in 0..self.num_stages() {
            let (ws, _) = self.window_at(rh, rw);
            ensure!(
                rh % ws == 0 && rw % ws == 0,
                "model.window_size: stage {i} feature map {rh}x{rw} is not divisible by its window \
                 {ws} (image {h}x{w})"
            );
            if i + 1 < self.num_stages() {
                ensure!(
                    rh % 2 == 0 && rw % 2 == 0,
                    "stage {i} feature map {rh}x{rw} is odd and cannot be merged (image {h}x{w})"
                );
                rh /= 2;
                rw /= 2;
            }
        }
        Ok(())
    }

    /// (window, shift of odd blocks) of stage `i`, fixed by the configured `img_size` for every
    /// input size (timm keeps them too).
    pub fn stage_window(&self, i: usize) -> (usize, usize) {
        let r = (self.img_size / self.patch_size) >> i;
        self.window_at(r, r)
    }

    /// (window, shift of odd blocks) of a stage whose map is `rh` x `rw`: official clamp
    /// `if min(resolution) <= window: shift = 0; window = min(resolution)` (architecture.md 1.2).
    pub fn window_at(&self, rh: usize, rw: usize) -> (usize, usize) {
        let m = rh.min(rw);
        if m <= self.window_size {
            (m, 0)
        } else {
            (self.window_size, self.window_size / 2)
        }
    }

    /// Analytic parameter count (equals the built model's, without `mask_token`); `usize::MAX`
    /// where it overflows (a config `validate` refuses).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// [`Self::num_params`] in checked arithmetic: `None` on overflow.
    fn checked_num_params(&self) -> Option<usize> {
        // Checked `a * b` and `a + b` on usize.
        fn m(a: usize, b: usize) -> Option<usize> {
            a.checked_mul(b)
        }
        fn s(terms: &[Option<usize>]) -> Option<usize> {
            terms
                .iter()
                .try_fold(0usize, |acc, t| acc.checked_add((*t)?))
        }
        let c = self.embed_dim;
        let p2 = m(self.patch_size, self.patch_size)?;
        let norm = if self.patch_norm { m(2, c) } else { Some(0) };
        let mut n = s(&[m(m(c, self.in_chans)?, p2), Some(c), norm])?;
        let cpb = |heads: usize| s(&[Some(2 * 512 + 512), m(512, heads)]);
        for (i, (&depth, &heads)) in self.depths.iter().zip(&self.num_heads).enumerate() {
            let d = 1usize.checked_shl(i as u32).and_then(|f| m(c, f))?;
            let hid = self.mlp_hidden(d);
            let dd = m(d, d)?;
            let attn = s(&[
                m(3, dd),
                if self.qkv_bias { m(2, d) } else { Some(0) },
                Some(dd),
                Some(d),
                Some(heads),
                if self.shared_cpb { Some(0) } else { cpb(heads) },
            ])?;
            let mlp = s(&[m(d, hid), Some(hid), m(hid, d), Some(d)])?;
            let e = self.moe.num_experts;
            for j in 0..depth {
                // an MoE block: gate [E, C] + E experts of the dense MLP's size
                let ffn = if self.moe.is_moe_block(&self.depths, i, j) {
                    s(&[m(e, d), m(e, mlp)])?
                } else {
                    mlp
                };
                n = s(&[Some(n), Some(attn), m(4, d), Some(ffn)])?;
            }
            if i + 1 < self.num_stages() {
                n = s(&[Some(n), m(8, dd), m(4, d)])?;
            }
        }
        if self.shared_cpb {
            n = s(&[
                Some(n),
                cpb(self.num_heads.iter().max().copied().unwrap_or(0)),
            ])?;
        }
        let f = self.num_features();
        n = s(&[Some(n), m(2, f)])?;
        if self.num_classes > 0 {
            n = s(&[Some(n), m(f, self.num_classes), Some(self.num_classes)])?;
        }
        Some(n)
    }

    /// Forward FLOPs per image at `img_size`, counted like the official `flops()` methods
    /// (Swin-Transformer models/swin_transformer_v2.py): multiply-adds of the patch embedding,
    /// qkv, q·k, attn·v, proj, MLP, patch-merging reduction and head, plus one per element for
    /// each LayerNorm (the final norm as the official `num_features * H*W / 2^stages`); the CPB
    /// MLP, softmax and GELU are not counted. SwinV2-T/8 at 256 gives 5.9 GFLOPs (README).
    pub fn flops(&self) -> u64 {
        let (ph, pw) = (
            self.img_size / self.patch_size,
            self.img_size / self.patch_size,
        );
        let c = self.embed_dim as f64;
        // Integer products saturate: `validate` refuses the sizes where they would overflow.
        let p2 = self.patch_size.saturating_mul(self.patch_size);
        let mut f = ph.saturating_mul(pw) as f64 * c * self.in_chans.saturating_mul(p2) as f64;
        if self.patch_norm {
            f += ph.saturating_mul(pw) as f64 * c;
        }
        let (mut h, mut w) = (ph, pw);
        for i in 0..self.num_stages() {
            let dim = self.stage_dim(i) as f64;
            let (ws, _) = self.window_at(h, w);
            let nwin = h.saturating_mul(w) as f64 / ws.saturating_mul(ws) as f64;
            let n = ws.saturating_mul(ws) as f64;
            let hw = h.saturating_mul(w) as f64;
            // W-MSA per window: qkv + q·k + attn·v + proj (head dims sum to dim)
            let attn = n * dim * 3.0 * dim + 2.0 * n * n * dim + n * dim * dim;
            let mlp = 2.0 * hw * dim * dim * self.mlp_ratio;
            for j in 0..self.depths[i] {
                // MoE: the gate plus top_k experts per token (all assignments kept)
                let ffn = if self.moe.is_moe_block(&self.depths, i, j) {
                    hw * dim * self.moe.num_experts as f64 + self.moe.top_k as f64 * mlp
                } else {
                    mlp
                };
                f += 2.0 * dim * hw + nwin * attn + ffn;
            }
            if i + 1 < self.num_stages() {
                f += (h / 2).saturating_mul(w / 2) as f64 * 4.0 * dim * 2.0 * dim + hw * dim / 2.0;
                h /= 2;
                w /= 2;
            }
        }
        let nf = self.num_features() as f64;
        let shift = 1usize
            .checked_shl(self.num_stages() as u32)
            .unwrap_or(usize::MAX);
        f += ((nf as usize).saturating_mul(ph).saturating_mul(pw) / shift) as f64;
        f += nf * self.num_classes as f64;
        f as u64
    }

    /// Forward multiply-adds per image at `img_size`, timm's / fvcore's convention (one
    /// multiply-add = one FLOP; timm's model cards list them as GMACs): the patch embedding, per
    /// block qkv, q·k and attn·v in every window, proj, the CPB MLP over the `(2ws-1)^2` table and
    /// the MLP (MoE: gate + `top_k` experts per token), each patch merging's reduction and the
    /// head. Norms, softmax, GELU and the cosine normalization are not counted (they are
    /// per-element, under 1% here). [`Self::flops`] is the official repo's count.
    pub fn macs(&self) -> u64 {
        let r = self.img_size / self.patch_size;
        let hw0 = (r * r) as f64;
        let p2 = (self.patch_size * self.patch_size) as f64;
        let mut f = hw0 * self.embed_dim as f64 * self.in_chans as f64 * p2;
        for i in 0..self.num_stages() {
            let d = self.stage_dim(i) as f64;
            let ri = r >> i;
            let hw = (ri * ri) as f64;
            let (ws, _) = self.window_at(ri, ri);
            let n = (ws * ws) as f64;
            let table = ((2 * ws - 1) * (2 * ws - 1)) as f64;
            let heads = self.num_heads[i] as f64;
            // qkv + proj, then q·k and attn·v over each window's N tokens
            let attn = hw * 4.0 * d * d + 2.0 * hw * n * d;
            // CPB MLP: Linear(2, 512) -> ReLU -> Linear(512, heads) on every table entry
            let cpb = table * (2.0 * 512.0 + 512.0 * heads);
            let mlp = 2.0 * hw * d * self.mlp_hidden(self.stage_dim(i)) as f64;
            for j in 0..self.depths[i] {
                let ffn = if self.moe.is_moe_block(&self.depths, i, j) {
                    hw * d * self.moe.num_experts as f64 + self.moe.top_k as f64 * mlp
                } else {
                    mlp
                };
                f += attn + cpb + ffn;
            }
            if i + 1 < self.num_stages() {
                // 2x2 neighbours concatenated (4d) -> 2d on the merged map
                f += hw / 4.0 * 4.0 * d * 2.0 * d;
            }
        }
        f += self.num_features() as f64 * self.num_classes as f64;
        f as u64
    }

    /// Stochastic-depth rate of every block: linspace(0, drop_path_rate, sum(depths)).
    pub(crate) fn drop_path_rates(&self) -> Vec<f64> {
        let total: usize = self.depths.iter().sum();
        (0..total)
            .map(|k| {
                if total > 1 {
                    self.drop_path_rate * k as f64 / (total - 1) as f64
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// Bytes of memory the model's sizes are checked against: `MemTotal` of /proc/meminfo, or 1 TiB
/// where that cannot be read (a generous cap: it only refuses sizes no machine holds).
pub fn machine_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(1 << 40)
}

/// The default model section: the `swinv2_nano` preset.
impl Default for SwinV2Config {
    fn default() -> Self {
        // Invariant: `swinv2_nano` is a preset name of `preset` above.
        Self::preset("swinv2_nano").expect("swinv2_nano is a preset")
    }
}

impl SwinV2Config {
    /// Validated, with the derived MoE placement spelled out (what a run writes into its
    /// `config.yaml`, so that the file repeats the run).
    pub fn resolved(mut self) -> Result<Self> {
        self.validate()?;
        if self.moe.enabled() {
            self.moe.blocks = self.moe.effective_blocks(&self.depths);
        }
        Ok(self)
    }
}

/// The config layer of `model.preset` (default `swinv2_nano`) for a `model:`-like section in
/// which the user set the keys `user` ([`mimlab_engine::config::PresetSection`]). A depth that
/// the user changes without giving `pretrained_window_sizes` gets one 0 (none) per stage.
pub fn preset_layer(
    name: Option<&str>,
    user: &serde_yaml_ng::Mapping,
) -> Result<serde_yaml_ng::Value> {
    let mut c = SwinV2Config::preset(name.unwrap_or("swinv2_nano"))?;
    if let (Some(serde_yaml_ng::Value::Sequence(depths)), None) =
        (user.get("depths"), user.get("pretrained_window_sizes"))
    {
        c.pretrained_window_sizes = vec![0; depths.len()];
    }
    Ok(serde_yaml_ng::to_value(c)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `swinv2_nano` with one `model.*` value changed.
    fn nano_with(set: impl FnOnce(&mut SwinV2Config)) -> SwinV2Config {
        let mut c = SwinV2Config::default();
        set(&mut c);
        c
    }

    #[test]
    fn huge_sizes_are_errors_naming_their_key() {
        let cases: [(&str, SwinV2Config); 5] = [
            ("model.img_size", nano_with(|c| c.img_size = 1 << 32)),
            ("model.embed_dim", nano_with(|c| c.embed_dim = 1 << 32)),
            ("model.mlp_ratio", nano_with(|c| c.mlp_ratio = 1e12)),
            (
                "model.moe.num_experts",
                nano_with(|c| c.moe.num_experts = 1_000_000),
            ),
            (
                "model.moe.num_experts",
                nano_with(|c| c.moe.num_experts = usize::MAX),
            ),
        ];
        for (key, cfg) in cases {
            let err = format!("{:#}", cfg.resolved().unwrap_err());
            assert!(err.starts_with(&format!("{key}: ")), "{key}: {err}");
        }
    }

    #[test]
    fn size_errors_give_the_estimate_and_the_memory() {
        let mem = 128 << 30;
        let c = nano_with(|c| c.mlp_ratio = 1e12);
        assert_eq!(
            c.check_sizes(mem).unwrap_err().to_string(),
            "model.mlp_ratio: 1000000000000 makes the last stage's MLP 256x256000000000000 with \
             488281250.0 GiB of weights, more than this machine's memory (128.0 GiB)"
        );
        let c = nano_with(|c| c.moe.num_experts = 1_000_000);
        assert_eq!(
            c.check_sizes(mem).unwrap_err().to_string(),
            "model.moe.num_experts: 1000000 experts of 256x1024 MLPs need 1958.8 GiB of weights \
             in one MoE layer, more than this machine's memory (128.0 GiB)"
        );
        // The presets fit in 4 GiB (swinv2_large: 197 M parameters) and their counts stay exact.
        for name in PRESETS {
            let c = SwinV2Config::preset(name).unwrap();
            c.check_sizes(4 << 30).unwrap();
            assert_eq!(c.checked_num_params(), Some(c.num_params()));
        }
        assert_eq!(
            nano_with(|c| c.embed_dim = 1 << 40).num_params(),
            usize::MAX,
            "saturates"
        );
    }
}
