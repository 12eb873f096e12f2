#!/usr/bin/env python
"""Benchmark: seconds and peak memory for one 1 mm 3-D visit (pre + post) through the workflow.

Draws a full-size phantom visit (about 230 x 230 x 180 voxels) with a fixed seed, runs the real
Nipype workflow with the Linear plugin on one thread, and prints wall time, CPU time and the peak
resident memory of the process. Usage::

    python scripts/bench_visit.py [--seed 7] [--repeat 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(var, "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the data and outputs here")
    ap.add_argument("--post-only", action="store_true")
    args = ap.parse_args()

    import nibabel as nb

    from lesionpipe.bids import find_visits
    from lesionpipe.phantom import write_dataset
    from lesionpipe.runner import run_batch
    from lesionpipe.settings import Settings

    root = args.keep or Path(tempfile.mkdtemp(prefix="lesionpipe_bench_"))
    bids, truth = root / "bids", root / "truth"
    if not bids.exists():
        write_dataset(bids, truth, n_subjects=1, weeks=(4,), seed=args.seed, size="full",
                      p_post_only=1.0 if args.post_only else 0.0, p_2d=0.0)
    visit = find_visits(bids)[0]
    shape = nb.load(visit.post).shape
    print(f"visit: {visit.prefix}  grid {shape} "
          f"{'post-only' if visit.pre is None else 'pre + post'}")
    times = []
    for r in range(args.repeat):
        work = root / f"work{r}"
        shutil.rmtree(work, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_batch([visit], bids_dir=bids, output_dir=root / f"out{r}", work_dir=work,
                        settings=Settings(), nprocs=1, omp_nthreads=1, plugin="Linear",
                        echo=lambda *a: None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        times.append(wall)
        status = res.table.iloc[0]
        print(f"run {r + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU, status {status.status}, "
              f"{status.gel_count} GEL")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"seconds per visit (median of {len(times)}): {sorted(times)[len(times) // 2]:.1f}")
    print(f"peak memory (max RSS of the process): {peak_mb:.0f} MB")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
