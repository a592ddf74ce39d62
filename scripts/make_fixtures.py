#!/usr/bin/env python3
"""Reference fixtures for the candle Swin-V2 port (models/tests/fixtures.rs).

Usage (PyTorch + timm + safetensors, CPU float32):
    python3 scripts/make_fixtures.py --out tests/fixtures [--official .ref/swin_transformer_v2.py]

For each of two small models (A, B) it writes
  swinv2_{a,b}.timm.safetensors      state dict in timm layout (no buffers)
  swinv2_{a,b}.official.safetensors  the same weights in the official Swin-Transformer layout,
                                     with the persistent buffers the official files carry
                                     (relative_coords_table, relative_position_index, attn_mask)
  swinv2_{a,b}.io.safetensors        input [B,3,H,W]; for each layout (prefix `timm.` / `official.`):
                                     logits, pre_logits, features (final map after the norm, NCHW),
                                     stage0 (first stage output, NCHW); metadata `config` = the
                                     mimlab SwinV2Config as JSON.
`--official` builds the official model from microsoft/Swin-Transformer models/swin_transformer_v2.py
(a git-ignored copy) and takes the official outputs from it; without it the official outputs are the
timm ones. Weights are re-randomized so that no part is zero/identity (norm1/norm2, logit_scale above
and below the ln(100) clamp, q_bias/v_bias).
"""
import argparse
import importlib.util
import json
import math
import os
import re

import torch
import timm
from timm.models.swin_transformer_v2 import SwinTransformerV2
from safetensors.torch import save_file

MODELS = {
    # stage 0 8x8 window 4 (shifted block), merge, stage 1 4x4: window 4 = resolution, shift off.
    "swinv2_a": dict(img_size=32, patch_size=4, in_chans=3, num_classes=0, embed_dim=16,
                     depths=[2, 2], num_heads=[1, 2], window_size=4,
                     pretrained_window_sizes=[0, 0]),
    # stage 0 16x16 window 8 (shifted), stage 1 8x8 (window 8, shift off), stage 2 4x4: window
    # clamped 8 -> 4; pretrained windows change the coords normalization; 7-class head.
    "swinv2_b": dict(img_size=32, patch_size=2, in_chans=3, num_classes=7, embed_dim=12,
                     depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=8,
                     pretrained_window_sizes=[6, 0, 3]),
}


def randomize(model, gen, logit_scale_max=150.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                # ln 2 .. ln 150: some heads above the clamp at ln 100
                p.copy_(torch.rand(p.shape, generator=gen)
                        * (math.log(logit_scale_max) - math.log(2)) + math.log(2))
            elif re.search(r"norm\d?\.weight$|norm\.weight$", name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def timm_to_official(sd, num_layers):
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        elif k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        out[k] = v
    return out


def outputs(model, x, timm_layout):
    stages = []
    hooks = [l.register_forward_hook(lambda m, i, o: stages.append(o)) for l in model.layers]
    with torch.no_grad():
        if timm_layout:
            f = model.forward_features(x)  # NHWC after norm
            pre = model.forward_head(f, pre_logits=True)
            logits = model.forward_head(f)
            feat = f.permute(0, 3, 1, 2)
            s0 = stages[0].permute(0, 3, 1, 2)  # timm stages are NHWC
        else:
            # official: blocks then downsample in each layer; take stage 0 before its merge
            blocks0 = []
            h = model.layers[0].blocks[-1].register_forward_hook(lambda m, i, o: blocks0.append(o))
            tokens = []
            hn = model.norm.register_forward_hook(lambda m, i, o: tokens.append(o))
            pre = model.forward_features(x)
            logits = model.head(pre)
            h.remove()
            hn.remove()
            B = x.shape[0]
            r = model.patches_resolution
            n = len(model.layers) - 1
            hw = (r[0] >> n, r[1] >> n)
            feat = tokens[0].transpose(1, 2).reshape(B, -1, *hw)
            s0 = blocks0[0].transpose(1, 2).reshape(B, -1, r[0], r[1])
    for hk in hooks:
        hk.remove()
    return {"logits": logits, "pre_logits": pre, "features": feat, "stage0": s0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--official", default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(4)
    print("torch", torch.__version__, "timm", timm.__version__)
    official_mod = None
    if args.official:
        spec = importlib.util.spec_from_file_location("swin_official", args.official)
        official_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(official_mod)

    for idx, (name, cfg) in enumerate(MODELS.items()):
        gen = torch.Generator().manual_seed(1234 + idx)
        kw = dict(cfg, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0)
        model = SwinTransformerV2(**kw).eval()
        randomize(model, gen)
        x = torch.randn(2, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=gen)
        out_t = outputs(model, x, True)
        sd_t = {k: v.contiguous() for k, v in model.state_dict().items()}
        sd_o = timm_to_official(sd_t, len(cfg["depths"]))

        if official_mod is not None:
            om = official_mod.SwinTransformerV2(**kw).eval()
            missing, unexpected = om.load_state_dict(sd_o, strict=False)
            assert not unexpected, unexpected
            bad = [k for k in missing
                   if not re.search("relative_position_index|relative_coords_table|attn_mask", k)]
            assert not bad, bad
            full_o = {k: v.contiguous() for k, v in om.state_dict().items()}
            out_o = outputs(om, x, False)
        else:
            full_o = sd_o
            out_o = out_t
        for k in out_t:
            d = (out_t[k] - out_o[k]).abs().max().item()
            s = out_t[k].abs().max().item()
            print(f"{name} {k} {tuple(out_t[k].shape)} timm-vs-official max abs diff {d:.3e}"
                  f" (max |ref| {s:.3e})")
            assert d <= 1e-5 * max(s, 1.0), (name, k, d)

        mcfg = dict(kw, patch_norm=True)
        meta = {"config": json.dumps(mcfg), "torch": torch.__version__, "timm": timm.__version__,
                "official_model": "yes" if official_mod else "no"}
        save_file(sd_t, os.path.join(args.out, f"{name}.timm.safetensors"), metadata=meta)
        save_file(full_o, os.path.join(args.out, f"{name}.official.safetensors"), metadata=meta)
        io = {"input": x.contiguous()}
        io.update({f"timm.{k}": v.clone().contiguous() for k, v in out_t.items()})
        io.update({f"official.{k}": v.clone().contiguous() for k, v in out_o.items()})
        save_file(io, os.path.join(args.out, f"{name}.io.safetensors"), metadata=meta)
        print(name, "timm keys", len(sd_t), "official keys", len(full_o),
              "params", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
