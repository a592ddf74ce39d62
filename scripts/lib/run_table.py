"""What the experiment scripts' result tables read from a run folder, written once:
wall minutes, steps x batch, and mean ± sample standard deviation over seeds."""
import json
import os
import statistics


def train_losses(run):
    """{step: loss} of the train rows a run folder's metrics.jsonl logged."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def eval_rows(run):
    """The eval rows a run folder's metrics.jsonl logged, in order."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("split") == "eval"]


def minutes(run):
    """Wall minutes of the command (each resumed part added): training, evaluations, report."""
    p = os.path.join(run, "wall_s")
    if not os.path.exists(p):
        return float("nan")
    return sum(int(x) for x in open(p).read().split()) / 60


def ms(xs, digits=3):
    """Mean ± sample standard deviation of `xs` (the value alone for one, "-" for none)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def steps(run):
    """Training steps x batch of the run (its last train row and its config)."""
    last = 0
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("split") == "train":
            last = max(last, r["step"])
    batch = None
    for line in open(os.path.join(run, "config.yaml")):
        if line.strip().startswith("batch_size:"):
            batch = int(line.split(":")[1])
            break
    return f"{last} x {batch}"
