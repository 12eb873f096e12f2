"""Operating characteristics of the primary analysis by simulation: bias, CI coverage, power.

Each simulated trial goes through the same functions as ``lesionpipe analyze``
(:func:`lesionpipe.stats.data.patient_table` and
:func:`lesionpipe.stats.efficacy.primary_analysis`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lesionpipe.stats.data import patient_table
from lesionpipe.stats.efficacy import primary_analysis, windows_from
from lesionpipe.stats.nb import ModelError
from lesionpipe.stats.simulate import DEFAULT_ARMS, counts_for_analysis, simulate_trial


@dataclass
class SimulationSummary:
    true_rate_ratio: float
    n_trials: int
    n_failed: int
    mean_log_rr: float
    bias_log_rr: float
    median_rr: float
    coverage: float
    coverage_mc_se: float
    power: float
    power_lr: float
    mean_alpha: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def one_trial(settings, seed: int, **sim) -> dict:
    """Simulate one trial and run the primary analysis on it."""
    counts, design = simulate_trial(seed=seed, period1_weeks=tuple(settings.period1_weeks),
                                    period2_weeks=tuple(settings.period2_weeks),
                                    baseline_week=settings.baseline_week, **sim)
    arms = sim.get("arms", DEFAULT_ARMS)
    design = design.set_index("participant_id")
    pt = patient_table(counts_for_analysis(counts), design, windows_from(settings), arms[1],
                       arms[0])
    primary, _, _ = primary_analysis(pt, design, settings, arms[1], arms[0])
    return {"log_rr": primary["log_rate_ratio"], "se": primary["se_log_rate_ratio"],
            "ci": primary["ci95"], "p": primary["p_value"], "p_lr": primary["p_value_lr"],
            "alpha": primary["dispersion"]["alpha"]}


def simulation_study(settings, *, n_trials: int, seed: int = 0, rate_ratio: float = 1.0,
                     **sim) -> SimulationSummary:
    """Bias of log(RR), 95% CI coverage and rejection rates (Wald and likelihood-ratio
    p < settings.alpha) over ``n_trials``; at rate_ratio = 1 the rejection rate is the type I
    error."""
    ss = np.random.SeedSequence(seed)
    seeds = ss.generate_state(n_trials)
    res, failed = [], 0
    for s in seeds:
        try:
            res.append(one_trial(settings, int(s), rate_ratio=rate_ratio, **sim))
        except (ModelError, ValueError, np.linalg.LinAlgError):
            failed += 1
    if not res:
        raise ModelError("every simulated trial failed to fit")
    df = pd.DataFrame(res)
    truth = math.log(rate_ratio)
    lo = np.array([c[0] for c in df["ci"]])
    hi = np.array([c[1] for c in df["ci"]])
    covered = (lo <= rate_ratio) & (rate_ratio <= hi)
    cov = float(covered.mean())
    return SimulationSummary(
        true_rate_ratio=rate_ratio, n_trials=len(df), n_failed=failed,
        mean_log_rr=float(df["log_rr"].mean()), bias_log_rr=float(df["log_rr"].mean() - truth),
        median_rr=float(np.exp(df["log_rr"].median())), coverage=cov,
        coverage_mc_se=math.sqrt(cov * (1 - cov) / len(df)),
        power=float((df["p"] < settings.alpha).mean()),
        power_lr=float((df["p_lr"] < settings.alpha).mean()), mean_alpha=float(df["alpha"].mean()))


def crossover_study(settings, *, n_trials: int, seed: int = 0, rate_ratio: float = 1.0,
                    **sim) -> dict:
    """Coverage, bias and power of the crossover NB mixed model, and power of the Wilcoxon test."""
    from lesionpipe.stats.efficacy import crossover_analyses

    arms = sim.get("arms", DEFAULT_ARMS)
    seeds = np.random.SeedSequence(seed).generate_state(n_trials)
    est, cover, sig_m, sig_w, failed = [], [], [], [], 0
    for s in seeds:
        counts, design = simulate_trial(seed=int(s), rate_ratio=rate_ratio,
                                        period1_weeks=tuple(settings.period1_weeks),
                                        period2_weeks=tuple(settings.period2_weeks),
                                        baseline_week=settings.baseline_week, **sim)
        design = design.set_index("participant_id")
        pt = patient_table(counts_for_analysis(counts), design, windows_from(settings), arms[1],
                           arms[0])
        res = crossover_analyses(pt, settings, arms[1], arms[0])
        m = res.get("nb_mixed", {})
        if "rate_ratio" not in m:
            failed += 1
            continue
        est.append(math.log(m["rate_ratio"]))
        cover.append(m["ci95"][0] <= rate_ratio <= m["ci95"][1])
        sig_m.append(m["p_value"] < settings.alpha)
        sig_w.append(res["wilcoxon"].get("p_value", 1.0) < settings.alpha)
    cov = float(np.mean(cover))
    return {"true_rate_ratio": rate_ratio, "n_trials": len(est), "n_failed": failed,
            "bias_log_rr": float(np.mean(est) - math.log(rate_ratio)),
            "coverage": cov, "coverage_mc_se": math.sqrt(cov * (1 - cov) / len(est)),
            "power_mixed": float(np.mean(sig_m)), "power_wilcoxon": float(np.mean(sig_w))}
