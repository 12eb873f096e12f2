"""Compare pipeline outputs with phantom ground truth: lesion-wise, voxel-wise and count-wise.

Matching rule (see docs/evaluation.md):

* A truth lesion is **detected** when at least one voxel of any predicted lesion lies inside it.
  The **strict** variant also requires that the predicted voxels cover >= 25 % of the truth
  lesion and that one overlapping predicted lesion has >= 25 % of its own voxels inside it (a large
  blob that swallows a lesion together with a vessel does not count as a strict detection).
* A predicted lesion is a **true positive** when it overlaps a counted truth lesion, **uncounted**
  when it overlaps only truth lesions below the counting rule (not a false positive), otherwise a
  **false positive**.
* A truth lesion overlapped by two or more predicted lesions is **split**; a predicted lesion
  overlapping two or more truth lesions is **merged**.
* Visits whose status is ``failed`` (or that are missing from the outputs) count as misses for
  sensitivity and count agreement; they are also reported separately.

Only counted truth lesions (the pipeline's counting rule on the post grid, column ``counted`` of
truth_lesions.tsv) enter sensitivity. ``evaluate_outputs`` is the entry point.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from lesionpipe.imageio import atomic_write_json, atomic_write_text

VOLUME_BINS = [(0, 20, "<20"), (20, 50, "20-50"), (50, 100, "50-100"), (100, 500, "100-500"),
               (500, math.inf, ">=500")]
CONTRAST_BINS = [(0, 25, "<25%"), (25, 50, "25-50%"), (50, 75, "50-75%"), (75, math.inf, ">=75%")]
MIMIC_NAMES = {0: "none", 1: "vessel", 2: "sinus_or_falx", 3: "dura", 4: "choroid_plexus",
               5: "non_enhancing_lesion", 6: "fat_or_marrow"}
STRICT_FRACTION = 0.25
MAX_CROPS = 60


class EvaluationError(ValueError):
    """Unusable truth or output folder (message names the file and the problem)."""


# =================================================================================================
# reading
# =================================================================================================
def _read_tsv(path: Path) -> list[dict]:
    if not path.exists():
        raise EvaluationError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return rows


def _num(v, default=math.nan) -> float:
    try:
        if v is None or v == "" or v == "n/a":
            return default
        return float(v)
    except ValueError:
        return default


def _visit_files(output_dir: Path, sub: str, ses: str) -> dict:
    anat = output_dir / sub / ses / "anat"
    stem = f"{sub}_{ses}"
    return {
        "dseg": anat / f"{stem}_ce-gadolinium_space-orig_label-GEL_dseg.nii.gz",
        "mask": anat / f"{stem}_ce-gadolinium_space-orig_label-GEL_mask.nii.gz",
        "post": anat / f"{stem}_ce-gadolinium_space-orig_desc-preproc_T1w.nii.gz",
        "pre": anat / f"{stem}_space-orig_desc-preproc_T1w.nii.gz",
        "candidates": anat / f"{stem}_ce-gadolinium_space-orig_desc-candidates_dseg.nii.gz",
        "candidate_table": anat / f"{stem}_ce-gadolinium_space-orig_desc-candidates_table.tsv",
    }


def _load_labels(path: Path) -> tuple[np.ndarray, nb.Nifti1Image]:
    img = nb.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(f"{path.name}: is {data.ndim}-D; expected a 3-D label image")
    return np.rint(data).astype(np.int32), img


# =================================================================================================
# per-visit matching (pure)
# =================================================================================================
def match_lesions(truth: np.ndarray, pred: np.ndarray, counted: dict[int, bool]) -> dict:
    """Match instance-labelled truth and prediction on one grid.

    Returns per-truth and per-prediction records plus voxel overlap. ``counted`` maps truth
    label -> whether it meets the counting rule (labels not listed are treated as counted).

    >>> t = np.zeros((6, 6, 6), int); t[1, 1, 1:3] = 1; t[4, 4, 4] = 2
    >>> p = np.zeros_like(t); p[1, 1, 2] = 1; p[0, 5, 0] = 2
    >>> m = match_lesions(t, p, {1: True, 2: True})
    >>> [r['detected'] for r in m['truth']], [r['status'] for r in m['pred']]
    ([True, False], ['tp', 'fp'])
    """
    t_ids = [int(v) for v in np.unique(truth) if v > 0]
    p_ids = [int(v) for v in np.unique(pred) if v > 0]
    both = (truth > 0) & (pred > 0)
    pairs: dict[tuple[int, int], int] = {}
    if both.any():
        tv, pv = truth[both], pred[both]
        key = tv.astype(np.int64) * (int(pred.max()) + 1) + pv
        uniq, cnt = np.unique(key, return_counts=True)
        for k, c in zip(uniq.tolist(), cnt.tolist()):
            pairs[(k // (int(pred.max()) + 1), k % (int(pred.max()) + 1))] = c
    t_size = _sizes(truth, t_ids)
    p_size = _sizes(pred, p_ids)
    truth_rows = []
    for t in t_ids:
        over = {p: c for (tt, p), c in pairs.items() if tt == t}
        covered = sum(over.values())
        frac_t = covered / t_size[t]
        strict = frac_t >= STRICT_FRACTION and any(c / p_size[p] >= STRICT_FRACTION for p, c in over.items())
        truth_rows.append({"label": t, "n_voxels": t_size[t], "counted": bool(counted.get(t, True)),
                           "detected": bool(over), "detected_strict": bool(strict),
                           "n_pred_overlapping": len(over), "overlap_fraction": round(frac_t, 3),
                           "split": len(over) >= 2})
    pred_rows = []
    for p in p_ids:
        over = {t: c for (t, pp), c in pairs.items() if pp == p}
        if any(counted.get(t, True) for t in over):
            status = "tp"
        elif over:
            status = "uncounted"
        else:
            status = "fp"
        pred_rows.append({"label": p, "n_voxels": p_size[p], "status": status,
                          "n_truth_overlapping": len(over),
                          "merged": sum(counted.get(t, True) for t in over) >= 2})
    inter = int(both.sum())
    return {"truth": truth_rows, "pred": pred_rows, "intersection": inter,
            "truth_voxels": int((truth > 0).sum()), "pred_voxels": int((pred > 0).sum())}


def _sizes(labels: np.ndarray, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    return dict(zip(ids, ndi.sum_labels(np.ones_like(labels), labels, ids).astype(int).tolist()))


def _dice(inter: int, a: int, b: int):
    return None if a + b == 0 else 2 * inter / (a + b)


def _bin(value: float, bins) -> str:
    for lo, hi, name in bins:
        if lo <= value < hi:
            return name
    return "n/a"


# =================================================================================================
# report
# =================================================================================================
@dataclass
class EvaluationReport:
    """Results of :func:`evaluate_outputs`; ``metrics`` is what evaluation.json holds."""

    metrics: dict
    visits: list = field(default_factory=list)
    lesions: list = field(default_factory=list)
    out_dir: Path | None = None

    def summary_text(self) -> str:
        m = self.metrics
        o = m["overall"]

        def pct(v):
            return "n/a" if v is None else f"{100 * v:.1f}%"

        def num(v, fmt="{:.2f}"):
            return "n/a" if v is None else fmt.format(v)

        lines = [
            f"lesionpipe evaluation: {m['n_visits']} visits ({m['n_failed_visits']} failed), "
            f"{o['n_truth_lesions']} counted truth lesions, {o['n_pred_lesions']} predicted",
            f"  sensitivity            {pct(o['sensitivity'])}  (strict {pct(o['sensitivity_strict'])}; "
            f"processed visits only {pct(o['sensitivity_ok_visits'])})",
            f"  precision              {pct(o['precision'])}",
            f"  false positives / scan {num(o['fp_per_scan'])}",
            f"  Dice pooled            {num(o['dice_pooled'], '{:.3f}')}   mean per visit "
            f"{num(o['dice_mean'], '{:.3f}')}",
            f"  count exact            {pct(o['count_exact'])}   within 1: {pct(o['count_within1'])}   "
            f"mean abs error {num(o['count_mae'])}   mean error {num(o['count_bias'], '{:+.2f}')}",
            f"  split truth lesions {o['n_split']}, merged predictions {o['n_merged']}",
        ]
        if o["fp_by_mimic"]:
            lines.append("  false positives on: "
                         + ", ".join(f"{k} {v}" for k, v in o["fp_by_mimic"].items()))
        if o.get("miss_causes"):
            lines.append("  misses (processed visits) by cause: "
                         + "; ".join(f"{k} {v}" for k, v in o["miss_causes"].items()))
        for name, table in m["breakdown"].items():
            lines.append(f"  by {name}:")
            for key, row in table.items():
                parts = [f"{key:>10}"]
                if "n_truth_lesions" in row:
                    parts.append(f"sens {pct(row['sensitivity'])} of {row['n_truth_lesions']:>3}")
                if "fp_per_scan" in row:
                    parts.append(f"FP/scan {num(row['fp_per_scan'])}")
                if "count_exact" in row:
                    parts.append(f"count exact {pct(row['count_exact'])} ({row['n_visits']} visits)")
                lines.append("    " + "  ".join(parts))
        if self.out_dir:
            lines.append(f"  details: {self.out_dir}")
        return "\n".join(lines)


def _lesion_summary(rows: list[dict]) -> dict:
    tr = [r for r in rows if r["source"] == "truth" and r["counted"]]
    n = len(tr)
    return {"n_truth_lesions": n,
            "sensitivity": (sum(r["detected"] for r in tr) / n) if n else None,
            "sensitivity_strict": (sum(r["detected_strict"] for r in tr) / n) if n else None}


def _visit_summary(visits: list[dict]) -> dict:
    ok = [v for v in visits if v["status"] == "ok"]
    errs = [v["count_error"] for v in visits if v["count_error"] is not None]
    n = len(visits)
    return {
        "n_visits": n,
        "fp_per_scan": (sum(v["n_fp"] for v in ok) / len(ok)) if ok else None,
        "count_exact": (sum(1 for v in visits if v["count_error"] == 0) / n) if n else None,
    } | ({"count_mae": float(np.mean(np.abs(errs)))} if errs else {})


def evaluate_outputs(output_dir, truth_dir, *, out_dir=None, bids_dir=None,
                     min_truth_volume: float = 0.0, max_crops: int = MAX_CROPS) -> EvaluationReport:
    """Score a lesionpipe output folder against a phantom truth folder.

    ``out_dir`` (default ``output_dir/evaluation``) receives evaluation.json, evaluation_visits.tsv,
    evaluation_lesions.tsv and evaluation.html. Crops use the pipeline's preprocessed images; when
    those are absent and ``bids_dir`` is given, the raw scans. Truth lesions smaller than
    ``min_truth_volume`` mm3 are treated like lesions below the counting rule.
    """
    output_dir, truth_dir = Path(output_dir), Path(truth_dir)
    out_dir = Path(out_dir) if out_dir is not None else output_dir / "evaluation"
    truth_counts = _read_tsv(truth_dir / "truth_counts.tsv")
    truth_lesions = _read_tsv(truth_dir / "truth_lesions.tsv")
    counts_path = output_dir / "gel_counts.tsv"
    pred_counts = {(r["participant_id"], r["session_id"]): r for r in _read_tsv(counts_path)}
    for col in ("participant_id", "session_id", "gel_count", "status"):
        if pred_counts and col not in next(iter(pred_counts.values())):
            raise EvaluationError(f"{counts_path}: column '{col}' missing")
    tl_by_visit: dict[tuple, dict[int, dict]] = {}
    for r in truth_lesions:
        tl_by_visit.setdefault((r["participant_id"], r["session_id"]), {})[int(r["lesion_id"])] = r

    visits, lesion_rows, crops = [], [], []
    pooled = [0, 0, 0]
    for tc in truth_counts:
        sub, ses = tc["participant_id"], tc["session_id"]
        key = (sub, ses)
        tinfo = tl_by_visit.get(key, {})
        counted = {lid: (r["counted"] == "1" and _num(r["volume_mm3"]) >= min_truth_volume)
                   for lid, r in tinfo.items()}
        truth_count = sum(counted.values())
        pc = pred_counts.get(key)
        status, error = "ok", ""
        if pc is None:
            status, error = "failed", "visit missing from gel_counts.tsv"
        elif pc.get("status", "ok") != "ok":
            status, error = "failed", pc.get("error", "") or "status failed"
        files = _visit_files(output_dir, sub, ses)
        pred = truth = t_img = None
        if status == "ok":
            try:
                if files["dseg"].exists():
                    pred, p_img = _load_labels(files["dseg"])
                elif files["mask"].exists():
                    mask, p_img = _load_labels(files["mask"])
                    pred, _ = ndi.label(mask > 0, structure=np.ones((3, 3, 3)))
                else:
                    raise EvaluationError(f"{files['dseg'].name}: file not found (nor the _mask)")
                truth, t_img = _load_labels(truth_dir / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz")
                if pred.shape != truth.shape or not np.allclose(p_img.affine, t_img.affine, atol=1e-3):
                    raise EvaluationError(f"{files['dseg'].name}: grid {pred.shape} differs from the truth "
                                          f"grid {truth.shape} (or the affines differ)")
            except (EvaluationError, OSError, ValueError) as exc:
                status, error = "failed", str(exc)
                pred = None
        pred_count = None if status != "ok" else int(_num(pc.get("gel_count"), 0))
        vrow = {"participant_id": sub, "session_id": ses, "week": tc.get("week", ""), "status": status,
                "error": error, "grid": tc.get("grid", ""), "has_pre": int(tc.get("has_pre", "0") == "1"),
                "truth_count": truth_count, "pred_count": pred_count,
                "count_error": None if pred_count is None else pred_count - truth_count,
                "n_tp": 0, "n_fn": truth_count, "n_fp": 0, "n_uncounted_match": 0, "dice": None}
        if status == "ok":
            m = match_lesions(truth, pred, counted)
            pooled[0] += m["intersection"]
            pooled[1] += m["truth_voxels"]
            pooled[2] += m["pred_voxels"]
            vrow["dice"] = _dice(m["intersection"], m["truth_voxels"], m["pred_voxels"])
            vrow["n_tp"] = sum(r["detected"] for r in m["truth"] if r["counted"])
            vrow["n_fn"] = truth_count - vrow["n_tp"]
            vrow["n_fp"] = sum(r["status"] == "fp" for r in m["pred"])
            vrow["n_uncounted_match"] = sum(r["status"] == "uncounted" for r in m["pred"])
            mimics = _mimic_image(truth_dir, sub, ses, truth.shape)
            vox = float(np.prod(t_img.header.get_zooms()[:3]))
            p_com = _centres(pred, [r["label"] for r in m["pred"]])
            cands = _CandidateLookup(files["candidates"], files["candidate_table"], truth.shape)
            for r in m["truth"]:
                info = tinfo.get(r["label"], {})
                row = _truth_row(sub, ses, tc, info, r)
                lesion_rows.append(row)
                if r["counted"] and not r["detected"]:
                    row["miss_cause"], row["miss_candidate_mm3"] = cands.cause(truth == r["label"], vox)
                    crops.append(("miss", sub, ses, _centres(truth, [r["label"]])[r["label"]], row))
            for r in m["pred"]:
                cls = "n/a"
                if mimics is not None:
                    vals = mimics[pred == r["label"]]
                    vals = vals[vals > 0]
                    cls = MIMIC_NAMES.get(int(np.bincount(vals).argmax()), "none") if vals.size else "none"
                row = {"source": "prediction", "participant_id": sub, "session_id": ses,
                       "lesion_id": r["label"], "n_voxels": r["n_voxels"],
                       "volume_mm3": round(r["n_voxels"] * vox, 2), "enhancement_pct": None, "kind": None,
                       "counted": None, "touching": None, "grid": tc.get("grid", ""),
                       "has_pre": vrow["has_pre"], "visit_status": "ok", "detected": None,
                       "detected_strict": None, "n_overlapping": r["n_truth_overlapping"],
                       "overlap_fraction": None, "split": None, "merged": r["merged"],
                       "pred_status": r["status"], "fp_on": cls if r["status"] == "fp" else None,
                       "miss_cause": None, "miss_candidate_mm3": None}
                lesion_rows.append(row)
                if r["status"] == "fp":
                    crops.append(("false positive", sub, ses, p_com[r["label"]], row))
        else:
            for lid, info in tinfo.items():
                r = {"label": lid, "n_voxels": int(_num(info.get("n_voxels"), 0)), "counted": counted[lid],
                     "detected": False, "detected_strict": False, "n_pred_overlapping": 0,
                     "overlap_fraction": 0.0, "split": False}
                row = _truth_row(sub, ses, tc, info, r)
                row["visit_status"] = "failed"
                lesion_rows.append(row)
        visits.append(vrow)

    metrics = _metrics(visits, lesion_rows, pooled)
    report = EvaluationReport(metrics=metrics, visits=visits, lesions=lesion_rows, out_dir=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "evaluation.json", metrics)
    _write_tsv(out_dir / "evaluation_visits.tsv", visits)
    _write_tsv(out_dir / "evaluation_lesions.tsv", lesion_rows)
    atomic_write_text(out_dir / "evaluation.html",
                      _html(report, _pick_crops(crops, max_crops), len(crops), output_dir, truth_dir,
                            bids_dir))
    return report


def _pick_crops(crops: list, cap: int) -> list:
    """Largest misses and largest false positives, half the page each when both are plentiful."""
    def size(c):
        return -float(c[4]["volume_mm3"]) if c[4]["volume_mm3"] == c[4]["volume_mm3"] else 0.0

    misses = sorted((c for c in crops if c[0] == "miss"), key=size)
    fps = sorted((c for c in crops if c[0] != "miss"), key=size)
    n_miss = min(len(misses), max(cap // 2, cap - len(fps)))
    chosen = misses[:n_miss] + fps[:cap - n_miss]
    # one visit after another, so each visit's images are loaded once
    return sorted(chosen, key=lambda c: (c[1], c[2], c[0]))


def _truth_row(sub, ses, tc, info, r) -> dict:
    return {"source": "truth", "participant_id": sub, "session_id": ses, "lesion_id": r["label"],
            "n_voxels": r["n_voxels"], "volume_mm3": _num(info.get("volume_mm3")),
            "enhancement_pct": _num(info.get("enhancement_pct")), "kind": info.get("kind", "n/a"),
            "counted": int(r["counted"]), "touching": info.get("touching", "n/a"),
            "grid": tc.get("grid", ""), "has_pre": int(tc.get("has_pre", "0") == "1"), "visit_status": "ok",
            "detected": int(r["detected"]), "detected_strict": int(r["detected_strict"]),
            "n_overlapping": r["n_pred_overlapping"], "overlap_fraction": r["overlap_fraction"],
            "split": int(r["split"]), "merged": None, "pred_status": None, "fp_on": None,
            "miss_cause": None, "miss_candidate_mm3": None}


class _CandidateLookup:
    """Why the pipeline dropped a truth lesion, from its candidate image and table (if written).

    The candidate the lesion overlaps most gives the cause: its rejection reason (a classifier
    rejection as ``classifier: p = ...``), or ``no candidate`` when no candidate touches the lesion.
    """

    def __init__(self, image: Path, table: Path, shape):
        self.paths, self.shape = (image, table), tuple(shape)
        self.loaded = False
        self.labels = self.sizes = self.reasons = None

    def _load(self) -> None:
        """Read the files once, at the visit's first miss (a visit without misses reads none)."""
        self.loaded = True
        image, table = self.paths
        if image.exists() and table.exists():
            labels, _ = _load_labels(image)
            if labels.shape == self.shape:
                self.labels = labels
                self.sizes = np.bincount(labels.ravel())
                self.reasons = [r.get("reason", "") or "" for r in _read_tsv(table)]

    def cause(self, lesion: np.ndarray, voxel_mm3: float) -> tuple[str, float | None]:
        if not self.loaded:
            self._load()
        if self.labels is None:
            return "n/a", None
        vals = self.labels[lesion]
        vals = vals[vals > 0]
        if not vals.size:
            return "no candidate", None
        k = int(np.bincount(vals).argmax())
        size = round(float(self.sizes[k]) * voxel_mm3, 1)
        reason = self.reasons[k - 1] if k <= len(self.reasons) else "n/a"
        return reason or "accepted, lost to a neighbour", size


