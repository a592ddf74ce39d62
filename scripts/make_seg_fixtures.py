"""Writes tests/fixtures/seg_ops.safetensors from PyTorch: the two ops of the segmentation head
that candle lacks, as references for `layers::resize_bilinear` and
`segment::loss::cross_entropy_ignore` (dense-tasks.md 3).

    python3 -m venv .venv-fix && .venv-fix/bin/pip install torch numpy safetensors \
        --index-url https://download.pytorch.org/whl/cpu   # or the PyPI torch wheel
    .venv-fix/bin/python scripts/make_seg_fixtures.py

Tensors (float32 unless said):
- `bilinear.{k}.x` [2, 3, h, w], `.g` (upstream gradient), `.y` = F.interpolate(x, size,
  mode="bilinear", align_corners=False), `.dx` = the gradient of (y * g).sum() with respect to x,
  `.size` int64 [oh, ow]; odd sizes up and down, and a non-integer ratio.
- `ce.logits` [2, 5, 7, 9], `ce.labels` int64 [2, 7, 9] with ~20% 255, `ce.weight` [5];
  `ce.loss` / `ce.dlogits` = F.cross_entropy(logits, labels, ignore_index=255) and its gradient;
  `ce.loss_w` / `ce.dlogits_w` the same with `weight=ce.weight`.
- `pool.{k}.x`, `.g`, `.y` = F.adaptive_avg_pool2d(x, size), `.dx`, `.size`: UPerNet's pooling
  scales 1, 2, 3, 6 on maps that are and are not multiples of them (overlapping bins), and an
  output larger than the input.
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "seg_ops.safetensors")


def main():
    g = torch.Generator().manual_seed(0)
    t = {}
    cases = [((5, 7), (9, 13)), ((5, 7), (3, 4)), ((4, 4), (16, 11)), ((6, 10), (6, 10)),
             ((7, 3), (28, 12)), ((9, 13), (5, 7))]
    for k, ((h, w), (oh, ow)) in enumerate(cases):
        x = torch.randn(2, 3, h, w, generator=g, requires_grad=True)
        y = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
        gy = torch.randn(y.shape, generator=g)
        (y * gy).sum().backward()
        t[f"bilinear.{k}.x"] = x.detach()
        t[f"bilinear.{k}.g"] = gy
        t[f"bilinear.{k}.y"] = y.detach()
        t[f"bilinear.{k}.dx"] = x.grad.detach()
        t[f"bilinear.{k}.size"] = torch.tensor([oh, ow], dtype=torch.int64)
    logits = torch.randn(2, 5, 7, 9, generator=g) * 3
    labels = torch.randint(0, 5, (2, 7, 9), generator=g)
    labels[torch.rand(2, 7, 9, generator=g) < 0.2] = 255
    weight = torch.rand(5, generator=g) + 0.5
    t["ce.logits"], t["ce.labels"], t["ce.weight"] = logits, labels, weight
    for suffix, w in [("", None), ("_w", weight)]:
        x = logits.clone().requires_grad_(True)
        loss = F.cross_entropy(x, labels, weight=w, ignore_index=255)
        loss.backward()
        t[f"ce.loss{suffix}"] = loss.detach().reshape(1)
        t[f"ce.dlogits{suffix}"] = x.grad.detach()
    pools = [((4, 4), (1, 1)), ((8, 8), (2, 2)), ((5, 7), (3, 3)), ((13, 9), (6, 6)),
             ((4, 4), (6, 6)), ((7, 11), (2, 3))]
    for k, ((h, w), (oh, ow)) in enumerate(pools):
        x = torch.randn(2, 3, h, w, generator=g, requires_grad=True)
        y = F.adaptive_avg_pool2d(x, (oh, ow))
        gy = torch.randn(y.shape, generator=g)
        (y * gy).sum().backward()
        t[f"pool.{k}.x"], t[f"pool.{k}.g"] = x.detach(), gy
        t[f"pool.{k}.y"], t[f"pool.{k}.dx"] = y.detach(), x.grad.detach()
        t[f"pool.{k}.size"] = torch.tensor([oh, ow], dtype=torch.int64)
    save_file({k: v.contiguous() for k, v in t.items()}, OUT)
    print(f"wrote {OUT}: {len(t)} tensors; torch {torch.__version__}")


if __name__ == "__main__":
    main()
