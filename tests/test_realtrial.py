"""Tests of the synthetic trial on real anatomy (lesionpipe.realtrial) and of its truth layout."""

from __future__ import annotations

import csv

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage as ndi

from lesionpipe import realtrial as RT
from lesionpipe.cli import main
from lesionpipe.evaluate import evaluate_outputs
from lesionpipe.phantom import MIMIC_DURA, MIMIC_FAT, MIMIC_NONENH, MIMIC_SINUS


def _brain_scans(folder, seed=0):
    """A skull-stripped 'real' brain as published (LAS, 1 mm): white-matter core in grey matter,
    bright vessels on post only, one T2 lesion, zero outside."""
    rng = np.random.default_rng(seed)
    shape = (96, 110, 92)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    r = np.sqrt((x / 40) ** 2 + (y / 48) ** 2 + (z / 38) ** 2)
    pre = np.where(r < 1, 70.0, 0.0) + np.where(r < 0.8, 30.0, 0.0)
    pre = (pre + rng.normal(0, 1.5, shape) * (r < 1)).astype(np.float32)
    post = pre * 0.9
    post[(np.abs(x - 20) < 1.2) & (np.abs(z) < 1.2) & (r < 0.95)] *= 2.2     # a vessel
    t2 = ((x + 15) ** 2 + (y - 10) ** 2 + z ** 2) < 16
    pre[t2] *= 0.8
    post[t2] *= 0.8
    aff = np.diag([-1.0, 1, 1, 1])
    aff[:3, 3] = [48, -60, -40]
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("T1POST_mni.nii.gz", post), ("T1_mni.nii.gz", pre),
                      ("T2_lesions_consensus_mni.nii.gz", t2.astype(np.uint8))):
        nb.save(nb.Nifti1Image(arr, aff), str(folder / name))
    return folder


def _tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_wrap_head_builds_the_layers_in_order_outside_the_brain():
    shape = (70, 70, 70)
    x, y, z = np.meshgrid(*[np.arange(n) - 35.0 for n in shape], indexing="ij")
    brain = np.sqrt(x ** 2 + y ** 2 + z ** 2) < 18
    pre, enh, mim = RT.wrap_head(np.random.default_rng(0), brain, np.array([-35.0, -35, -35]))
    assert not pre[brain].any() and not enh[brain].any() and not mim[brain].any()
    # along a ray to the left (away from the midline sinus): CSF, dura, bone, marrow, bone, fat
    ray = pre[:17, 35, 35][::-1]          # from the brain edge outwards
    codes = mim[:17, 35, 35][::-1]
    first_fat = int(np.argmax(ray >= 1.39))
    assert ray[0] == pytest.approx(0.24) and first_fat > 4
    assert MIMIC_DURA in codes[:first_fat] and MIMIC_FAT in codes
    assert np.any(ray[:first_fat] <= 0.05)                   # a dark bone table before the fat
    assert enh[mim == MIMIC_DURA].min() >= 0.1                # dura enhances
    assert (mim == MIMIC_SINUS).any() and enh[mim == MIMIC_SINUS].min() >= 1.2
    sinus_x = np.nonzero(mim == MIMIC_SINUS)[0] - 35
    assert np.abs(sinus_x).max() <= 5                         # on the midline


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    root = tmp_path_factory.mktemp("realtrial")
    scans = _brain_scans(root / "scans")
    summary = RT.write_real_trial(scans, root / "bids", root / "truth", n_subjects=2, weeks=(0,), seed=3,
                                  mean_lesions=4.0, p_post_only=0.0, p_2d=0.5)
    return root, summary


