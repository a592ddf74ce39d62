//! Shared layers (pipeline stage: model): the building blocks used by more than one model
//! (Swin-V2, its MoE feed-forward, the dense necks and heads), each built by
//! `new(..., vb)` under checkpoint-shaped key names and run by `forward`: [`Linear`] (official
//! init), [`LayerNorm`] (eps 1e-5), [`dropout`], stochastic depth fused with the residual add
//! ([`residual_drop_path`]) and the transformer [`Mlp`] (fc1 -> GELU(erf) -> dropout -> fc2 ->
//! dropout). Random masks draw from the shared [`SharedRng`], so runs repeat exactly.
//! For dense heads: [`Conv2d`], [`ConvTranspose2d`], [`GroupNorm`], the channels-first
//! [`LayerNorm2d`] and a differentiable [`upsample_nearest2x`].
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use mimlab_engine::rng::SharedRng;
use rand::Rng;

/// `nn.Linear` with the official init (weight N(0, .02), bias 0).
#[derive(Debug, Clone)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// `i` -> `o` features: `weight [o, i]` and, with `bias`, `bias [o]` under `vb`.
    pub fn new(i: usize, o: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let w = vb.get_with_hints(
            (o, i),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(o, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// `x [..., i]` -> `[..., o]` ([`crate::ops::linear`]).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::linear(x, &self.w, self.b.as_ref())
    }
}

/// LayerNorm (eps 1e-5): [`crate::ops::layer_norm`]. Off the CPU outside training, candle's fused
/// kernel (it has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    /// `weight [dim]` (1, or 0 with `init_zero`: Swin-V2 res-post-norm) and `bias [dim]` (0).
    pub fn new(dim: usize, init_zero: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let w0 = if init_zero { 0.0 } else { 1.0 };
        let w = vb.get_with_hints(dim, "weight", Init::Const(w0))?;
        let b = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { w, b })
    }

    /// Normalizes the last dimension; `train = false` keeps no graph through the norm.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train && !crate::ops::is_fused(x) {
            return candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, 1e-5);
        }
        let y = crate::ops::layer_norm(x, &self.w, &self.b, 1e-5)?;
        // eval: no graph through the norm (as candle's no-backward eval kernel), so a forward
        // with Var weights does not keep every activation of the network alive until its end
        Ok(if train { y } else { y.detach() })
    }
}

/// Inverted dropout with a mask drawn from the shared RNG.
pub fn dropout(x: &Tensor, p: f64, rng: &SharedRng, train: bool) -> candle_core::Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let n = x.elem_count();
    let m = keep_scales(n, keep, rng);
    let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * m
}

/// `nn.Dropout2d` on `[B, C, H, W]`: whole channels zeroed with probability `p`, the others
/// scaled by `1 / (1 - p)`; the `[B, C]` mask is drawn from the shared RNG.
pub fn dropout2d(x: &Tensor, p: f64, rng: &SharedRng, train: bool) -> candle_core::Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let (b, c, _, _) = x.dims4()?;
    let m = keep_scales(b * c, 1.0 - p, rng);
    let m = Tensor::from_vec(m, (b, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&m)
}

/// `n` draws from the shared RNG of Bernoulli(keep) scaled by 1/keep: `1/keep` or 0.
fn keep_scales(n: usize, keep: f64, rng: &SharedRng) -> Vec<f32> {
    rng.with(|g| {
        (0..n)
            .map(|_| {
                if g.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect()
    })
}

/// `x + drop_path(y)`: stochastic depth on `[B, ...]`, per-sample Bernoulli(keep) scaled by 1/keep
/// (timm DropPath), then the residual add.
pub fn residual_drop_path(
    x: &Tensor,
    y: &Tensor,
    p: f64,
    rng: &SharedRng,
    train: bool,
) -> candle_core::Result<Tensor> {
    if !train || p <= 0.0 {
        return x + y;
    }
    let keep = 1.0 - p;
    let b = x.dim(0)?;
    let scales = keep_scales(b, keep, rng);
    // one node (ops::residual): candle's broadcast_mul backward would also build a full-size
    // gradient for the broadcast scales
    crate::ops::residual(x, y, &scales)
}

// ------------------------------------------------------------------------------------------------
// Mlp
// ------------------------------------------------------------------------------------------------

/// The transformer MLP (timm `Mlp`, official key names `fc1`, `fc2`).
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    drop: f64,
}

impl Mlp {
    /// `fc1` (`dim` -> `hidden`) and `fc2` (`hidden` -> `dim`) with biases under `vb`.
    pub fn new(dim: usize, hidden: usize, drop: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, true, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, true, vb.pp("fc2"))?,
            drop,
        })
    }

    /// `x [..., dim]` -> `[..., dim]`; dropout draws from `rng` when `train`.
    pub fn forward(&self, x: &Tensor, rng: &SharedRng, train: bool) -> candle_core::Result<Tensor> {
        // fc1 + GELU as one node (ops::linear_gelu): no zero-filled gradient of the 4C-wide
        // pre-activation in the backward
        let h = match &self.fc1.b {
            Some(b) => crate::ops::linear_gelu(x, &self.fc1.w, b)?,
            None => crate::ops::gelu_erf(&self.fc1.forward(x)?)?,
        };
        let h = dropout(&h, self.drop, rng, train)?;
        dropout(&self.fc2.forward(&h)?, self.drop, rng, train)
    }
}

