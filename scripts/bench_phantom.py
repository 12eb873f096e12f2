#!/usr/bin/env python
"""Time the phantom generator: one subject's anatomy, then one visit (pre + post + truth).

    python scripts/bench_phantom.py [--size full|small] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from lesionpipe import phantom as P


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    for rep in range(args.repeat):
        rng = np.random.default_rng(rep)
        t0 = time.perf_counter()
        anat = P.make_anatomy(rng, size=args.size)
        t1 = time.perf_counter()
        lesions = P.plan_lesions(rng, anat, [0], stress=True, pair_dirs=[np.array([1.0, 0, 0])])
        pre_vol, post_vol = P.visit_volumes(anat, lesions, 0)
        for grid in ("3d", "2d"):
            t2 = time.perf_counter()
            pose = P.draw_pose(rng, 4, 6)
            post = P.draw_acquisition(rng, size=args.size, stress=False, grid=grid, pose=pose)
            pre = P.draw_acquisition(rng, size=args.size, stress=False, grid=grid,
                                     pose=P.draw_pose(rng, 5, 6, base=pose))
            img_post = P.finish_scan(rng, P.sample(post_vol, anat.grid.origin, post), post)
            img_pre = P.finish_scan(rng, P.sample(pre_vol, anat.grid.origin, pre), pre)
            labels, rows = P.truth_labels(anat, lesions, 0, post)
            mim = P.mimic_labels(anat, lesions, 0, post)
            t3 = time.perf_counter()
            print(f"{args.size} run {rep}: anatomy {t1 - t0:.1f} s; {grid} visit (pre+post+truth, "
                  f"{post.shape}) {t3 - t2:.1f} s; {len(rows)} GELs; "
                  f"finite={bool(np.isfinite(img_post).all() and np.isfinite(img_pre).all())}; "
                  f"mimic voxels {int((mim > 0).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
