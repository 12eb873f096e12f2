"""Tests of lesionpipe.evaluate on tiny hand-made truth/prediction folders with known answers."""

from __future__ import annotations

import csv
import json

import nibabel as nb
import numpy as np
import pytest

from lesionpipe.evaluate import EvaluationError, evaluate_outputs, match_lesions

SHAPE = (20, 20, 10)
AFF = np.diag([1.0, 1.0, 1.0, 1.0])


def _tsv(path, rows, cols):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _nii(path, data, dtype=np.int16):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data.astype(dtype), AFF), str(path))


def _cube(lab, value, corner, size):
    i, j, k = corner
    lab[i:i + size, j:j + size, k:k + size] = value


@pytest.fixture()
def folders(tmp_path):
    truth, out = tmp_path / "truth", tmp_path / "out"
    visits = ["ses-w00", "ses-w04", "ses-w08", "ses-w12"]
    t = {v: np.zeros(SHAPE, int) for v in visits}
    p = {v: np.zeros(SHAPE, int) for v in visits}
    # w00: lesion 1 found, lesion 2 found in two pieces (split), lesion 3 too small (uncounted)
    _cube(t["ses-w00"], 1, (2, 2, 2), 3)     # 27 voxels
    _cube(t["ses-w00"], 2, (10, 10, 2), 4)   # 64 voxels
    t["ses-w00"][16, 16, 5] = t["ses-w00"][16, 16, 6] = 3
    _cube(p["ses-w00"], 1, (2, 2, 2), 3)
    p["ses-w00"][10:12, 10:14, 2:6] = 2
    p["ses-w00"][12, 10:14, 2:6] = 3
    p["ses-w00"][16, 16, 5] = 4               # matches the uncounted lesion: not a false positive
    p["ses-w00"][2, 15, 7] = p["ses-w00"][2, 16, 7] = p["ses-w00"][2, 17, 7] = 5  # false positive
    # w04: failed visit with one truth lesion
    _cube(t["ses-w04"], 1, (5, 5, 5), 3)
    # w08: one truth lesion, nothing predicted
    _cube(t["ses-w08"], 1, (5, 5, 5), 3)
    # w12: nothing anywhere
    counts = {"ses-w00": 2, "ses-w04": 1, "ses-w08": 1, "ses-w12": 0}
    _tsv(truth / "truth_counts.tsv",
         [{"participant_id": "sub-01", "session_id": v, "week": v[-2:], "gel_count": counts[v],
           "has_pre": int(v != "ses-w08"), "grid": "3d" if v != "ses-w12" else "2d"} for v in visits],
         ["participant_id", "session_id", "week", "gel_count", "has_pre", "grid"])
    les = [("ses-w00", 1, 27, 40.0, "nodular", 1), ("ses-w00", 2, 64, 80.0, "ring", 1),
           ("ses-w00", 3, 2, 20.0, "nodular", 0), ("ses-w04", 1, 27, 30.0, "nodular", 1),
           ("ses-w08", 1, 27, 15.0, "irregular", 1)]
    _tsv(truth / "truth_lesions.tsv",
         [{"participant_id": "sub-01", "session_id": s, "lesion_id": i, "n_voxels": n, "volume_mm3": n,
           "enhancement_pct": e, "kind": k, "counted": c, "touching": "none"} for s, i, n, e, k, c in les],
         ["participant_id", "session_id", "lesion_id", "n_voxels", "volume_mm3", "enhancement_pct", "kind",
          "counted", "touching"])
    for v in visits:
        _nii(truth / "sub-01" / v / f"sub-01_{v}_label-GEL_dseg.nii.gz", t[v])
        if v != "ses-w04":
            _nii(out / "sub-01" / v / "anat" / f"sub-01_{v}_ce-gadolinium_space-orig_label-GEL_dseg.nii.gz",
                 p[v])
            post = np.random.default_rng(0).normal(100, 5, SHAPE) + 50 * (t[v] > 0)
            _nii(out / "sub-01" / v / "anat" / f"sub-01_{v}_ce-gadolinium_space-orig_desc-preproc_T1w.nii.gz",
                 post, np.float32)
    _tsv(out / "gel_counts.tsv",
         [{"participant_id": "sub-01", "session_id": "ses-w00", "week": 0, "gel_count": 5, "status": "ok",
           "error": "", "has_pre": 1},
          {"participant_id": "sub-01", "session_id": "ses-w04", "week": 4, "gel_count": "n/a",
           "status": "failed", "error": "registration failed", "has_pre": 1},
          {"participant_id": "sub-01", "session_id": "ses-w08", "week": 8, "gel_count": 0, "status": "ok",
           "error": "", "has_pre": 0},
          {"participant_id": "sub-01", "session_id": "ses-w12", "week": 12, "gel_count": 0, "status": "ok",
           "error": "", "has_pre": 1}],
         ["participant_id", "session_id", "week", "gel_count", "status", "error", "has_pre"])
    return out, truth, t, p


