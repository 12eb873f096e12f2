"""End to end: the pipeline on sample_scans/ (plus two broken visits), compared with the truth.

One batch run serves every assertion here (it is the suite's slowest test); a second run on the
same work directory checks that finished visits are reused.
"""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from lesionpipe.cli import main

pytestmark = pytest.mark.e2e
SAMPLE = Path(__file__).resolve().parents[1] / "sample_scans"
TRUTH = SAMPLE / "derivatives" / "truth"


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids = root / "bids"
    shutil.copytree(SAMPLE, bids, ignore=shutil.ignore_patterns("derivatives"))
    # two broken visits: a truncated post-contrast scan and a 4-D one
    some_post = sorted(bids.glob("sub-*/ses-*/anat/*_ce-gadolinium_T1w.nii.gz"))[0]
    bad = bids / "sub-98" / "ses-w04" / "anat"
    bad.mkdir(parents=True)
    raw = some_post.read_bytes()
    (bad / "sub-98_ses-w04_ce-gadolinium_T1w.nii.gz").write_bytes(raw[: len(raw) // 3])
    img = nb.load(some_post)
    four = bids / "sub-99" / "ses-w04" / "anat"
    four.mkdir(parents=True)
    data = np.asanyarray(img.dataobj)
    nb.save(nb.Nifti1Image(np.stack([data, data], -1), img.affine),
            four / "sub-99_ses-w04_ce-gadolinium_T1w.nii.gz")
    before = _tree_digest(bids)
    out, work = root / "out", root / "work"
    code = main(["run", str(bids), str(out), "-w", str(work), "--nprocs", "2"])
    return {"root": root, "bids": bids, "out": out, "work": work, "code": code,
            "before": before}


def test_exit_code_and_failed_visits(batch):
    assert batch["code"] == 1                     # some visits failed
    counts = pd.read_csv(batch["out"] / "gel_counts.tsv", sep="\t", dtype=str,
                         keep_default_na=False)
    assert list(counts.columns) == ["participant_id", "session_id", "week", "gel_count",
                                    "gel_volume_mm3", "has_pre", "status", "error"]
    failed = counts[counts.status == "failed"].set_index("participant_id")
    assert set(failed.index) == {"sub-98", "sub-99"}
    assert (failed.gel_count == "n/a").all()      # missing, never 0
    assert "sub-98_ses-w04_ce-gadolinium_T1w.nii.gz" in failed.loc["sub-98", "error"]
    assert "truncated" in failed.loc["sub-98", "error"]
    assert "4-D" in failed.loc["sub-99", "error"]


def test_input_dataset_is_untouched(batch):
    assert _tree_digest(batch["bids"]) == batch["before"]


def test_counts_match_the_truth(batch):
    counts = pd.read_csv(batch["out"] / "gel_counts.tsv", sep="\t")
    ok = counts[counts.status == "ok"]
    truth = pd.read_csv(TRUTH / "truth_counts.tsv", sep="\t")
    merged = ok.merge(truth, on=["participant_id", "session_id"], suffixes=("", "_truth"))
    assert len(merged) == len(truth)              # every sample visit processed
    assert (merged.week == merged.week_truth).all()
    assert (merged.has_pre == merged.has_pre_truth).all()
    error = (merged.gel_count - merged.gel_count_truth).abs()
    # Regression guard below the level measured on these scans (2026-12-02: mean absolute count
    # error 1.00, 78 % of visits within one lesion); the accuracy targets of the issues are
    # higher and are measured on fresh phantoms (docs/evaluation.md), not here.
    assert error.mean() <= 2.0, merged[["participant_id", "session_id", "gel_count",
                                        "gel_count_truth"]]
    assert (error <= 1).mean() >= 0.4
    assert merged.gel_count.sum() > 0          # it does find lesions, not 0 everywhere


def test_masks_are_on_the_input_grid(batch):
    for sidecar in sorted(batch["out"].glob("sub-0*/ses-*/anat/*_label-GEL_mask.json")):
        mask_file = Path(str(sidecar).replace(".json", ".nii.gz"))
        sub, ses = mask_file.name.split("_")[:2]
        src = nb.load(batch["bids"] / sub / ses / "anat" / f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz")
        mask = nb.load(mask_file)
        assert mask.shape == src.shape[:3]
        assert np.allclose(mask.affine, src.affine, atol=1e-4)
        assert mask.get_data_dtype() == np.uint8
        data = np.asanyarray(mask.dataobj)
        assert set(np.unique(data)) <= {0, 1}
        info = json.loads(sidecar.read_text())
        labels = np.asanyarray(nb.load(str(mask_file).replace("_mask.", "_dseg.")).dataobj)
        assert info["gel_count"] == int(labels.max()) == len(
            pd.read_csv(str(mask_file).replace("_mask.nii.gz", "_lesions.tsv"), sep="\t"))
        digest = hashlib.sha256(
            (batch["bids"] / sub / ses / "anat" /
             f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz").read_bytes()).hexdigest()
        assert info["inputs"]["post"]["sha256"] == digest
        assert info["settings"]["min_volume_mm3"] == 10.0


def test_reports_are_self_contained(batch):
    reports = sorted(batch["out"].glob("sub-0*/ses-*/figures/*_report.html"))
    assert reports
    for rep in reports:
        html = rep.read_text()
        assert "http://" not in html and "https://" not in html
        assert "<script src" not in html


def test_rerun_reuses_finished_visits(batch):
    node = next(batch["work"].glob("lesionpipe_*_wf/visit_01_*_wf/preproc_wf/prep_post"))
    result = next(node.glob("result_*.pklz"))
    stamp = result.stat().st_mtime_ns
    (batch["out"] / "gel_counts.tsv").unlink()
    code = main(["run", str(batch["bids"]), str(batch["out"]), "-w", str(batch["work"]),
                 "--nprocs", "2", "--participant-label", "01"])
    assert code == 0
    assert result.stat().st_mtime_ns == stamp     # cached, not recomputed
    counts = pd.read_csv(batch["out"] / "gel_counts.tsv", sep="\t")
    assert set(counts.participant_id) == {"sub-01"}


def test_redetect_script_reruns_detection_on_the_cache(batch, tmp_path, monkeypatch):
    """scripts/redetect.py: the detection step again on the cached inputs, with changed settings."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import redetect
    changes = tmp_path / "strict.toml"
    changes.write_text("min_probability = 0.99\nmin_probability_post_only = 0.99\n")
    out = tmp_path / "re"
    assert redetect.main([str(batch["work"]), str(out), "--settings", str(changes),
                          "--nprocs", "2"]) == 0
    new = pd.read_csv(out / "gel_counts.tsv", sep="\t").set_index(["participant_id", "session_id"])
    old = pd.read_csv(batch["out"] / "gel_counts.tsv", sep="\t")
    old = old[old.status == "ok"].set_index(["participant_id", "session_id"])
    # every sample visit; the two broken ones never reached detection (an earlier test may have
    # re-run sub-01 alone into the batch's gel_counts.tsv)
    assert len(new) == 9 and not {"sub-98", "sub-99"} & set(new.index.get_level_values(0))
    assert set(old.index) <= set(new.index)
    assert (new.gel_count.loc[old.index] <= old.gel_count).all()
    for (sub, ses), _ in new.iterrows():
        name = f"{sub}/{ses}/anat/{sub}_{ses}_ce-gadolinium_space-orig_desc-candidates_table.tsv"
        before = pd.read_csv(batch["out"] / name, sep="\t")
        after = pd.read_csv(out / name, sep="\t")
        # same candidates and probabilities (same code, same cached inputs); a stricter decision
        assert len(before) == len(after)
        assert np.allclose(before["probability"].fillna(-1), after["probability"].fillna(-1))
        assert not (after.decision.eq("accept") & (after.probability < 0.99)).any()


def test_training_script_labels_the_batchs_candidates_and_names_what_is_missing(batch, tmp_path,
                                                                                 monkeypatch):
    """scripts/train_classifier.py: candidates labelled against the truth (1 lesion, 0 mimic);
    a folder without truth or without candidate tables is named, not a pandas traceback."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_classifier

    data = train_classifier.labelled_candidates(batch["out"], TRUTH)
    assert len(data) and set(data.label) <= {0, 1} and (data.label == 1).sum() >= 1
    assert data.contrast_z.notna().all()
    with pytest.raises(SystemExit, match="no truth_lesions.tsv"):
        train_classifier.labelled_candidates(batch["out"], tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="no candidate table"):
        train_classifier.labelled_candidates(tmp_path / "out", TRUTH)
