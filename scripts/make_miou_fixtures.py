"""Writes the mIoU fixtures of tests/fixtures/miou/ from an independent NumPy implementation of
mmsegmentation's IoUMetric (mmseg/evaluation/metrics/iou_metric.py: `intersect_and_union` and
`total_area_to_metrics`; `reduce_zero_label` as mmseg's `LoadAnnotations`), the reference of
finetune/src/segment/miou.rs (dense-tasks.md 2.2).

    python3 -m venv .venv-fix && .venv-fix/bin/pip install numpy pillow
    .venv-fix/bin/python scripts/make_miou_fixtures.py

Per case: <case>/gt/*.png (label maps; 8-bit grey, or palette where the case says so),
<case>/pred/*.png (8-bit grey) and <case>/expected.json: the settings, the summed per-class areas
(exact integers) and the metrics as fractions (`null` for mmseg's NaN). mmseg sums its histograms
in float32 torch tensors; the counts here are exact integers and the ratios float64 (mmseg's
values agree to float32 rounding, ~1e-7 relative, while a class has fewer than 2^24 pixels).
"""
import json
import os
import shutil

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "miou")


def reduce_zero_label(label):
    # mmseg LoadAnnotations on uint8: 0 -> 255, - 1, 254 -> 255
    label = label.astype(np.uint8).copy()
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def histc(values, n):
    # torch.histc(x, bins=n, min=0, max=n - 1) on integer values: out-of-range values dropped
    values = values[(values >= 0) & (values <= n - 1)]
    return np.bincount(values.astype(np.int64), minlength=n)[:n]


def intersect_and_union(pred, label, n, ignore_index):
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    ai, ap, al = histc(intersect, n), histc(pred, n), histc(label, n)
    return ai, ap + al - ai, ap, al


def metrics(pairs, n, ignore_index=255, rzl=False):
    ti = tu = tp = tl = np.zeros(n, dtype=np.int64)
    for pred, label in pairs:
        label = label.astype(np.int64)
        if rzl:
            label = reduce_zero_label(label).astype(np.int64)
        ai, au, ap, al = intersect_and_union(pred.astype(np.int64), label, n, ignore_index)
        ti, tu, tp, tl = ti + ai, tu + au, tp + ap, tl + al
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = ti / tu
        acc = ti / tl
        aacc = ti.sum() / tl.sum()
        miou = np.nanmean(iou) if np.any(~np.isnan(iou)) else np.nan

        macc = np.nanmean(acc) if np.any(~np.isnan(acc)) else np.nan

    def f(x):
        return None if np.isnan(x) else float(x)

    return {
        "areas": {"intersect": ti.tolist(), "union": tu.tolist(), "pred": tp.tolist(),
                  "label": tl.tolist()},
        "mIoU": f(miou), "aAcc": f(aacc), "mAcc": f(macc),
        "IoU": [f(x) for x in iou], "Acc": [f(x) for x in acc],
    }


def save(path, arr, palette=False):
    arr = np.ascontiguousarray(arr.astype(np.uint8))
    size = (arr.shape[1], arr.shape[0])
    if palette:
        # the stored index is the class; the colours (VOC-like, arbitrary) must not matter
        img = Image.frombytes("P", size, arr.tobytes())
        img.putpalette([(i * m) % 256 for i in range(256) for m in (37, 91, 53)])
    else:
        img = Image.frombytes("L", size, arr.tobytes())
    img.save(path)


def case(name, pairs, n, ignore_index=255, rzl=False, palette_gt=False, note=""):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "gt"))
    os.makedirs(os.path.join(d, "pred"))
    for k, (pred, label) in enumerate(pairs):
        save(os.path.join(d, "gt", f"{k:03d}.png"), label, palette=palette_gt)
        save(os.path.join(d, "pred", f"{k:03d}.png"), pred)
    exp = {"note": note, "num_classes": n, "ignore_index": ignore_index,
           "reduce_zero_label": rzl, "palette_gt": palette_gt}
    exp.update(metrics(pairs, n, ignore_index, rzl))
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump(exp, fh, indent=1)
        fh.write("\n")
    print(name, {k: exp[k] for k in ("mIoU", "aAcc", "mAcc")})


def a(rows):
    return np.array(rows, dtype=np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    # ignored pixels: their predictions (including class 2, seen nowhere else) are dropped
    case("ignore", [(a([[0, 1, 2], [1, 1, 2]]), a([[0, 1, 255], [0, 1, 255]]))], 3,
         note="class 2 predicted only under ignored labels: IoU and Acc null")
    # a class only in the predictions: IoU 0 (counted in mIoU), Acc null
    case("pred_only_class", [(a([[0, 2, 2, 1]]), a([[0, 1, 1, 1]])),
                             (a([[1, 1], [0, 2]]), a([[1, 1], [0, 0]]))], 3,
         note="class 2 only predicted")
    # a class absent from both sides, and an image without any evaluated pixel
    case("absent_class", [(a([[0, 1], [1, 3]]), a([[0, 1], [3, 3]])),
                          (a([[4, 0]]), a([[255, 255]]))], 5,
         note="class 2 absent everywhere; class 4 only under ignore")
    # ADE20K's label shift: stored 0 is ignored, k is class k - 1
    case("reduce_zero_label", [(a([[0, 2, 2, 0], [1, 1, 1, 2]]), a([[1, 2, 3, 0], [0, 2, 1, 255]]))],
         3, rzl=True, note="stored labels 1..3 are classes 0..2")
    # a palette label map (the index is the class, never the colour)
    case("palette", [(a([[0, 1, 2], [2, 2, 1]]), a([[0, 1, 1], [2, 255, 1]]))], 3, palette_gt=True,
         note="GT stored as an 8-bit palette PNG")
    rng = np.random.default_rng(0)
    pairs = []
    for h, w in [(23, 37), (16, 16), (31, 9), (40, 52), (1, 7), (12, 33)]:
        label = rng.integers(0, 8, size=(h, w))
        label[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, 8, size=(h, w)))
        pred[label == 255] = rng.integers(0, 8, size=int((label == 255).sum()))
        pairs.append((pred, label))
    case("random", pairs, 8, note="seeded random maps, 10% ignore, 60% correct")
    pairs = []
    for h, w in [(20, 30), (17, 5), (33, 21)]:
        label = rng.integers(0, 13, size=(h, w))
        label[rng.random((h, w)) < 0.05] = 255
        pred = np.where(rng.random((h, w)) < 0.5, label - 1, rng.integers(0, 12, size=(h, w)))
        pred = np.clip(pred, 0, 11)
        pairs.append((pred, label))
    case("random_reduce_zero_label", pairs, 12, rzl=True, note="seeded random, reduce_zero_label")


if __name__ == "__main__":
    main()
