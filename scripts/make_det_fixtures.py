#!/usr/bin/env python3
"""Reference values for mimlab's FCOS losses (finetune/src/detect/fcos_loss.rs).

The three losses of mmdet 3.x `FCOSHead.loss_by_feat` (improved variant: GIoU, centerness on the
regression branch, norm_on_bbox), computed in float64 on a small fixed input:
  loss_cls        torchvision.ops.sigmoid_focal_loss(alpha=0.25, gamma=2, reduction='none'),
                  checked equal to mmdet's `py_sigmoid_focal_loss` formula written out here,
                  summed and divided by max(num_pos, 1)
  loss_bbox       1 - GIoU of the boxes decoded at the pixel points from the distances in strides
                  (mmdet `distance2bbox`, `bbox_overlaps(mode='giou', eps=1e-6)`), weighted by the
                  centerness targets (mmdet `centerness_target`), / max(sum of targets, 1e-6)
  loss_centerness F.binary_cross_entropy_with_logits(reduction='sum') / max(num_pos, 1)

Usage (a throwaway, git-ignored venv; torch 2.15.0 and torchvision 0.29.2 made the committed file):
    python3 -m venv .venv-fix && .venv-fix/bin/pip install torch torchvision safetensors
    .venv-fix/bin/python scripts/make_det_fixtures.py --out tests/fixtures/det

Writes fcos_loss.json: the inputs (`cls` [N][K] logits, `reg` [N][4] predicted distances in
strides, `ctr` [N] logits, `labels` [N] with K = background, `positives`, `ltrb` [P][4] target
distances in strides, `points` [N][2] pixels, `strides` [N]) and the outputs (`focal` [N][K]
element-wise, `loss_cls`, `loss_bbox`, `loss_centerness`, `centerness_targets` [P]).
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def mmdet_focal(pred, target, alpha=0.25, gamma=2.0):
    # mmdet/models/losses/focal_loss.py py_sigmoid_focal_loss, reduction 'none'
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def distance2bbox(points, distance):
    # mmdet/structures/bbox/transforms.py, no max_shape
    return torch.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        -1,
    )


def giou_aligned(b1, b2, eps=1e-6):
    # mmdet/structures/bbox/bbox_overlaps.py, mode='giou', is_aligned=True
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, :2], b2[:, :2])
    rb = torch.min(b1[:, 2:], b2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = torch.max(area1 + area2 - overlap, b1.new_tensor([eps]))
    ious = overlap / union
    enclosed_lt = torch.min(b1[:, :2], b2[:, :2])
    enclosed_rb = torch.max(b1[:, 2:], b2[:, 2:])
    ewh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = torch.max(ewh[:, 0] * ewh[:, 1], b1.new_tensor([eps]))
    return ious - (enclose_area - union) / enclose_area


def centerness_target(t):
    # mmdet FCOSHead.centerness_target
    lr = t[:, [0, 2]]
    tb = t[:, [1, 3]]
    c = (lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0])
    return torch.sqrt(c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/det")
    args = ap.parse_args()
    torch.manual_seed(19)
    dt = torch.float64
    n, k = 10, 3
    # 6 points of a 2x3 map at stride 8, then 4 of a 2x2 map at stride 16
    points, strides = [], []
    for h, w, s in [(2, 3, 8), (2, 2, 16)]:
        for i in range(h):
            for j in range(w):
                points.append([(j + 0.5) * s, (i + 0.5) * s])
                strides.append(s)
    points = torch.tensor(points, dtype=dt)
    strides = torch.tensor(strides, dtype=dt)
    cls = (torch.randn(n, k, dtype=dt) * 3).round(decimals=4)
    cls[0, 0] = 30.0  # confident false positive
    cls[3, 1] = -30.0  # confident negative
    cls[4, 0] = -25.0  # confidently missed positive
    reg = torch.empty(n, 4, dtype=dt).uniform_(0.2, 3.0).round(decimals=4)
    ctr = torch.randn(n, dtype=dt).round(decimals=4)
    positives = [1, 4, 7, 8]
    pos_labels = [2, 0, 1, 2]
    labels = [k] * n
    for p, c in zip(positives, pos_labels):
        labels[p] = c
    ltrb = torch.empty(len(positives), 4, dtype=dt).uniform_(0.3, 3.0).round(decimals=4)

    onehot = torch.zeros(n, k, dtype=dt)
    for p, c in zip(positives, pos_labels):
        onehot[p, c] = 1.0
    focal = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.allclose(focal, mmdet_focal(cls, onehot), rtol=0, atol=1e-12)
    num_pos = max(len(positives), 1)
    loss_cls = focal.sum() / num_pos

    pidx = torch.tensor(positives)
    pts = points[pidx]
    pred_boxes = distance2bbox(pts, reg[pidx])
    tgt_boxes = distance2bbox(pts, ltrb)
    ct = centerness_target(ltrb)
    loss_bbox = ((1 - giou_aligned(pred_boxes, tgt_boxes)) * ct).sum() / max(ct.sum().item(), 1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pidx], ct, reduction="sum") / num_pos

    out = {
        "num_classes": k,
        "cls": cls.tolist(),
        "reg": reg.tolist(),
        "ctr": ctr.tolist(),
        "labels": labels,
        "positives": positives,
        "ltrb": ltrb.tolist(),
        "points": points.tolist(),
        "strides": strides.tolist(),
        "focal": focal.tolist(),
        "loss_cls": loss_cls.item(),
        "loss_bbox": loss_bbox.item(),
        "loss_centerness": loss_ctr.item(),
        "centerness_targets": ct.tolist(),
        "made_with": f"torch {torch.__version__}",
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fcos_loss.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(path, {k: out[k] for k in ["loss_cls", "loss_bbox", "loss_centerness"]})


if __name__ == "__main__":
    main()
