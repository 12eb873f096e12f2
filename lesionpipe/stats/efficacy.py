"""The trial's efficacy analysis from per-visit GEL counts (``lesionpipe analyze``).

Primary: NB2 regression of the period-1 GEL total on arm + baseline GELs with offset
log(number of period-1 scans available). Secondary: Poisson fit with overdispersion tests, an
unadjusted NB sensitivity fit, the within-patient crossover comparison (NB mixed model and Wilcoxon
signed-rank test) with a carry-over check, and per-visit summaries by arm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lesionpipe.stats.data import (InputError, Windows, check_match, covariate_columns,
                                   patient_table, read_counts, read_design, visit_matrix)
from lesionpipe.stats.nb import ModelError, fit_nb2, fit_nb_mixed, fit_poisson, lr_test, \
    overdispersion_tests, with_sandwich_se

LOG = logging.getLogger("lesionpipe")

__all__ = ["InputError", "ModelError", "analyze_tables", "run_analysis", "primary_analysis",
           "visit_summary"]


def windows_from(settings) -> Windows:
    return Windows(int(settings.baseline_week), tuple(int(w) for w in settings.period1_weeks),
                   tuple(int(w) for w in settings.period2_weeks))


# ============================================================================================
# primary analysis
# ============================================================================================
def _exclusions(pt: pd.DataFrame, settings) -> tuple[pd.Series, list[dict]]:
    """Boolean mask of participants in the primary analysis, and who was left out and why."""
    keep = pd.Series(True, index=pt.index)
    excluded = []
    for pid, r in pt.iterrows():
        reasons = []
        if r["n_rows"] == 0:
            reasons.append("no visits in the counts file")
        else:
            if settings.baseline_adjustment != "none" and not np.isfinite(r["baseline"]):
                reasons.append(f"no baseline count (week {settings.baseline_week} missing or "
                               "failed)")
            if r["n1"] == 0:
                reasons.append("no period-1 scan available (all period-1 visits missing or "
                               "failed)")
        if reasons:
            keep[pid] = False
            excluded.append({"participant_id": pid, "arm": r["arm"], "reason": "; ".join(reasons)})
    return keep, excluded


def _baseline_term(values: pd.Series, how: str) -> pd.Series | None:
    if how == "linear":
        return values.astype(float)
    if how == "log1p":
        return np.log1p(values.astype(float))
    return None


def primary_design(pt: pd.DataFrame, design: pd.DataFrame, settings,
                   *, treatment: bool = True, baseline: bool = True) -> pd.DataFrame:
    """Design matrix of the primary model for the rows of ``pt``."""
    X = pd.DataFrame({"const": 1.0}, index=pt.index)
    if treatment:
        X["treatment"] = pt["treated"].astype(float)
    if baseline:
        b = _baseline_term(pt["baseline"], settings.baseline_adjustment)
        if b is not None:
            X["baseline_gel"] = b
    if settings.covariates:
        X = X.join(covariate_columns(design, tuple(settings.covariates), pt.index))
    return X


def primary_analysis(pt: pd.DataFrame, design: pd.DataFrame, settings, ref: str,
                     active: str) -> tuple[dict, list[dict], dict]:
    """Fit the primary NB2 model. Returns (primary result, excluded list, fits for reuse)."""
    keep, excluded = _exclusions(pt, settings)
    d = pt[keep]
    n_arm = {ref: int((d["arm"] == ref).sum()), active: int((d["arm"] == active).sum())}
    for arm, n in n_arm.items():
        if n == 0:
            raise InputError(f"arm {arm!r} has no patients with usable counts for the primary "
                             f"analysis ({sum(1 for e in excluded if e['arm'] == arm)} excluded)")
    y = d["y1"].to_numpy(float)
    for arm in (ref, active):
        if d.loc[d["arm"] == arm, "y1"].sum() == 0:
            raise ModelError(f"arm {arm!r} has no GEL at all over the period-1 visits: the rate "
                             "ratio is 0 or infinite and cannot be estimated by the model")
    offset = np.log(d["n1"].to_numpy(float)) if settings.offset_scans else np.zeros(len(d))
    X = primary_design(d, design, settings)
    full = fit_nb2(y, X.to_numpy(), offset, list(X.columns))
    X0 = X.drop(columns="treatment")
    reduced = fit_nb2(y, X0.to_numpy(), offset, list(X0.columns))
    if settings.robust_se:
        full = with_sandwich_se(full, y, X.to_numpy())
    w = full.wald("treatment")
    lr = lr_test(full, reduced)
    incomplete = [{"participant_id": pid, "arm": r["arm"], "period1_scans": int(r["n1"]),
                   "period1_expected": len(settings.period1_weeks)}
                  for pid, r in d.iterrows() if r["n1"] < len(settings.period1_weeks)]
    primary = {
        "model": ("NB2 regression (log link, dispersion by maximum likelihood) of the GEL total "
                  f"over weeks {list(settings.period1_weeks)} on arm"
                  + {"linear": " + baseline GEL count", "log1p": " + log(1 + baseline GEL count)",
                     "none": ""}[settings.baseline_adjustment]
                  + "".join(f" + {c}" for c in settings.covariates)
                  + (" with offset log(number of period-1 scans available)"
                     if settings.offset_scans else "")
                  + ("; Wald CI and p from robust (HC1 sandwich) standard errors"
                     if settings.robust_se else "")),
        "comparison": f"{active} vs {ref}",
        "rate_ratio": w["ratio"],
        "ci95": w["ci"],
        "p_value": w["p_value"],
        "p_value_lr": lr["p_value"],
        "lr_statistic": lr["statistic"],
        "log_rate_ratio": w["log_estimate"],
        "se_log_rate_ratio": w["se"],
        "dispersion": {"alpha": full.alpha, "se_alpha": full.se_alpha, "theta": full.theta,
                       "se_theta": full.se_theta,
                       "note": "NB2: Var(y) = mu + alpha*mu^2; theta = 1/alpha as in R "
                               "MASS::glm.nb"},
        "n": n_arm,
        "n_total": int(len(d)),
        "coefficients": {name: {"estimate": float(full.params[name]), "se": float(full.bse[name]),
                                "rate_ratio": math.exp(full.params[name])}
                         for name in full.params.index},
        "loglik": full.llf,
        "incomplete_period1": incomplete,
    }
    fits = {"data": d, "X": X, "y": y, "offset": offset, "full": full}
    return primary, excluded, fits


# ============================================================================================
# secondary analyses
# ============================================================================================
def poisson_check(fits: dict, settings) -> dict:
    X, y, offset, nb = fits["X"], fits["y"], fits["offset"], fits["full"]
    pois = fit_poisson(y, X.to_numpy(), offset, list(X.columns))
    w = pois.wald("treatment")
    od = overdispersion_tests(y, pois, nb)
    prefer_nb = od["lr_nb_vs_poisson"]["p_value"] < settings.alpha
    return {"model": "Poisson regression, same terms and offset as the primary model",
            "rate_ratio": w["ratio"], "ci95": w["ci"], "p_value": w["p_value"],
            "overdispersion": od,
            "conclusion": ("overdispersed: the Poisson model understates uncertainty; NB2 is "
                           "preferred" if prefer_nb else
                           "no significant overdispersion at the chosen level")}


def unadjusted_nb(fits: dict, design, settings) -> dict:
    d = fits["data"]
    X = primary_design(d, design, settings, baseline=False)
    fit = fit_nb2(fits["y"], X.to_numpy(), fits["offset"], list(X.columns))
    w = fit.wald("treatment")
    return {"model": "NB2 without the baseline covariate (sensitivity)", "rate_ratio": w["ratio"],
            "ci95": w["ci"], "p_value": w["p_value"], "dispersion": {"alpha": fit.alpha}}


def crossover_analyses(pt: pd.DataFrame, settings, ref: str, active: str) -> dict:
    """Within-patient comparison of the period on active treatment with the placebo period.

    The active arm takes the active treatment in period 1 and placebo in period 2; the reference
    arm the reverse (the MESEMS schedule).
    """
    if not settings.period2_weeks:
        return {"available": False, "reason": "no period-2 weeks in the settings"}
    d = pt[(pt["n1"] > 0) & (pt["n2"] > 0)]
    n_arm = {ref: int((d["arm"] == ref).sum()), active: int((d["arm"] == active).sum())}
    if min(n_arm.values()) < 2:
        return {"available": False, "n": n_arm,
                "reason": "fewer than 2 patients per arm with scans in both periods"}
    first_active = (d["arm"] == active).to_numpy()
    rate1 = (d["y1"] / d["n1"]).to_numpy()
    rate2 = (d["y2"] / d["n2"]).to_numpy()
    rate_t = np.where(first_active, rate1, rate2)
    rate_p = np.where(first_active, rate2, rate1)

    # NB mixed model: two rows per patient
    ids = np.concatenate([d.index.to_numpy(), d.index.to_numpy()])
    y = np.concatenate([d["y1"].to_numpy(float), d["y2"].to_numpy(float)])
    n = np.concatenate([d["n1"].to_numpy(float), d["n2"].to_numpy(float)])
    period2 = np.concatenate([np.zeros(len(d)), np.ones(len(d))])
    treated = np.concatenate([first_active, ~first_active]).astype(float)
    X = np.column_stack([np.ones_like(y), treated, period2])
    names = ["const", "treatment", "period2"]
    mixed: dict[str, Any]
    try:
        fit = fit_nb_mixed(y, X, ids, np.log(n), names,
                           n_quad=settings.mixed_quadrature_points)
        wt, wp = fit.wald("treatment"), fit.wald("period2")
        mixed = {"model": ("NB2 mixed model: period total ~ treatment + period + (1 | patient), "
                           "offset log(scans in the period); adaptive Gauss-Hermite quadrature "
                           f"({fit.n_quad} points)"),
                 "rate_ratio": wt["ratio"], "ci95": wt["ci"], "p_value": wt["p_value"],
                 "period_rate_ratio": wp["ratio"], "period_ci95": wp["ci"],
                 "period_p_value": wp["p_value"], "alpha": fit.alpha,
                 "alpha_at_lower_bound": fit.alpha_at_bound,
                 "random_intercept_sd": fit.sigma, "loglik": fit.llf, "converged": fit.converged,
                 "n_patients": fit.n_groups}
    except (ModelError, np.linalg.LinAlgError, FloatingPointError) as exc:
        mixed = {"model": "NB2 mixed model", "error": str(exc)}

    diff = rate_t - rate_p
    if np.all(diff == 0):
        wil = {"available": False, "reason": "all within-patient differences are zero"}
    else:
        res = stats.wilcoxon(rate_t, rate_p, zero_method="wilcox", alternative="two-sided")
        wil = {"test": "Wilcoxon signed-rank, GELs per scan on active vs placebo period",
               "statistic": float(res.statistic), "p_value": float(res.pvalue),
               "n_pairs": int(len(diff)), "n_zero_differences": int(np.sum(diff == 0)),
               "median_difference_per_scan": float(np.median(diff)),
               "mean_rate_active": float(np.mean(rate_t)),
               "mean_rate_placebo": float(np.mean(rate_p))}
    # Grizzle-type carry-over check: per-patient sum of the two periods' rates, by sequence
    tot = rate1 + rate2
    mw = stats.mannwhitneyu(tot[first_active], tot[~first_active], alternative="two-sided")
    carry = {"test": ("Mann-Whitney U on each patient's summed per-scan rates over both periods, "
                      f"{active} vs {ref} sequence (a difference suggests carry-over or a "
                      "sequence effect; low power)"),
             "statistic": float(mw.statistic), "p_value": float(mw.pvalue),
             "median_sum_active_first": float(np.median(tot[first_active])),
             "median_sum_reference_first": float(np.median(tot[~first_active]))}
    return {"available": True, "n": n_arm, "nb_mixed": mixed, "wilcoxon": wil,
            "carryover": carry}


def visit_summary(counts: pd.DataFrame, design: pd.DataFrame, windows: Windows) -> pd.DataFrame:
    """Per-visit summaries by arm, and the cumulative mean curve (sum of visit means since
    baseline; missing visits are left out of each visit's mean, never counted as 0)."""
    m = visit_matrix(counts, design, windows)
    rows = []
    for arm in sorted(design["arm"].unique()):
        sub = m[design["arm"] == arm]
        cum = 0.0
        for week in windows.all_weeks:
            v = sub[week].dropna()
            mean = float(v.mean()) if len(v) else math.nan
            if week != windows.baseline and len(v):
                cum += mean
            period = ("baseline" if week == windows.baseline else
                      "1" if week in windows.period1 else "2")
            rows.append({"arm": arm, "week": week, "period": period, "n_patients": len(sub),
                         "n_available": int(len(v)), "n_missing": int(len(sub) - len(v)),
                         "mean": mean, "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                         "median": float(v.median()) if len(v) else math.nan,
                         "pct_with_gel": float(100 * (v >= 1).mean()) if len(v) else math.nan,
                         "cumulative_mean": (0.0 if week == windows.baseline else cum)})
    return pd.DataFrame(rows)


# ============================================================================================
# whole analysis
# ============================================================================================
def analyze_tables(counts: pd.DataFrame, design: pd.DataFrame, settings, ref: str,
                   active: str) -> dict[str, Any]:
    """Everything but file I/O: returns the efficacy dictionary plus tables for the plots."""
    windows = windows_from(settings)
    pt = patient_table(counts, design, windows, ref, active)
    primary, excluded, fits = primary_analysis(pt, design, settings, ref, active)
    secondary = {"poisson": poisson_check(fits, settings),
                 "nb_unadjusted": unadjusted_nb(fits, design, settings),
                 "crossover": crossover_analyses(pt, settings, ref, active)}
    failed = counts[counts["gel_count"].isna()]
    result = {
        "arms": {"reference": ref, "active": active,
                 "randomised": {ref: int((design["arm"] == ref).sum()),
                                active: int((design["arm"] == active).sum())}},
        "primary": primary,
        "excluded": excluded,
        "failed_visits": [{"participant_id": r.participant_id, "session_id": r.session_id,
                           "week": int(r.week)} for r in failed.itertuples()],
        "secondary": secondary,
    }
    return {"result": result, "patients": pt, "visits": visit_summary(counts, design, windows)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def run_analysis(counts_tsv, design_tsv, out_dir, settings) -> dict[str, Any]:
    """Read the inputs, run every analysis, write efficacy.json, TSVs, PNGs and the HTML page.

    ``settings`` is the ``[analysis]`` section (:class:`lesionpipe.settings.AnalysisSettings`).
    Returns the efficacy dictionary as written to efficacy.json.
    """
    from lesionpipe import __version__
    from lesionpipe.stats.report import write_html, write_plots

    counts_tsv, design_tsv, out_dir = Path(counts_tsv), Path(design_tsv), Path(out_dir)
    windows = windows_from(settings)
    counts = read_counts(counts_tsv, windows)
    design, ref, active = read_design(design_tsv, settings.reference_arm,
                                      tuple(settings.covariates))
    check_match(counts, design, counts_tsv, design_tsv)
    tables = analyze_tables(counts, design, settings, ref, active)
    result = tables["result"]
    import dataclasses

    result = {"generated_by": {"name": "lesionpipe", "version": __version__},
              "inputs": {"counts": {"name": counts_tsv.name, "sha256": _sha256(counts_tsv)},
                         "design": {"name": design_tsv.name, "sha256": _sha256(design_tsv)}},
              "settings": dataclasses.asdict(settings), **result}
    result = _clean(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables["visits"].to_csv(out_dir / "visit_summary.tsv", sep="\t", index=False,
                            float_format="%.6g", na_rep="n/a")
    pt = tables["patients"].rename(columns={"y1": "period1_total", "n1": "period1_scans",
                                            "y2": "period2_total", "n2": "period2_scans"})
    pt.drop(columns=["n_rows"]).to_csv(out_dir / "patients.tsv", sep="\t", float_format="%.6g",
                                       na_rep="n/a")
    images = write_plots(result, tables, out_dir, windows)
    tmp = out_dir / "efficacy.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_dir / "efficacy.json")
    write_html(result, tables["visits"], images, out_dir / "efficacy.html")
    return result
