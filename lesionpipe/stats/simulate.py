"""Draw MESEMS-like two-arm crossover trials of per-visit GEL counts.

Each patient has a gamma-distributed activity level ``u`` (mean 1, variance ``dispersion``);
given ``u`` the count at each visit is Poisson with mean ``baseline_rate * u``, multiplied by
``rate_ratio`` at visits on active treatment and by ``period_ratio`` in period 2. The total over
any set of visits is therefore negative-binomial (NB2) with dispersion ``alpha = dispersion``.
The active arm ("MSC-first") is on active treatment in period 1 and on placebo in period 2; the
reference arm the reverse. Visits fail at random with probability ``missing_rate`` (written as
``status = failed`` rows with an empty count, as the image pipeline does).

>>> counts, design = simulate_trial(n=10, seed=1)
>>> sorted(design['arm'].value_counts().items())
[('MSC-first', 5), ('placebo-first', 5)]
>>> len(counts) == 10 * 7, set(counts['status']) <= {'ok', 'failed'}
(True, True)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_ARMS = ("MSC-first", "placebo-first")


def simulate_trial(*, n: int = 144, active_fraction: float = 0.5,
                   arms: tuple[str, str] = DEFAULT_ARMS, baseline_week: int = 0,
                   period1_weeks: tuple[int, ...] = (4, 12, 24),
                   period2_weeks: tuple[int, ...] = (28, 36, 48), baseline_rate: float = 1.0,
                   dispersion: float = 2.0, rate_ratio: float = 1.0, period_ratio: float = 1.0,
                   missing_rate: float = 0.05, sites: int = 3,
                   seed: int | None = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (counts table in the gel_counts.tsv layout, design table).

    ``arms`` is (active-first label, reference label); ``active_fraction`` of the ``n`` patients
    (rounded) are allocated to the active-first arm, in random order.
    """
    if n < 2:
        raise ValueError("n must be at least 2")
    if not 0 < active_fraction < 1:
        raise ValueError("active_fraction must be between 0 and 1")
    if baseline_rate <= 0 or rate_ratio <= 0 or period_ratio <= 0:
        raise ValueError("baseline_rate, rate_ratio and period_ratio must be positive")
    if dispersion < 0:
        raise ValueError("dispersion must be >= 0")
    if not 0 <= missing_rate < 1:
        raise ValueError("missing_rate must be in [0, 1)")
    if arms[0] == arms[1]:
        raise ValueError("the two arm labels must differ")
    rng = np.random.default_rng(seed)
    n_active = int(round(n * active_fraction))
    n_active = min(max(n_active, 1), n - 1)
    active_first = rng.permutation(np.r_[np.ones(n_active, bool), np.zeros(n - n_active, bool)])
    if dispersion > 0:
        u = rng.gamma(1.0 / dispersion, dispersion, size=n)
    else:
        u = np.ones(n)
    weeks = [baseline_week, *period1_weeks, *period2_weeks]
    period = np.array([0] + [1] * len(period1_weeks) + [2] * len(period2_weeks))
    on_active = (period[None, :] == 1) & active_first[:, None] | \
                (period[None, :] == 2) & ~active_first[:, None]
    mean = (baseline_rate * u[:, None] * np.where(on_active, rate_ratio, 1.0)
            * np.where(period[None, :] == 2, period_ratio, 1.0))
    y = rng.poisson(mean)
    failed = rng.random(y.shape) < missing_rate
    width = max(2, len(str(n)))
    pids = [f"sub-{i + 1:0{width}d}" for i in range(n)]
    rows = []
    for i, pid in enumerate(pids):
        for j, week in enumerate(weeks):
            ses = f"ses-w{week:02d}"
            if failed[i, j]:
                rows.append((pid, ses, week, "n/a", "n/a", 1, "failed", "simulated missing visit"))
            else:
                vol = float(np.sum(rng.lognormal(np.log(60.0), 0.8, size=y[i, j])))
                rows.append((pid, ses, week, int(y[i, j]), round(vol, 1), 1, "ok", ""))
    counts = pd.DataFrame(rows, columns=["participant_id", "session_id", "week", "gel_count",
                                         "gel_volume_mm3", "has_pre", "status", "error"])
    design = pd.DataFrame({"participant_id": pids,
                           "arm": np.where(active_first, arms[0], arms[1]),
                           "site": [f"site{k + 1}" for k in rng.integers(0, max(sites, 1), n)]})
    return counts, design


def write_trial(out_dir: str | Path, counts: pd.DataFrame,
                design: pd.DataFrame) -> tuple[Path, Path]:
    """Write gel_counts.tsv and design.tsv into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, d = out_dir / "gel_counts.tsv", out_dir / "design.tsv"
    counts.to_csv(c, sep="\t", index=False)
    design.to_csv(d, sep="\t", index=False)
    return c, d


def counts_for_analysis(counts: pd.DataFrame) -> pd.DataFrame:
    """The validated-table layout (:func:`lesionpipe.stats.data.read_counts`) of a simulated
    counts table, without a round trip through a file."""
    g = pd.to_numeric(counts["gel_count"].where(counts["status"] == "ok"), errors="coerce")
    return pd.DataFrame({"participant_id": counts["participant_id"],
                         "session_id": counts["session_id"], "week": counts["week"].astype(int),
                         "gel_count": g.astype(float)})