// ------------------------------------------------------------------------------------------------
// Convolutional layers (dense necks and heads)
// ------------------------------------------------------------------------------------------------

/// `nn.Conv2d` (square kernel, no groups) under `weight [o, i, k, k]` and optional `bias [o]`.
///
/// On the CPU (f32/f64) it runs as im2col + the fused linear op (`forward_im2col`). Elsewhere it
/// is candle's conv2d, whose 0.11.1 backward builds the input gradient with one `output_padding`
/// taken from the height and used for the width too, so a strided conv on a map whose height and
/// width leave different remainders gets a gradient of the wrong width. For `stride > 1` that
/// path therefore zero-pads the input and cuts off the tail that no window reads, then runs the
/// conv with padding 0: the same output, and a backward that fits both sides.
#[derive(Debug, Clone)]
pub struct Conv2d {
    w: Tensor,
    b: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `i` -> `o` channels, `k` x `k` kernel; weights drawn from `init`, bias from `bias_init`
    /// (`None` = no bias).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        i: usize,
        o: usize,
        k: usize,
        stride: usize,
        padding: usize,
        init: Init,
        bias_init: Option<Init>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let w = vb.get_with_hints((o, i, k, k), "weight", init)?;
        let b = match bias_init {
            Some(bi) => Some(vb.get_with_hints(o, "bias", bi)?),
            None => None,
        };
        Ok(Self {
            w,
            b,
            stride: stride.max(1),
            padding,
        })
    }

    /// `[B, i, H, W]` -> `[B, o, H', W']`, `H' = (H + 2p - k) / s + 1` (floor).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        let k = self.w.dim(2)?;
        let (_, _, h, w) = x.dims4()?;
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: {h}x{w} map smaller than the {k}x{k} kernel");
        }
        if crate::ops::is_fused(x) && self.w.dtype() == x.dtype() {
            return self.forward_im2col(x);
        }
        let y = if s == 1 {
            x.conv2d(&self.w, p, 1, 1, 1)?
        } else {
            // padded length read by the windows: (out - 1) * s + k
            let used = |n: usize| (n + 2 * p - k) / s * s + k;
            let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
            let xp = xp.narrow(2, 0, used(h))?.narrow(3, 0, used(w))?;
            xp.conv2d(&self.w, 0, s, 1, 1)?
        };
        match &self.b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    /// The CPU path: [`crate::ops::im2col`] (channels-last patch rows, tap-major as the weight
    /// permuted to `[o, kh, kw, i]`), one [`crate::ops::linear`] gemm with its own backward, and
    /// the result back to channels-first. candle 0.11.1's CPU conv2d (element-wise im2col tiles,
    /// a direct transposed conv for the backward) took 53% of a digits-det FCOS step (perf, 2-core
    /// AMD EPYC).
    fn forward_im2col(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        let (o, c, k, _) = self.w.dims4()?;
        let cols = if k == 1 && s == 1 && p == 0 {
            crate::ops::channels_last(x)?
        } else {
            crate::ops::im2col(x, k, s, p)?
        };
        let wmat = self.w.permute((0, 2, 3, 1))?.reshape((o, k * k * c))?;
        crate::ops::channels_first(&crate::ops::linear(&cols, &wmat, self.b.as_ref())?)
    }
}