def test_known_answers(folders, tmp_path):
    out, truth, t, p = folders
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev")
    o = rep.metrics["overall"]
    assert o["n_truth_lesions"] == 4                      # the 2-voxel lesion is not counted
    assert o["sensitivity"] == pytest.approx(2 / 4)        # failed visit's lesion is a miss
    assert o["sensitivity_ok_visits"] == pytest.approx(2 / 3)
    assert o["n_truth_in_failed_visits"] == 1
    assert o["n_fp"] == 1 and o["fp_per_scan"] == pytest.approx(1 / 3)
    assert o["n_pred_matching_uncounted_truth"] == 1
    assert o["precision"] == pytest.approx(3 / 4)          # 3 TP pieces, 1 FP
    assert o["n_split"] == 1
    assert rep.metrics["n_failed_visits"] == 1
    assert rep.metrics["failed_visits"][0]["error"] == "registration failed"
    # count agreement: only w12 is exact (0 = 0); failed visit never exact
    assert o["count_exact"] == pytest.approx(1 / 4)
    assert o["count_error_histogram"] == {"-1": 1, "0": 1, "3": 1}
    # Dice of w00 by hand
    tw, pw = t["ses-w00"] > 0, p["ses-w00"] > 0
    d00 = 2 * (tw & pw).sum() / (tw.sum() + pw.sum())
    v00 = [v for v in rep.visits if v["session_id"] == "ses-w00"][0]
    assert v00["dice"] == pytest.approx(d00)
    pooled = 2 * (tw & pw).sum() / (tw.sum() + pw.sum() + (t["ses-w08"] > 0).sum())
    assert o["dice_pooled"] == pytest.approx(pooled)
    # breakdowns
    vol = rep.metrics["breakdown"]["truth volume (mm3)"]
    assert vol["20-50"]["n_truth_lesions"] == 3 and vol["50-100"]["sensitivity"] == 1.0
    assert rep.metrics["breakdown"]["pre-contrast"]["post-only"]["sensitivity"] == 0.0
    # files
    ev = tmp_path / "ev"
    assert json.loads((ev / "evaluation.json").read_text())["overall"]["n_fp"] == 1
    page = (ev / "evaluation.html").read_text()
    assert page.count("data:image/png;base64,") == 2     # w08 miss and w00 false positive (w04 failed)
    assert "http" not in page.replace("http-equiv", "")
    rows = list(csv.DictReader(open(ev / "evaluation_lesions.tsv"), delimiter="\t"))
    assert sum(r["source"] == "prediction" for r in rows) == 5
    text = rep.summary_text()
    assert "sensitivity" in text and "50.0%" in text and "by grid" in text


