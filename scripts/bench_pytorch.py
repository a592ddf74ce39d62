#!/usr/bin/env python3
"""PyTorch + timm side of `mimlab bench`: the same rows, shapes, thread count and JSON schema.

Each mimlab preset is built as timm's SwinTransformerV2 with the preset's hyper-parameters
(models/src/swin_v2.rs `SwinV2Config::preset`), at the row's image size. SimMIM is a small
wrapper written here like the official one: the mask token replaces masked patch embeddings
(after the patch norm), a 1x1 conv to stride^2*3 channels + PixelShuffle, L1 on masked pixels.
Optimizer: torch.optim.AdamW (lr 1e-4, wd 0.05). Eval rows run under torch.inference_mode().

Detection rows (`detect/nano_fcos/...`): the detector of configs/detect/swinv2_nano_digits_det.yaml
(mimlab's rows build it from that file) written here in PyTorch: timm's SwinTransformerV2 with
the nano preset at window 8, its stages 1-3 as features (stage 3 after the final norm, as mimlab),
mmdet's FPN (1x1 laterals, top-down nearest upsample, 3x3 outputs, 64 ch) and FCOS head (2 x (3x3
conv, GroupNorm 16, ReLU) towers shared over levels, centerness on the regression tower, a
learnable scale per level, mmdet's init), mmdet's FCOS targets (center sampling 1.5, the regress
ranges, smallest box wins) and losses (torchvision's sigmoid focal loss / num_pos, GIoU weighted by
the centerness targets / their sum, centerness BCE / num_pos); the same synthetic boxes as
src/bench.rs. Inference: eval forward and mmdet's decoding (score > 0.05, top 1000 per level,
boxes at the points, score x centerness, torchvision's batched_nms at the recipe's IoU 0.5, 100 per
image).

Segmentation rows (`segment/nano_{upernet,segformer}/...`): the segmentor of
configs/segment/swinv2_nano_digits_seg.yaml (mimlab's rows build it from that file): the same
Swin-V2 nano at window 8 with all four stages as features, mmseg's UPerHead (PPM at pool scales
1, 2, 4, FPN fuse, 32 channels) or SegformerHead (32 channels), ConvModules with GroupNorm 8 for
mmseg's SyncBN, and the FCNHead auxiliary head on stage 2 (32 channels, weight 0.4). Train: logits
upsampled bilinearly (align_corners=False) to the labels, F.cross_entropy(ignore_index=255) on the
synthetic class maps of src/bench.rs, backward, AdamW step. Inference: eval forward, logits
upsampled to the input, argmax.

Timing rule (engine/src/bench.rs): `--warmup` untimed calls, then at least 3 timed calls and on
until 2 s were timed (at most 20), or exactly `--iters`. Peak memory: VmHWM after resetting it
(`echo 5 > /proc/self/clear_refs`) before each row's setup.

On a GPU (`--device cuda`): the models, inputs and targets are made on the device
(torch.set_default_device), each timed call ends with torch.cuda.synchronize(), full f32 as
mimlab (TF32 off for matmuls and cuDNN convolutions), and `peak_device_mib` is
torch.cuda.max_memory_allocated() since a reset before the row's setup. `--precision bf16` runs
each step under torch.autocast("cuda", dtype=torch.bfloat16), as mimlab's `run.precision: bf16`
casts its linear and attention products (f32 weights and optimizer).

Usage: python scripts/bench_pytorch.py --threads 2 [--device cuda] [--filter nano] [--json out.json]
Not part of CI: needs torch, timm and torchvision (scripts/bench_compare.sh installs them in a
venv).
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                   help="bf16: torch.autocast(dtype=bfloat16) around each step (CUDA)")
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
# the gemm/ rows: one f32 product of two square matrices of this side (the GEMM peak; mimlab
# prints every row with a FLOP count as a share of its fastest gemm row)
GEMM_SIDE = 2048
MOE_TOKENS = (64, 8, 96, 384)  # images, side, channels, hidden
# detection rows: image size and batches as src/bench.rs DETECT_ROWS; the detector of
# configs/detect/swinv2_nano_digits_det.yaml with the defaults of finetune/src/detect/fcos_head.rs
# (FcosHeadConfig) for the keys the file leaves out
DETECT_IMG, DETECT_BATCHES = 128, (8, 16)
DETECT = dict(preset="swinv2_nano", window=8, in_stages=(1, 2, 3), channels=64, stacked_convs=2,
              gn_groups=16, num_classes=10, strides=(8, 16, 32),
              regress_ranges=((-1.0, 32.0), (32.0, 64.0), (64.0, 1e8)), center_radius=1.5,
              score_thr=0.05, nms_pre=1000, nms_iou=0.5, max_per_img=100)
# segmentation rows: as src/bench.rs SEGMENT_ROWS; the segmentor of
# configs/segment/swinv2_nano_digits_seg.yaml
SEGMENT_IMG, SEGMENT_BATCHES = 128, (8, 16)
SEGMENT = dict(preset="swinv2_nano", window=8, channels=32, pool_scales=(1, 2, 4), gn_groups=8,
               num_classes=11, aux_stage=2, aux_channels=32, aux_weight=0.4, dropout=0.1)


def specs():
    out = []
    for preset, imgs, batches in PRESETS:
        for img in imgs:
            for batch in batches:
                for task in ("inference", "finetune", "simmim"):
                    out.append(dict(name=f"{preset}/{task}", preset=preset, task=task,
                                    batch=batch, img=img))
    for task in ("matmul", "linear"):
        out.append(dict(name=f"gemm/{task}_{GEMM_SIDE}", preset="", task=f"gemm_{task}",
                        batch=1, img=0))
    b, side, _, _ = MOE_TOKENS
    out.append(dict(name="mlp/dense", preset="", task="dense", batch=b, img=side * 4))
    out.append(dict(name="mlp/moe_e8_top1", preset="", task="moe", batch=b, img=side * 4))
    for task, n in (("block_fwd", "block/tiny_w8_s0_shifted_fwd"),
                    ("block_bwd", "block/tiny_w8_s0_shifted_fwd_bwd")):
        out.append(dict(name=n, preset="swinv2_tiny_window8_256", task=task, batch=8, img=256))
    for batch in DETECT_BATCHES:
        for task in ("train", "inference"):
            out.append(dict(name=f"detect/nano_fcos/{task}", preset=DETECT["preset"],
                            task=f"det_{task}", batch=batch, img=DETECT_IMG))
    for head in ("upernet", "segformer"):
        for batch in SEGMENT_BATCHES:
            for task in ("train", "inference"):
                out.append(dict(name=f"segment/nano_{head}/{task}", preset=SEGMENT["preset"],
                                task=f"seg_{task}", head=head, batch=batch, img=SEGMENT_IMG))
    return out


def synthetic_class_maps(batch, img):
    """src/bench.rs `synthetic_class_maps`: 16 px squares of class (i + row + 2 column) % 11,
    every 7th pixel (in flat order) 255."""
    import torch
    k = torch.arange(batch * img * img)
    i, y, x = k // (img * img), k // img % img, k % img
    lab = (i + y // 16 + 2 * (x // 16)) % 11
    lab[k % 7 == 0] = 255
    return lab.view(batch, img, img)


def synthetic_boxes(batch, img):
    """src/bench.rs `synthetic_boxes`: per image squares of 16, 48 and 96 px as
    (x1, y1, x2, y2, class)."""
    out = []
    for i in range(batch):
        boxes = []
        for j, side in enumerate((16, 48, 96)):
            x = (37 * i + 53 * j) % (img - side)
            y = (29 * i + 71 * j + 11) % (img - side)
            boxes.append((x, y, x + side, y + side, (3 * i + j) % 10))
        out.append(boxes)
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


def time_iters(step, warmup, timed, budget_s, sync=lambda: None):
    for _ in range(warmup):
        step()
    sync()
    secs = []
    while len(secs) < max(timed, 1) or (len(secs) < 20 and sum(secs) < budget_s):
        t = time.perf_counter()
        step()
        sync()
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
    from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.set_default_device(dev)
        # full f32 like mimlab's CUDA path (candle's cuBLAS gemms run without TF32 by default)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def swin(preset, img, num_classes, window=None):
        e, d, h, w, dpr = HPARAMS[preset]
        w = window or w
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

    class FPN(nn.Module):
        """mmdet FPN without extra levels: 1x1 laterals, top-down nearest, 3x3 outputs."""

        def __init__(self, in_dims, c):
            super().__init__()
            self.lateral_convs = nn.ModuleList(nn.Conv2d(d, c, 1) for d in in_dims)
            self.fpn_convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in in_dims)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

        def forward(self, feats):
            lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
            for i in range(len(lat) - 1, 0, -1):
                lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:],
                                                        mode="nearest")
            return [conv(x) for conv, x in zip(self.fpn_convs, lat)]

    class FCOSHead(nn.Module):
        """mmdet FCOSHead (norm_on_bbox, centerness_on_reg, conv_bias), its init."""

        def __init__(self, c, num_classes, stacked_convs, gn_groups, levels):
            super().__init__()

            def tower():
                layers = []
                for _ in range(stacked_convs):
                    layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(gn_groups, c),
                               nn.ReLU(inplace=True)]
                return nn.Sequential(*layers)

            self.cls_convs, self.reg_convs = tower(), tower()
            self.conv_cls = nn.Conv2d(c, num_classes, 3, padding=1)
            self.conv_reg = nn.Conv2d(c, 4, 3, padding=1)
            self.conv_centerness = nn.Conv2d(c, 1, 3, padding=1)
            self.scales = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in range(levels))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
            nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))

        def forward(self, feats):
            cls, reg, ctr = [], [], []
            for x, scale in zip(feats, self.scales):
                c, r = self.cls_convs(x), self.reg_convs(x)
                cls.append(self.conv_cls(c))
                reg.append(F.relu(self.conv_reg(r) * scale))  # distances in strides
                ctr.append(self.conv_centerness(r))
            return cls, reg, ctr

    class Detector(nn.Module):
        """Swin-V2 stages `in_stages` (the last after the final norm) -> FPN -> FCOS head."""

        def __init__(self, img):
            super().__init__()
            d = DETECT
            self.backbone = swin(d["preset"], img, 0, window=d["window"])
            e = self.backbone.embed_dim
            self.neck = FPN([e * 2 ** i for i in d["in_stages"]], d["channels"])
            self.head = FCOSHead(d["channels"], d["num_classes"], d["stacked_convs"],
                                 d["gn_groups"], len(d["strides"]))

        def forward(self, x):
            z = self.backbone.patch_embed(x)  # (B, H, W, C)
            feats, last = [], len(self.backbone.layers) - 1
            for i, layer in enumerate(self.backbone.layers):
                z = layer(z)
                if i == last:
                    z = self.backbone.norm(z)
                if i in DETECT["in_stages"]:
                    feats.append(z.permute(0, 3, 1, 2).contiguous())
            return self.head(self.neck(feats))

    def conv_module(i, o, k):
        """mmcv ConvModule(conv without bias, GN, ReLU), Kaiming fan_out init."""
        conv = nn.Conv2d(i, o, k, padding=k // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        groups = max(g for g in range(1, SEGMENT["gn_groups"] + 1) if o % g == 0)
        return nn.Sequential(conv, nn.GroupNorm(groups, o), nn.ReLU(inplace=True))

    def conv_seg(c):
        m = nn.Conv2d(c, SEGMENT["num_classes"], 1)
        nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(m.bias)
        return m

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    class UPerHead(nn.Module):
        """mmseg UPerHead: PPM on the last stage, FPN fuse, concat at stride 4, dropout, conv_seg."""

        def __init__(self, dims, c):
            super().__init__()
            self.psp = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_module(dims[-1], c, 1))
                                     for s in SEGMENT["pool_scales"])
            self.bottleneck = conv_module(dims[-1] + len(SEGMENT["pool_scales"]) * c, c, 3)
            self.lateral_convs = nn.ModuleList(conv_module(d, c, 1) for d in dims[:-1])
            self.fpn_convs = nn.ModuleList(conv_module(c, c, 3) for _ in dims[:-1])
            self.fpn_bottleneck = conv_module(len(dims) * c, c, 3)
            self.dropout = nn.Dropout2d(SEGMENT["dropout"])
            self.conv_seg = conv_seg(c)

        def forward(self, feats):
            x = feats[-1]
            psp = self.bottleneck(torch.cat([x] + [up(m(x), x.shape[2:]) for m in self.psp], 1))
            lat = [l(f) for l, f in zip(self.lateral_convs, feats[:-1])] + [psp]
            for i in range(len(lat) - 1, 0, -1):
                lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1].shape[2:])
            outs = [c(l) for c, l in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
            outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
            return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))

    class SegformerHead(nn.Module):
        """mmseg SegformerHead: 1x1 ConvModule per stage, upsampled, concat, fusion, conv_seg."""

        def __init__(self, dims, c):
            super().__init__()
            self.convs = nn.ModuleList(conv_module(d, c, 1) for d in dims)
            self.fusion_conv = conv_module(len(dims) * c, c, 1)
            self.dropout = nn.Dropout2d(SEGMENT["dropout"])
            self.conv_seg = conv_seg(c)

        def forward(self, feats):
            size = feats[0].shape[2:]
            outs = [up(conv(f), size) for conv, f in zip(self.convs, feats)]
            return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(outs, 1))))

    class Segmentor(nn.Module):
        """Swin-V2 (all four stages, the last after the final norm) -> decode head + FCN aux."""

        def __init__(self, img, head):
            super().__init__()
            d = SEGMENT
            self.backbone = swin(d["preset"], img, 0, window=d["window"])
            e = self.backbone.embed_dim
            dims = [e * 2 ** i for i in range(len(self.backbone.layers))]
            c = d["channels"]
            self.decode_head = UPerHead(dims, c) if head == "upernet" else SegformerHead(dims, c)
            self.aux = nn.Sequential(conv_module(dims[d["aux_stage"]], d["aux_channels"], 3),
                                     nn.Dropout2d(d["dropout"]), conv_seg(d["aux_channels"]))

        def forward(self, x, aux=True):
            z = self.backbone.patch_embed(x)
            feats, last = [], len(self.backbone.layers) - 1
            for i, layer in enumerate(self.backbone.layers):
                z = layer(z)
                if i == last:
                    z = self.backbone.norm(z)
                feats.append(z.permute(0, 3, 1, 2).contiguous())
            # mmseg runs the auxiliary head in training only
            return (self.decode_head(feats),
                    self.aux(feats[SEGMENT["aux_stage"]]) if aux else None)

    def seg_loss(out, labels):
        main, aux = (F.cross_entropy(up(o, labels.shape[1:]), labels, ignore_index=255)
                     for o in out)
        return main + SEGMENT["aux_weight"] * aux

    def level_points(cls):
        """mmdet MlvlPointGenerator (offset 0.5): the (x, y) of each level's points, row-major."""
        out = []
        for c, s in zip(cls, DETECT["strides"]):
            h, w = c.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            out.append(torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], 1))
        return out

    def fcos_targets(points, gts):
        """mmdet FCOSHead.get_targets: labels [N] (num_classes = background) and distances [N, 4]
        in strides, flattened level by level, then image by image."""
        d, k = DETECT, DETECT["num_classes"]
        n_lvl = [len(p) for p in points]
        pts = torch.cat(points)
        stride = torch.cat([torch.full((n,), float(s)) for n, s in zip(n_lvl, d["strides"])])
        rng = torch.cat([torch.tensor(r).expand(n, 2) for n, r in zip(n_lvl, d["regress_ranges"])])
        xs, ys = pts[:, :1], pts[:, 1:]
        per_image = []
        for gt in gts:
            b, lab = gt[:, :4], gt[:, 4].long()
            ltrb = torch.stack([xs - b[:, 0], ys - b[:, 1], b[:, 2] - xs, b[:, 3] - ys], -1)
            # center sampling: the box's centre +- radius * stride, clipped to the box
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            rad = stride[:, None] * d["center_radius"]
            cb = torch.stack([torch.maximum(cx - rad, b[:, 0]), torch.maximum(cy - rad, b[:, 1]),
                              torch.minimum(cx + rad, b[:, 2]), torch.minimum(cy + rad, b[:, 3])],
                             -1)
            inside = torch.stack([xs - cb[..., 0], ys - cb[..., 1], cb[..., 2] - xs,
                                  cb[..., 3] - ys], -1).min(-1).values > 0
            m = ltrb.max(-1).values
            in_range = (m >= rng[:, :1]) & (m <= rng[:, 1:])
            areas = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None].repeat(len(pts), 1)
            areas[~(inside & in_range)] = 1e8
            min_area, idx = areas.min(1)
            labels = lab[idx]
            labels[min_area == 1e8] = k
            per_image.append((labels, ltrb[torch.arange(len(pts)), idx] / stride[:, None]))
        # (image, level) -> level-major, image-minor, as the flattened head outputs
        labels, targets = [], []
        for lv in range(len(n_lvl)):
            a, z = sum(n_lvl[:lv]), sum(n_lvl[:lv + 1])
            labels += [lab[a:z] for lab, _ in per_image]
            targets += [t[a:z] for _, t in per_image]
        return torch.cat(labels), torch.cat(targets)

    def flat(maps):
        return torch.cat([m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps])

    def ltrb_box(d):
        """The box at distances (l, t, r, b) around (0, 0)."""
        return torch.cat([-d[:, :2], d[:, 2:]], 1)

    def fcos_loss(cls, reg, ctr, gts):
        """mmdet FCOSHead.loss_by_feat (GIoU, centerness weights; one process: no all-reduce)."""
        k = DETECT["num_classes"]
        labels, targets = fcos_targets(level_points(cls), gts)
        flat_cls, flat_reg, flat_ctr = flat(cls), flat(reg), flat(ctr).reshape(-1)
        pos = ((labels >= 0) & (labels < k)).nonzero().reshape(-1)
        num_pos = max(float(len(pos)), 1.0)
        onehot = torch.zeros_like(flat_cls)
        onehot[pos, labels[pos]] = 1.0
        loss_cls = sigmoid_focal_loss(flat_cls, onehot, alpha=0.25, gamma=2.0,
                                      reduction="sum") / num_pos
        if len(pos) == 0:
            return loss_cls + flat_reg.sum() * 0 + flat_ctr.sum() * 0
        p_reg, p_tgt, p_ctr = flat_reg[pos], targets[pos], flat_ctr[pos]
        lr, tb = p_tgt[:, [0, 2]], p_tgt[:, [1, 3]]
        # mmdet centerness_target: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
        ct = (lr.min(-1).values / lr.max(-1).values * tb.min(-1).values / tb.max(-1).values).sqrt()
        # both boxes decoded at the same point: GIoU does not depend on which, take (0, 0)
        giou = generalized_box_iou_loss(ltrb_box(p_reg), ltrb_box(p_tgt), reduction="none")
        loss_bbox = (giou * ct).sum() / ct.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(p_ctr, ct, reduction="sum") / num_pos
        return loss_cls + loss_bbox + loss_ctr

    def fcos_predict(cls, reg, ctr, img):
        """mmdet _predict_by_feat_single + _bbox_post_process per image: (boxes, scores, labels)."""
        d = DETECT
        points = level_points(cls)
        out = []
        for i in range(cls[0].shape[0]):
            boxes, scores, labels = [], [], []
            for c, r, z, pts, s in zip(cls, reg, ctr, points, d["strides"]):
                sc = c[i].permute(1, 2, 0).reshape(-1, c.shape[1]).sigmoid()
                # filter_scores_and_topk: threshold, then the best nms_pre (point, class) pairs
                valid = sc > d["score_thr"]
                v, idx = sc[valid].sort(descending=True)
                keep, lab = valid.nonzero()[idx[:d["nms_pre"]]].unbind(1)
                dist = r[i].permute(1, 2, 0).reshape(-1, 4)[keep] * s
                p = pts[keep]
                bx = torch.cat([p - dist[:, :2], p + dist[:, 2:]], 1).clamp(0, img)
                boxes.append(bx)
                scores.append(v[:d["nms_pre"]] * z[i].reshape(-1)[keep].sigmoid())
                labels.append(lab)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            ok = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            keep = batched_nms(boxes, scores, labels, d["nms_iou"])[:d["max_per_img"]]
            out.append((boxes[keep], scores[keep], labels[keep]))
        return out

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def setup(s):
        preset, task, b, img = s["preset"], s["task"], s["batch"], s["img"]
        g = torch.Generator(device=dev).manual_seed(0)
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
        if task in ("gemm_matmul", "gemm_linear"):
            a = torch.randn(GEMM_SIDE, GEMM_SIDE, generator=g)
            w = torch.randn(GEMM_SIDE, GEMM_SIDE, generator=g)
            bias = torch.zeros(GEMM_SIDE)

            def step():
                with torch.inference_mode():
                    if task == "gemm_matmul":
                        torch.mm(a, w)
                    else:
                        F.linear(a, w, bias)
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
        if task in ("det_train", "det_inference"):
            model = Detector(img)
            x = torch.randn(b, 3, img, img, generator=g)
            if task == "det_inference":
                model.eval()

                def step():
                    with torch.inference_mode():
                        fcos_predict(*model(x), img)
                return step
            model.train()
            opt = adamw(model)
            gts = [torch.tensor(bs, dtype=torch.float32) for bs in synthetic_boxes(b, img)]

            def step():
                loss = fcos_loss(*model(x), gts)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step
        if task in ("seg_train", "seg_inference"):
            model = Segmentor(img, s["head"])
            x = torch.randn(b, 3, img, img, generator=g)
            if task == "seg_inference":
                model.eval()

                def step():
                    with torch.inference_mode():
                        up(model(x, aux=False)[0], (img, img)).argmax(1)
                return step
            model.train()
            opt = adamw(model)
            labels = synthetic_class_maps(b, img)

            def step():
                loss = seg_loss(model(x), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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
    device = f"cuda:{dev.index or 0} {torch.cuda.get_device_name(dev)}" if gpu else "cpu"
    if args.precision == "bf16":
        if not gpu:
            sys.exit("--precision bf16 is for CUDA devices (add --device cuda)")
        plain_setup = setup

        def setup(s):  # noqa: F811 (each step under autocast)
            step = plain_setup(s)

            def cast_step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    step()
            return cast_step
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    print(f"pytorch bench: {len(rows_sel)} rows, {device} {args.precision}, {threads} CPU threads, "
          f"torch {torch.__version__}", file=sys.stderr)
    rows = []
    for s in rows_sel:
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        secs = time_iters(setup(s), warmup, timed, budget, sync)
        med = statistics.median(secs)
        row = dict(name=s["name"], batch=s["batch"], img=s["img"], median_ms=med * 1e3,
                   min_ms=min(secs) * 1e3, max_ms=max(secs) * 1e3, iters=len(secs),
                   images_per_s=s["batch"] / med, peak_rss_mib=peak_rss_mib())
        if gpu:
            row["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"{row['name']:<34} b{row['batch']:<3} {row['img']:>4}px {row['median_ms']:>9.1f} ms "
              f"{row['images_per_s']:>8.1f} img/s {row['peak_rss_mib']:>6.0f} MiB", file=sys.stderr)
        rows.append(row)
    print(f"{'row':<34} {'batch':>5} {'img':>4} {'median ms':>10} {'min-max ms':>19} "
          f"{'images/s':>9} {'peak MiB':>9}" + (f" {'GPU MiB':>9}" if gpu else ""))
    for r in rows:
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        print(f"{r['name']:<34} {r['batch']:>5} {r['img']:>4} {r['median_ms']:>10.1f} "
              f"{spread:>19} {r['images_per_s']:>9.1f} {r['peak_rss_mib']:>9.0f}"
              + (f" {r['peak_device_mib']:>9.0f}" if gpu else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tool="pytorch", device=device, torch=torch.__version__, threads=threads,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
