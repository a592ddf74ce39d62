"""Writes the COCO box AP fixtures of tests/fixtures/coco/ from pycocotools 2.0.11 (the reference
of finetune/src/detect/coco_eval.rs, dense-tasks.md 2.1).

    python3 -m venv .venv-fix && .venv-fix/bin/pip install pycocotools==2.0.11 numpy
    .venv-fix/bin/python scripts/make_coco_fixtures.py

Per case: <case>.gt.json, <case>.dt.json and <case>.expected.json holding pycocotools' `stats`
(as floats and as the IEEE-754 bit patterns, so the Rust test can compare exactly whatever its JSON
float parser does) and the per-category AP `precision[:, :, k, 0, -1]` mean over entries > -1
(-1 when none). Inputs use short decimals, which every parser reads exactly.
"""
import contextlib
import copy
import io
import json
import os
import random
import struct
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "coco")


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def image(i, w=640, h=480):
    return {"id": i, "file_name": f"{i}.jpg", "width": w, "height": h}


def ann(i, img, cat, box, area=None, crowd=0, **extra):
    a = {"id": i, "image_id": img, "category_id": cat, "bbox": box,
         "area": box[2] * box[3] if area is None else area, "iscrowd": crowd}
    a.update(extra)
    return a


def det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": box, "score": score}


