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
        self.embed_dim << i
    }

    /// Channels of the final feature map: embed_dim * 2^(stages-1).
    pub fn num_features(&self) -> usize {
        self.stage_dim(self.num_stages().saturating_sub(1))
    }

    /// Stride of the final feature map: patch_size * 2^(stages-1).
    pub fn out_stride(&self) -> usize {
        self.patch_size << self.num_stages().saturating_sub(1)
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

    /// Analytic parameter count (equals the built model's, without `mask_token`).
    pub fn num_params(&self) -> usize {
        let c = self.embed_dim;
        let p2 = self.patch_size * self.patch_size;
        let mut n = c * self.in_chans * p2 + c + if self.patch_norm { 2 * c } else { 0 };
        for (i, (&depth, &heads)) in self.depths.iter().zip(&self.num_heads).enumerate() {
            let d = self.stage_dim(i);
            let hid = self.mlp_hidden(d);
            let attn = 3 * d * d
                + if self.qkv_bias { 2 * d } else { 0 }
                + d * d
                + d
                + heads
                + if self.shared_cpb {
                    0
                } else {
                    2 * 512 + 512 + 512 * heads
                };
            let mlp = d * hid + hid + hid * d + d;
            let e = self.moe.num_experts;
            for j in 0..depth {
                // an MoE block: gate [E, C] + E experts of the dense MLP's size
                let ffn = if self.moe.is_moe_block(&self.depths, i, j) {
                    e * d + e * mlp
                } else {
                    mlp
                };
                n += attn + 4 * d + ffn;
            }
            if i + 1 < self.num_stages() {
                n += 4 * d * 2 * d + 2 * 2 * d;
            }
        }
        if self.shared_cpb {
            n += 2 * 512 + 512 + 512 * self.num_heads.iter().max().copied().unwrap_or(0);
        }
        let f = self.num_features();
        n += 2 * f;
        if self.num_classes > 0 {
            n += f * self.num_classes + self.num_classes;
        }
        n
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
        let mut f =
            (ph * pw) as f64 * c * (self.in_chans * self.patch_size * self.patch_size) as f64;
        if self.patch_norm {
            f += (ph * pw) as f64 * c;
        }
        let (mut h, mut w) = (ph, pw);
        for i in 0..self.num_stages() {
            let dim = self.stage_dim(i) as f64;
            let (ws, _) = self.window_at(h, w);
            let nwin = (h * w) as f64 / (ws * ws) as f64;
            let n = (ws * ws) as f64;
            let hw = (h * w) as f64;
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
                f += ((h / 2) * (w / 2)) as f64 * 4.0 * dim * 2.0 * dim + hw * dim / 2.0;
                h /= 2;
                w /= 2;
            }
        }
        let nf = self.num_features() as f64;
        f += (nf as usize * ph * pw / (1usize << self.num_stages())) as f64;
        f += nf * self.num_classes as f64;
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
