//! Shared layers (pipeline stage: model): the building blocks used by more than one model
//! (Swin-V2, its MoE feed-forward, and the necks and heads to come), each built by
//! `new(..., vb)` under checkpoint-shaped key names and run by `forward`: [`Linear`] (official
//! init), [`LayerNorm`] (eps 1e-5), [`dropout`], stochastic depth fused with the residual add
//! ([`residual_drop_path`]) and the transformer [`Mlp`] (fc1 -> GELU(erf) -> dropout -> fc2 ->
//! dropout). Random masks draw from the shared [`SharedRng`], so runs repeat exactly.
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