/// `nn.ConvTranspose2d` with kernel = stride (`k` x `k`, no padding: each input pixel becomes a
/// `k` x `k` block), `weight [i, o, k, k]`, `bias [o]`, PyTorch's default init
/// (U(+-1/sqrt(o k k)), PyTorch's fan-in of a transposed conv weight).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    w: Tensor,
    b: Tensor,
    k: usize,
}

impl ConvTranspose2d {
    /// `i` -> `o` channels, upsampling by `k`.
    pub fn new(i: usize, o: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let bound = 1.0 / ((o * k * k) as f64).sqrt();
        let uni = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            w: vb.get_with_hints((i, o, k, k), "weight", uni)?,
            b: vb.get_with_hints(o, "bias", uni)?,
            k,
        })
    }

    /// `[B, i, H, W]` -> `[B, o, kH, kW]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv_transpose2d(&self.w, 0, 0, self.k, 1)?;
        y.broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }
}

/// GroupNorm (eps 1e-5, `weight` 1, `bias` 0) over `[B, C, ...]`, as `torch.nn.GroupNorm`:
/// [`crate::ops::group_norm`] (fused with its backward on the CPU, candle_nn's composed one
/// elsewhere). Names: `weight`, `bias`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
}

impl GroupNorm {
    /// `groups` groups over `channels` channels (`groups` must divide `channels`).
    pub fn new(groups: usize, channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels")
        }
        Ok(Self {
            w: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            b: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
        })
    }

    /// The normalized map, followed by ReLU when `relu` (one op, forward and backward).
    pub fn forward(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        crate::ops::group_norm(x, &self.w, &self.b, self.groups, 1e-5, relu)
    }
}

/// mmcv's `ConvModule` with GroupNorm and ReLU (conv -> GN -> ReLU), as the FCOS towers and the
/// UPerNet head use it. Names: `conv.weight` (`conv.bias` when built with one), `gn.weight`,
/// `gn.bias`.
#[derive(Debug, Clone)]
pub struct ConvGnRelu {
    conv: Conv2d,
    gn: GroupNorm,
}

impl ConvGnRelu {
    /// `i` -> `o` channels, `k` x `k` kernel with padding `k / 2`, stride 1, GroupNorm with
    /// [`gn_groups`]`(o, max_groups)` groups; conv weights from `init`, bias from `bias` (`None` =
    /// none, mmcv's `bias='auto'` under a norm).
    pub fn new(
        i: usize,
        o: usize,
        k: usize,
        max_groups: usize,
        init: Init,
        bias: Option<Init>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv2d::new(i, o, k, 1, k / 2, init, bias, vb.pp("conv"))?,
            gn: GroupNorm::new(gn_groups(o, max_groups), o, vb.pp("gn"))?,
        })
    }

    /// `[B, i, H, W]` -> `[B, o, H, W]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.gn.forward(&self.conv.forward(x)?, true)
    }
}

/// The number of GroupNorm groups for `channels`: the largest divisor of `channels` that is at
/// most `max_groups` (32 in the references; fewer where a CPU preset has few channels).
pub fn gn_groups(channels: usize, max_groups: usize) -> usize {
    (1..=max_groups.min(channels).max(1))
        .rev()
        .find(|g| channels.is_multiple_of(*g))
        .unwrap_or(1)
}

/// LayerNorm over the channels of an NCHW map (detectron2's channels-first `LayerNorm`, used by
/// ViTDet's simple feature pyramid): `weight [C]` 1, `bias [C]` 0, `eps` given (1e-6 there).
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    /// Over `dim` channels.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            b: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// `[B, C, H, W]` -> the same, each pixel's C values normalized (biased variance).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mu = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.w.reshape((1, (), 1, 1))?)?
            .broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }
}

/// The `[out, inp]` matrix of 1-D linear interpolation as PyTorch's `F.interpolate(...,
/// mode="bilinear", align_corners=False, size=...)` computes it (ATen `UpSample.h`:
/// `area_pixel_compute_source_index` and `compute_source_index_and_lambda`, in f32 as its CPU
/// kernel for float input): output `i` reads `src = max((i + 0.5) * inp / out - 0.5, 0)`, rows
/// `i0 = floor(src)` and `i1 = min(i0 + 1, inp - 1)` with weights `1 - l` and `l = src - i0`.
pub fn linear_interp_matrix(out: usize, inp: usize) -> Vec<f32> {
    let scale = inp as f32 / out as f32;
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(inp - 1);
        let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        m[i * inp + i0] += 1.0 - l1;
        m[i * inp + i1] += l1;
    }
    m
}