def _centres(labels: np.ndarray, ids: list[int]) -> dict[int, tuple]:
    if not ids:
        return {}
    com = ndi.center_of_mass(np.ones_like(labels), labels, ids)
    return {i: tuple(int(round(c)) for c in cc) for i, cc in zip(ids, com)}


def _mimic_image(truth_dir: Path, sub: str, ses: str, shape) -> np.ndarray | None:
    path = truth_dir / sub / ses / f"{sub}_{ses}_label-mimics_dseg.nii.gz"
    if not path.exists():
        return None
    data = np.asarray(nb.load(str(path)).dataobj).astype(np.int64)
    return data if data.shape == tuple(shape) else None


def _tally(values) -> dict:
    """Count of each value (None left out), most frequent first."""
    return dict(Counter(v for v in values if v is not None).most_common())


def _metrics(visits: list[dict], rows: list[dict], pooled) -> dict:
    ok = [v for v in visits if v["status"] == "ok"]
    truth = [r for r in rows if r["source"] == "truth" and r["counted"]]
    truth_ok = [r for r in truth if r["visit_status"] == "ok"]
    preds = [r for r in rows if r["source"] == "prediction"]
    n_pred_scored = sum(r["pred_status"] in ("tp", "fp") for r in preds)
    errs = [v["count_error"] for v in visits if v["count_error"] is not None]
    all_errs = [v["count_error"] if v["count_error"] is not None else None for v in visits]
    dices = [v["dice"] for v in ok if v["dice"] is not None]
    overall = {
        "n_truth_lesions": len(truth), "n_pred_lesions": len(preds),
        "sensitivity": (sum(r["detected"] for r in truth) / len(truth)) if truth else None,
        "sensitivity_strict": (sum(r["detected_strict"] for r in truth) / len(truth)) if truth else None,
        "sensitivity_ok_visits": (sum(r["detected"] for r in truth_ok) / len(truth_ok)) if truth_ok else None,
        "n_truth_in_failed_visits": len(truth) - len(truth_ok),
        "precision": (sum(r["pred_status"] == "tp" for r in preds) / n_pred_scored)
        if n_pred_scored else None,
        "n_fp": sum(r["pred_status"] == "fp" for r in preds),
        "n_pred_matching_uncounted_truth": sum(r["pred_status"] == "uncounted" for r in preds),
        "fp_per_scan": (sum(v["n_fp"] for v in ok) / len(ok)) if ok else None,
        "dice_pooled": _dice(*pooled),
        "dice_mean": float(np.mean(dices)) if dices else None,
        # failed visits are never an exact count
        "count_exact": (sum(1 for e in all_errs if e == 0) / len(visits)) if visits else None,
        "count_within1": (sum(1 for e in all_errs if e is not None and abs(e) <= 1) / len(visits))
        if visits else None,
        "count_mae": float(np.mean(np.abs(errs))) if errs else None,
        "count_bias": float(np.mean(errs)) if errs else None,
        "count_error_histogram": {str(k): int(v) for k, v in
                                  sorted(zip(*np.unique(errs, return_counts=True)))} if errs else {},
        "n_split": sum(r["split"] for r in truth),
        "n_merged": sum(bool(r["merged"]) for r in preds),
        "fp_by_mimic": _tally(r["fp_on"] for r in preds if r["pred_status"] == "fp"),
        # the classifier's probability stays in evaluation_lesions.tsv, not in the tally
        "miss_causes": _tally((r.get("miss_cause") or "").split(":")[0] or None
                              for r in truth_ok if not r["detected"]),
    }
    breakdown: dict[str, dict] = {}
    vb = {}
    for lo, hi, name in VOLUME_BINS:
        vb[name] = _lesion_summary([r for r in truth if lo <= r["volume_mm3"] < hi])
    breakdown["truth volume (mm3)"] = vb
    cb = {}
    for lo, hi, name in CONTRAST_BINS:
        cb[name] = _lesion_summary([r for r in truth if lo <= r["enhancement_pct"] < hi])
    breakdown["enhancement"] = cb
    for title, key, values in (("lesion kind", "kind", ("nodular", "ring", "irregular")),
                               ("placed touching", "touching", ("none", "vessel", "ventricle", "pair"))):
        tab = {v: _lesion_summary([r for r in truth if r[key] == v]) for v in values}
        breakdown[title] = {k: v for k, v in tab.items() if v["n_truth_lesions"]}
    for title, vkey, values in (("grid", "grid", ("3d", "2d")), ("pre-contrast", "has_pre", (1, 0))):
        tab = {}
        for val in values:
            vs = [v for v in visits if v[vkey] == val]
            if not vs:
                continue
            label = {1: "pre+post", 0: "post-only"}.get(val, val) if vkey == "has_pre" else val
            lr = [r for r in rows if r[vkey] == val]
            tab[label] = {**_lesion_summary(lr), **_visit_summary(vs)}
        breakdown[title] = tab
    return {"n_visits": len(visits), "n_failed_visits": len(visits) - len(ok),
            "failed_visits": [{"participant_id": v["participant_id"], "session_id": v["session_id"],
                               "error": v["error"]} for v in visits if v["status"] != "ok"],
            "matching_rule": {"detected": ">= 1 voxel overlap with any predicted lesion",
                              "strict": f">= {STRICT_FRACTION:.0%} of the truth lesion covered and one "
                                        f"overlapping prediction with >= {STRICT_FRACTION:.0%} of its voxels "
                                        "inside it"},
            "overall": overall, "breakdown": breakdown}


