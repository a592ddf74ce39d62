#!/usr/bin/env python3
"""Executes a notebook headless with nbclient; exits non-zero when a cell raises.

    .venv-notebook/bin/python scripts/run_notebook.py NOTEBOOK OUT [--timeout S] [--require-clean]

Run it with the Python of scripts/setup-notebook.sh's venv: the kernel is that venv's "python3"
kernelspec (installed there by `ipykernel install --sys-prefix`, and put first on JUPYTER_PATH here
so that a user-wide "python3" kernel cannot take its place). Cells run in NOTEBOOK's folder and see
this process's environment (MIMLAB_RUNS, made absolute from the current folder; MPLBACKEND). The executed notebook is written to OUT
even when a cell raises; the error (the cell's source and traceback) goes to stderr.
--require-clean first checks that NOTEBOOK has no stored outputs or execution counts.
Exit status: 0 ran, 1 a cell raised, 2 bad arguments or an unclean notebook.
"""
import argparse
import os
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook")
    ap.add_argument("out")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--require-clean", action="store_true",
                    help="fail when the notebook stores outputs or execution counts")
    args = ap.parse_args()

    # this interpreter's kernelspec before any user-wide one
    share = os.path.join(sys.prefix, "share", "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in [share, os.environ.get("JUPYTER_PATH", "")] if p)
    # a relative MIMLAB_RUNS means from where this was started, not from the notebook's folder
    if os.environ.get("MIMLAB_RUNS"):
        os.environ["MIMLAB_RUNS"] = os.path.abspath(os.environ["MIMLAB_RUNS"])
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(args.notebook, as_version=4)
    if args.require_clean:
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        if dirty:
            print(f"run_notebook: {args.notebook}: code cells {dirty} store outputs or execution "
                  "counts: clear them before committing", file=sys.stderr)
            return 2
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}},
    )
    status = 0
    try:
        client.execute()
    except CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython's coloured traceback
        print(f"run_notebook: {args.notebook}: a cell raised:\n{plain}", file=sys.stderr)
        status = 1
    finally:
        nbformat.write(nb, args.out)
    ran = sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count"))
    print(f"run_notebook: {args.notebook}: {ran} code cells ran; executed notebook: {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
