#!/usr/bin/env python3
"""Config fuzzing: random `--set` values (huge, negative, NaN, inf, odd types, deep nesting) on
many keys, each case run through `mimlab config show` and `mimlab pretrain --set
train.max_steps=1`; counts panics (exit code 101 or "panicked" on stderr).

    python3 scripts/fuzz_configs.py [--cases 300] [--seed 0] [--bin target/debug/mimlab]
        [--config configs/simmim/swinv2_nano_fmnist.yaml] [--no-train]

Runs go to a temporary run.output_dir; the panicking cases are printed with their command line.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile

KEYS = [
    "model.img_size", "model.patch_size", "model.in_chans", "model.num_classes",
    "model.embed_dim", "model.depths", "model.num_heads", "model.window_size",
    "model.mlp_ratio", "model.drop_rate", "model.drop_path_rate",
    "model.pretrained_window_sizes", "model.moe.num_experts", "model.moe.top_k",
    "model.moe.capacity_factor", "model.moe.blocks", "model.preset",
    "train.epochs", "train.batch_size", "train.base_lr", "train.warmup_lr", "train.min_lr",
    "train.warmup_epochs", "train.weight_decay", "train.betas", "train.eps", "train.clip_grad",
    "train.accum_steps", "train.lr_scale_batch", "train.milestones", "train.gamma",
    "train.schedule", "train.max_steps",
    "run.name", "run.seed", "run.threads", "run.log_every", "run.image_every",
    "run.keep_checkpoints", "run.checkpoint_every_steps", "run.device",
    "data.batch_size", "data.num_workers", "data.prefetch_batches", "data.root",
    "data.dataset", "simmim.mask_ratio", "simmim.mask_patch_size",
    "nope.key", "model", "train",
]

VALUES = [
    "0", "1", "-1", "2", "3", "7", "1e12", "-1e12", "1e39", "-0.0", ".nan", ".inf", "-.inf",
    "4294967296", "18446744073709551615", "18446744073709551616", "-9223372036854775808",
    "1000000", "0.5", "1.5", "true", "null", "~", "''", "abc", "'../..'", "[]", "[1]",
    "[0, 0]", "[1, 2, 3, 4, 5, 6, 7, 8]", "{}", "{a: 1}", "[[1]]", "'[' * 100", "x" * 300,
    "'\\u0000'", "64", "65", "1023", "cuda:9", "[-1]", "0x10", "1_000",
]


def value(rng):
    v = rng.choice(VALUES)
    if v == "'[' * 100":
        return "[" * rng.choice([10, 70, 5000])
    return v


def run(cmd, timeout):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return p.returncode, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bin", default="target/debug/mimlab")
    ap.add_argument("--config", default="configs/simmim/swinv2_nano_fmnist.yaml")
    ap.add_argument("--no-train", action="store_true", help="only `config show`")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = tempfile.mkdtemp(prefix="mimlab-fuzz-")
    runs, panics, timeouts = 0, [], 0
    for case in range(args.cases):
        sets = [f"{rng.choice(KEYS)}={value(rng)}" for _ in range(rng.randint(1, 3))]
        set_args = [a for s in sets for a in ("--set", s)]
        cmds = [[args.bin, "config", "show", "--config", args.config, *set_args]]
        if not args.no_train:
            cmds.append([args.bin, "pretrain", "--config", args.config, *set_args,
                         "--set", "train.max_steps=1", "--set", f"run.output_dir={out}",
                         "--set", "data.num_workers=0"])
        for cmd in cmds:
            runs += 1
            rc, err = run(cmd, args.timeout)
            if rc == "timeout":
                timeouts += 1
            elif rc == 101 or "panicked" in err:
                panics.append((cmd, err.strip().splitlines()[-3:]))
                print(f"PANIC case {case}: {' '.join(cmd)}\n  {err.strip()[-400:]}", flush=True)
    print(f"cases {args.cases}, commands {runs}, panics {len(panics)}, timeouts {timeouts}")
    sys.exit(1 if panics else 0)


if __name__ == "__main__":
    main()
