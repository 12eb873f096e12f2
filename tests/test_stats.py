"""Efficacy analysis (lesionpipe.stats): reference estimates, models, input checks, outputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionpipe.cli import main
from lesionpipe.settings import AnalysisSettings, Settings
from lesionpipe.stats.data import InputError, Windows, patient_table, read_counts
from lesionpipe.stats.efficacy import run_analysis
from lesionpipe.stats.nb import (fit_nb2, fit_nb_mixed, fit_poisson, mixed_loglik,
                                 overdispersion_tests, theta_ml)
from lesionpipe.stats.power import simulation_study
from lesionpipe.stats.simulate import simulate_trial, write_trial

DATA = Path(__file__).parent / "data" / "stats"


# ============================================================================================
# Reference: R MASS::glm.nb on the quine data (Venables & Ripley)
# ============================================================================================
def _dummies(df: pd.DataFrame, terms: list[str]) -> pd.DataFrame:
    """Treatment-coded design like R's default contrasts (first level is the reference)."""
    X = pd.DataFrame({"(Intercept)": 1.0}, index=df.index)
    for t in terms:
        for lev in sorted(df[t].unique())[1:]:
            X[f"{t}{lev}"] = (df[t] == lev).astype(float)
    return X


@pytest.fixture(scope="module")
def quine() -> pd.DataFrame:
    d = pd.read_csv(DATA / "quine.tsv", sep="\t")
    assert len(d) == 146 and d["Days"].sum() == 2403
    return d


# Published R output of summary(glm.nb(...)) on quine (an R session transcript, "Analysis of quine
# data", S. King 2016, on GitHub). Values as printed by R: estimate, standard error.
R_MAIN = {  # Days ~ Sex + Eth + Age + Lrn ; init.theta = 1.274892646 ; 2 x loglik -1093.151
    "(Intercept)": (2.89458, 0.22842), "SexM": (0.08232, 0.15992), "EthN": (-0.56937, 0.15333),
    "AgeF1": (-0.44843, 0.23975), "AgeF2": (0.08808, 0.23619), "AgeF3": (0.35690, 0.24832),
    "LrnSL": (0.29211, 0.18647),
}
R_NO_SEX = {  # Days ~ Eth + Age + Lrn ; init.theta = 1.271992937 ; 2 x loglik -1093.401
    "(Intercept)": (2.9351, 0.2017), "EthN": (-0.5627, 0.1535), "AgeF1": (-0.4703, 0.2363),
    "AgeF2": (0.1009, 0.2363), "AgeF3": (0.3591, 0.2452), "LrnSL": (0.2848, 0.1848),
}
R_ETH_AGE = {  # Days ~ Eth + Age ; init.theta = 1.249142794 ; 2 x loglik -1095.801
    "(Intercept)": (3.0382, 0.1957), "EthN": (-0.5611, 0.1547), "AgeF1": (-0.3855, 0.2274),
    "AgeF2": (0.1846, 0.2313), "AgeF3": (0.2550, 0.2407),
}


def _sig_equal(a: float, b: float, printed: float) -> bool:
    """``a`` equals R's printed ``b`` to the printed precision (half a unit in the last place)."""
    s = f"{printed:.10g}"
    decimals = len(s.split(".")[1]) if "." in s else 0
    return abs(a - b) <= 0.5 * 10 ** (-decimals) + 1e-12


@pytest.mark.parametrize("terms, ref, theta, two_ll, se_theta", [
    (["Sex", "Eth", "Age", "Lrn"], R_MAIN, 1.274892646, -1093.151, 0.161),
    (["Eth", "Age", "Lrn"], R_NO_SEX, 1.271992937, -1093.401, 0.161),
    (["Eth", "Age"], R_ETH_AGE, 1.249142794, -1095.801, 0.157),
])
def test_nb2_reproduces_glm_nb_on_quine(quine, terms, ref, theta, two_ll, se_theta):
    X = _dummies(quine, terms)
    fit = fit_nb2(quine["Days"].to_numpy(), X.to_numpy(), names=list(X.columns))
    for name, (est, se) in ref.items():
        assert _sig_equal(fit.params[name], est, est), (name, fit.params[name], est)
        assert _sig_equal(fit.bse[name], se, se), (name, fit.bse[name], se)
        # and at least 4 significant digits in relative terms
        assert abs(fit.params[name] - est) <= 5e-4 * abs(est) + 5e-5
        assert abs(fit.bse[name] - se) <= 5e-4 * se
    # R stops at glm.control(epsilon = 1e-8): its theta is good to about 7 digits
    assert fit.theta == pytest.approx(theta, rel=1e-6)
    assert 2 * fit.llf == pytest.approx(two_ll, abs=5e-4)
    assert round(fit.se_theta, 3) == se_theta
    assert fit.alpha == pytest.approx(1 / theta, rel=1e-6)