def run_pycocotools(gt, dt):
    """stats and per-category AP. An empty result list cannot go through loadRes (it reads
    anns[0] and raises IndexError), so it is evaluated on a result COCO built by hand."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dt:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dt))
        else:
            try:
                coco_gt.loadRes([])
                raise SystemExit("loadRes([]) no longer fails: update the note in coco_eval.rs")
            except IndexError:
                pass
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    prec = e.eval["precision"]
    per_class = []
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cid in enumerate(e.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        ap = float(np.mean(p)) if p.size else -1.0
        per_class.append({"id": int(cid), "name": names[cid], "AP": ap, "AP_bits": bits(ap)})
    stats = [float(s) for s in e.stats]
    return stats, per_class


def case_crowd():
    """Crowd GTs: matched by several detections, IoU = intersection / detection area, never TP."""
    gt = {"images": [image(1), image(2)], "categories": [{"id": 1, "name": "person"}],
          "annotations": [
              ann(1, 1, 1, [0, 0, 200, 200], crowd=1),
              ann(2, 1, 1, [300, 300, 50, 60]),
              ann(3, 1, 1, [250, 10, 40, 40]),
              ann(4, 2, 1, [10, 10, 100, 100]),
              ann(5, 2, 1, [0, 0, 400, 400], crowd=1),
              ann(6, 2, 1, [150, 150, 60, 60]),
          ]}
    dt = [
        det(1, 1, [10, 10, 50, 50], 0.95),    # inside the crowd: IoU 1 with it, ignored
        det(1, 1, [100, 100, 50, 50], 0.9),   # inside the crowd again: matched repeatedly
        det(1, 1, [150, 150, 100, 100], 0.85),  # half in the crowd: crowd IoU 0.25
        det(1, 1, [302, 301, 50, 58], 0.8),   # on GT 2
        det(1, 1, [255, 12, 40, 40], 0.6),    # on GT 3, IoU ~0.70
        det(2, 1, [12, 8, 100, 100], 0.9),    # on GT 4 (also inside crowd 5: regular match wins)
        det(2, 1, [14, 12, 100, 100], 0.88),  # second on GT 4: falls to the crowd, ignored
        det(2, 1, [150, 160, 60, 50], 0.7),   # on GT 6
        det(2, 1, [500, 400, 30, 30], 0.5),   # outside everything: FP
    ]
    return gt, dt


def case_area_ranges():
    """GT areas and detection w*h exactly on 32^2 and 96^2 (ranges are closed), and a GT whose
    `area` field differs from its box (the field decides)."""
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    gt = {"images": [image(1), image(2), image(3)], "categories": cats, "annotations": [
        ann(1, 1, 1, [0, 0, 32, 32]),                 # 1024: small and medium
        ann(2, 1, 1, [100, 0, 96, 96]),               # 9216: medium and large
        ann(3, 1, 1, [300, 0, 31.9, 32]),             # just small
        ann(4, 1, 1, [0, 200, 32.1, 32]),             # just medium
        ann(5, 1, 1, [200, 200, 96.1, 96]),           # just large
        ann(6, 2, 1, [0, 0, 200, 200], area=500),     # big box, small area field
        ann(7, 2, 2, [0, 0, 20, 20], area=20000),     # small box, large area field
        ann(8, 3, 2, [10, 10, 50, 50]),
        ann(9, 3, 2, [100, 100, 120, 120]),
    ]}
    dt = [
        det(1, 1, [1, 0, 32, 32], 0.9),
        det(1, 1, [100, 1, 96, 96], 0.8),
        det(1, 1, [300, 0, 31.9, 32], 0.7),
        det(1, 1, [0, 201, 32.1, 32], 0.6),
        det(1, 1, [201, 200, 96.1, 96], 0.5),
        det(1, 1, [500, 0, 32, 32], 0.85),     # FP, w*h exactly 1024
        det(1, 1, [500, 300, 96, 96], 0.75),   # FP, w*h exactly 9216
        det(1, 1, [400, 400, 10, 10], 0.65),   # FP, small
        det(2, 1, [0, 0, 200, 200], 0.9),
        det(2, 2, [0, 0, 20, 20], 0.4),
        det(3, 2, [12, 10, 50, 50], 0.9),
        det(3, 2, [100, 110, 120, 120], 0.3),
        det(3, 2, [300, 300, 40, 20], 0.95),   # FP, medium (800 < 1024: small)
    ]
    return gt, dt


def case_max_dets():
    """150 detections on one image and category (cut to 100 per image AND category), and maxDets
    1/10 over several images."""
    rng = random.Random(11)
    gt = {"images": [image(1, 1200, 1200), image(2)],
          "categories": [{"id": 3, "name": "car"}, {"id": 4, "name": "bus"}], "annotations": []}
    aid = 1
    boxes = []
    for r in range(11):
        for c in range(11):
            b = [c * 100 + 5, r * 100 + 5, 60, 50]
            boxes.append(b)
            gt["annotations"].append(ann(aid, 1, 3, b)); aid += 1
    gt["annotations"].append(ann(aid, 1, 4, [10, 10, 300, 300])); aid += 1
    for i in range(4):
        gt["annotations"].append(ann(aid, 2, 3, [i * 120, 30, 80, 90])); aid += 1
    dt = []
    for i in range(150):
        b = boxes[i % len(boxes)]
        jit = [round(b[0] + rng.uniform(-8, 8), 2), round(b[1] + rng.uniform(-8, 8), 2), b[2], b[3]]
        dt.append(det(1, 3, jit, round(rng.uniform(0.05, 0.99), 4)))
    for i in range(12):
        dt.append(det(1, 4, [10 + i * 3, 10, 300, 300], round(0.9 - i * 0.05, 4)))
    for i in range(4):
        dt.append(det(2, 3, [i * 120 + 2, 32, 80, 90], 0.5 + i * 0.1))
    return gt, dt


def case_score_ties():
    """Equal scores within an image (file order decides who matches) and across images (ascending
    image id decides the order of the precision curve)."""
    gt = {"images": [image(9), image(2), image(5)], "categories": [{"id": 1, "name": "x"}],
          "annotations": [
              ann(1, 9, 1, [0, 0, 50, 50]),
              ann(2, 2, 1, [0, 0, 50, 50]),
              ann(3, 5, 1, [100, 100, 40, 40]),
              ann(4, 5, 1, [0, 0, 40, 40]),
          ]}
    dt = [
        det(9, 1, [200, 200, 50, 50], 0.5),   # FP
        det(9, 1, [0, 0, 50, 50], 0.5),       # TP, same score, later in the file
        det(2, 1, [0, 0, 50, 50], 0.5),       # TP
        det(2, 1, [2, 2, 50, 50], 0.5),       # duplicate: FP
        det(5, 1, [100, 100, 40, 40], 0.7),
        det(5, 1, [300, 0, 40, 40], 0.7),     # FP
        det(5, 1, [1, 1, 40, 40], 0.5),
    ]
    return gt, dt


def case_empty_and_missing():
    """An image with GT and no detection at all (4), a category without GT (its detections are
    FPs of nobody: per-class -1), a category with GT and no detection (AP 0), an image with
    neither (3)."""
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "no_gt"}, {"id": 3, "name": "no_dt"}]
    gt = {"images": [image(1), image(2), image(3), image(4)], "categories": cats, "annotations": [
        ann(1, 1, 1, [0, 0, 100, 100]),
        ann(2, 2, 1, [10, 10, 30, 30]),
        ann(3, 2, 3, [50, 50, 60, 60]),
        ann(4, 4, 1, [20, 20, 40, 40]),
    ]}
    dt = [
        det(1, 1, [5, 0, 100, 100], 0.9),
        det(1, 2, [0, 0, 10, 10], 0.8),
        det(2, 2, [0, 0, 100, 100], 0.7),
    ]
    return gt, dt


def case_empty_results():
    """The whole result list empty (pycocotools' loadRes([]) raises IndexError)."""
    gt, _ = case_empty_and_missing()
    return gt, []


def case_ignore_field():
    """The GT `ignore` field has no effect (pycocotools overwrites it with iscrowd); iscrowd does."""
    gt = {"images": [image(1)], "categories": [{"id": 1, "name": "a"}], "annotations": [
        ann(1, 1, 1, [0, 0, 50, 50], ignore=1),            # regular despite ignore=1
        ann(2, 1, 1, [100, 0, 50, 50], crowd=1, ignore=0),  # crowd despite ignore=0
        ann(3, 1, 1, [200, 0, 50, 50], ignore=0),
    ]}
    dt = [
        det(1, 1, [0, 0, 50, 50], 0.9),
        det(1, 1, [100, 0, 50, 50], 0.8),
        det(1, 1, [400, 0, 50, 50], 0.7),
    ]
    return gt, dt


def case_gt_id_zero():
    """A GT with annotation id 0: pycocotools stores the matched GT id and tests it against 0, so a
    detection matched to it counts as unmatched (FP) while the GT is used up."""
    gt = {"images": [image(1)], "categories": [{"id": 1, "name": "a"}], "annotations": [
        ann(0, 1, 1, [0, 0, 50, 50]),
        ann(1, 1, 1, [100, 0, 50, 50]),
    ]}
    dt = [
        det(1, 1, [0, 0, 50, 50], 0.9),
        det(1, 1, [2, 0, 50, 50], 0.85),
        det(1, 1, [100, 0, 50, 50], 0.8),
    ]
    return gt, dt


def case_non_contiguous():
    """Category ids 90, 5, 17 (file order), image ids out of order."""
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"},
            {"id": 17, "name": "cat"}]
    gt = {"images": [image(42), image(7), image(100)], "categories": cats, "annotations": [
        ann(10, 42, 90, [0, 0, 20, 20]),
        ann(11, 7, 5, [0, 0, 200, 100]),
        ann(12, 100, 17, [30, 30, 60, 60]),
        ann(13, 100, 5, [300, 300, 100, 100]),
    ]}
    dt = [
        det(42, 90, [1, 1, 20, 20], 0.3),
        det(7, 5, [0, 5, 200, 100], 0.6),
        det(100, 5, [310, 300, 100, 100], 0.9),
        det(100, 17, [30, 40, 60, 60], 0.8),
        det(100, 90, [0, 0, 5, 5], 0.2),
    ]
    return gt, dt


