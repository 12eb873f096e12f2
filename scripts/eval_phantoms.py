#!/usr/bin/env python
"""Accuracy on fresh phantoms: draw a dataset with a seed, run the pipeline, evaluate.

    python scripts/eval_phantoms.py OUT_ROOT --seed 9001 --subjects 10 --weeks 0 4 12 [--stress]

Writes OUT_ROOT/bids, OUT_ROOT/truth, OUT_ROOT/out (pipeline) and OUT_ROOT/out/evaluation/ and
prints the evaluation summary. Seeds used during development: 0-999; use others for testing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--weeks", type=int, nargs="+", default=[0, 4, 12])
    ap.add_argument("--stress", action="store_true")
    ap.add_argument("--size", choices=["small", "full"], default="full")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--activity", type=float, default=1.0,
                    help="scale of the rate of new enhancing lesions (see lesionpipe phantoms)")
    args = ap.parse_args()

    from lesionpipe.cli import main as cli
    from lesionpipe.phantom import write_dataset

    bids, truth, out = args.root / "bids", args.root / "truth", args.root / "out"
    t0 = time.time()
    if not bids.exists():
        write_dataset(bids, truth, n_subjects=args.subjects, weeks=tuple(args.weeks),
                      seed=args.seed, stress=args.stress, size=args.size,
                      activity=args.activity)
    t1 = time.time()
    code = cli(["run", str(bids), str(out), "-w", str(args.root / "work"), "--nprocs",
                str(args.nprocs), "--no-reports"])
    t2 = time.time()
    cli(["evaluate", str(out), str(truth)])
    print(f"\nphantoms {t1 - t0:.0f} s, pipeline {t2 - t1:.0f} s (exit {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