def test_nb2_nested_model_matches_published_theta(quine):
    """glm.nb(Days ~ Sex/(Age + Eth*Lrn)): theta 1.597991 (glmmTMB issue #641, R session);
    coefficients and SEs as printed by broom's tidy() documentation (3 significant digits)."""
    d = quine
    cols = {"(Intercept)": 1.0, "SexM": (d.Sex == "M") * 1.0}
    for s in ("F", "M"):
        is_s = (d.Sex == s) * 1.0
        for a in ("F1", "F2", "F3"):
            cols[f"Sex{s}:Age{a}"] = is_s * (d.Age == a)
        cols[f"Sex{s}:EthN"] = is_s * (d.Eth == "N")
        cols[f"Sex{s}:LrnSL"] = is_s * (d.Lrn == "SL")
        cols[f"Sex{s}:EthN:LrnSL"] = is_s * (d.Eth == "N") * (d.Lrn == "SL")
    X = pd.DataFrame(cols, index=d.index).astype(float)
    fit = fit_nb2(d["Days"].to_numpy(), X.to_numpy(), names=list(X.columns))
    assert fit.theta == pytest.approx(1.597991, abs=5e-7)
    broom = {"(Intercept)": (3.02, 0.297), "SexM": (-0.475, 0.396), "SexF:AgeF1": (-0.709, 0.323),
             "SexM:AgeF1": (-0.724, 0.330), "SexF:AgeF2": (-0.615, 0.371),
             "SexM:AgeF2": (0.628, 0.274), "SexF:AgeF3": (-0.342, 0.327),
             "SexM:AgeF3": (1.15, 0.314), "SexF:EthN": (-0.0731, 0.265),
             "SexM:EthN": (-0.679, 0.256), "SexF:LrnSL": (0.944, 0.322),
             "SexM:LrnSL": (0.239, 0.336), "SexF:EthN:LrnSL": (-1.36, 0.377),
             "SexM:EthN:LrnSL": (0.761, 0.441)}
    for name, (est, se) in broom.items():
        assert float(f"{fit.params[name]:.3g}") == est, name
        assert float(f"{fit.bse[name]:.3g}") == se, name


