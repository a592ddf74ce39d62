#!/usr/bin/env python3
"""PyTorch-pickle twins of the safetensors fixtures, and a check of `mimlab model convert` in timm.

Usage (PyTorch + timm + safetensors, CPU float32; run from the repository root):
    python3 scripts/make_pth_fixtures.py --out tests/fixtures [--mimlab target/debug/mimlab]

Writes (read by models/tests/pth.rs and tests/cli.rs):
  swinv2_a.official.pth       torch.save zip format, like the official Swin-V2 / SimMIM releases:
                              {'model': state dict of swinv2_a.official.safetensors (official
                              layout, with its buffers), 'epoch', 'max_accuracy', 'config'}
  swinv2_dyn_a.timm.legacy.bin  torch.save legacy (non-zip) format of a plain state dict (timm /
                              HF `pytorch_model.bin` style, top level), the tensors of
                              swinv2_dyn_a.timm.safetensors
Both hold exactly the tensors (names, dtypes, values) of their safetensors twin.

With --mimlab PATH it also runs `PATH model convert swinv2_a.official.pth OUT --layout timm`
(the architecture given with --set, since a .pth carries none), loads OUT into
`timm.create_model('swinv2_tiny_window8_256', pretrained=False, <swinv2_a's sizes>)` with
`load_state_dict(strict=True)` and compares its outputs on swinv2_a.io's input with the model
built from swinv2_a.timm.safetensors and with the stored reference, printing the max abs
differences (asserted 0 / <= 1e-5 relative).
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
import timm
from safetensors import safe_open
from safetensors.torch import load_file


def read(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return load_file(path), meta


def same(a, b):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def write_fixtures(out):
    sd, meta = read(os.path.join(out, "swinv2_a.official.safetensors"))
    sd = {k: v.clone().contiguous() for k, v in sd.items()}  # one storage per tensor
    cfg = json.loads(meta["config"])
    ckpt = {"model": sd, "epoch": 299, "max_accuracy": 0.0, "config": {"MODEL": cfg}}
    p = os.path.join(out, "swinv2_a.official.pth")
    torch.save(ckpt, p)
    same(torch.load(p, weights_only=True)["model"], sd)
    print(p, os.path.getsize(p), "bytes,", len(sd), "tensors")

    sd, _ = read(os.path.join(out, "swinv2_dyn_a.timm.safetensors"))
    sd = {k: v.clone().contiguous() for k, v in sd.items()}
    p = os.path.join(out, "swinv2_dyn_a.timm.legacy.bin")
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    same(torch.load(p, weights_only=True), sd)
    print(p, os.path.getsize(p), "bytes,", len(sd), "tensors (legacy format)")
    return cfg


def timm_model(cfg):
    return timm.create_model(
        "swinv2_tiny_window8_256", pretrained=False, img_size=cfg["img_size"],
        patch_size=cfg["patch_size"], in_chans=cfg["in_chans"], num_classes=cfg["num_classes"],
        embed_dim=cfg["embed_dim"], depths=tuple(cfg["depths"]),
        num_heads=tuple(cfg["num_heads"]), window_size=cfg["window_size"],
        pretrained_window_sizes=tuple(cfg["pretrained_window_sizes"]),
        mlp_ratio=cfg["mlp_ratio"], drop_path_rate=0.0).eval()


def check_convert(out, mimlab, cfg):
    sets = []
    for k in ["img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
              "num_heads", "window_size", "pretrained_window_sizes", "mlp_ratio"]:
        v = cfg[k]
        v = "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else v
        sets += ["--set", f"model.{k}={v}"]
    with tempfile.TemporaryDirectory() as d:
        conv = os.path.join(d, "swinv2_a.timm.safetensors")
        cmd = [mimlab, "model", "convert", os.path.join(out, "swinv2_a.official.pth"), conv,
               "--layout", "timm"] + sets
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        converted, meta = read(conv)
    print("converted metadata config:", meta.get("config"))
    reference, _ = read(os.path.join(out, "swinv2_a.timm.safetensors"))
    same(converted, reference)
    print("converted == swinv2_a.timm.safetensors: same", len(converted),
          "keys, bitwise equal tensors")

    io, _ = read(os.path.join(out, "swinv2_a.io.safetensors"))
    x = io["input"]
    a, b = timm_model(cfg), timm_model(cfg)
    a.load_state_dict(converted, strict=True)
    b.load_state_dict(reference, strict=True)
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
        outs = {
            "features": (fa.permute(0, 3, 1, 2), fb.permute(0, 3, 1, 2)),
            "pre_logits": (a.forward_head(fa, pre_logits=True),
                           b.forward_head(fb, pre_logits=True)),
        }
    for k, (ga, gb) in outs.items():
        d_twin = (ga - gb).abs().max().item()
        d_ref = (ga - io[f"timm.{k}"]).abs().max().item()
        scale = io[f"timm.{k}"].abs().max().item()
        print(f"timm strict load of the converted file: {k} {tuple(ga.shape)} max abs diff "
              f"{d_twin:.3e} vs the timm fixture's weights, {d_ref:.3e} vs the stored "
              f"reference (max |ref| {scale:.3e})")
        assert d_twin == 0.0, k
        assert d_ref <= 1e-5 * max(scale, 1.0), k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--mimlab", default=None, help="the mimlab binary, to check model convert")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("torch", torch.__version__, "timm", timm.__version__)
    cfg = write_fixtures(args.out)
    if args.mimlab:
        check_convert(args.out, args.mimlab, cfg)


if __name__ == "__main__":
    main()
