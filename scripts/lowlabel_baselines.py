#!/usr/bin/env python3
"""Classical baselines on raw Fashion-MNIST pixels at the low-label experiment's label counts.

What a reader checks a from-scratch network against (EXPERIMENTS.md, low-label section): with the
same number of labels (60 or 600 per class, class-balanced), how well do a linear model, an
RBF-kernel SVM and a k-NN on the 784 raw pixels do on the 10,000 test images? The Zalando
benchmark (github.com/zalandoresearch/fashion-mnist, "Benchmark") reports these models with all
60,000 labels (LogisticRegression ~84%, SVC C=10 rbf 89.7%, KNeighbors ~85.5%).

Subsets: per class, a seeded shuffle keeps the first 60 (1%) or 600 (10%), seeds 0, 1, 2 (numpy;
not the same images as mimlab's `data.label_seed` subsets, the same sizes and balance).

    bash scripts/lowlabel_baselines.sh      # makes the venv, runs this, writes the JSON
    python scripts/lowlabel_baselines.py --data data/fashion-mnist --out runs/lowlabel/baselines.json
"""
import argparse
import gzip
import json
import os
import statistics
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC


def idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def balanced(labels, per_class, seed):
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(members)[:per_class])
    return np.sort(np.array(keep))


MODELS = {
    # sklearn defaults except where the Zalando benchmark's best setting is known (SVC C=10).
    "logistic regression": lambda: LogisticRegression(C=1.0, max_iter=2000),
    "SVM, RBF kernel (C=10)": lambda: SVC(C=10.0, kernel="rbf", gamma="scale"),
    "k-NN (k=5, distance-weighted)": lambda: KNeighborsClassifier(5, weights="distance"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--out", default="runs/lowlabel/baselines.json")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    d = args.data
    xtr = idx(f"{d}/train-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    ytr = idx(f"{d}/train-labels-idx1-ubyte.gz")
    xte = idx(f"{d}/t10k-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    yte = idx(f"{d}/t10k-labels-idx1-ubyte.gz")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for frac, per_class in ((0.01, 60), (0.1, 600)):
        for name, make in MODELS.items():
            accs = []
            t0 = time.time()
            for seed in seeds:
                sub = balanced(ytr, per_class, seed)
                model = make().fit(xtr[sub], ytr[sub])
                accs.append(100.0 * float((model.predict(xte) == yte).mean()))
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(
                {
                    "label_fraction": frac,
                    "labels": per_class * 10,
                    "model": name,
                    "top1": accs,
                    "mean": statistics.mean(accs),
                    "sd": sd,
                    "seconds": time.time() - t0,
                }
            )
            print(f"| {per_class * 10} | {name} | {statistics.mean(accs):.2f} ± {sd:.2f} |", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"seeds": seeds, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
