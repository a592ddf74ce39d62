//! The convolution building blocks of mmseg's decode heads, with mmseg's inits: `ConvModule`
//! (conv without bias + GroupNorm + ReLU; Kaiming normal, fan_out, ReLU gain:
//! N(0, 2 / (out * k * k))) and `BaseDecodeHead.conv_seg` (1x1, N(0, 0.01), bias 0).
use candle_nn::{Init, VarBuilder};
use mimlab_models::layers::{Conv2d, ConvGnRelu};

/// mmcv `ConvModule(i, o, k, norm=GN, act=ReLU)` with its init; `gn_groups` at most.
pub fn conv_module(
    i: usize,
    o: usize,
    k: usize,
    gn_groups: usize,
    vb: VarBuilder,
) -> candle_core::Result<ConvGnRelu> {
    let kaiming = Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (o * k * k) as f64).sqrt(),
    };
    ConvGnRelu::new(i, o, k, gn_groups, kaiming, None, vb)
}

/// `BaseDecodeHead.conv_seg`: 1x1 `c` -> `n` classes, N(0, 0.01), bias 0.
pub fn conv_seg(c: usize, n: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let n01 = Init::Randn {
        mean: 0.0,
        stdev: 0.01,
    };
    Conv2d::new(c, n, 1, 1, 0, n01, Some(Init::Const(0.0)), vb)
}
