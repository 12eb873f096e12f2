"""Read and check ``gel_counts.tsv`` and the design table; build per-patient analysis rows.

Missing counts (failed visits, empty or ``n/a`` cells) stay missing: they are never read as 0.
Every problem with the input raises :class:`InputError` naming the file and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

COUNT_COLUMNS = ("participant_id", "session_id", "week", "gel_count", "status")
NA_VALUES = ["", "n/a", "N/A", "NA", "nan", "NaN"]


class InputError(ValueError):
    """The counts or design table cannot be analysed as given."""


@dataclass(frozen=True)
class Windows:
    """Visit windows: the baseline week and the weeks of each treatment period."""

    baseline: int
    period1: tuple[int, ...]
    period2: tuple[int, ...]

    @property
    def all_weeks(self) -> tuple[int, ...]:
        return (self.baseline, *self.period1, *self.period2)


def _read_tsv(path: Path, what: str) -> pd.DataFrame:
    path = Path(path)
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not a readable TSV file: {exc}") from None


def _is_na(value: str) -> bool:
    return value.strip() in NA_VALUES


def read_counts(path: str | Path, windows: Windows) -> pd.DataFrame:
    """Validated visit table: participant_id, session_id, week (int), gel_count (float; NaN =
    missing).

    Accepts ``gel_counts.tsv`` and the reviewed export (extra columns are ignored).
    """
    path = Path(path)
    raw = _read_tsv(path, "counts file")
    missing = [c for c in COUNT_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"counts file {path} lacks column(s) {', '.join(missing)} "
                         f"(expected the gel_counts.tsv contract: {', '.join(COUNT_COLUMNS)})")
    if raw.empty:
        raise InputError(f"counts file {path} has no rows")
    rows = []
    allowed = set(windows.all_weeks)
    for i, r in raw.iterrows():
        line = i + 2  # header is line 1
        where = f"{path} line {line} ({r['participant_id']} {r['session_id']})"
        status = r["status"].strip().lower()
        if status not in ("ok", "failed"):
            raise InputError(f"{where}: status must be 'ok' or 'failed', not {r['status']!r}")
        if not r["participant_id"].startswith("sub-"):
            raise InputError(f"{where}: participant_id must look like 'sub-<label>'")
        if _is_na(r["week"]):
            if status == "failed":
                continue  # a failed visit without a week cannot be placed and is missing anyway
            raise InputError(f"{where}: week is missing; add it to the participant's sessions.tsv")
        try:
            week_f = float(r["week"])
        except ValueError:
            raise InputError(f"{where}: week {r['week']!r} is not a number") from None
        if not math.isfinite(week_f) or week_f != round(week_f):
            raise InputError(f"{where}: week {r['week']!r} is not a whole number")
        week = int(round(week_f))
        if week not in allowed:
            raise InputError(f"{where}: week {week} is not the baseline week or in a period "
                             f"window (baseline {windows.baseline}, "
                             f"period 1 {list(windows.period1)}, "
                             f"period 2 {list(windows.period2)}); set the [analysis] visit "
                             "windows in the settings file")
        count = math.nan
        if status == "ok":
            if _is_na(r["gel_count"]):
                raise InputError(f"{where}: status is 'ok' but gel_count is empty")
            try:
                c = float(r["gel_count"])
            except ValueError:
                raise InputError(f"{where}: gel_count {r['gel_count']!r} is not a number") from None
            if not math.isfinite(c) or c < 0 or c != round(c):
                raise InputError(f"{where}: gel_count {r['gel_count']!r} is not a non-negative "
                                 "integer")
            count = c
        rows.append((r["participant_id"], r["session_id"], week, count))
    df = pd.DataFrame(rows, columns=["participant_id", "session_id", "week", "gel_count"])
    dup = df[df.duplicated(["participant_id", "week"], keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        raise InputError(f"counts file {path}: {first['participant_id']} has more than one row "
                         f"for week {first['week']}")
    return df


def read_design(path: str | Path, reference_arm: str = "",
                covariates: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str, str]:
    """Design table indexed by participant_id, plus (reference arm, active arm) labels."""
    path = Path(path)
    raw = _read_tsv(path, "design file")
    for col in ("participant_id", "arm"):
        if col not in raw.columns:
            raise InputError(f"design file {path} lacks column {col!r}")
    if raw.empty:
        raise InputError(f"design file {path} has no rows")
    raw = raw.copy()
    raw["participant_id"] = raw["participant_id"].str.strip()
    raw["arm"] = raw["arm"].str.strip()
    dup = raw["participant_id"][raw["participant_id"].duplicated()]
    if not dup.empty:
        raise InputError(f"design file {path}: {dup.iloc[0]} is listed more than once")
    if (raw["arm"] == "").any() or raw["arm"].isin(NA_VALUES).any():
        who = raw.loc[raw["arm"].isin(NA_VALUES), "participant_id"].iloc[0]
        raise InputError(f"design file {path}: {who} has no arm")
    arms = sorted(raw["arm"].unique())
    if len(arms) != 2:
        raise InputError(f"design file {path} must have exactly two arms, found {len(arms)}: "
                         f"{', '.join(arms)}")
    if reference_arm:
        if reference_arm not in arms:
            raise InputError(f"reference arm {reference_arm!r} (setting analysis.reference_arm) is "
                             f"not an arm of {path}: {', '.join(arms)}")
        ref = reference_arm
    else:
        placebo = [a for a in arms if "placebo" in a.lower()]
        if len(placebo) != 1:
            raise InputError(f"cannot tell the reference arm of {path} ({', '.join(arms)}): "
                             "exactly one label should contain 'placebo', or set "
                             "analysis.reference_arm")
        ref = placebo[0]
    active = arms[0] if arms[1] == ref else arms[1]
    for cov in covariates:
        if cov not in raw.columns:
            raise InputError(f"covariate {cov!r} (setting analysis.covariates) is not a column of "
                             f"{path}")
        bad = raw.loc[raw[cov].isin(NA_VALUES), "participant_id"]
        if not bad.empty:
            raise InputError(f"design file {path}: covariate {cov!r} is missing for {bad.iloc[0]}")
    return raw.set_index("participant_id"), ref, active


def check_match(counts: pd.DataFrame, design: pd.DataFrame, counts_path, design_path) -> None:
    """Counts and design must describe the same trial."""
    unknown = sorted(set(counts["participant_id"]) - set(design.index))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise InputError(f"{counts_path} has participants not in the design {design_path}: "
                         f"{', '.join(unknown[:3])}{more}")
    if not set(counts["participant_id"]) & set(design.index):
        raise InputError(f"no participant of {design_path} appears in {counts_path}")


def patient_table(counts: pd.DataFrame, design: pd.DataFrame, windows: Windows,
                  ref: str, active: str) -> pd.DataFrame:
    """One row per design participant: baseline, period totals and scans available per period.

    Columns: arm, treated (1 = active arm), baseline (NaN if missing), y1, n1, y2, n2 (totals and
    numbers of available scans in periods 1 and 2; totals NaN when no scan), n_rows.
    """
    out = pd.DataFrame(index=design.index.copy())
    out["arm"] = design["arm"]
    out["treated"] = (design["arm"] == active).astype(int)
    base = counts[counts["week"] == windows.baseline].set_index("participant_id")["gel_count"]
    out["baseline"] = base.reindex(out.index)
    for k, weeks in (("1", windows.period1), ("2", windows.period2)):
        sub = counts[counts["week"].isin(weeks) & counts["gel_count"].notna()]
        g = sub.groupby("participant_id")["gel_count"]
        out["y" + k] = g.sum().reindex(out.index)
        out["n" + k] = g.size().reindex(out.index).fillna(0).astype(int)
    out["n_rows"] = counts.groupby("participant_id").size().reindex(out.index).fillna(0).astype(int)
    return out


def covariate_columns(design: pd.DataFrame, covariates: tuple[str, ...], index) -> pd.DataFrame:
    """Numeric design columns for the covariates: numbers as they are, labels as indicators."""
    cols = {}
    for cov in covariates:
        values = design.loc[index, cov]
        num = pd.to_numeric(values, errors="coerce")
        if num.notna().all():
            cols[cov] = num.astype(float)
        else:
            levels = sorted(values.unique())
            for lev in levels[1:]:
                cols[f"{cov}[{lev}]"] = (values == lev).astype(float)
    return pd.DataFrame(cols, index=index)


def visit_matrix(counts: pd.DataFrame, design: pd.DataFrame, windows: Windows) -> pd.DataFrame:
    """Participants x weeks table of counts (NaN = missing or failed)."""
    m = counts.pivot(index="participant_id", columns="week", values="gel_count")
    return m.reindex(index=design.index, columns=list(windows.all_weeks)).astype(float)
