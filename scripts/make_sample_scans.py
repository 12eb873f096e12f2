#!/usr/bin/env python
"""Regenerate ``sample_scans/``: a small synthetic BIDS trial with its ground truth.

Three subjects x three visits (weeks 0, 4, 12), 'small' field of view, a mix of 1 mm 3-D and
1x1x3 mm 2-D grids, post-only visits, int16 storage. The ground truth is written to
``sample_scans/derivatives/truth/`` (BIDS readers skip ``derivatives/``). Fixed seed: running it
again gives the same files.

    python scripts/make_sample_scans.py [--out sample_scans]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from lesionpipe.phantom import write_dataset

SEED = 9
#: (subject index, visit index) -> design forced for that visit
OVERRIDES = {
    (0, 0): {"grid": "3d", "has_pre": True, "pre_grid": "2d", "pre_thickness": 3.0},
    (0, 1): {"grid": "2d", "has_pre": True, "pre_grid": "2d", "thickness": 3.0, "pre_thickness": 3.0},
    (0, 2): {"grid": "3d", "has_pre": False},
    (1, 0): {"grid": "2d", "has_pre": True, "pre_grid": "2d", "thickness": 3.0, "pre_thickness": 3.0},
    (1, 1): {"grid": "3d", "has_pre": True, "pre_grid": "2d", "pre_thickness": 3.0},
    (1, 2): {"grid": "2d", "has_pre": False, "thickness": 3.0},
    (2, 0): {"grid": "2d", "has_pre": True, "pre_grid": "2d", "thickness": 3.0, "pre_thickness": 3.0},
    (2, 1): {"grid": "2d", "has_pre": True, "pre_grid": "2d", "thickness": 3.0, "pre_thickness": 3.0},
    (2, 2): {"grid": "2d", "has_pre": True, "pre_grid": "2d", "thickness": 3.0, "pre_thickness": 3.0},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_scans")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    seed = args.seed
    if args.out.exists():
        shutil.rmtree(args.out)
    summary = write_dataset(args.out, args.out / "derivatives" / "truth", n_subjects=3, weeks=(0, 4, 12),
                            seed=seed, size="small", storage="int16", overrides=OVERRIDES,
                            gain_range=(25.0, 50.0), progress=print)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{summary['n_visits']} visits, {summary['total_gels']} GELs, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