def test_nb2_agrees_with_statsmodels(quine):
    """The same estimates from statsmodels: joint MLE (discrete NegativeBinomial) for theta and
    coefficients, GLM at that alpha for the glm.nb standard errors."""
    import statsmodels.api as sm

    X = _dummies(quine, ["Sex", "Eth", "Age", "Lrn"])
    y = quine["Days"].to_numpy()
    fit = fit_nb2(y, X.to_numpy(), names=list(X.columns))
    disc = sm.NegativeBinomial(y, X.to_numpy()).fit(disp=0, method="bfgs", maxiter=1000)
    disc = sm.NegativeBinomial(y, X.to_numpy()).fit(start_params=disc.params, disp=0,
                                                    method="newton", tol=1e-12)
    assert disc.params[-1] == pytest.approx(fit.alpha, rel=1e-5)
    np.testing.assert_allclose(disc.params[:-1], fit.params.to_numpy(), rtol=1e-5, atol=1e-7)
    glm = sm.GLM(y, X.to_numpy(), family=sm.families.NegativeBinomial(alpha=fit.alpha)).fit(
        tol=1e-13)
    np.testing.assert_allclose(glm.params, fit.params.to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(glm.bse, fit.bse.to_numpy(), rtol=1e-6)


def test_poisson_matches_statsmodels_and_offset(quine):
    import statsmodels.api as sm

    X = _dummies(quine, ["Eth", "Age"])
    y = quine["Days"].to_numpy()
    off = np.log(np.arange(len(y)) % 3 + 1.0)
    fit = fit_poisson(y, X.to_numpy(), off, list(X.columns))
    ref = sm.GLM(y, X.to_numpy(), family=sm.families.Poisson(), offset=off).fit()
    np.testing.assert_allclose(fit.params.to_numpy(), ref.params, rtol=1e-8)
    np.testing.assert_allclose(fit.bse.to_numpy(), ref.bse, rtol=1e-6)
    assert fit.llf == pytest.approx(ref.llf, rel=1e-10)


def test_theta_ml_without_overdispersion_gives_poisson():
    rng = np.random.default_rng(5)
    y = rng.poisson(3.0, 400)
    y = np.clip(y, 2, 4)  # underdispersed: likelihood keeps rising with theta
    theta, se = theta_ml(y, np.full(len(y), y.mean()))
    assert math.isinf(theta) and math.isnan(se)
    fit = fit_nb2(y, np.ones((len(y), 1)))
    assert fit.alpha == 0.0
    assert fit.params.iloc[0] == pytest.approx(math.log(y.mean()), rel=1e-8)


def test_sandwich_se_matches_statsmodels_in_the_poisson_limit():
    """With alpha = 0 the NB2 fit is a Poisson fit (canonical link, observed = expected
    information), where statsmodels' HC0 sandwich is the reference."""
    import statsmodels.api as sm

    from lesionpipe.stats.nb import with_sandwich_se

    rng = np.random.default_rng(9)
    x = rng.normal(size=300)
    X = np.column_stack([np.ones(300), x])
    y = np.clip(rng.poisson(np.exp(1.0 + 0.3 * x)), 1, 5)  # underdispersed: alpha estimate 0
    fit = fit_nb2(y, X)
    assert fit.alpha == 0.0
    robust = with_sandwich_se(fit, y, X)
    ref = sm.GLM(y, X, family=sm.families.Poisson()).fit(cov_type="HC0", tol=1e-13)
    np.testing.assert_allclose(robust.bse.to_numpy() * math.sqrt(298 / 300), ref.bse, rtol=1e-6)
    assert np.all(robust.bse.to_numpy() < fit.bse.to_numpy())  # underdispersion: smaller


def test_overdispersion_tests_detect_nb_and_accept_poisson():
    rng = np.random.default_rng(11)
    X = np.column_stack([np.ones(300), np.repeat([0.0, 1.0], 150)])
    mu = np.exp(0.5 + 0.3 * X[:, 1])
    y_nb = rng.negative_binomial(0.7, 0.7 / (0.7 + mu))
    od = overdispersion_tests(y_nb, fit_poisson(y_nb, X), fit_nb2(y_nb, X))
    assert od["cameron_trivedi"]["p_value"] < 0.01
    assert od["lr_nb_vs_poisson"]["p_value"] < 0.01
    assert od["pearson_dispersion"] > 1.5
    y_p = rng.poisson(mu)
    od = overdispersion_tests(y_p, fit_poisson(y_p, X), fit_nb2(y_p, X))
    assert od["cameron_trivedi"]["p_value"] > 0.01
    assert od["lr_nb_vs_poisson"]["p_value"] > 0.01


# ============================================================================================
# NB mixed model
# ============================================================================================
def test_mixed_loglik_matches_direct_integration():
    from scipy import integrate, stats

    rng = np.random.default_rng(2)
    group = np.repeat(np.arange(6), 2)
    X = np.column_stack([np.ones(12), np.tile([0.0, 1.0], 6)])
    y = rng.poisson(3.0, 12).astype(float)
    y[0] = 25  # one strongly active patient: the integrand is far from the prior
    beta, log_a, log_s = np.array([0.9, -0.3]), math.log(0.4), math.log(0.8)
    ll_agq = mixed_loglik(beta, log_a, log_s, y, X, np.zeros(12), group, 6, n_quad=20)
    theta, sigma = 1 / 0.4, 0.8
    total = 0.0
    for g in range(6):
        idx = group == g

        def f(b, idx=idx):
            mu = np.exp(X[idx] @ beta + b)
            return np.exp(np.sum(stats.nbinom.logpmf(y[idx], theta, theta / (theta + mu)))
                          + stats.norm.logpdf(b, 0, sigma))
        val, _ = integrate.quad(f, -12, 12, limit=400, epsabs=1e-300, epsrel=1e-12)
        total += math.log(val)
    assert ll_agq == pytest.approx(total, abs=1e-6)


def test_mixed_model_recovers_treatment_effect():
    counts, design = simulate_trial(n=240, rate_ratio=0.5, dispersion=1.0, missing_rate=0.0,
                                    baseline_rate=1.5, seed=21)
    w = Windows(0, (4, 12, 24), (28, 36, 48))
    from lesionpipe.stats.simulate import counts_for_analysis

    pt = patient_table(counts_for_analysis(counts), design.set_index("participant_id"), w,
                       "placebo-first", "MSC-first")
    first = (pt["arm"] == "MSC-first").to_numpy()
    y = np.r_[pt["y1"], pt["y2"]]
    treated = np.r_[first, ~first].astype(float)
    X = np.column_stack([np.ones_like(y), treated, np.r_[np.zeros(len(pt)), np.ones(len(pt))]])
    fit = fit_nb_mixed(y, X, np.r_[pt.index, pt.index], np.log(3.0) * np.ones_like(y),
                       ["const", "treatment", "period2"], n_quad=10)
    assert abs(fit.params["treatment"] - math.log(0.5)) < 3 * fit.bse["treatment"]
    assert 0.4 < math.exp(fit.params["treatment"]) < 0.62
    assert fit.bse["treatment"] < 0.1
    assert 0.6 < math.exp(fit.params["period2"]) < 1.6
    # the simulated periods are Poisson given the patient's activity: little residual alpha
    assert fit.alpha < 0.3


# ============================================================================================
# inputs
# ============================================================================================
def _write(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture()
def small_trial(tmp_path):
    counts, design = simulate_trial(n=40, rate_ratio=0.6, seed=4, missing_rate=0.1)
    c, d = write_trial(tmp_path / "trial", counts, design)
    return c, d, counts, design


def test_read_counts_never_reads_missing_as_zero(small_trial):
    c, _, counts, _ = small_trial
    w = Windows(0, (4, 12, 24), (28, 36, 48))
    table = read_counts(c, w)
    failed = counts["status"] == "failed"
    assert failed.any()
    assert table["gel_count"][failed.to_numpy()].isna().all()
    assert table["gel_count"][~failed.to_numpy()].notna().all()


def test_missing_visit_changes_offset_not_total():
    w = Windows(0, (4, 12, 24), ())
    counts = pd.DataFrame({"participant_id": ["sub-1"] * 4 + ["sub-2"] * 4,
                           "session_id": [f"ses-{k}" for k in range(8)],
                           "week": [0, 4, 12, 24] * 2,
                           "gel_count": [1, 2, np.nan, 4, 0, 0, 0, 0]})
    design = pd.DataFrame({"arm": ["a-placebo", "b"]}, index=["sub-1", "sub-2"])
    pt = patient_table(counts, design, w, "a-placebo", "b")
    assert pt.loc["sub-1", "y1"] == 6 and pt.loc["sub-1", "n1"] == 2
    assert pt.loc["sub-2", "y1"] == 0 and pt.loc["sub-2", "n1"] == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda c, d: (c.assign(gel_count=c["gel_count"].astype(object).where(
        c.index != 3, "-1")), d), "not a non-negative integer"),
    (lambda c, d: (c.assign(gel_count=c["gel_count"].astype(object).where(
        c.index != 3, "2.5")), d), "not a non-negative integer"),
    (lambda c, d: (c.assign(gel_count=c["gel_count"].astype(object).where(
        c.index != 3, "lots")), d), "not a number"),
    (lambda c, d: (pd.concat([c, c.iloc[[2]]]), d), "more than one row"),
    (lambda c, d: (c.assign(week=c["week"].where(c.index != 2, 8)), d), "week 8 is not"),
    (lambda c, d: (c.drop(columns="status"), d), "lacks column"),
    (lambda c, d: (c.assign(participant_id=c["participant_id"].where(c.index != 0, "sub-99")),
                   d), "not in the design"),
    (lambda c, d: (c, d.assign(arm="MSC-first")), "exactly two arms"),
    (lambda c, d: (c, d.assign(arm=d["arm"].where(d.index != 0, "third"))), "exactly two arms"),
    (lambda c, d: (c, d.assign(arm=d["arm"].str.replace("placebo", "control"))),
     "reference arm"),
    (lambda c, d: (c, pd.concat([d, d.iloc[[0]]])), "more than once"),
    (lambda c, d: (c, d.assign(participant_id="sub-x" + d["participant_id"])), "not in the design"),
], ids=["negative", "non-integer", "text", "duplicate", "week", "column", "unknown",
        "one-arm", "three-arms", "no-placebo", "dup-design", "no-overlap"])
