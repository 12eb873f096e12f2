"""Tests of the synthetic head phantoms (lesionpipe.phantom)."""

from __future__ import annotations

import csv
import json

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage as ndi

from lesionpipe import phantom as P


def _read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    overrides = {(0, 0): {"grid": "3d", "has_pre": True, "pre_grid": "3d"},
                 (0, 1): {"grid": "2d", "has_pre": False}}
    summary = P.write_dataset(root / "bids", root / "truth", n_subjects=1, weeks=(0, 4), seed=15,
                              size="small", overrides=overrides)
    return root, summary


@pytest.fixture(scope="module")
def anatomy():
    return P.make_anatomy(np.random.default_rng(5), size="small")


def test_bids_layout_and_truth_tables(dataset):
    root, summary = dataset
    bids, truth = root / "bids", root / "truth"
    assert json.loads((bids / "dataset_description.json").read_text())["BIDSVersion"]
    assert _read_tsv(bids / "participants.tsv") == [{"participant_id": "sub-01"}]
    sessions = _read_tsv(bids / "sub-01" / "sub-01_sessions.tsv")
    assert sessions == [{"session_id": "ses-w00", "week": "0"}, {"session_id": "ses-w04", "week": "4"}]
    anat0 = bids / "sub-01" / "ses-w00" / "anat"
    anat1 = bids / "sub-01" / "ses-w04" / "anat"
    assert (anat0 / "sub-01_ses-w00_ce-gadolinium_T1w.nii.gz").exists()
    assert (anat0 / "sub-01_ses-w00_T1w.nii.gz").exists()
    assert (anat1 / "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz").exists()
    assert not (anat1 / "sub-01_ses-w04_T1w.nii.gz").exists()  # forced post-only visit
    sidecar = json.loads((anat1 / "sub-01_ses-w04_ce-gadolinium_T1w.json").read_text())
    assert sidecar["ContrastBolusIngredient"] == "GADOLINIUM" and sidecar["MRAcquisitionType"] == "2D"
    counts = _read_tsv(truth / "truth_counts.tsv")
    assert [r["has_pre"] for r in counts] == ["1", "0"]
    assert [r["grid"] for r in counts] == ["3d", "2d"]
    gen = json.loads((truth / "generation.json").read_text())
    assert gen["seed"] == 15 and gen["total_gels"] == summary["total_gels"]


def test_truth_counts_equal_labels(dataset):
    root, _ = dataset
    truth = root / "truth"
    counts = _read_tsv(truth / "truth_counts.tsv")
    lesions = _read_tsv(truth / "truth_lesions.tsv")
    for row in counts:
        sub, ses = row["participant_id"], row["session_id"]
        img = nb.load(truth / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz")
        lab = np.asarray(img.dataobj)
        post = nb.load(root / "bids" / sub / ses / "anat" / f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz")
        assert lab.shape == post.shape and np.allclose(img.affine, post.affine)
        mine = [r for r in lesions if r["participant_id"] == sub and r["session_id"] == ses]
        ids = sorted(int(v) for v in np.unique(lab) if v)
        assert ids == sorted(int(r["lesion_id"]) for r in mine if int(r["n_voxels"]) > 0)
        vox = float(np.prod(img.header.get_zooms()))
        for r in mine:
            n = int((lab == int(r["lesion_id"])).sum())
            assert n == int(r["n_voxels"])
            assert int(r["counted"]) <= int(n >= 3 and n * vox >= 10.0)
        assert int(row["gel_count"]) == sum(int(r["counted"]) for r in mine)


def test_truth_sits_on_the_enhancing_lesions(dataset):
    """Image and truth are aligned: truth voxels are brighter on post than the tissue around them."""
    root, _ = dataset
    counts = _read_tsv(root / "truth" / "truth_counts.tsv")
    checked = 0
    for row in counts:
        sub, ses = row["participant_id"], row["session_id"]
        lab = np.asarray(nb.load(root / "truth" / sub / ses / f"{sub}_{ses}_label-GEL_dseg.nii.gz").dataobj)
        if int(row["gel_count"]) == 0:
            continue
        anat = root / "bids" / sub / ses / "anat"
        post = nb.load(anat / f"{sub}_{ses}_ce-gadolinium_T1w.nii.gz").get_fdata()
        inside = lab > 0
        ring = ndi.binary_dilation(inside, np.ones((3, 3, 1)), iterations=3) & ~ndi.binary_dilation(
            inside, np.ones((3, 3, 1)))
        assert np.median(post[inside]) > 1.05 * np.median(post[ring])
        checked += 1
    assert checked >= 1


def test_grids_and_no_nan(dataset):
    root, _ = dataset
    post0 = nb.load(root / "bids/sub-01/ses-w00/anat/sub-01_ses-w00_ce-gadolinium_T1w.nii.gz")
    post1 = nb.load(root / "bids/sub-01/ses-w04/anat/sub-01_ses-w04_ce-gadolinium_T1w.nii.gz")
    assert np.allclose(post0.header.get_zooms(), (1, 1, 1))
    assert np.allclose(post1.header.get_zooms(), (1, 1, 3)) or np.allclose(
        post1.header.get_zooms(), (1, 1, 5))
    assert post0.shape == (160, 160, 130)
    for img in (post0, post1):
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.max() > 0
        assert img.header["sform_code"] == 1


def test_reproducible_with_seed(tmp_path, dataset):
    root, _ = dataset
    overrides = {(0, 0): {"grid": "3d", "has_pre": True, "pre_grid": "3d"},
                 (0, 1): {"grid": "2d", "has_pre": False}}
    P.write_dataset(tmp_path / "bids", tmp_path / "truth", n_subjects=1, weeks=(0, 4), seed=15,
                    size="small", overrides=overrides)
    for rel in ("truth/truth_counts.tsv", "truth/truth_lesions.tsv",
                "bids/sub-01/ses-w04/anat/sub-01_ses-w04_ce-gadolinium_T1w.nii.gz"):
        a, b = root / rel, tmp_path / rel
        if rel.endswith(".tsv"):
            assert a.read_text() == b.read_text()
        else:
            assert np.array_equal(np.asarray(nb.load(a).dataobj), np.asarray(nb.load(b).dataobj))


def test_make_grid_orientations():
    for ori, signs in (("RAS", (1, 1, 1)), ("LAS", (-1, 1, 1)), ("LPS", (-1, -1, 1))):
        shape, aff = P.make_grid(grid="3d", size="full", thickness=1, orientation=ori)
        assert shape == (230, 230, 180)
        assert np.allclose(np.sign(np.diag(aff)[:3]), signs)
        assert nb.aff2axcodes(aff) == tuple(ori)
    shape, aff = P.make_grid(grid="2d", size="full", thickness=5, orientation="oblique",
                             oblique_deg=(10, 0, 0))
    assert shape == (230, 230, 36)
    assert np.allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), (1, 1, 5))
    assert not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3])))
    # the field of view is centred where asked
    centre = aff @ np.r_[(np.array(shape) - 1) / 2, 1]
    assert np.allclose(centre[:3], (0, 0, -4))


