#!/usr/bin/env python3
"""PyTorch + timm side of `mimlab bench`: the same rows, shapes, thread count and JSON schema.

Each mimlab preset is built as timm's SwinTransformerV2 with the preset's hyper-parameters
(models/src/swin_v2.rs `SwinV2Config::preset`), at the row's image size. SimMIM is a small
wrapper written here like the official one: the mask token replaces masked patch embeddings
(after the patch norm), a 1x1 conv to stride^2*3 channels + PixelShuffle, L1 on masked pixels.
Optimizer: torch.optim.AdamW (lr 1e-4, wd 0.05). Eval rows run under torch.inference_mode().

Timing rule (engine/src/bench.rs): `--warmup` untimed calls, then at least 3 timed calls and on
until 2 s were timed (at most 20), or exactly `--iters`. Peak memory: VmHWM after resetting it
(`echo 5 > /proc/self/clear_refs`) before each row's setup.

Usage: python scripts/bench_pytorch.py --threads 2 [--filter nano] [--json out.json]
Not part of CI: needs torch and timm (scripts/bench_compare.sh installs them in a venv).
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: all cores)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row, exactly")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--filter", action="append", default=[], help="run rows whose key contains it")
    p.add_argument("--quick", action="store_true", help="one timed iteration, no warm-up")
    p.add_argument("--json", default=None, help="write rows as JSON (mimlab's schema)")
    p.add_argument("--list", action="store_true")
    return p.parse_args()


# (preset, image sizes, batch sizes): the same as src/cli/bench.rs PRESETS
PRESETS = [
    ("swinv2_nano", [32, 64], [8, 32]),
    ("swinv2_micro", [64, 128], [8, 16]),
    ("swinv2_tiny_window8_256", [128, 256], [4, 8]),
]
# name -> (embed_dim, depths, heads, window, drop_path_rate)
HPARAMS = {
    "swinv2_nano": (32, (2, 2, 2, 2), (1, 2, 4, 8), 4, 0.1),
    "swinv2_micro": (48, (2, 2, 6, 2), (2, 4, 8, 16), 8, 0.1),
    "swinv2_tiny_window8_256": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 0.2),
}
MOE_TOKENS = (64, 8, 96, 384)  # images, side, channels, hidden


def specs():
    out = []
    for preset, imgs, batches in PRESETS:
        for img in imgs:
            for batch in batches:
                for task in ("inference", "finetune", "simmim"):
                    out.append(dict(name=f"{preset}/{task}", preset=preset, task=task,
                                    batch=batch, img=img))
    b, side, _, _ = MOE_TOKENS
    out.append(dict(name="mlp/dense", preset="", task="dense", batch=b, img=side * 4))
    out.append(dict(name="mlp/moe_e8_top1", preset="", task="moe", batch=b, img=side * 4))
    for task, n in (("block_fwd", "block/tiny_w8_s0_shifted_fwd"),
                    ("block_bwd", "block/tiny_w8_s0_shifted_fwd_bwd")):
        out.append(dict(name=n, preset="swinv2_tiny_window8_256", task=task, batch=8, img=256))
    return out


def key(s):
    return f"{s['name']} img={s['img']} batch={s['batch']}"


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def time_iters(step, warmup, timed, budget_s):
    for _ in range(warmup):
        step()
    secs = []
    while len(secs) < max(timed, 1) or (len(secs) < 20 and sum(secs) < budget_s):
        t = time.perf_counter()
        step()
        secs.append(time.perf_counter() - t)
    return secs


def main():
    args = parse_args()
    rows_sel = [s for s in specs() if not args.filter or any(f in key(s) for f in args.filter)]
    if not rows_sel:
        sys.exit(f"--filter {args.filter} matches no row")
    if args.list:
        for s in rows_sel:
            print(key(s))
        return

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def swin(preset, img, num_classes):
        e, d, h, w, dpr = HPARAMS[preset]
        return SwinTransformerV2(img_size=img, patch_size=4, in_chans=3, num_classes=num_classes,
                                 embed_dim=e, depths=d, num_heads=h, window_size=w, mlp_ratio=4.0,
                                 qkv_bias=True, drop_path_rate=dpr)

    class SimMIM(nn.Module):
        """Official SimMIM layout: encoder with mask token, 1x1 conv + PixelShuffle, masked L1."""

        def __init__(self, preset, img):
            super().__init__()
            self.encoder = swin(preset, img, 0)
            c = self.encoder.embed_dim
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, c).normal_(std=0.02))
            self.stride = 4 * 2 ** (len(self.encoder.layers) - 1)
            self.decoder = nn.Sequential(
                nn.Conv2d(self.encoder.num_features, self.stride ** 2 * 3, 1),
                nn.PixelShuffle(self.stride))

        def forward(self, x, mask):
            z = self.encoder.patch_embed(x)  # (B, H, W, C), norm included
            w = mask.unsqueeze(-1).type_as(z)
            z = z * (1.0 - w) + self.mask_token * w
            z = self.encoder.norm(self.encoder.layers(z)).permute(0, 3, 1, 2)
            x_rec = self.decoder(z)
            m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()
            loss = (F.l1_loss(x, x_rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / 3
            return loss

    def random_mask(batch, img, g):
        # official MaskGenerator: ceil(0.6 * R) of the R mask squares, then model-patch resolution
        mp = min(img // 4, 32)
        r = img // mp
        count = -(-r * r * 6 // 10)
        out = torch.zeros(batch, r * r)
        for i in range(batch):
            out[i, torch.randperm(r * r, generator=g)[:count]] = 1.0
        s = mp // 4
        return out.view(batch, r, r).repeat_interleave(s, 1).repeat_interleave(s, 2)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def setup(s):
        preset, task, b, img = s["preset"], s["task"], s["batch"], s["img"]
        g = torch.Generator().manual_seed(0)
        if task == "inference":
            model = swin(preset, img, 1000).eval()
            x = torch.randn(b, 3, img, img, generator=g)

            def step():
                with torch.inference_mode():
                    model(x)
            return step
        if task == "finetune":
            model = swin(preset, img, 1000).train()
            opt = adamw(model)
            x = torch.randn(b, 3, img, img, generator=g)
            y = torch.arange(b) * 7 % 1000

            def step():
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step
        if task == "simmim":
            model = SimMIM(preset, img).train()
            opt = adamw(model)
            x = torch.randn(b, 3, img, img, generator=g)
            mask = random_mask(b, img, g)

            def step():
                loss = model(x, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step
        if task in ("dense", "moe"):
            n, side, c, hid = MOE_TOKENS
            x = torch.randn(n * side * side, c, generator=g)
            if task == "dense":
                mlp = nn.Sequential(nn.Linear(c, hid), nn.GELU(), nn.Linear(hid, c)).eval()

                def step():
                    with torch.inference_mode():
                        mlp(x)
                return step
            e = 8
            wg = torch.randn(e, c, generator=g) * 0.005
            w1 = torch.randn(e, hid, c, generator=g) * 0.005
            b1 = torch.zeros(e, 1, hid)
            w2 = torch.randn(e, hid, c, generator=g) * 0.005
            b2 = torch.zeros(e, 1, c)
            cap = -(-int(1.25 * x.shape[0]) // e)  # eval capacity factor 1.25, top-1

            def step():
                # top-1 gate with capacity (tutel-style dispatch into [E, cap, C], then combine)
                with torch.inference_mode():
                    scores = F.softmax(x @ wg.t(), dim=-1)
                    gate, idx = scores.max(dim=-1)
                    onehot = F.one_hot(idx, e)
                    pos = (onehot.cumsum(0) - 1)[torch.arange(x.shape[0]), idx]
                    keep = pos < cap
                    buf = torch.zeros(e, cap, c)
                    buf[idx[keep], pos[keep]] = x[keep]
                    h = F.gelu(torch.baddbmm(b1, buf, w1.transpose(1, 2)))
                    o = torch.baddbmm(b2, h, w2)
                    out = torch.zeros_like(x)
                    out[keep] = o[idx[keep], pos[keep]] * gate[keep].unsqueeze(1)
            return step
        if task in ("block_fwd", "block_bwd"):
            e, _, h, w, _ = HPARAMS[preset]
            res = img // 4
            blk = SwinTransformerV2Block(e, (res, res), h[0], window_size=w, shift_size=w // 2)
            x = torch.randn(b, res, res, e, generator=g)
            if task == "block_fwd":
                blk.eval()

                def step():
                    with torch.inference_mode():
                        blk(x)
                return step
            blk.train()

            def step():
                blk.zero_grad(set_to_none=True)
                blk(x).pow(2).mean().backward()
            return step
        raise ValueError(task)

    if args.quick:
        warmup, timed, budget = 0, 1, 0.0
    else:
        warmup, timed, budget = args.warmup, args.iters or 3, 0.0 if args.iters else 2.0
    print(f"pytorch bench: {len(rows_sel)} rows, {threads} threads, torch {torch.__version__}",
          file=sys.stderr)
    rows = []
    for s in rows_sel:
        gc.collect()
        reset_peak_rss()
        secs = time_iters(setup(s), warmup, timed, budget)
        med = statistics.median(secs)
        row = dict(name=s["name"], batch=s["batch"], img=s["img"], median_ms=med * 1e3,
                   min_ms=min(secs) * 1e3, max_ms=max(secs) * 1e3, iters=len(secs),
                   images_per_s=s["batch"] / med, peak_rss_mib=peak_rss_mib())
        print(f"{row['name']:<34} b{row['batch']:<3} {row['img']:>4}px {row['median_ms']:>9.1f} ms "
              f"{row['images_per_s']:>8.1f} img/s {row['peak_rss_mib']:>6.0f} MiB", file=sys.stderr)
        rows.append(row)
    print(f"{'row':<34} {'batch':>5} {'img':>4} {'median ms':>10} {'min-max ms':>19} "
          f"{'images/s':>9} {'peak MiB':>9}")
    for r in rows:
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        print(f"{r['name']:<34} {r['batch']:>5} {r['img']:>4} {r['median_ms']:>10.1f} "
              f"{spread:>19} {r['images_per_s']:>9.1f} {r['peak_rss_mib']:>9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tool="pytorch", torch=torch.__version__, threads=threads, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