def test_bad_input_is_refused(small_trial, tmp_path, mutate, message):
    _, _, counts, design = small_trial
    counts = counts.copy()
    counts["gel_count"] = counts["gel_count"].astype(object)
    counts = counts[counts["status"] == "ok"].reset_index(drop=True)
    c2, d2 = mutate(counts, design.copy())
    cpath = _write(tmp_path / "c.tsv", c2)
    dpath = _write(tmp_path / "d.tsv", d2)
    with pytest.raises(InputError, match=message):
        run_analysis(cpath, dpath, tmp_path / "out", AnalysisSettings())
    assert not (tmp_path / "out" / "efficacy.json").exists()


def test_status_ok_with_empty_count_is_refused(tmp_path):
    c = pd.DataFrame({"participant_id": ["sub-1"], "session_id": ["ses-1"], "week": [4],
                      "gel_count": [""], "status": ["ok"]})
    with pytest.raises(InputError, match="status is 'ok' but gel_count is empty"):
        read_counts(_write(tmp_path / "c.tsv", c), Windows(0, (4,), ()))


def test_arm_without_usable_patients_is_refused(small_trial, tmp_path):
    _, _, counts, design = small_trial
    placebo = set(design.loc[design["arm"] == "placebo-first", "participant_id"])
    counts = counts[~counts["participant_id"].isin(placebo)]
    with pytest.raises(InputError, match="arm 'placebo-first' has no patients"):
        run_analysis(_write(tmp_path / "c.tsv", counts), _write(tmp_path / "d.tsv", design),
                     tmp_path / "out", AnalysisSettings())