def _write_tsv(path: Path, rows: list[dict]) -> None:
    if not rows:
        atomic_write_text(path, "\n")
        return
    cols = list(rows[0].keys())

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["\t".join(cols)] + ["\t".join(fmt(r.get(c)) for c in cols) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


# =================================================================================================
# HTML with crops
# =================================================================================================
def _load_float(path: Path | None):
    if path is None or not path.exists():
        return None
    try:
        return np.asarray(nb.load(str(path)).get_fdata(dtype=np.float32))
    except Exception:  # an unreadable background image only costs the picture
        return None


def _crop_png(post, pre, truth, pred, centre, title) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    half = 24
    k = int(np.clip(centre[2], 0, post.shape[2] - 1))
    sl = tuple(slice(max(c - half, 0), c + half) for c in centre[:2]) + (k,)
    panels = [("post", post[sl])]
    if pre is not None and pre.shape == post.shape:
        panels.append(("post - pre", post[sl] - pre[sl]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")
        for lab, colour in ((truth, "lime"), (pred, "red")):
            if lab is not None and (lab[sl] > 0).any():
                ax.contour((lab[sl] > 0).T.astype(float), [0.5], colors=colour, linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html(report: EvaluationReport, crops, n_crops_total, output_dir, truth_dir, bids_dir) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>lesionpipe evaluation</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}pre{background:#f4f4f4;padding:1em}"
             "figure{display:inline-block;margin:.4em;vertical-align:top}figcaption{font-size:12px;"
             "max-width:380px}</style></head><body><h1>lesionpipe evaluation</h1>",
             f"<pre>{html.escape(report.summary_text())}</pre>",
             "<p>Green outline: truth lesion; red outline: predicted lesion. Axial slice of the "
             "post-contrast grid through the lesion centre.</p>"]
    parts.append(f"<h2>Misses and false positives ({len(crops)} of {n_crops_total} shown)</h2>")
    cache: dict = {}
    for kind, sub, ses, centre, row in crops:
        key = (sub, ses)
        if key not in cache:
            files = _visit_files(output_dir, sub, ses)
            post = _load_float(files["post"])
            pre = _load_float(files["pre"])
            if post is None and bids_dir is not None:
                anat = Path(bids_dir) / sub / ses / "anat"
                post = _load_float(anat / f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz")
                pre = None  # raw pre is not on the post grid
            truth = _load_float(truth_dir / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz")
            pred = _load_float(files["dseg"]) if files["dseg"].exists() else _load_float(files["mask"])
            cache = {key: (post, pre, truth, pred)}  # one visit in memory at a time
        post, pre, truth, pred = cache[key]
        desc = (f"{kind}: {sub} {ses} lesion {row['lesion_id']}, {row['volume_mm3']} mm3"
                + (f", enhancement {row['enhancement_pct']}%, {row['kind']}" if kind == "miss" else
                   f", on {row['fp_on']}")
                + (f"; lost: {row['miss_cause']}" if row.get("miss_cause") not in (None, "n/a") else ""))
        if post is None or post.shape != (truth.shape if truth is not None else post.shape):
            parts.append(f"<figure><figcaption>{html.escape(desc)} (no image available)"
                         "</figcaption></figure>")
            continue
        png = _crop_png(post, pre, truth, pred, centre, f"{sub} {ses} #{row['lesion_id']}")
        parts.append(f"<figure><img src='data:image/png;base64,{png}' alt='{html.escape(desc)}'>"
                     f"<figcaption>{html.escape(desc)}</figcaption></figure>")
    parts.append("<h2>Visits</h2><table border='1' cellspacing='0' cellpadding='3'><tr>"
                 + "".join(f"<th>{c}</th>" for c in ("visit", "status", "grid", "pre", "truth", "pred",
                                                     "error", "Dice"))
                 + "</tr>")
    for v in report.visits:
        dice = "n/a" if v["dice"] is None else f"{v['dice']:.2f}"
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
            f"{v['participant_id']} {v['session_id']}",
            v["status"] + (f": {v['error']}" if v["error"] else ""),
            v["grid"], v["has_pre"], v["truth_count"], "n/a" if v["pred_count"] is None else v["pred_count"],
            "n/a" if v["count_error"] is None else f"{v['count_error']:+d}", dice)) + "</tr>")
    parts.append("</table><h2>Metrics (evaluation.json)</h2><pre>"
                 + html.escape(json.dumps(report.metrics, indent=1, default=str)) + "</pre></body></html>")
    return "\n".join(parts)