def case_random():
    """Seeded: 8 images, 4 categories, ~350 GTs of every size (some crowd), ~500 detections
    (jittered GTs and false positives), scores on 2 decimals so ties happen."""
    rng = random.Random(2026)
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 8, 11)]
    gt = {"images": [], "categories": cats, "annotations": []}
    dt = []
    aid = 1
    for img in range(1, 9):
        gt["images"].append(image(img * 3, 800, 600))
        for _ in range(rng.randint(25, 60)):
            cat = rng.choice(cats)["id"]
            s = rng.choice([8, 20, 31, 40, 80, 100, 150, 250])
            w = round(s * rng.uniform(0.6, 1.4), 1)
            h = round(s * rng.uniform(0.6, 1.4), 1)
            x = round(rng.uniform(0, 800 - w), 1)
            y = round(rng.uniform(0, 600 - h), 1)
            crowd = 1 if rng.random() < 0.05 else 0
            area = round(w * h * rng.uniform(0.5, 1.0), 2)
            gt["annotations"].append(ann(aid, img * 3, cat, [x, y, w, h], area=area, crowd=crowd))
            aid += 1
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                j = 0.25 * max(w, h)
                dt.append(det(img * 3, cat if rng.random() < 0.9 else rng.choice(cats)["id"],
                              [round(x + rng.uniform(-j, j), 1), round(y + rng.uniform(-j, j), 1),
                               round(w * rng.uniform(0.8, 1.2), 1),
                               round(h * rng.uniform(0.8, 1.2), 1)],
                              round(rng.uniform(0, 1), 2)))
        for _ in range(rng.randint(5, 20)):
            w, h = round(rng.uniform(5, 200), 1), round(rng.uniform(5, 200), 1)
            dt.append(det(img * 3, rng.choice(cats)["id"],
                          [round(rng.uniform(0, 600), 1), round(rng.uniform(0, 400), 1), w, h],
                          round(rng.uniform(0, 0.6), 2)))
    rng.shuffle(dt)
    return gt, dt


CASES = {
    "crowd": case_crowd,
    "area_ranges": case_area_ranges,
    "max_dets": case_max_dets,
    "score_ties": case_score_ties,
    "empty_and_missing": case_empty_and_missing,
    "empty_results": case_empty_results,
    "ignore_field": case_ignore_field,
    "gt_id_zero": case_gt_id_zero,
    "non_contiguous": case_non_contiguous,
    "random": case_random,
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, make in CASES.items():
        gt, dt = make()
        stats, per_class = run_pycocotools(gt, dt)
        with open(os.path.join(OUT, f"{name}.gt.json"), "w") as f:
            json.dump(gt, f)
        with open(os.path.join(OUT, f"{name}.dt.json"), "w") as f:
            json.dump(dt, f)
        expected = {"case": name, "about": " ".join(make.__doc__.split()),
                    "pycocotools": "2.0.11", "numpy": np.__version__,
                    "stats": stats, "stats_bits": [bits(s) for s in stats],
                    "per_class": per_class}
        with open(os.path.join(OUT, f"{name}.expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(f"{name:18s} gt {len(gt['annotations']):4d} dt {len(dt):4d} "
              + " ".join(f"{s:.4f}" for s in stats))


if __name__ == "__main__":
    sys.exit(main())