def test_anatomy_contrast(anatomy):
    a = anatomy
    med = {c: float(np.median(a.pre[a.tissue == c])) for c in (P.WM, P.GM, P.CSF, P.FAT, P.BONE)}
    assert med[P.FAT] > 1.2 * med[P.WM]          # scalp fat brighter than white matter
    assert med[P.CSF] < med[P.GM] < med[P.WM]
    assert med[P.BONE] < 0.2
    # enhancing structures exist, also inside the brain, and are lesion-sized or larger
    for code in (P.MIMIC_VESSEL, P.MIMIC_SINUS, P.MIMIC_DURA, P.MIMIC_CHOROID):
        assert (a.mimic == code).sum() > 30, code
    brain = np.isin(a.tissue, (P.WM, P.GM, P.DGM))
    assert ((a.mimic == P.MIMIC_VESSEL) & brain).sum() > 100
    sinus = a.mimic == P.MIMIC_SINUS
    assert np.median(a.enh[sinus]) > 0.4 and np.percentile(a.enh[sinus], 90) > 1.0
    assert np.median(a.enh[a.tissue == P.WM]) < 0.05


def _blob_lesion(grid, uid, centre, radius, amp=0.5):
    rng = np.random.default_rng(uid)
    box, occ, rim, vol = P._lesion_shape(rng, grid, np.asarray(centre, float), 4 / 3 * np.pi * radius ** 3,
                                         "nodular", axes_dir=np.eye(3), ratios=(1, 1, 1))
    return P.Lesion(uid=uid, kind="nodular", centre=np.asarray(centre, float), box=box, occ=occ,
                    rim=rim, volume_mm3=vol, t1_factor=0.9, onset=0, enhancement={0: amp})


def test_touching_lesions_keep_separate_labels():
    grid = P.SubjectGrid((40, 40, 40), np.array([-20.0, -20, -20]))
    # two lesions 1 mm apart along z: on a 5 mm slice grid they share slices
    les = [_blob_lesion(grid, 1, (0, 0, -3.5), 3.0), _blob_lesion(grid, 2, (0, 0, 3.5), 3.0)]
    anat = P.Anatomy(grid=grid, scale=1, tissue=None, pre=None, enh=None, mimic=None, wm_depth=None,
                     vent_dist=None)
    shape, aff = P.make_grid(grid="2d", size="small", thickness=5, orientation="RAS", centre=(0, 0, 0))
    acq = P.Acquisition(grid="2d", zooms=(1, 1, 5), shape=shape, affine=aff, orientation="RAS",
                        rot=np.eye(3), trans=np.zeros(3))
    labels, rows = P.truth_labels(anat, les, 0, acq)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert [r["n_voxels"] for r in rows] == [int((labels == k).sum()) for k in (1, 2)]
    merged, n = ndi.label(labels > 0, structure=np.ones((3, 3, 3)))
    assert n == 1  # they touch on this grid, yet remain two truth lesions
    # on a 1 mm grid they are separate components with the expected volume
    shape, aff = P.make_grid(grid="3d", size="small", thickness=1, orientation="LAS", centre=(0, 0, 0))
    acq3 = P.Acquisition(grid="3d", zooms=(1, 1, 1), shape=shape, affine=aff, orientation="LAS",
                         rot=P._rotation((3, 0, 2)), trans=np.array([1.0, -2, 0.5]))
    labels3, rows3 = P.truth_labels(anat, les, 0, acq3)
    assert ndi.label(labels3 > 0, structure=np.ones((3, 3, 3)))[1] == 2
    for r in rows3:
        assert abs(r["volume_mm3"] - 4 / 3 * np.pi * 27) < 0.25 * 4 / 3 * np.pi * 27
        # centroids are in world mm under the head pose
    expected = acq3.rot @ np.array([0, 0, -3.5]) + acq3.trans
    got = np.array([rows3[0][k] for k in ("centroid_x", "centroid_y", "centroid_z")])
    assert np.allclose(got, expected, atol=0.6)


