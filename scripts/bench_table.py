#!/usr/bin/env python3
"""mimlab vs PyTorch, one line per row both measured: images/s of each, the ratio mimlab/PyTorch
(> 1: mimlab faster) and peak memory (resident set on the CPU; device memory on a GPU, where the
JSON rows carry `peak_device_mib`).

Usage: python3 scripts/bench_table.py MIMLAB.json PYTORCH.json
(the JSON files of `mimlab bench --json` and `scripts/bench_pytorch.py --json`; used by
scripts/bench_compare.sh and scripts/cuda_check.sh).
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    m, p = (json.load(open(f)) for f in sys.argv[1:3])
    key = lambda r: (r["name"], r["img"], r["batch"])
    pt = {key(r): r for r in p["rows"]}
    gpu = any("peak_device_mib" in r for r in m["rows"])
    mem, unit = ("peak_device_mib", "GPU MiB m/pt") if gpu else ("peak_rss_mib", "MiB m/pt")
    device = m.get("device", "cpu")
    print(f"\nmimlab vs PyTorch {p.get('torch', '')} on {device}, {m['threads']} CPU threads, "
          f"images/s (ratio > 1: mimlab faster)")
    print(f"{'row':<34} {'batch':>5} {'img':>4} {'mimlab':>9} {'pytorch':>9} {'ratio':>6} {unit:>13}")
    for r in m["rows"]:
        q = pt.get(key(r))
        if q is None:
            continue
        print(f"{r['name']:<34} {r['batch']:>5} {r['img']:>4} {r['images_per_s']:>9.1f} "
              f"{q['images_per_s']:>9.1f} {r['images_per_s'] / q['images_per_s']:>6.2f} "
              f"{r.get(mem, float('nan')):>6.0f}/{q.get(mem, float('nan')):<6.0f}")


if __name__ == "__main__":
    main()