/// Bilinear resize of `[B, C, h, w]` to `[B, C, oh, ow]`, exactly PyTorch's
/// `F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)`, written as
/// `A_h x A_w^T` with the fixed [`linear_interp_matrix`]es so that it has a backward (candle
/// 0.11.1's `upsample_bilinear2d` has none; dense-tasks.md 3). Works for up- and down-sizing
/// (PyTorch's `antialias=False`).
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        candle_core::bail!("resize_bilinear: {h}x{w} -> {oh}x{ow} has an empty side");
    }
    if (oh, ow) == (h, w) {
        return Ok(x.clone());
    }
    resample_separable(
        x,
        linear_interp_matrix(oh, h),
        &linear_interp_matrix(ow, w),
        oh,
        ow,
    )
}

/// The `[out, inp]` averaging matrix of PyTorch's 1-D adaptive average pooling
/// (ATen `AdaptiveAveragePooling.cpp`): output `i` averages inputs `floor(i * inp / out)` to
/// `ceil((i + 1) * inp / out)` (exclusive), so bins overlap when `inp` is not a multiple of `out`.
pub fn adaptive_pool_matrix(out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let (start, end) = (i * inp / out, ((i + 1) * inp).div_ceil(out));
        for j in start..end {
            m[i * inp + j] = 1.0 / (end - start) as f32;
        }
    }
    m
}

/// `A_h x A_w^T` for `x [B, C, h, w]` with `ah [oh, h]` and `aw [ow, w]` given row-major (e.g.
/// [`linear_interp_matrix`], [`adaptive_pool_matrix`]): a separable linear resampling as two
/// matmuls, so it has candle's matmul backward.
pub fn resample_separable(
    x: &Tensor,
    ah: Vec<f32>,
    aw: &[f32],
    oh: usize,
    ow: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let ah = Tensor::from_vec(ah, (oh, h), dev)?.to_dtype(x.dtype())?;
    let awt: Vec<f32> = (0..w * ow).map(|k| aw[(k % ow) * w + k / ow]).collect();
    let awt = Tensor::from_vec(awt, (w, ow), dev)?.to_dtype(x.dtype())?;
    // [B*C*h, w] x [w, ow], then [oh, h] x [B*C, h, ow] per map
    let y = x.reshape((b * c * h, w))?.matmul(&awt)?;
    let y = ah.broadcast_matmul(&y.reshape((b * c, h, ow))?)?;
    y.reshape((b, c, oh, ow))
}

/// `F.adaptive_avg_pool2d(x, (oh, ow))` of `[B, C, h, w]` (UPerNet's pyramid pooling), with a
/// backward (candle has no adaptive pooling; dense-tasks.md 3).
pub fn adaptive_avg_pool2d(x: &Tensor, oh: usize, ow: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        candle_core::bail!("adaptive_avg_pool2d: {h}x{w} -> {oh}x{ow} has an empty side");
    }
    resample_separable(
        x,
        adaptive_pool_matrix(oh, h),
        &adaptive_pool_matrix(ow, w),
        oh,
        ow,
    )
}

/// Nearest-neighbour upsampling of `[B, C, h, w]` by 2 cropped to `(oh, ow)` (`oh <= 2h`,
/// `ow <= 2w`): exactly `F.interpolate(x, size=(oh, ow), mode='nearest')` when `oh` is `2h` or
/// `2h - 1` (source row `floor(i * h / oh) = floor(i / 2)` for `i < oh`), as mmdet's FPN
/// top-down path on odd maps. Built from a broadcast, so its backward sums each 2x2 block (candle
/// 0.11.1's `upsample_nearest2d` backward overwrites the input's gradient instead of adding to
/// it, which loses the lateral branch's own gradient in an FPN).
pub fn upsample_nearest2x(x: &Tensor, oh: usize, ow: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if oh > 2 * h || ow > 2 * w || oh + 1 < 2 * h || ow + 1 < 2 * w {
        candle_core::bail!("upsample_nearest2x: {h}x{w} -> {oh}x{ow} is not a 2x nearest upsample");
    }
    let y = x
        .reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?;
    if (oh, ow) == (2 * h, 2 * w) {
        Ok(y)
    } else {
        y.narrow(2, 0, oh)?.narrow(3, 0, ow)
    }
}