def test_trial_truth_is_on_each_post_grid_and_marks_bright_lesions(trial):
    root, summary = trial
    counts = _tsv(root / "truth" / "truth_counts.tsv")
    lesions = _tsv(root / "truth" / "truth_lesions.tsv")
    assert [r["participant_id"] for r in counts] == ["sub-01", "sub-02"]
    assert summary["total_gels"] == sum(int(r["gel_count"]) for r in counts)
    assert summary["total_gels"] == sum(int(r["counted"]) for r in lesions) > 0
    for row in counts:
        sub, ses = row["participant_id"], row["session_id"]
        anat = root / "bids" / sub / ses / "anat"
        post = nb.load(str(anat / f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz"))
        pre = nb.load(str(anat / f"{sub}_{ses}_T1w.nii.gz"))
        lab = nb.load(str(root / "truth" / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz"))
        mim = nb.load(str(root / "truth" / sub / ses / f"{sub}_{ses}_label-mimics_dseg.nii.gz"))
        assert lab.shape == post.shape and np.allclose(lab.affine, post.affine)
        assert mim.shape == post.shape and pre.shape[:2] == (230, 230)
        labels = np.asarray(lab.dataobj)
        p = post.get_fdata()
        m = np.asarray(mim.dataobj)
        assert MIMIC_NONENH in m and MIMIC_FAT in m            # the T2 lesion and the scalp
        wm = np.median(p[(m == 0) & (p > np.percentile(p, 60))])
        for r in (r for r in lesions if r["participant_id"] == sub):
            inside = p[labels == int(r["lesion_id"])]
            assert inside.size == int(r["n_voxels"])
            # each lesion is brighter on post than the white matter around it
            assert np.median(inside) > 1.05 * wm, r
        # the centroid in the table is the label's centre in scanner mm
        if labels.any():
            c = ndi.center_of_mass(labels == 1)
            world = lab.affine[:3, :3] @ np.asarray(c) + lab.affine[:3, 3]
            first = next(r for r in lesions if r["participant_id"] == sub and r["lesion_id"] == "1")
            assert np.allclose(world, [float(first[k]) for k in ("centroid_x", "centroid_y", "centroid_z")],
                               atol=0.02)


def test_an_oracle_output_scores_perfectly_with_evaluate(trial, tmp_path):
    """The truth layout is the phantoms': lesionpipe evaluate reads it unchanged."""
    root, _ = trial
    out = tmp_path / "out"
    rows = ["participant_id\tsession_id\tweek\tgel_count\tstatus"]
    for row in _tsv(root / "truth" / "truth_counts.tsv"):
        sub, ses = row["participant_id"], row["session_id"]
        lab = nb.load(str(root / "truth" / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz"))
        anat = out / sub / ses / "anat"
        anat.mkdir(parents=True)
        nb.save(nb.Nifti1Image(np.asarray(lab.dataobj).astype(np.int16), lab.affine),
                str(anat / f"{sub}_{ses}_ce-gadolinium_space-orig_label-GEL_dseg.nii.gz"))
        rows.append(f"{sub}\t{ses}\t0\t{row['gel_count']}\tok")
    (out / "gel_counts.tsv").write_text("\n".join(rows) + "\n")
    o = evaluate_outputs(out, root / "truth").metrics["overall"]
    assert o["sensitivity"] == 1.0 and o["n_fp"] == 0 and o["count_exact"] == 1.0


def test_mirrored_subject_differs_and_the_same_seed_repeats(trial, tmp_path):
    root, _ = trial
    a = nb.load(str(root / "bids/sub-01/ses-w00/anat/sub-01_ses-w00_ce-gadolinium_T1w.nii.gz")).get_fdata()
    b = nb.load(str(root / "bids/sub-02/ses-w00/anat/sub-02_ses-w00_ce-gadolinium_T1w.nii.gz")).get_fdata()
    assert a.shape != b.shape or not np.allclose(a, b)
    RT.write_real_trial(root / "scans", tmp_path / "bids", tmp_path / "truth", n_subjects=1, weeks=(0,),
                        seed=3, mean_lesions=4.0, p_post_only=0.0, p_2d=0.5)
    name = "sub-01/ses-w00/anat/sub-01_ses-w00_ce-gadolinium_T1w.nii.gz"
    assert (tmp_path / "bids" / name).read_bytes() == (root / "bids" / name).read_bytes()


def test_missing_scan_is_named_and_the_command_says_so(tmp_path, capsys):
    scans = _brain_scans(tmp_path / "scans")
    (scans / "T1_mni.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="T1_mni.nii.gz"):
        RT.load_real_brain(scans)
    code = main(["phantoms", str(tmp_path / "bids"), "--real-anatomy", str(scans), "--subjects", "1"])
    assert code == 2 and "T1_mni.nii.gz" in capsys.readouterr().err
    assert main(["phantoms", str(tmp_path / "b2"), "--real-anatomy", str(scans), "--stress"]) == 2
