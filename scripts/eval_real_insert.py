#!/usr/bin/env python
"""Evaluate the GEL detector on a real MS patient's scans with synthetic lesions inserted.

Real post-contrast anatomy (enhancing vessels, venous sinuses, choroid plexus) with a known answer:
synthetic enhancing lesions are inserted into normal-appearing white matter of the real
post-contrast T1 (lesionpipe.realinsert; the pre-contrast T1 is left as it is), a BIDS dataset is
built, ``lesionpipe run`` is called on it, and every visit's ``_label-GEL_dseg`` output is compared
with the inserted lesions:

* sensitivity: inserted lesions detected (>= 1 voxel overlap) / inserted, overall and >= 20 mm3;
* every other detection (not overlapping an inserted lesion): its lesion-table row, whether it
  overlaps the T2 lesion consensus mask (a real MS lesion, so possibly real enhancement), simple
  location hints, and an image crop (post, pre, post - pre; axial and coronal).

Visits (one BIDS session each): ``ses-seed<S>`` for every seed (lesions inserted with that seed)
and ``ses-unmodified`` (the real scans as they are, to count what the anatomy alone produces).
Subject ``sub-prepost`` has the pre-contrast T1, ``sub-postonly`` the same post-contrast images
without it, so both modes of the pipeline are measured on identical post-contrast images.

Usage (from the repository root; the detector is whatever ``lesionpipe`` the venv runs)::

    .venv/bin/python scripts/eval_real_insert.py --out real_eval [--work /tmp/real_work] \
        [--seeds 1 2 3] [--n-lesions 12] [--nprocs 2] [--settings my.toml]

The scans default to ``<repo>/../shared/real_scans/open_ms_patient07`` (``--scans`` to change).
Writes to ``--out``: summary.tsv, inserted_lesions.tsv, other_detections.tsv, results.json,
report.html (self-contained), crops/*.png, truth/ (inserted labels) and pipeline_log.txt.
Re-running with the same ``--work`` reuses the pipeline's finished steps; Nipype's cache is keyed
on inputs, not on code, so after a change to the detector use a fresh ``--work`` (the default).
See docs/real_scan_evaluation.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's lesionpipe (realinsert) even without installing it

import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from lesionpipe.evaluate import match_lesions  # noqa: E402
from lesionpipe.realinsert import insert_lesions, wm_mask_from_t1, wm_mode  # noqa: E402
from lesionpipe.reports.render import plane_slice, ras_grid, to_ras  # noqa: E402

SCAN_FILES = {"post": "T1POST_mni.nii.gz", "pre": "T1_mni.nii.gz",
              "t2": "T2_lesions_consensus_mni.nii.gz"}
SUBJECTS = {"prepost": "post+pre", "postonly": "post-only"}
SUFFIX = "ce-gadolinium_space-orig_label-GEL"
CROP_MM = 40
DISPLAY = {"post": (0, 180), "pre": (0, 140), "diff": (-40, 80)}  # % of white matter


class EvalError(RuntimeError):
    """A problem with the inputs or the pipeline run (message says which)."""


# =================================================================================================
# inputs and dataset
# =================================================================================================
def default_scans() -> Path:
    return REPO.parent / "shared" / "real_scans" / "open_ms_patient07"


def load_scans(folder: Path) -> dict:
    if not folder.is_dir():
        raise EvalError(f"real scans folder {folder} not found (expected <repo>/../shared/real_scans/"
                        "open_ms_patient07; pass --scans DIR)")
    imgs = {}
    for key, name in SCAN_FILES.items():
        path = folder / name
        if not path.is_file():
            raise EvalError(f"{path}: file not found (needed: {', '.join(SCAN_FILES.values())})")
        try:
            imgs[key] = nb.load(str(path))
        except Exception as exc:
            raise EvalError(f"{path}: unreadable NIfTI ({exc})") from exc
        if len(imgs[key].shape) != 3:
            raise EvalError(f"{path}: shape {imgs[key].shape}, expected one 3-D volume")
    for key in ("pre", "t2"):
        if imgs[key].shape != imgs["post"].shape or not np.allclose(imgs[key].affine, imgs["post"].affine,
                                                                    atol=1e-3):
            raise EvalError(f"{folder / SCAN_FILES[key]}: grid differs from {SCAN_FILES['post']}")
    return imgs


def _save_float(data: np.ndarray, ref: nb.Nifti1Image, path: Path) -> None:
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.float32)
    img = nb.Nifti1Image(np.asarray(data, np.float32), ref.affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nb.save(img, str(tmp))
    os.replace(tmp, path)


def build_dataset(imgs: dict, bids: Path, truth_dir: Path, seeds: list[int], n_lesions: int,
                  unmodified: bool) -> dict:
    """Write the BIDS dataset and the truth; returns {session: (labels, lesion rows)}.

    Files are rewritten only when the insertion parameters changed (so a re-run with the same
    work folder resumes from the pipeline's cache).
    """
    post = imgs["post"].get_fdata(dtype=np.float32)
    pre = imgs["pre"].get_fdata(dtype=np.float32)
    t2 = np.asarray(imgs["t2"].dataobj) > 0
    zooms = imgs["post"].header.get_zooms()[:3]
    wm = wm_mask_from_t1(pre, zooms)
    params = {"seeds": seeds, "n_lesions": n_lesions, "unmodified": unmodified,
              "inputs": {k: _sha(Path(imgs[k].get_filename())) for k in SCAN_FILES},
              "module": _sha(REPO / "lesionpipe" / "realinsert.py")}
    manifest = bids / "code" / "insertion.json"
    fresh = not (manifest.is_file() and json.loads(manifest.read_text()) == params)
    bids.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "real MS patient with inserted synthetic enhancing lesions", "BIDSVersion": "1.8.0",
         "DatasetType": "raw"}, indent=1))
    (bids / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in SUBJECTS))
    sessions = {}
    for seed in seeds:
        res = insert_lesions(post, pre, wm, imgs["post"].affine, np.random.default_rng(seed), n_lesions,
                             exclude=t2)
        sessions[f"seed{seed}"] = (res.post, res.labels, [les.row() for les in res.lesions])
    if unmodified:
        sessions["unmodified"] = (post, np.zeros(post.shape, np.int16), [])
    truth = {}
    for ses, (post_s, labels, rows) in sessions.items():
        truth[ses] = (labels, rows)
        tpath = truth_dir / f"ses-{ses}_inserted_dseg.nii.gz"
        if fresh or not tpath.exists():
            nb.save(nb.Nifti1Image(labels, imgs["post"].affine), str(tpath))
        for sub in SUBJECTS:
            anat = bids / f"sub-{sub}" / f"ses-{ses}" / "anat"
            ppath = anat / f"sub-{sub}_ses-{ses}_ce-gadolinium_T1w.nii.gz"
            if fresh or not ppath.exists():
                _save_float(post_s, imgs["post"], ppath)
            if sub == "prepost":
                qpath = anat / f"sub-{sub}_ses-{ses}_T1w.nii.gz"
                if fresh or not qpath.exists():
                    _save_float(pre, imgs["pre"], qpath)
    for sub in SUBJECTS:  # drop sessions of an earlier run with other seeds
        for old in (bids / f"sub-{sub}").glob("ses-*"):
            if old.name[4:] not in sessions:
                shutil.rmtree(old)
    manifest.parent.mkdir(exist_ok=True)
    manifest.write_text(json.dumps(params, indent=1))
    return truth


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# =================================================================================================
# pipeline
# =================================================================================================
def find_lesionpipe(explicit: str | None) -> list[str]:
    if explicit:
        return explicit.split()
    beside = Path(sys.executable).parent / "lesionpipe"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("lesionpipe")
    if found:
        return [found]
    raise EvalError("no `lesionpipe` command beside this Python or on PATH; pass --lesionpipe CMD")


def detector_source(lp: list[str]) -> str:
    """Where the detector's code lives and its git commit (best effort, for the record)."""
    try:
        first = Path(lp[0]).read_text(errors="replace").splitlines()[0]
        python = first[2:].strip().split()[0] if first.startswith("#!") else sys.executable
        where = subprocess.run([python, "-c", "import lesionpipe, os; print(os.path.dirname("
                                "os.path.dirname(lesionpipe.__file__)))"], capture_output=True, cwd="/",
                               text=True, timeout=60).stdout.strip()
        commit = subprocess.run(["git", "-C", where, "log", "-1", "--format=%h %s"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return f"{where} @ {commit or 'unknown commit'}{' (uncommitted changes)' if dirty else ''}"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def run_pipeline(cmd: list[str], log: Path) -> int:
    env = dict(os.environ, NIPYPE_NO_ET="1")
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("[") or "FAILED" in line or "Error" in line:
                print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc not in (0, 1):
        raise EvalError(f"`lesionpipe run` exited with code {rc}; see {log}")
    return rc


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# =================================================================================================
# evaluation
# =================================================================================================
def _brain_depth(post: np.ndarray, zooms) -> np.ndarray:
    brain = ndi.binary_fill_holes(post > 0)
    return ndi.distance_transform_edt(np.pad(brain, 1), sampling=zooms)[1:-1, 1:-1, 1:-1]


def _elongation(mask: np.ndarray, zooms) -> float:
    pts = np.argwhere(mask) * np.asarray(zooms, float)
    if len(pts) < 4:
        return float("nan")
    ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))
    return float(np.sqrt(ev[-1] / max(ev[-2], 1e-3)))


def evaluate(out_dir: Path, bids: Path, deriv: Path, imgs: dict, truth: dict) -> dict:
    post0 = imgs["post"].get_fdata(dtype=np.float32)
    pre = imgs["pre"].get_fdata(dtype=np.float32)
    t2 = np.asarray(imgs["t2"].dataobj) > 0
    zooms = tuple(float(z) for z in imgs["post"].header.get_zooms()[:3])
    vox_mm3 = float(np.prod(zooms))
    t2_near = ndi.distance_transform_edt(~t2, sampling=zooms) <= 2.0
    depth = _brain_depth(post0, zooms)
    wm = wm_mask_from_t1(pre, zooms)
    post_ref = wm_mode(post0, wm)[0]
    pre_ref = wm_mode(pre, wm)[0]
    counts = {(r["participant_id"], r["session_id"]): r for r in _read_tsv(deriv / "gel_counts.tsv")} \
        if (deriv / "gel_counts.tsv").is_file() else {}

    visits, inserted_rows, others, masks = [], [], [], {}
    for sub, mode in SUBJECTS.items():
        for ses, (tlab, trows) in truth.items():
            key = (f"sub-{sub}", f"ses-{ses}")
            crow = counts.get(key, {})
            v = {"visit": f"{key[0]}_{key[1]}", "mode": mode, "session": ses,
                 "status": crow.get("status", "missing"), "error": crow.get("error", "") or "",
                 "pipeline_count": crow.get("gel_count", "")}
            anat = deriv / key[0] / key[1] / "anat"
            dseg_path = anat / f"{key[0]}_{key[1]}_{SUFFIX}_dseg.nii.gz"
            table_path = anat / f"{key[0]}_{key[1]}_{SUFFIX}_lesions.tsv"
            pred = None
            if v["status"] == "ok" and dseg_path.is_file():
                img = nb.load(str(dseg_path))
                if img.shape != post0.shape or not np.allclose(img.affine, imgs["post"].affine, atol=1e-3):
                    v["status"], v["error"] = "failed", f"{dseg_path.name}: grid differs from the input"
                else:
                    pred = np.asarray(img.dataobj).astype(np.int32)
            elif v["status"] == "ok":
                v["status"], v["error"] = "failed", f"{dseg_path.name} missing"
            table = {int(r["lesion_id"]): r for r in _read_tsv(table_path)} if table_path.is_file() else {}
            n_t = len(trows)
            if pred is None:
                v.update(inserted=n_t, detected=0, inserted_ge20=sum(r["volume_mm3"] >= 20 for r in trows),
                         detected_ge20=0, detected_strict=0, other=None, other_on_t2=None,
                         other_in_unmodified=None)
                for r in trows:
                    inserted_rows.append({"visit": v["visit"], "mode": mode, **r, "detected": "n/a"})
                visits.append(v)
                continue
            masks[v["visit"]] = pred
            diag = _pipeline_diagnostics(anat, key, tlab, trows, zooms)
            m = match_lesions(tlab, pred, {})
            by_label = {r["label"]: r for r in m["truth"]}
            det = det20 = strict = n20 = 0
            for r in trows:
                mt = by_label.get(r["label"], {"detected": False, "detected_strict": False,
                                                "overlap_fraction": 0.0, "n_pred_overlapping": 0})
                hit = [p for p in np.unique(pred[tlab == r["label"]]) if p > 0]
                row = {"visit": v["visit"], "mode": mode, **r, "detected": int(mt["detected"]),
                       "detected_strict": int(mt["detected_strict"]),
                       "overlap_fraction": mt["overlap_fraction"],
                       "pred_ids": ",".join(str(int(p)) for p in hit),
                       "pred_volume_mm3": ",".join(table.get(int(p), {}).get("volume_mm3", "?") for p in hit),
                       "pred_peak_pct": ",".join(table.get(int(p), {}).get("peak_enhancement_pct", "?")
                                                 for p in hit),
                       **diag.get(r["label"], {})}
                inserted_rows.append(row)
                det += mt["detected"]
                strict += mt["detected_strict"]
                if r["volume_mm3"] >= 20:
                    n20 += 1
                    det20 += mt["detected"]
            v.update(inserted=n_t, detected=det, inserted_ge20=n20, detected_ge20=det20,
                     detected_strict=strict)
            n_other = on_t2 = 0
            for pr in m["pred"]:
                if pr["status"] == "tp":
                    continue
                lid = pr["label"]
                les = pred == lid
                trow = table.get(lid, {})
                com = np.array(ndi.center_of_mass(les))
                ci = tuple(int(round(c)) for c in com)
                o = {"visit": v["visit"], "mode": mode, "lesion_id": lid,
                     "volume_mm3": float(trow.get("volume_mm3", les.sum() * vox_mm3)),
                     "n_voxels": int(les.sum()),
                     "mean_enhancement_pct": trow.get("mean_enhancement_pct", ""),
                     "peak_enhancement_pct": trow.get("peak_enhancement_pct", ""),
                     "centroid_x": trow.get("centroid_x", ""), "centroid_y": trow.get("centroid_y", ""),
                     "centroid_z": trow.get("centroid_z", ""),
                     "centroid_ijk": ",".join(str(c) for c in ci),
                     "t2_overlap_voxels": int((les & t2).sum()),
                     "t2_within_2mm": int((les & t2_near).any()),
                     "depth_below_brain_surface_mm": round(float(depth[les].max()), 1),
                     "pre_pct_wm": round(float(np.median(pre[les]) / pre_ref * 100), 0),
                     "post_pct_wm": round(float(np.median(post0[les]) / post_ref * 100), 0),
                     "elongation": round(_elongation(les, zooms), 1),
                     "_com": com}
                others.append(o)
                n_other += 1
                on_t2 += o["t2_overlap_voxels"] > 0
            v.update(other=n_other, other_on_t2=on_t2)
            visits.append(v)

    # the same anatomy in every visit: group other detections into places ("sites")
    union = np.zeros(post0.shape, bool)
    for o in others:
        union |= masks[o["visit"]] == o["lesion_id"]
    sites, n_sites = ndi.label(union, structure=np.ones((3, 3, 3), bool))
    for o in others:
        ids = np.unique(sites[masks[o["visit"]] == o["lesion_id"]])
        o["site"] = int(ids[ids > 0][0])
    unmod = {mode: f"sub-{sub}_ses-unmodified" for sub, mode in SUBJECTS.items()}
    for o in others:
        ref = unmod[o["mode"]]
        o["also_in_unmodified"] = ("n/a" if ref not in masks or o["visit"] == ref else
                                   int(bool((masks[ref][masks[o["visit"]] == o["lesion_id"]] > 0).any())))
    for v in visits:
        mine = [o for o in others if o["visit"] == v["visit"]]
        if v.get("other") is not None and v["session"] != "unmodified" and unmod[v["mode"]] in masks:
            v["other_in_unmodified"] = sum(o["also_in_unmodified"] == 1 for o in mine)
        elif v.get("other") is not None:
            v["other_in_unmodified"] = "n/a"
    for o in others:
        o["hints"] = _hints(o)

    # crops: one per site (largest occurrence) and one per missed inserted lesion
    crops_dir = out_dir / "crops"
    if crops_dir.exists():
        shutil.rmtree(crops_dir)
    crops_dir.mkdir(parents=True)
    bids_post = {}
    site_rows = []
    for s in range(1, n_sites + 1):
        occ = [o for o in others if o["site"] == s]
        if not occ:
            continue
        rep = max(occ, key=lambda o: o["n_voxels"])
        post_s = _visit_post(bids_post, bids, rep["visit"], post0)
        png = crops_dir / f"site{s:03d}.png"
        title = (f"site {s}: {rep['visit']} #{rep['lesion_id']}, {rep['volume_mm3']:.0f} mm3, "
                 f"peak {rep['peak_enhancement_pct']}%")
        _crop_png(png, post_s, pre, post_ref, pre_ref, masks[rep["visit"]] == rep["lesion_id"],
                  masks[rep["visit"]], truth[rep["visit"].split("_ses-")[1]][0], t2, rep["_com"],
                  imgs["post"], title)
        for o in occ:
            o["crop"] = f"crops/{png.name}"
        site_rows.append({"site": s, "crop": f"crops/{png.name}", "n_visits": len(occ),
                          "visits": ", ".join(f"{o['visit']}#{o['lesion_id']}" for o in occ),
                          "modes": ", ".join(sorted({o["mode"] for o in occ})),
                          "max_volume_mm3": max(o["volume_mm3"] for o in occ),
                          "max_peak_pct": max(float(o["peak_enhancement_pct"] or 0) for o in occ),
                          "t2_overlap": int(any(o["t2_overlap_voxels"] for o in occ)),
                          "hints": rep["hints"], "centroid_ijk": rep["centroid_ijk"],
                          "centroid_xyz": f"{rep['centroid_x']}, {rep['centroid_y']}, {rep['centroid_z']}"})
    miss_rows = []
    for r in inserted_rows:
        if r["detected"] != 0:
            continue
        ses = r["visit"].split("_ses-")[1]
        post_s = _visit_post(bids_post, bids, r["visit"], post0)
        png = crops_dir / f"miss_{r['visit']}_{r['label']:02d}.png"
        tl = truth[ses][0]
        pred = masks.get(r["visit"], np.zeros(post0.shape, np.int32))
        com = np.array([r["centre_i"], r["centre_j"], r["centre_k"]])
        _crop_png(png, post_s, pre, post_ref, pre_ref, tl == r["label"], pred, tl, t2, com, imgs["post"],
                  f"missed: {r['visit']} inserted #{r['label']}, {r['volume_mm3']:.0f} mm3, "
                  f"{r['enhancement_pct']}%, {r['kind']}", target_colour="lime")
        r["crop"] = f"crops/{png.name}"
        miss_rows.append(r)
    for o in others:
        o.pop("_com", None)
    return {"visits": visits, "inserted": inserted_rows, "others": others, "sites": site_rows,
            "misses": miss_rows, "post_wm_mode": post_ref, "pre_wm_mode": pre_ref}


def _pipeline_diagnostics(anat: Path, key: tuple, tlab: np.ndarray, trows: list[dict], zooms) -> dict:
    """Per inserted lesion: what the pipeline's own images say there (for explaining misses).

    ``in_brain_mask``: fraction of the lesion inside the pipeline's brain mask; ``pipeline_enh_median``:
    median of the enhancement map (% of white matter) inside the lesion; ``candidate``: decision and
    reason of the detector's candidates whose centroid lies within 2 mm of the lesion (from the
    ``desc-candidates_dseg`` image when present, else candidates whose centroid lies within 2 mm of
    the lesion in ``desc-candidates_table.tsv``), ``none`` when no candidate was formed there.
    """
    stem = anat / f"{key[0]}_{key[1]}_ce-gadolinium_space-orig_"
    out: dict = {r["label"]: {} for r in trows}
    if not trows:
        return out
    brain = stem.with_name(stem.name + "desc-brain_mask.nii.gz")
    enh = stem.with_name(stem.name + "desc-enhancement_map.nii.gz")
    cand = stem.with_name(stem.name + "desc-candidates_table.tsv")
    bmask = np.asarray(nb.load(str(brain)).dataobj) > 0 if brain.is_file() else None
    emap = nb.load(str(enh)).get_fdata(dtype=np.float32) if enh.is_file() else None
    cands = _read_tsv(cand) if cand.is_file() else None
    cseg_path = stem.with_name(stem.name + "desc-candidates_dseg.nii.gz")
    cseg = np.asarray(nb.load(str(cseg_path)).dataobj) if cseg_path.is_file() and cands is not None else None
    for r in trows:
        les = tlab == r["label"]
        d = out[r["label"]]
        if bmask is not None and bmask.shape == les.shape:
            d["in_brain_mask"] = round(float(bmask[les].mean()), 2)
        if emap is not None and emap.shape == les.shape:
            d["pipeline_enh_median"] = round(float(np.median(emap[les])), 1)
        if cseg is not None and cseg.shape == les.shape:  # candidate k = row k of the table
            ids = [int(k) for k in np.unique(cseg[les]) if 0 < k <= len(cands)]
            d["candidate"] = "; ".join(
                f"{cands[k - 1].get('decision', '?')}: {cands[k - 1].get('reason') or 'kept'} "
                f"({float(cands[k - 1].get('volume_mm3') or 'nan'):.0f} mm3)" for k in ids) or "none"
        elif cands is not None:
            lo = np.maximum(np.argwhere(les).min(axis=0) - 4, 0)
            hi = np.argwhere(les).max(axis=0) + 5
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            grown = ndi.distance_transform_edt(~les[box], sampling=zooms) <= 2.0
            found = []
            for c in cands:
                try:
                    ijk = [int(round(float(c[f"centroid_{a}"]))) - int(o) for a, o in zip("ijk", lo)]
                except (KeyError, ValueError):
                    continue
                if all(0 <= x < n for x, n in zip(ijk, grown.shape)) and grown[tuple(ijk)]:
                    found.append(f"{c.get('decision', '?')}: {c.get('reason') or 'kept'} "
                                 f"({float(c.get('volume_mm3') or 'nan'):.0f} mm3)")
            d["candidate"] = "; ".join(found) or "none"
    return out


def _visit_post(cache: dict, bids: Path, visit: str, post0: np.ndarray) -> np.ndarray:
    """The post-contrast input of a visit (the real post plus that visit's inserted lesions)."""
    if visit not in cache:
        sub, ses = visit.split("_")
        path = bids / sub / ses / "anat" / f"{visit}_ce-gadolinium_T1w.nii.gz"
        cache.clear()  # one visit in memory at a time
        cache[visit] = nb.load(str(path)).get_fdata(dtype=np.float32) if path.is_file() else post0
    return cache[visit]


def _hints(o: dict) -> str:
    h = []
    if o["t2_overlap_voxels"] > 0:
        h.append("on a T2 lesion")
    elif o["t2_within_2mm"]:
        h.append("within 2 mm of a T2 lesion")
    if o["depth_below_brain_surface_mm"] < 6:
        h.append("at the brain surface")
    if o["pre_pct_wm"] < 60:
        h.append("dark on pre (CSF/sulcus/ventricle)")
    elif o["pre_pct_wm"] < 85:
        h.append("grey-matter level on pre")
    if o["elongation"] == o["elongation"] and o["elongation"] >= 2.5:
        h.append(f"elongated ({o['elongation']}:1)")
    if o.get("also_in_unmodified") == 1:
        h.append("also found in the unmodified scan")
    return "; ".join(h) or "deep, no T2 lesion"


def _crop_png(path: Path, post, pre, post_ref, pre_ref, target, pred, truth, t2, com, ref_img, title,
              target_colour="red") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = ras_grid(ref_img)
    c = np.round(grid.to_ras_index(com)[0]).astype(int)
    half = [int(round(CROP_MM / 2 / z)) for z in grid.zooms]
    box = tuple(slice(max(ci - h, 0), ci + h + 1) for ci, h in zip(c, half))
    local = [ci - b.start for ci, b in zip(c, box)]

    def cut(a):
        return to_ras(a, grid)[box]

    post_n = cut(post) / post_ref * 100
    pre_n = cut(pre) / pre_ref * 100
    layers = {"post": post_n, "pre": pre_n, "diff": post_n - pre_n}
    outlines = [(cut(pred > 0) & ~cut(target), "orange"), (cut(truth > 0), "lime"), (cut(t2), "cyan"),
                (cut(target), target_colour)]
    fig = Figure(figsize=(7.6, 5.2), dpi=96)
    FigureCanvasAgg(fig)
    for r, plane in enumerate(("axial", "coronal")):
        idx = local[2] if plane == "axial" else local[1]
        for col, (name, vol) in enumerate(layers.items()):
            ax = fig.add_subplot(2, 3, r * 3 + col + 1)
            img2d, aspect = plane_slice(vol, grid.zooms, plane, idx)
            lo, hi = DISPLAY[name]
            ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if name != "pre":
                for mask, colour in outlines:
                    m2d, _ = plane_slice(mask.astype(float), grid.zooms, plane, idx)
                    if m2d.any():
                        ax.contour(m2d, [0.5], colors=colour, linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title({"post": "post", "pre": "pre", "diff": "post - pre"}[name], fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{plane} (R left)", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.savefig(str(path), format="png", bbox_inches="tight")


# =================================================================================================
# output
# =================================================================================================
def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_tsv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not k.startswith("_")]
    lines = ["\t".join(cols)] + ["\t".join(_fmt(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def summarise(res: dict) -> tuple[list[dict], str]:
    rows = []
    for v in res["visits"]:
        sens = f"{v['detected']}/{v['inserted']}" if v["inserted"] else "-"
        s20 = f"{v['detected_ge20']}/{v['inserted_ge20']}" if v["inserted"] else "-"
        rows.append({"visit": v["visit"], "mode": v["mode"], "status": v["status"],
                     "pipeline_count": v["pipeline_count"], "inserted_detected": sens,
                     "inserted_ge20mm3_detected": s20,
                     "strict": f"{v['detected_strict']}/{v['inserted']}" if v["inserted"] else "-",
                     "other_detections": v["other"], "other_on_T2_lesion": v["other_on_t2"],
                     "other_also_in_unmodified": v.get("other_in_unmodified"), "error": v["error"]})
    lines = []
    cols = ["visit", "mode", "status", "pipeline_count", "inserted_detected", "inserted_ge20mm3_detected",
            "strict", "other_detections", "other_on_T2_lesion", "other_also_in_unmodified"]
    width = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols} if rows else {}
    lines.append("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        lines.append("  ".join(_fmt(r[c]).ljust(width[c]) for c in cols))
    lines.append("")
    for mode in SUBJECTS.values():
        vs = [v for v in res["visits"] if v["mode"] == mode and v["inserted"] and v["other"] is not None]
        n, d = sum(v["inserted"] for v in vs), sum(v["detected"] for v in vs)
        n20, d20 = sum(v["inserted_ge20"] for v in vs), sum(v["detected_ge20"] for v in vs)
        oth = [v["other"] for v in vs]
        un = [v for v in res["visits"] if v["mode"] == mode and v["session"] == "unmodified"]
        un_txt = (f"; unmodified scan: {un[0]['other']} detections" if un and un[0]["other"] is not None
                  else "")
        if n:
            lines.append(f"{mode}: sensitivity {d}/{n} = {d / n:.0%}, >= 20 mm3 {d20}/{n20} = "
                         f"{d20 / max(n20, 1):.0%}; other detections per visit with insertions "
                         f"{np.mean(oth):.1f} (range {min(oth)}-{max(oth)}){un_txt}")
        elif un_txt:
            lines.append(f"{mode}:{un_txt[1:]}")
    lines.append(f"distinct places of other detections (sites): {len(res['sites'])}, "
                 f"on a T2 lesion: {sum(s['t2_overlap'] for s in res['sites'])}")
    failed = [v for v in res["visits"] if v["status"] != "ok"]
    for v in failed:
        lines.append(f"FAILED {v['visit']}: {v['error'] or v['status']}")
    return rows, "\n".join(lines)


def _img_tag(out_dir: Path, rel: str, alt: str) -> str:
    data = base64.b64encode((out_dir / rel).read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'>"


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>")
    return "\n".join(out) + "</table>"


def write_html(path: Path, out_dir: Path, res: dict, summary_text: str, meta: dict) -> None:
    p = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>lesionpipe: real scan with inserted "
         "lesions</title><style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
         "pre{background:#f4f4f4;padding:.8em;overflow-x:auto}table{border-collapse:collapse;font-size:12px}"
         "td,th{border:1px solid #bbb;padding:2px 5px}figure{display:inline-block;margin:.4em;"
         "vertical-align:top}figcaption{font-size:12px;max-width:580px}</style></head><body>",
         "<h1>Detector on a real MS patient's scans with inserted enhancing lesions</h1>",
         "<p>Real post-contrast T1 (MNI space, skull-stripped; the real pre-contrast T1 is a different "
         "sequence). Synthetic enhancing lesions were inserted into normal-appearing white matter of the "
         "post-contrast image; <b>ses-unmodified</b> is the real scan alone. <b>sub-prepost</b> visits "
         "were run with the pre-contrast T1, <b>sub-postonly</b> visits without it (same post images).</p>",
         f"<pre>{html.escape(summary_text)}</pre>",
         f"<pre>{html.escape(json.dumps(meta, indent=1))}</pre>",
         "<p>Crops: 40 mm, radiological (patient's right on the left), intensities in % of the white-matter "
         "mode (post 0-180, pre 0-140, post - pre -40..80; pre and post are different sequences, so the "
         "difference is only indicative). Outlines: <span style='color:red'>red</span> the detection shown, "
         "<span style='color:darkorange'>orange</span> other detections, <span style='color:green'>green"
         "</span> inserted lesions, <span style='color:darkcyan'>cyan</span> T2 lesion consensus "
         "(real MS lesions). Hints are automatic, not a classification.</p>",
         "<h2>Places of other detections (not overlapping an inserted lesion)</h2>"]
    for s in res["sites"]:
        cap = (f"site {s['site']}: found in {s['n_visits']} visit(s) ({s['modes']}); "
               f"max {s['max_volume_mm3']:.0f}"
               f" mm3, peak {s['max_peak_pct']:.0f}%; voxel {s['centroid_ijk']}, world {s['centroid_xyz']}; "
               f"hints: {s['hints']}; visits: {s['visits']}")
        p.append(f"<figure>{_img_tag(out_dir, s['crop'], cap)}<figcaption>{html.escape(cap)}"
                 "</figcaption></figure>")
    p.append("<h2>Every other detection</h2>")
    p.append(_table(res["others"], ["visit", "mode", "lesion_id", "site", "volume_mm3",
                                    "mean_enhancement_pct",
                                    "peak_enhancement_pct", "centroid_x", "centroid_y", "centroid_z",
                                    "t2_overlap_voxels", "depth_below_brain_surface_mm", "pre_pct_wm",
                                    "elongation", "also_in_unmodified", "hints"]))
    p.append(f"<h2>Missed inserted lesions ({len(res['misses'])})</h2><p>Green: the missed lesion's truth "
             "outline; orange: detections nearby.</p>")
    for r in res["misses"]:
        cap = (f"{r['visit']} inserted #{r['label']}: {r['volume_mm3']:.0f} mm3, {r['kind']}, "
               f"+{r['enhancement_pct']}% of local white matter; in the pipeline's brain mask: "
               f"{r.get('in_brain_mask', 'n/a')}; enhancement map median "
               f"{r.get('pipeline_enh_median', 'n/a')}%; "
               f"detector candidate here: {r.get('candidate', 'n/a')}")
        p.append(f"<figure>{_img_tag(out_dir, r['crop'], cap)}<figcaption>{html.escape(cap)}"
                 "</figcaption></figure>")
    p.append("<h2>Inserted lesions</h2>")
    p.append(_table(res["inserted"], ["visit", "mode", "label", "kind", "volume_mm3", "enhancement_pct",
                                      "centre_x", "centre_y", "centre_z", "detected", "detected_strict",
                                      "overlap_fraction", "pred_ids", "pred_volume_mm3", "pred_peak_pct",
                                      "in_brain_mask", "pipeline_enh_median", "candidate"]))
    p.append("</body></html>")
    path.write_text("\n".join(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=Path, default=None,
                    help="folder with T1POST_mni, T1_mni and T2_lesions_consensus_mni (.nii.gz); default "
                         "<repo>/../shared/real_scans/open_ms_patient07")
    ap.add_argument("--out", type=Path, default=Path("real_insert_eval"), help="results folder")
    ap.add_argument("--work", type=Path, default=None,
                    help="BIDS dataset, pipeline outputs and Nipype cache (default: a temporary folder, "
                         "removed at the end); re-use it to resume")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one visit per seed")
    ap.add_argument("--n-lesions", type=int, default=12, help="inserted lesions per visit")
    ap.add_argument("--no-unmodified", action="store_true", help="skip the visit without insertions")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--settings", type=Path, default=None, help="settings TOML passed to lesionpipe run")
    ap.add_argument("--reports", action="store_true", help="let the pipeline write its HTML QA reports")
    ap.add_argument("--lesionpipe", default=None,
                    help="command that runs lesionpipe (default: the one beside this Python)")
    args = ap.parse_args(argv)
    tmp = None
    try:
        scans = (args.scans or default_scans()).resolve()
        imgs = load_scans(scans)
        out_dir = args.out.resolve()
        if out_dir == scans or scans in out_dir.parents:
            raise EvalError(f"--out {out_dir} is inside the scans folder {scans}")
        lp = find_lesionpipe(args.lesionpipe)
        version = subprocess.run(lp + ["--version"], capture_output=True, text=True).stdout.strip()
        source = detector_source(lp)
        print(f"detector: {version}, code {source}", flush=True)
        work = args.work.resolve() if args.work else Path(tmp := tempfile.mkdtemp(prefix="real_insert_"))
        out_dir.mkdir(parents=True, exist_ok=True)
        bids, deriv = work / "bids", work / "derivatives"
        t0 = time.time()
        print(f"building the dataset in {bids} ({len(args.seeds)} seeds x {args.n_lesions} lesions)",
              flush=True)
        truth = build_dataset(imgs, bids, out_dir / "truth", args.seeds, args.n_lesions,
                              not args.no_unmodified)
        cmd = lp + ["run", str(bids), str(deriv), "-w", str(work / "nipype"), "--nprocs", str(args.nprocs)]
        if args.settings:
            cmd += ["--settings", str(args.settings.resolve())]
        if not args.reports:
            cmd.append("--no-reports")
        rc = run_pipeline(cmd, out_dir / "pipeline_log.txt")
        t_run = time.time() - t0
        res = evaluate(out_dir, bids, deriv, imgs, truth)
        rows, text = summarise(res)
        meta = {"command": " ".join([Path(sys.executable).name, "scripts/eval_real_insert.py"]
                                     + (argv if argv is not None else sys.argv[1:])),
                "detector": version, "detector_code": source, "lesionpipe_command": " ".join(lp),
                "pipeline_exit_code": rc,
                "scans": scans.name, "seeds": args.seeds, "n_lesions_per_visit": args.n_lesions,
                "insertion": "lesionpipe.realinsert.insert_lesions defaults (15-500 mm3 log-uniform, "
                             "+20-80% of local WM, 30% of lesions >= 80 mm3 ring-enhancing, >= 8 mm apart, "
                             "normal WM of the pre-contrast T1, T2 lesions + 2 mm excluded)",
                "post_wm_mode": round(res["post_wm_mode"], 1), "pre_wm_mode": round(res["pre_wm_mode"], 1),
                "seconds_build_and_run": round(t_run, 1)}
        write_tsv(out_dir / "summary.tsv", rows)
        write_tsv(out_dir / "inserted_lesions.tsv", res["inserted"])
        write_tsv(out_dir / "other_detections.tsv", res["others"])
        write_tsv(out_dir / "sites.tsv", res["sites"])
        (out_dir / "results.json").write_text(json.dumps(
            {"meta": meta, "summary": rows, "sites": res["sites"]}, indent=1, default=str))
        write_html(out_dir / "report.html", out_dir, res, text, meta)
        print()
        print(text)
        print(f"\nresults: {out_dir}/report.html, summary.tsv, inserted_lesions.tsv, other_detections.tsv")
        return 0 if rc == 0 else 1
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
