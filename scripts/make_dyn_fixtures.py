#!/usr/bin/env python3
"""Reference fixtures for Swin-V2 on input sizes other than the configured one
(models/tests/dynamic_size.rs, tests/cli.rs).

timm's `SwinTransformerV2(..., dynamic_img_size=True)` keeps the windows and shifts of the
configured `img_size`, pads each block's shifted map with zeros to a window multiple (bottom,
right), builds the shift mask on the padded map, crops after the reverse partition, and pads odd
maps in patch merging; inputs must be a multiple of the patch size. mimlab does the same.

Usage (a throwaway, git-ignored venv; CPU float32; torch 2.15.0 and timm 1.0.31 made the committed
files):
    python3 -m venv .venv-fix && .venv-fix/bin/pip install torch timm safetensors
    .venv-fix/bin/python scripts/make_dyn_fixtures.py --out tests/fixtures

Writes
  swinv2_dyn.inputs.safetensors      inputs `64x64` [1,3,64,64], `100x148` [1,3,100,148] and
                                     `68x92` [2,3,68,92], float16 (exact in float32; half the bytes)
  swinv2_dyn_{a,b}.timm.safetensors  weights in timm layout (re-randomized as make_fixtures.py does)
  swinv2_dyn_{a,b}.io.safetensors    for each input size S: `S.logits`, `S.pre_logits`,
                                     `S.features` (final map after the norm, NCHW) and `S.stage{i}`
                                     (the map of every stage before its merge, NCHW); metadata
                                     `config` = the mimlab SwinV2Config as JSON.
Both models are configured at 64 px with patch 4:
  A: 2 stages (16x16 window 4 shifted, 8x8 window 4 shifted), 5 classes. At 100x148 the maps are
     25x37 (padded to 28x40, odd merge) and 13x19 (padded to 16x20).
  B: 3 stages, window 8 (16x16: window 8 shifted; 8x8: window 8, no shift; 4x4: window clamped
     to 4), pretrained windows [6,0,3], 3 classes. At 68x92 the maps are 17x23 (padded to 24x24,
     shifted), 9x12 (16x16) and 5x6 (8x8).
Weights are re-randomized as in make_fixtures.py, with logit scales below ln 10 (the clamp at
ln 100 is covered there): with scales up to 100 the softmax turns float32 rounding into errors of
up to 3e-4 between timm in float32 and in float64, too close to the 2e-5 the Rust tests check. The
script asserts that timm's float32 outputs stored here are within 1e-5 of timm in float64.
At 64x64 the dynamic model must equal timm's static one (checked here).
"""
import argparse
import json
import os

import torch
import timm
from timm.models.swin_transformer_v2 import SwinTransformerV2
from safetensors.torch import save_file

from make_fixtures import randomize

MODELS = {
    "swinv2_dyn_a": dict(img_size=64, patch_size=4, in_chans=3, num_classes=5, embed_dim=8,
                         depths=[2, 2], num_heads=[1, 2], window_size=4,
                         pretrained_window_sizes=[0, 0]),
    "swinv2_dyn_b": dict(img_size=64, patch_size=4, in_chans=3, num_classes=3, embed_dim=8,
                         depths=[2, 2, 1], num_heads=[1, 2, 4], window_size=8,
                         pretrained_window_sizes=[6, 0, 3]),
}

# size name -> (batch, height, width)
SIZES = {"64x64": (1, 64, 64), "100x148": (1, 100, 148), "68x92": (2, 68, 92)}


def run(model, x):
    """logits, pre_logits, features (NCHW, after the final norm), stage{i} (NCHW, before merge)."""
    stages = []
    hooks = [l.register_forward_hook(lambda m, i, o: stages.append(o)) for l in model.layers]
    with torch.no_grad():
        f = model.forward_features(x)  # NHWC after the norm
        out = {"logits": model.forward_head(f),
               "pre_logits": model.forward_head(f, pre_logits=True),
               "features": f.permute(0, 3, 1, 2)}
    for h in hooks:
        h.remove()
    # timm stage i = merge then blocks: its output is mimlab's stage i map (before the next merge)
    for i, s in enumerate(stages[:-1]):
        out[f"stage{i}"] = s.permute(0, 3, 1, 2)
    return {k: v.contiguous() for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    print("torch", torch.__version__, "timm", timm.__version__)

    gen = torch.Generator().manual_seed(4321)
    inputs = {k: torch.randn(b, 3, h, w, generator=gen).half() for k, (b, h, w) in SIZES.items()}
    save_file(inputs, os.path.join(args.out, "swinv2_dyn.inputs.safetensors"),
              metadata={"torch": torch.__version__, "timm": timm.__version__})

    for idx, (name, cfg) in enumerate(MODELS.items()):
        gen = torch.Generator().manual_seed(5678 + idx)
        kw = dict(cfg, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0)
        model = SwinTransformerV2(**kw, dynamic_img_size=True).eval()
        randomize(model, gen, logit_scale_max=10.0)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        static = SwinTransformerV2(**kw).eval()
        static.load_state_dict(sd)
        double = SwinTransformerV2(**kw, dynamic_img_size=True).double().eval()
        double.load_state_dict(sd)

        io = {}
        for size, x in inputs.items():
            out = run(model, x.float())
            out64 = run(double, x.double())
            for k in out:
                e = ((out[k].double() - out64[k]).abs().max() / out64[k].abs().max()).item()
                print(f"{name} {size} {k}: float32 vs float64 {e:.2e}")
                assert e <= 1e-5, (name, size, k, e)
            if size == "64x64":
                ref = run(static, x.float())
                for k in out:
                    assert torch.equal(out[k], ref[k]), (name, k, "dynamic != static at 64x64")
            for k, v in out.items():
                io[f"{size}.{k}"] = v
                print(f"{name} {size} {k} {tuple(v.shape)} max|v| {v.abs().max().item():.3e}")

        meta = {"config": json.dumps(dict(kw, patch_norm=True)), "torch": torch.__version__,
                "timm": timm.__version__, "dynamic_img_size": "true"}
        save_file(sd, os.path.join(args.out, f"{name}.timm.safetensors"), metadata=meta)
        save_file(io, os.path.join(args.out, f"{name}.io.safetensors"), metadata=meta)
        print(name, "keys", len(sd), "params", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