def test_miss_cause_from_the_candidates(folders, tmp_path):
    """A miss is traced to the candidate it overlaps most, and its rejection reason."""
    out, truth, t, p = folders
    anat = out / "sub-01" / "ses-w08" / "anat"
    cand = np.zeros(SHAPE, int)
    cand[5:8, 5:8, 5] = 1                    # 9 voxels of the lesion: rejected by the classifier
    cand[5:8, 5:8, 6:8] = 2                  # 18 voxels of it: too faint (the larger overlap)
    cand[15, 15, 2] = 3
    _nii(anat / "sub-01_ses-w08_ce-gadolinium_space-orig_desc-candidates_dseg.nii.gz", cand)
    _tsv(anat / "sub-01_ses-w08_ce-gadolinium_space-orig_desc-candidates_table.tsv",
         [{"n_voxels": 9, "reason": "classifier: p = 0.12"}, {"n_voxels": 18, "reason": "faint"},
          {"n_voxels": 1, "reason": ""}], ["n_voxels", "reason"])
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev")
    assert rep.metrics["overall"]["miss_causes"] == {"faint": 1}
    miss = [r for r in rep.lesions if r["source"] == "truth" and r["session_id"] == "ses-w08"][0]
    assert miss["miss_candidate_mm3"] == 18.0
    cand[5:8, 5:8, 6:8] = 1
    _nii(anat / "sub-01_ses-w08_ce-gadolinium_space-orig_desc-candidates_dseg.nii.gz", cand)
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev")
    assert rep.metrics["overall"]["miss_causes"] == {"classifier": 1}
    assert "by cause: classifier 1" in rep.summary_text()
    assert [r["miss_cause"] for r in rep.lesions if r["session_id"] == "ses-w08"] == ["classifier: p = 0.12"]
    assert "lost: classifier: p = 0.12" in (tmp_path / "ev" / "evaluation.html").read_text()
    cand[cand == 1] = 0
    _nii(anat / "sub-01_ses-w08_ce-gadolinium_space-orig_desc-candidates_dseg.nii.gz", cand)
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev")
    assert rep.metrics["overall"]["miss_causes"] == {"no candidate": 1}


def test_binary_mask_is_labelled(folders, tmp_path):
    out, truth, t, p = folders
    anat = out / "sub-01" / "ses-w00" / "anat"
    dseg = anat / "sub-01_ses-w00_ce-gadolinium_space-orig_label-GEL_dseg.nii.gz"
    dseg.unlink()
    _nii(anat / "sub-01_ses-w00_ce-gadolinium_space-orig_label-GEL_mask.nii.gz", p["ses-w00"] > 0, np.uint8)
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev2")
    # the split pieces touch under 26-connectivity, so the mask gives one lesion for lesion 2
    assert rep.metrics["overall"]["n_split"] == 0
    assert rep.metrics["overall"]["sensitivity_ok_visits"] == pytest.approx(2 / 3)


def test_grid_mismatch_is_a_failed_visit(folders, tmp_path):
    out, truth, t, p = folders
    anat = out / "sub-01" / "ses-w12" / "anat"
    _nii(anat / "sub-01_ses-w12_ce-gadolinium_space-orig_label-GEL_dseg.nii.gz", np.zeros((5, 5, 5)))
    rep = evaluate_outputs(out, truth, out_dir=tmp_path / "ev3")
    failed = {f["session_id"]: f["error"] for f in rep.metrics["failed_visits"]}
    assert "grid" in failed["ses-w12"]


def test_missing_counts_file(tmp_path):
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "truth_counts.tsv").write_text("participant_id\tsession_id\n")
    (tmp_path / "truth" / "truth_lesions.tsv").write_text("participant_id\tsession_id\tlesion_id\n")
    with pytest.raises(EvaluationError, match="gel_counts.tsv: file not found"):
        evaluate_outputs(tmp_path / "out", tmp_path / "truth")


def test_strict_overlap():
    t = np.zeros((10, 10, 10), int)
    t[2:6, 2:6, 2:6] = 1                     # 64 voxels
    p = np.zeros_like(t)
    p[5, 5, 5] = 1                           # touches one voxel only
    m = match_lesions(t, p, {1: True})
    assert m["truth"][0]["detected"] and not m["truth"][0]["detected_strict"]
    p[2:5, 2:6, 2:6] = 1                     # now covers 48 of 64
    m = match_lesions(t, p, {1: True})
    assert m["truth"][0]["detected_strict"]
    big = np.zeros_like(t)
    big[1:9, 1:9, 1:9] = 1                   # swallows the lesion with lots of surrounding tissue
    m = match_lesions(t, big, {1: True})
    assert m["truth"][0]["detected"] and not m["truth"][0]["detected_strict"]
