#!/usr/bin/env python
"""Power of the primary analysis against the true rate ratio, by simulation, for several trial
sizes (in the spirit of Sormani's sample-size tables for GEL endpoints). Prints a table; with
--png also draws the curves.

    python scripts/power_curve.py --trials 500 --n 72 144 288 --png power_curve.png
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

from lesionpipe.settings import AnalysisSettings
from lesionpipe.stats.power import simulation_study


def _run(job):
    n, rr, args = job
    s = simulation_study(AnalysisSettings(), n_trials=args.trials, seed=args.seed + n,
                         rate_ratio=rr, n=n, baseline_rate=args.baseline_rate,
                         dispersion=args.dispersion, missing_rate=args.missing_rate)
    return n, rr, s.power


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--n", type=int, nargs="+", default=[72, 144, 288])
    ap.add_argument("--rate-ratios", type=float, nargs="+",
                    default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--baseline-rate", type=float, default=1.0)
    ap.add_argument("--dispersion", type=float, default=2.0)
    ap.add_argument("--missing-rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--png", default=None, help="write the power curves to this PNG")
    args = ap.parse_args()
    t0 = time.perf_counter()
    jobs = [(n, rr, args) for n in args.n for rr in args.rate_ratios]
    with ProcessPoolExecutor(args.processes) as ex:
        res = {(n, rr): p for n, rr, p in ex.map(_run, jobs)}
    print(f"power of the primary NB2 analysis (two-sided Wald test at 0.05), {args.trials} "
          f"simulated trials per cell; baseline rate {args.baseline_rate} GELs/scan, dispersion "
          f"alpha={args.dispersion}, missing-visit rate {args.missing_rate}, 1:1 allocation")
    print(f"{'true RR':>8} " + " ".join(f"{'n=' + str(n):>8}" for n in args.n))
    for rr in args.rate_ratios:
        print(f"{rr:>8.2f} " + " ".join(f"{res[(n, rr)]:>8.3f}" for n in args.n))
    print(f"elapsed {time.perf_counter() - t0:.1f} s")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
        for n in args.n:
            ax.plot(args.rate_ratios, [res[(n, rr)] for rr in args.rate_ratios], marker="o",
                    label=f"n = {n}")
        ax.axhline(0.8, color="grey", ls="--", lw=1)
        ax.axhline(0.05, color="grey", ls=":", lw=1)
        ax.set_xlabel("true rate ratio (active vs placebo)")
        ax.set_ylabel("power (P[p < 0.05])")
        ax.set_title(f"Primary analysis power, {args.trials} simulated trials per point")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
