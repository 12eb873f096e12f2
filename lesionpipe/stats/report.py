"""Efficacy plots (matplotlib, Agg backend) and the self-contained HTML summary page."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

COLOURS = ("#1f77b4", "#d62728")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def forest_rows(result: dict) -> list[tuple[str, float, float, float, float]]:
    """(label, rate ratio, low, high, p) of the primary and secondary rate ratios."""
    rows = []
    p = result["primary"]
    rows.append(("Primary: NB2, baseline-adjusted", p["rate_ratio"], *p["ci95"], p["p_value"]))
    s = result["secondary"]
    u = s["nb_unadjusted"]
    rows.append(("NB2, no baseline adjustment", u["rate_ratio"], *u["ci95"], u["p_value"]))
    q = s["poisson"]
    rows.append(("Poisson (ignores overdispersion)", q["rate_ratio"], *q["ci95"], q["p_value"]))
    c = s["crossover"]
    if c.get("available") and "rate_ratio" in c.get("nb_mixed", {}):
        m = c["nb_mixed"]
        rows.append(("Crossover: NB2 mixed model", m["rate_ratio"], *m["ci95"], m["p_value"]))
    return [r for r in rows if r[1] is not None and r[2] is not None and r[3] is not None]


def write_plots(result: dict, tables: dict, out_dir: Path, windows) -> dict[str, Path]:
    plt = _pyplot()
    out = {}
    ref, active = result["arms"]["reference"], result["arms"]["active"]
    arms = (active, ref)

    # cumulative mean GELs by arm
    v = tables["visits"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for colour, arm in zip(COLOURS, arms):
        s = v[v["arm"] == arm].sort_values("week")
        ax.plot(s["week"], s["cumulative_mean"], marker="o", color=colour, label=arm)
    if windows.period2:
        ax.axvline(max(windows.period1), color="grey", ls="--", lw=1)
        ax.text(max(windows.period1), ax.get_ylim()[1] * 0.97, " crossover", va="top",
                color="grey", fontsize=9)
    ax.set_xlabel("week")
    ax.set_ylabel("cumulative mean number of GELs\n(sum of visit means since baseline)")
    ax.set_title("Cumulative mean GELs by arm")
    ax.set_xticks(list(windows.all_weeks))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    out["cumulative"] = out_dir / "cumulative_mean_gels.png"
    fig.savefig(out["cumulative"])
    plt.close(fig)

    # forest plot
    rows = forest_rows(result)
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(rows) + 1.4), dpi=110)
    ys = np.arange(len(rows))[::-1]
    for y, (label, rr, lo, hi, p) in zip(ys, rows):
        ax.plot([lo, hi], [y, y], color="black", lw=1.5)
        ax.plot([rr], [y], marker="s", color=COLOURS[0] if y == ys[0] else "black", ms=8)
        ptxt = "p<0.0001" if p < 1e-4 else f"p={p:.3g}"
        ax.text(1.02, y, f"{rr:.2f} ({lo:.2f}-{hi:.2f}), {ptxt}",
                transform=ax.get_yaxis_transform(), va="center", fontsize=9)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    lo_all = min(r[2] for r in rows)
    hi_all = max(r[3] for r in rows)
    ax.set_xlim(min(lo_all * 0.8, 0.5), max(hi_all * 1.25, 2.0))
    ticks = [t for t in (0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 10)
             if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"rate ratio, {active} vs {ref} (95% CI, log scale)")
    ax.set_title("Rate ratios: primary and secondary analyses")
    fig.tight_layout()
    fig.subplots_adjust(right=0.68)
    out["forest"] = out_dir / "forest_rate_ratios.png"
    fig.savefig(out["forest"])
    plt.close(fig)

    # distribution of per-patient period-1 totals
    pt = tables["patients"]
    pt = pt[pt["n1"] > 0]
    cap = 20
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    width = 0.4
    for k, (colour, arm) in enumerate(zip(COLOURS, arms)):
        vals = np.minimum(pt.loc[pt["arm"] == arm, "y1"].to_numpy(float), cap)
        counts = np.bincount(vals.astype(int), minlength=cap + 1)
        frac = counts / max(len(vals), 1) * 100
        ax.bar(np.arange(cap + 1) + (k - 0.5) * width, frac, width=width, color=colour,
               label=f"{arm} (n={len(vals)})")
    ax.set_xticks(range(0, cap + 1, 2))
    ax.set_xticklabels([str(t) if t < cap else f"{cap}+" for t in range(0, cap + 1, 2)])
    ax.set_xlabel(f"GELs per patient over weeks {', '.join(map(str, windows.period1))}")
    ax.set_ylabel("% of patients")
    ax.set_title("Distribution of per-patient period-1 GEL totals")
    ax.legend(frameon=False)
    fig.tight_layout()
    out["distribution"] = out_dir / "patient_gel_distribution.png"
    fig.savefig(out["distribution"])
    plt.close(fig)
    return out


# ============================================================================================
def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"
    return html.escape(str(x))


def _p(x) -> str:
    if x is None:
        return "n/a"
    return "&lt;0.0001" if x < 1e-4 else f"{x:.4f}"


def _peq(x) -> str:
    if x is None:
        return "p = n/a"
    return "p &lt; 0.0001" if x < 1e-4 else f"p = {x:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_html(result: dict, visits: pd.DataFrame, images: dict, path: Path) -> None:
    p = result["primary"]
    s = result["secondary"]
    ref, active = result["arms"]["reference"], result["arms"]["active"]
    parts = []
    parts.append("<h2>Primary analysis</h2>")
    parts.append(f"<p>{html.escape(p['model'])}.</p>")
    d = p["dispersion"]
    parts.append(_table(["quantity", "value"], [
        ["comparison", html.escape(p["comparison"])],
        ["rate ratio (95% CI)", f"<b>{_fmt(p['rate_ratio'])}</b> ({_fmt(p['ci95'][0])} to "
                                f"{_fmt(p['ci95'][1])})"],
        ["Wald p-value", _p(p["p_value"])],
        ["likelihood-ratio p-value", _p(p["p_value_lr"])],
        ["dispersion alpha (SE)", f"{_fmt(d['alpha'])} ({_fmt(d['se_alpha'])})"],
        ["theta = 1/alpha (SE)", f"{_fmt(d['theta'])} ({_fmt(d['se_theta'])})"],
        ["patients analysed", ", ".join(f"{html.escape(k)}: {v}" for k, v in p["n"].items())],
        ["randomised", ", ".join(f"{html.escape(k)}: {v}"
                                 for k, v in result["arms"]["randomised"].items())],
    ]))
    parts.append("<h3>Coefficients</h3>")
    parts.append(_table(["term", "estimate (log scale)", "SE", "rate ratio"],
                        [[html.escape(k), _fmt(v["estimate"], 5), _fmt(v["se"], 5),
                          _fmt(v["rate_ratio"])] for k, v in p["coefficients"].items()]))
    parts.append(f"<h3>Excluded from the primary analysis ({len(result['excluded'])})</h3>")
    if result["excluded"]:
        parts.append(_table(["participant", "arm", "reason"],
                            [[html.escape(e["participant_id"]), html.escape(e["arm"]),
                              html.escape(e["reason"])] for e in result["excluded"]]))
    else:
        parts.append("<p>None.</p>")
    inc = p["incomplete_period1"]
    parts.append(f"<p>{len(inc)} included patient(s) had fewer than "
                 f"{len(result['settings']['period1_weeks'])} period-1 scans; the offset accounts "
                 f"for the scans available. {len(result['failed_visits'])} visit(s) failed or were "
                 "missing a count in total; missing counts are never treated as 0.</p>")
    parts.append("<h2>Rate ratios</h2>" + _img(images["forest"], "forest plot of rate ratios"))

    parts.append("<h2>Is negative-binomial needed? Poisson fit and overdispersion</h2>")
    q = s["poisson"]
    od = q["overdispersion"]
    parts.append(_table(["quantity", "value"], [
        ["Poisson rate ratio (95% CI)", f"{_fmt(q['rate_ratio'])} ({_fmt(q['ci95'][0])} to "
                                        f"{_fmt(q['ci95'][1])}), {_peq(q['p_value'])}"],
        ["Pearson chi-square / df", _fmt(od["pearson_dispersion"])],
        ["Cameron-Trivedi test (alpha estimate, p)",
         f"{_fmt(od['cameron_trivedi']['alpha_estimate'])}, "
         f"{_peq(od['cameron_trivedi']['p_value'])}"],
        ["LR test NB2 vs Poisson (boundary)", f"{_fmt(od['lr_nb_vs_poisson']['statistic'])}, "
                                              f"{_peq(od['lr_nb_vs_poisson']['p_value'])}"],
        ["conclusion", html.escape(q["conclusion"])],
    ]))

    parts.append("<h2>Within-patient crossover comparison</h2>")
    c = s["crossover"]
    if not c.get("available"):
        parts.append(f"<p>Not available: {html.escape(c.get('reason', ''))}.</p>")
    else:
        m = c["nb_mixed"]
        rows = []
        if "rate_ratio" in m:
            rows += [["NB2 mixed model, treatment rate ratio (95% CI)",
                      f"{_fmt(m['rate_ratio'])} ({_fmt(m['ci95'][0])} to {_fmt(m['ci95'][1])}), "
                      f"{_peq(m['p_value'])}"],
                     ["period 2 vs period 1 rate ratio (95% CI)",
                      f"{_fmt(m['period_rate_ratio'])} ({_fmt(m['period_ci95'][0])} to "
                      f"{_fmt(m['period_ci95'][1])}), {_peq(m['period_p_value'])}"],
                     ["alpha; random-intercept SD",
                      ("0 (at its lower bound: no overdispersion beyond the patient effect)"
                       if m.get("alpha_at_lower_bound") else _fmt(m["alpha"]))
                      + f"; {_fmt(m['random_intercept_sd'])}"]]
        else:
            rows.append(["NB2 mixed model", html.escape(m.get("error", "failed"))])
        w = c["wilcoxon"]
        if w.get("p_value") is not None:
            rows.append(["Wilcoxon signed-rank (per-scan rate, active vs placebo period)",
                         f"median difference {_fmt(w['median_difference_per_scan'])}, "
                         f"{_peq(w['p_value'])} ({w['n_pairs']} pairs)"])
        rows.append(["carry-over check (Mann-Whitney, sum of both periods by sequence)",
                     f"{_peq(c['carryover']['p_value'])}"])
        rows.append(["patients with scans in both periods",
                     ", ".join(f"{html.escape(k)}: {v}" for k, v in c["n"].items())])
        parts.append(_table(["analysis", "result"], rows))

    parts.append("<h2>Per-visit summaries</h2>")
    parts.append(_img(images["cumulative"], "cumulative mean GELs by arm"))
    vrows = [[html.escape(r.arm), str(r.week), html.escape(str(r.period)),
              f"{r.n_available}/{r.n_patients}", _fmt(r.mean), _fmt(r.median),
              _fmt(r.pct_with_gel, 3), _fmt(r.cumulative_mean)] for r in visits.itertuples()]
    parts.append(_table(["arm", "week", "period", "available", "mean", "median",
                         "% with >= 1 GEL", "cumulative mean"], vrows))
    parts.append(_img(images["distribution"], "distribution of per-patient GEL totals"))
    gen = result["generated_by"]
    inputs = ", ".join(f"{html.escape(f['name'])} (SHA-256 {f['sha256'][:12]}...)"
                       for f in (result["inputs"]["counts"], result["inputs"]["design"]))
    body = "\n".join(parts)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Efficacy analysis: {html.escape(active)} vs {html.escape(ref)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
.foot {{ color: #666; font-size: 0.85em; }}
</style></head><body>
<h1>Efficacy analysis: {html.escape(active)} vs {html.escape(ref)}</h1>
{body}
<p class="foot">{html.escape(gen['name'])} {html.escape(str(gen['version']))}; inputs
{inputs}.
Machine-readable results: efficacy.json.</p>
</body></html>
"""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