def test_exclusions_are_listed_with_reasons(small_trial, tmp_path):
    _, _, counts, design = small_trial
    counts = counts.copy()
    pids = sorted(design["participant_id"])
    # sub-01: baseline failed; sub-02: every period-1 visit failed; sub-03: no rows at all
    rm_base = (counts["participant_id"] == pids[0]) & (counts["week"] == 0)
    rm_p1 = (counts["participant_id"] == pids[1]) & counts["week"].isin([4, 12, 24])
    counts.loc[rm_base | rm_p1, ["gel_count", "status"]] = ["n/a", "failed"]
    counts = counts[counts["participant_id"] != pids[2]]
    res = run_analysis(_write(tmp_path / "c.tsv", counts), _write(tmp_path / "d.tsv", design),
                       tmp_path / "out", AnalysisSettings())
    reasons = {e["participant_id"]: e["reason"] for e in res["excluded"]}
    assert "no baseline count" in reasons[pids[0]]
    assert "no period-1 scan" in reasons[pids[1]]
    assert "no visits" in reasons[pids[2]]
    assert sum(res["primary"]["n"].values()) == 40 - len(res["excluded"])


# ============================================================================================
# the command, outputs, settings
# ============================================================================================
def test_simulate_and_analyze_commands(tmp_path, capsys):
    trial = tmp_path / "trial"
    assert main(["simulate-trial", str(trial), "--n", "60", "--arm-split", "2:1",
                 "--rate-ratio", "0.5", "--dispersion", "1.5", "--missing-rate", "0.1",
                 "--seed", "3"]) == 0
    design = pd.read_csv(trial / "design.tsv", sep="\t")
    assert design["arm"].value_counts().to_dict() == {"MSC-first": 40, "placebo-first": 20}
    counts = pd.read_csv(trial / "gel_counts.tsv", sep="\t", keep_default_na=False)
    assert set(counts["week"]) == {0, 4, 12, 24, 28, 36, 48}
    assert (counts.loc[counts["status"] == "failed", "gel_count"] == "n/a").all()
    # the reviewed export carries an extra column: accepted, ignored
    counts["read_status"] = "confirmed"
    counts.to_csv(trial / "gel_counts_reviewed.tsv", sep="\t", index=False)
    before = (trial / "gel_counts_reviewed.tsv").read_bytes()
    out = tmp_path / "eff"
    assert main(["analyze", str(trial / "gel_counts_reviewed.tsv"), "--design",
                 str(trial / "design.tsv"), "--out", str(out)]) == 0
    assert "primary: rate ratio" in capsys.readouterr().out
    assert (trial / "gel_counts_reviewed.tsv").read_bytes() == before
    res = json.loads((out / "efficacy.json").read_text())
    p = res["primary"]
    assert p["ci95"][0] < p["rate_ratio"] < p["ci95"][1]
    assert 0 <= p["p_value"] <= 1 and 0 <= p["p_value_lr"] <= 1
    assert p["dispersion"]["theta"] == pytest.approx(1 / p["dispersion"]["alpha"])
    assert set(p["n"]) == {"MSC-first", "placebo-first"}
    assert isinstance(res["excluded"], list)
    assert res["secondary"]["crossover"]["available"]
    assert res["secondary"]["poisson"]["overdispersion"]["lr_nb_vs_poisson"]["p_value"] < 0.05
    v = pd.read_csv(out / "visit_summary.tsv", sep="\t")
    assert len(v) == 14 and {"mean", "median", "pct_with_gel", "cumulative_mean"} <= set(v)
    page = (out / "efficacy.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for png in ("cumulative_mean_gels.png", "forest_rate_ratios.png",
                "patient_gel_distribution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_bad_input_exits_2(tmp_path, capsys):
    counts, design = simulate_trial(n=12, seed=1)
    counts.loc[0, "gel_count"] = -3
    c, d = write_trial(tmp_path, counts, design)
    assert main(["analyze", str(c), "--design", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gel_count '-3' is not a non-negative integer" in err and "line 2" in err


def test_arm_without_any_gel_exits_1(tmp_path, capsys):
    counts, design = simulate_trial(n=20, seed=2, missing_rate=0.0)
    active = set(design.loc[design["arm"] == "MSC-first", "participant_id"])
    counts.loc[counts["participant_id"].isin(active) & (counts["week"] > 0), "gel_count"] = 0
    c, d = write_trial(tmp_path, counts, design)
    assert main(["analyze", str(c), "--design", str(d), "--out", str(tmp_path / "o")]) == 1
    assert "arm 'MSC-first' has no GEL at all" in capsys.readouterr().err


def test_analysis_settings_from_toml_and_checks(tmp_path):
    s = Settings.from_toml_string('[analysis]\nperiod1_weeks = [4, 12]\nperiod2_weeks = []\n'
                                  'baseline_adjustment = "log1p"\ncovariates = ["site"]\n')
    assert s.analysis.period1_weeks == (4, 12) and s.analysis.period2_weeks == ()
    assert Settings.from_toml_string(s.to_toml_string()) == s
    with pytest.raises(ValueError, match="baseline_adjustment"):
        Settings.from_toml_string('[analysis]\nbaseline_adjustment = "sqrt"\n')
    with pytest.raises(ValueError, match="overlap"):
        Settings.from_toml_string('[analysis]\nperiod1_weeks = [0, 4]\n')
    # a run with these settings: covariate used, crossover skipped, weeks 24+ refused as unknown
    counts, design = simulate_trial(n=30, seed=8, period2_weeks=(), period1_weeks=(4, 12))
    c, d = write_trial(tmp_path, counts, design)
    res = run_analysis(c, d, tmp_path / "o", s.analysis)
    assert any(k.startswith("site[") for k in res["primary"]["coefficients"])
    assert "baseline_gel" in res["primary"]["coefficients"]
    assert res["secondary"]["crossover"]["available"] is False


# ============================================================================================
# operating characteristics (small; the full study is scripts/sim_coverage.py)
# ============================================================================================
def test_simulated_coverage_and_bias_sanity():
    s = simulation_study(AnalysisSettings(), n_trials=60, seed=2024, rate_ratio=0.7, n=144,
                         dispersion=2.0, missing_rate=0.05)
    assert s.n_failed == 0
    assert abs(s.bias_log_rr) < 0.08
    assert 0.85 <= s.coverage <= 1.0


def test_simulated_power_increases_with_effect():
    weak = simulation_study(AnalysisSettings(), n_trials=40, seed=7, rate_ratio=0.9, n=144)
    strong = simulation_study(AnalysisSettings(), n_trials=40, seed=7, rate_ratio=0.4, n=144)
    assert strong.power > 0.8 and weak.power < strong.power


def test_stats_does_not_import_nipype():
    import subprocess

    code = ("import sys, lesionpipe.stats.efficacy, lesionpipe.stats.power, "
            "lesionpipe.stats.report; sys.exit('nipype' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
