#!/usr/bin/env python3
"""Per-op profile of PyTorch's SimMIM step (the `mimlab bench` simmim row), for comparison with
`perf record` of `mimlab bench` (BENCHMARKS.md, "Where the time goes now").

Builds the same model as scripts/bench_pytorch.py (timm's SwinTransformerV2 with the preset's
hyper-parameters, the official SimMIM head and masked L1, AdamW), runs 2 untimed steps, then
profiles `--steps` steps with torch.profiler and prints the ops by self CPU time, and the share of
the step in matrix products (mm, addmm, bmm).

Usage: .venv-bench/bin/python scripts/profile_pytorch.py --preset swinv2_tiny_window8_256 \
           --img 128 --batch 8 --threads 2
Not part of CI: needs torch and timm (scripts/bench_compare.sh installs them in .venv-bench).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="swinv2_tiny_window8_256")
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25, help="ops to print")
    a = p.parse_args()

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from bench_pytorch import HPARAMS

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    e, d, h, w, dpr = HPARAMS[a.preset]
    enc = SwinTransformerV2(img_size=a.img, patch_size=4, in_chans=3, num_classes=0, embed_dim=e,
                            depths=d, num_heads=h, window_size=w, mlp_ratio=4.0, qkv_bias=True,
                            drop_path_rate=dpr)
    stride = 4 * 2 ** (len(enc.layers) - 1)
    mask_token = nn.Parameter(torch.zeros(1, 1, 1, e).normal_(std=0.02))
    decoder = nn.Sequential(nn.Conv2d(enc.num_features, stride ** 2 * 3, 1), nn.PixelShuffle(stride))
    params = list(enc.parameters()) + [mask_token] + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    x = torch.randn(a.batch, 3, a.img, a.img)
    mask = (torch.rand(a.batch, a.img // 4, a.img // 4) < 0.6).float()

    def step():
        opt.zero_grad()
        z = enc.patch_embed(x)
        m = mask.unsqueeze(-1).type_as(z)
        z = z * (1.0 - m) + mask_token * m
        z = enc.norm(enc.layers(z)).permute(0, 3, 1, 2)
        rec = decoder(z)
        pm = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()
        loss = (F.l1_loss(x, rec, reduction="none") * pm).sum() / (pm.sum() + 1e-5) / 3
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    total = sum(ev.self_cpu_time_total for ev in events)
    gemm = sum(ev.self_cpu_time_total for ev in events if ev.key in ("aten::mm", "aten::addmm",
                                                                       "aten::bmm"))
    print(f"{a.preset} img={a.img} batch={a.batch}, {a.threads} threads: "
          f"{total / a.steps / 1e3:.0f} ms of self CPU time per step, "
          f"{100 * gemm / total:.1f}% in mm/addmm/bmm ({gemm / a.steps / 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
