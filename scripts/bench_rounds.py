#!/usr/bin/env python3
"""Interleaved mimlab-vs-PyTorch rounds for `scripts/bench_compare.sh --rounds R` (R > 1).

Each row of `mimlab bench --list` (with the given filters) runs R times in both tools. A row's two
runs in a round come one right after the other, mimlab first in odd rounds and PyTorch first in
even ones, so that each ratio compares the tools in the same state of the machine. Prints, per
row, the median images/s of each tool over the rounds and the median and range of the per-round
ratios mimlab/PyTorch, and writes every round to OUT/rounds.json.

Not meant to be run directly (bench_compare.sh builds mimlab and installs torch first), but:
    python3 scripts/bench_rounds.py --bin target/release/mimlab --python .venv-bench/bin/python \\
        --threads 2 --rounds 3 --out target/bench -- --filter 'simmim img=64' --iters 5
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def split_args(rest):
    """(filters, other `bench` flags) of the arguments after `--`."""
    filters, other, i = [], [], 0
    while i < len(rest):
        a = rest[i]
        if a == "--filter" and i + 1 < len(rest):
            filters.append(rest[i + 1])
            i += 2
        elif a.startswith("--filter="):
            filters.append(a.split("=", 1)[1])
            i += 1
        else:
            other.append(a)
            i += 1
    return filters, other


def run_row(cmd, key, json_path):
    """Runs one tool on one row; returns that row of its JSON (the filter may match more rows)."""
    full = cmd + ["--filter", key, "--json", json_path]
    done = subprocess.run(full, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"bench_rounds: exit {done.returncode} from {' '.join(full)}")
    with open(json_path) as f:
        doc = json.load(f)
    for r in doc["rows"]:
        if f"{r['name']} img={r['img']} batch={r['batch']}" == key:
            return r, doc
    sys.exit(f"bench_rounds: {cmd[0]} wrote no row {key!r} to {json_path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True, help="the mimlab binary")
    p.add_argument("--python", required=True, help="the python with torch and timm")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for rounds.json")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then `mimlab bench` flags")
    a = p.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    filters, other = split_args(rest)
    fl = [x for f in filters for x in ("--filter", f)]
    listed = subprocess.run([a.bin, "bench", "--list"] + fl, check=True, capture_output=True,
                            text=True).stdout.split("\n")
    keys = [k.strip() for k in listed if k.strip()]
    if not keys:
        sys.exit(f"bench_rounds: the filters {filters} match no `mimlab bench` row")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_pytorch.py")
    tools = {
        "mimlab": [a.bin, "bench", "--threads", str(a.threads)] + other,
        "pytorch": [a.python, script, "--threads", str(a.threads)] + other,
    }
    runs = {k: {"mimlab": [], "pytorch": []} for k in keys}
    torch_version = ""
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, a.rounds + 1):
            order = ["mimlab", "pytorch"] if rnd % 2 else ["pytorch", "mimlab"]
            for key in keys:
                for tool in order:
                    row, doc = run_row(tools[tool], key, os.path.join(tmp, f"{tool}.json"))
                    torch_version = doc.get("torch", torch_version)
                    runs[key][tool].append(row)
                m, q = runs[key]["mimlab"][-1], runs[key]["pytorch"][-1]
                print(f"round {rnd}/{a.rounds}  {key:<48} mimlab {m['images_per_s']:8.1f}  "
                      f"pytorch {q['images_per_s']:8.1f}  ratio "
                      f"{m['images_per_s'] / q['images_per_s']:.2f}", file=sys.stderr, flush=True)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "rounds.json"), "w") as f:
        json.dump({"threads": a.threads, "rounds": a.rounds, "torch": torch_version,
                   "rows": runs}, f, indent=1)
    print(f"\nmimlab vs PyTorch {torch_version}, {a.threads} threads, {a.rounds} interleaved "
          f"rounds: median images/s, and the per-round ratio (> 1: mimlab faster)")
    print(f"{'row':<34} {'batch':>5} {'img':>4} {'mimlab':>9} {'pytorch':>9} {'ratio':>6} "
          f"{'range':>11} {'>=1':>5} {'MiB m/pt':>11}")
    for key in keys:
        ms, ps = runs[key]["mimlab"], runs[key]["pytorch"]
        ratios = [m["images_per_s"] / q["images_per_s"] for m, q in zip(ms, ps)]
        r0 = ms[0]
        peak = lambda rows: max(r["peak_rss_mib"] for r in rows)
        print(f"{r0['name']:<34} {r0['batch']:>5} {r0['img']:>4} "
              f"{statistics.median(r['images_per_s'] for r in ms):>9.1f} "
              f"{statistics.median(r['images_per_s'] for r in ps):>9.1f} "
              f"{statistics.median(ratios):>6.2f} {min(ratios):>5.2f}-{max(ratios):<5.2f} "
              f"{sum(r >= 1.0 for r in ratios):>2}/{len(ratios):<2} "
              f"{peak(ms):>5.0f}/{peak(ps):<5.0f}")


if __name__ == "__main__":
    main()