def test_thick_slices_average_partial_volume():
    vol = np.zeros((20, 20, 20), np.float32)
    vol[:, :, 10:] = 1.0  # an edge at z = 9.5 in the 1 mm array
    shape, aff = P.make_grid(grid="2d", size="small", thickness=3, orientation="RAS", centre=(0, 0, 0))
    aff = aff.copy()
    aff[:3, 3] = (5, 5, 9.5)  # slice 0 spans z 8..11 of the array
    acq = P.Acquisition(grid="2d", zooms=(1, 1, 3), shape=(4, 4, 2), affine=aff, orientation="RAS",
                        rot=np.eye(3), trans=np.zeros(3))
    out = P.sample(vol, np.zeros(3), acq)
    assert 0.3 < out[0, 0, 0] < 0.7  # partial volume, not nearest neighbour
    assert out[0, 0, 1] == pytest.approx(1.0)


def test_storage_types():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 3, (8, 8, 8)).astype(np.float32)
    base = dict(grid="3d", zooms=(1, 1, 1), shape=data.shape, affine=np.eye(4), orientation="RAS",
                rot=np.eye(3), trans=np.zeros(3))
    img = P.to_nifti(data * 1000, P.Acquisition(**base, storage="int16"))
    assert img.get_data_dtype() == np.int16
    img = P.to_nifti(data * 0.01, P.Acquisition(**base, storage="int16"))  # too small for raw int16
    assert img.get_data_dtype() == np.int16
    img = P.to_nifti(data, P.Acquisition(**base, storage="float32"))
    assert img.get_data_dtype() == np.float32


def test_stress_set_is_harder(tmp_path):
    P.write_dataset(tmp_path / "b", tmp_path / "t", n_subjects=1, weeks=(0,), seed=3, stress=True,
                    size="small", overrides={(0, 0): {"grid": "2d", "has_pre": True}})
    row = _read_tsv(tmp_path / "t" / "truth_counts.tsv")[0]
    assert float(row["snr_post"]) <= 16 and float(row["bias_post"]) >= 0.3
    assert int(row["gel_count"]) >= 1
    gen = json.loads((tmp_path / "t" / "generation.json").read_text())
    assert gen["stress"] is True


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        P.write_dataset(tmp_path / "b", tmp_path / "t", size="huge")
    with pytest.raises(ValueError, match="weeks"):
        P.write_dataset(tmp_path / "b", tmp_path / "t", weeks=(4, 0))


def test_activity_scales_the_new_lesions():
    anat = P.make_anatomy(np.random.default_rng(4), size="small")
    weeks = [0, 4, 12]

    def n_enhancing(activity):
        lesions = P.plan_lesions(np.random.default_rng(8), anat, weeks, stress=False,
                                 activity=activity)
        return sum(len(les.enhancement) for les in lesions)

    base = n_enhancing(1.0)
    rich = n_enhancing(4.0)
    assert rich >= 3 * len(weeks)          # every visit of a lesion-rich subject is active
    assert rich > base
    with pytest.raises(ValueError, match="activity"):
        P.write_dataset("/nonexistent/b", "/nonexistent/t", activity=0)


def test_juxtacortical_share_moves_new_lesions_to_the_grey_white_junction():
    anat = P.make_anatomy(np.random.default_rng(4), size="small")

    def share(j):
        lesions = P.plan_lesions(np.random.default_rng(8), anat, [0, 4, 12], stress=False,
                                 activity=6.0, juxtacortical=j)
        new = [les for les in lesions if les.enhancement and les.touching == ""]
        return sum(les.site == "juxtacortical" for les in new) / max(len(new), 1)

    assert share(0.8) > share(0.25) + 0.2
    with pytest.raises(ValueError, match="juxtacortical"):
        P.plan_lesions(np.random.default_rng(8), anat, [0], stress=False, juxtacortical=1.5)
    with pytest.raises(ValueError, match="juxtacortical"):    # before any anatomy is drawn
        P.write_dataset("/nonexistent/b", "/nonexistent/t", juxtacortical=-0.1)
