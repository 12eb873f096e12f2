"""GEL detection on small synthetic normalised volumes with known answers."""

import numpy as np
import pandas as pd
import pytest

from lesionpipe.lesions.detect import count_lesions, detect_lesions, lesion_table, principal_axes_mm
from lesionpipe.settings import Settings

SHAPE = (64, 64, 48)


def _brain(zooms=(1.0, 1.0, 1.0), seed=0):
    """A ball of white matter (100) with a CSF ventricle; pre and post with noise (SD 3)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(round(s / z)) for s, z in zip(SHAPE, zooms))
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * z for n, z in zip(shape, zooms)],
                                indexing="ij"), -1)
    centre = np.array(SHAPE) / 2.0
    r = np.linalg.norm((grid - centre) / [1.0, 1.0, 0.8], axis=-1)
    brain = r < 22
    pre = np.where(brain, 100.0, 0.0)
    vent = np.linalg.norm((grid - centre) / [2.5, 1.0, 1.0], axis=-1) < 4
    pre[vent] = 30.0
    noise = lambda: rng.normal(0, 3.0, shape)  # noqa: E731
    return grid, brain, pre, noise, zooms


def _ball(grid, centre, radius):
    return np.linalg.norm(grid - np.asarray(centre, float), axis=-1) <= radius


def _run(post, pre, brain, zooms, **kw):
    wm = brain & ((post if pre is None else pre) > 85) & ((post if pre is None else pre) < 115)
    return detect_lesions(post.astype(np.float32), zooms, brain, Settings(**kw),
                          pre_n=None if pre is None else pre.astype(np.float32), wm=wm,
                          csf_level=50.0)


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)])
@pytest.mark.parametrize("with_pre", [True, False])
def test_blob_in_white_matter_is_found_and_tube_rejected(zooms, with_pre):
    grid, brain, pre, noise, zooms = _brain(zooms)
    post = pre.copy()
    lesion = _ball(grid, (40, 40, 24), 3.0)               # ~113 mm3, +40 %
    post[lesion] += 40
    # a thin enhancing vessel crossing the white matter
    tube = (np.hypot(grid[..., 0] - 22, grid[..., 2] - 20) < 1.0) & brain
    post[tube] += 60
    pre_n = pre + noise()
    post_n = post + noise()
    det = _run(post_n, pre_n if with_pre else None, brain, zooms, classifier="none")
    assert det.labels.max() == 1
    assert det.labels[lesion].any()
    assert not det.labels[tube & ~lesion].any()
    # the vessel's centre line is cut out before candidates are formed; what is left is rejected
    assert det.thresholds["vessel_cut_voxels"] > 0.5 * tube.sum()
    # the shipped classifier agrees on this clear case
    det = _run(post_n, pre_n if with_pre else None, brain, zooms)
    assert det.labels[lesion].any() and not det.labels[tube & ~lesion].any()


def test_surface_enhancement_and_tiny_foci_are_rejected():
    grid, brain, pre, noise, zooms = _brain()
    post = pre.copy()
    surface = _ball(grid, (32 + 22, 32, 24), 2.5) & brain  # dura-like, at the brain edge
    post[surface] += 60
    tiny = _ball(grid, (24, 40, 24), 0.9)                     # 7 voxels < 10 mm3
    post[tiny] += 60
    det = _run(post + noise(), pre + noise(), brain, zooms)
    assert det.labels.max() == 0


def test_empty_scan_has_no_lesions():
    grid, brain, pre, noise, zooms = _brain()
    det = _run(pre + noise(), pre + noise(), brain, zooms)
    assert det.labels.max() == 0
    assert len(lesion_table(det.labels, det.enhancement, np.eye(4))) == 0


def test_min_size_setting_changes_the_count():
    grid, brain, pre, noise, zooms = _brain()
    post = pre.copy()
    small = _ball(grid, (24, 40, 24), 2.0)    # 33 voxels
    big = _ball(grid, (40, 28, 24), 3.0)
    post[small] += 50
    post[big] += 50
    assert _run(post + noise(), pre + noise(), brain, zooms).labels.max() == 2
    assert _run(post + noise(), pre + noise(), brain, zooms,
                min_volume_mm3=60.0).labels.max() == 1


def test_touching_lesions_connectivity():
    m = np.zeros((6, 6, 6), bool)
    m[1:3, 1:3, 1:3] = True
    m[3:5, 3:5, 3:5] = True       # touches only at a corner
    assert count_lesions(m, connectivity=1) == 2
    assert count_lesions(m, connectivity=3) == 1


def test_lesion_table_world_coordinates_with_anisotropic_affine():
    lab = np.zeros((10, 10, 10), np.int32)
    lab[2:4, 2:4, 2:4] = 1
    aff = np.diag([-1.0, 1.0, 3.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    t = lesion_table(lab, np.full(lab.shape, 25.0), aff)
    row = t.iloc[0]
    assert row.volume_mm3 == pytest.approx(24.0)
    assert (row.centroid_x, row.centroid_y, row.centroid_z) == pytest.approx((7.5, 22.5, 37.5))


def test_principal_axes_of_a_rod_are_elongated():
    rod = np.argwhere(np.ones((12, 2, 2), bool))
    axes = principal_axes_mm(rod, (1, 1, 1))
    assert axes[0] / axes[1] > 5


def _model_file(tmp_path, intercept):
    from lesionpipe.lesions.classifier import FEATURES, LogisticModel

    k = len(FEATURES)
    path = tmp_path / f"model_{intercept}.json"
    LogisticModel(mean=np.zeros(k), scale=np.ones(k), coef=np.zeros(k), intercept=intercept,
                  names=tuple(FEATURES), info={}).to_json(path)
    return str(path)


def test_classifier_decides_among_candidates_passing_the_hard_rules(tmp_path):
    grid, brain, pre, noise, zooms = _brain()
    post = pre.copy()
    lesion = _ball(grid, (40, 40, 24), 3.0)
    post[lesion] += 40
    post_n, pre_n = post + noise(), pre + noise()
    never = _run(post_n, pre_n, brain, zooms, classifier=_model_file(tmp_path, -50.0))
    always = _run(post_n, pre_n, brain, zooms, classifier=_model_file(tmp_path, 50.0))
    assert never.labels.max() == 0
    assert always.labels.max() >= 1 and always.labels[lesion].any()
    assert "probability" in always.candidates
    assert never.candidates.reason.str.startswith("classifier").any()


def test_post_only_visits_have_their_own_probability_threshold():
    grid, brain, pre, noise, zooms = _brain()
    post = pre.copy()
    lesion = _ball(grid, (40, 40, 24), 3.0)
    post[lesion] += 40
    post_n, pre_n = post + noise(), pre + noise()
    strict_post_only = {"min_probability": 0.1, "min_probability_post_only": 1.5}
    with_pre = _run(post_n, pre_n, brain, zooms, **strict_post_only)
    post_only = _run(post_n, None, brain, zooms, **strict_post_only)
    assert with_pre.labels[lesion].any()
    assert post_only.labels.max() == 0
    assert post_only.candidates.reason.str.startswith("classifier").any()


def test_a_model_with_other_features_is_refused(tmp_path):
    from lesionpipe.lesions.classifier import LogisticModel

    path = tmp_path / "old.json"
    path.write_text('{"features": ["a"], "mean": [0], "scale": [1], "coef": [1], "intercept": 0}')
    with pytest.raises(ValueError, match="retrain"):
        LogisticModel.from_json(path)


def _synthetic_candidates(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    table = pd.DataFrame({
        "volume_mm3": rng.uniform(10, 200, n), "contrast_z": rng.uniform(3, 20, n),
        "mean_pct": rng.uniform(15, 80, n), "local_contrast_pct": rng.uniform(5, 60, n),
        "elongation": rng.uniform(1, 4, n), "flatness": rng.uniform(1, 3, n),
        "tubularity": rng.uniform(1, 5, n),
        # lesions are blob-like, mimics are not: the one informative feature
        "blobness": np.where(y, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.5, n)),
        "parent_ratio": rng.uniform(1, 50, n), "depth_mm": rng.uniform(3, 30, n),
        "shell_csf": rng.uniform(0, 0.3, n), "shell_outside": np.zeros(n),
        "ventricle_frac": np.zeros(n), "shell_wm": rng.uniform(0.5, 1, n),
        "has_pre": rng.random(n) < 0.5, "ref_mean": rng.uniform(60, 140, n),
        "slice_mm": rng.choice([1.0, 3.0], n), "peak_pct": rng.uniform(15, 100, n),
        "thickness_mm": rng.uniform(1, 8, n), "max_depth_mm": rng.uniform(3, 30, n),
        "shell_ref_mean": rng.uniform(60, 120, n), "shell_bright": rng.uniform(0, 0.3, n),
        "ring_bright": rng.uniform(0, 0.3, n), "shell_exits": rng.integers(0, 3, n),
        "ring_p90": rng.uniform(0, 0.6, n)})
    return table, y.astype(int)


def test_boosted_trees_learn_exports_and_reload(tmp_path):
    pytest.importorskip("sklearn")
    from lesionpipe.lesions.classifier import TreeModel, load_model, train_trees

    table, y = _synthetic_candidates(1500, 0)
    model = train_trees(table, y, n_trees=60)
    test, y_test = _synthetic_candidates(500, 1)
    p = model.probability(test)
    accuracy = ((p >= 0.5) == (y_test == 1)).mean()
    assert accuracy > 0.85
    path = tmp_path / "trees.json"
    model.to_json(path)
    again = load_model(path)
    assert isinstance(again, TreeModel)
    np.testing.assert_allclose(again.probability(test), p, atol=1e-6)
    # a model trained on a subset of the features reads only those
    fewer = train_trees(table, y, n_trees=20, names=["contrast_z", "log_elongation"])
    assert fewer.names == ("contrast_z", "log_elongation")
    assert (fewer.info["n_trees"], fewer.info["depth"]) == (20, 3)
    assert fewer.probability(test.drop(columns=["parent_ratio", "shell_wm"])).shape == (500,)
    # a table without a column the model reads (written by an older version) is named, not a
    # bare KeyError
    with pytest.raises(ValueError, match="'ring_bright'.*candidate table column 'ring_bright'"):
        model.probability(test.drop(columns=["ring_bright"]))


def test_monotone_trees_follow_their_directions_whatever_the_data_say(tmp_path):
    pytest.importorskip("sklearn")
    from lesionpipe.lesions.classifier import MONOTONE, TreeModel, load_model, train_trees

    table, y = _synthetic_candidates(1500, 0)
    # a training-set accident: elongated candidates happen to be lesions more often
    y = np.where(table["elongation"] > 3.5, 1, y)
    model = train_trees(table, y, n_trees=60, monotone=True)
    assert model.info["monotone"]["log_elongation"] == MONOTONE["log_elongation"] == -1
    probe = pd.concat([table.iloc[[0]]] * 30, ignore_index=True)
    probe["elongation"] = np.linspace(1.0, 4.0, 30)
    p = model.probability(probe)
    assert (np.diff(p) <= 1e-12).all()
    free = train_trees(table, y, n_trees=60)
    assert np.diff(free.probability(probe)).max() > 0.01    # unconstrained, it learns the accident
    path = tmp_path / "mono.json"
    model.to_json(path)
    again = load_model(path)
    assert isinstance(again, TreeModel) and again.dtype == "float64"
    np.testing.assert_allclose(again.probability(table), model.probability(table), atol=1e-9)


def test_continued_trees_learn_what_the_base_model_gets_wrong(tmp_path):
    pytest.importorskip("sklearn")
    from lesionpipe.lesions.classifier import FEATURES, continue_trees, load_model, train_trees

    table, y = _synthetic_candidates(1500, 0)
    base = train_trees(table, y, n_trees=60, names=[n for n in FEATURES if n != "ring_bright"])
    # another kind of scan: here thick candidates are mimics, which the base data never showed
    other, y_other = _synthetic_candidates(1500, 2)
    y_other = np.where(other["thickness_mm"] > 6, 0, y_other)
    test, y_test = _synthetic_candidates(1000, 3)
    y_test = np.where(test["thickness_mm"] > 6, 0, y_test)
    model = continue_trees(base, other, y_other, n_trees=60)
    assert len(model.trees) == 120 and model.trees[:60] == base.trees
    assert model.info["continued"]["n_trees"] == 60

    def accuracy(m):
        return ((m.probability(test) >= 0.5) == (y_test == 1)).mean()

    assert accuracy(model) > accuracy(base) + 0.03
    # a further stage may read a feature the earlier ones did not: their trees are kept as they
    # are and each stage keeps its record
    for t, labels, seed in ((other, y_other, 5), (test, y_test, 6)):
        t["ring_bright"] = np.where(labels == 1, 0.0, 0.6) + np.random.default_rng(seed).normal(
            0, 0.2, len(t))
    third = continue_trees(model, other, y_other, n_trees=30, extra_names=["ring_bright"])
    assert third.names == model.names + ("ring_bright",) and third.trees[:120] == model.trees
    assert third.info["continued"]["n_trees"] == 60
    assert third.info["continued_2"]["extra_features"] == ["ring_bright"]
    assert accuracy(third) > accuracy(model) + 0.03
    path = tmp_path / "continued.json"
    model.to_json(path)
    np.testing.assert_allclose(load_model(path).probability(test), model.probability(test),
                               atol=1e-6)


def _peeled(comp, enh, conn, **kw):
    """Regions ``_peel`` yields (lo 6, hi 10, 1 mm grid), each as a full-size mask."""
    from lesionpipe.lesions.detect import _peel

    out = []
    for start, region, _ in _peel(comp, enh, lo=6.0, hi=10.0, conn=conn, zooms=(1, 1, 1), **kw):
        full = np.zeros(comp.shape, bool)
        full[tuple(slice(a, a + s) for a, s in zip(start, region.shape))] = region
        out.append(full)
    return out


@pytest.mark.parametrize("vessel_blur", [0.5, 1.0])
def test_a_lesion_touching_a_brighter_vessel_keeps_its_own_extent(vessel_blur):
    """The vessel's centre line and flank are cut out before the peaks are split: the lesion is
    one region of its own, not a bump on the vessel's half-maximum region."""
    from scipy import ndimage as ndi

    from lesionpipe.lesions.detect import tube_centrelines
    from lesionpipe.preproc.morph import dilate

    g = np.indices((40, 30, 30)).transpose(1, 2, 3, 0) + 0.5
    vessel = np.linalg.norm(g[..., 1:] - [15.0, 15.0], axis=-1) <= 1.2
    lesion = _ball(g, (20.0, 15.0, 19.2), 2.6)
    enh = (ndi.gaussian_filter(np.where(vessel, 300.0, 0.0), vessel_blur)
           + ndi.gaussian_filter(np.where(lesion, 60.0, 0.0), 0.8)).astype(np.float32)
    conn = np.ones((3, 3, 3), bool)
    comp = ndi.label(enh > 6.0, structure=conn)[0] == 1
    cut = dilate(tube_centrelines(enh, comp, (1, 1, 1)), 1.0, (1, 1, 1)) & comp
    assert not (cut & lesion).any() and (cut & vessel).sum() > 0.9 * vessel.sum()
    regions = _peeled(comp & ~cut, enh, conn, dynamic=3.0)
    own = [r for r in regions if (r & lesion).sum() > 0.5 * lesion.sum()]
    assert len(own) == 1 and (own[0] & ~lesion).sum() < 0.3 * own[0].sum()


@pytest.mark.parametrize("amplitude", [30.0, 50.0])
def test_a_lesion_without_a_peak_of_its_own_beside_a_vessel_is_peeled_with_peel_flank_mm(amplitude):
    """A lesion abutting a much brighter vessel climbs towards it (no maximum of its own), so its
    voxels are in the vessel's basin: the whole basin goes with the vessel by default, only the
    vessel's near flank with ``flank_mm``, and the rest of the lesion is a region of its own."""
    from scipy import ndimage as ndi

    g = np.indices((40, 30, 30)).transpose(1, 2, 3, 0) + 0.5
    vessel = np.linalg.norm(g[..., 1:] - [15.0, 15.0], axis=-1) <= 1.2
    lesion = _ball(g, (20.0, 15.0, 19.2), 3.0)
    enh = (ndi.gaussian_filter(np.where(vessel, 300.0, 0.0), 1.0)
           + ndi.gaussian_filter(np.where(lesion, amplitude, 0.0), 0.8)).astype(np.float32)
    conn = np.ones((3, 3, 3), bool)
    comp = ndi.label(enh > 6.0, structure=conn)[0] == 1

    def on_lesion(flank_mm):
        return [r for r in _peeled(comp, enh, conn, dynamic=3.0, flank_mm=flank_mm)
                if (r & lesion).sum() > 0.3 * lesion.sum()]

    assert on_lesion(0.0) == []
    own = on_lesion(2.0)
    assert len(own) == 1 and (own[0] & lesion).sum() > 0.7 * lesion.sum()
    assert not (own[0] & vessel).any() and (own[0] & ~lesion).sum() < 0.1 * own[0].sum()


def test_thick_slice_grids_have_their_own_threshold():
    """The thick-slice threshold acts on thick grids only, and sets the high threshold as stated."""
    kw = dict(classifier="none", min_peak_enhancement_pct=1.0, thick_slice_z=3.0)
    grid, brain, pre, noise, zooms = _brain((1.0, 1.0, 5.0))
    pre_n, post_n = pre + noise(), pre + noise()
    thick = _run(post_n, pre_n, brain, zooms, **kw).thresholds
    assert thick["high_pct"] == pytest.approx(3.0 * thick["sigma_pct"], rel=1e-6)
    assert _run(post_n, None, brain, zooms, **kw).thresholds["high_pct"] == pytest.approx(
        3.0 * _run(post_n, None, brain, zooms, **kw).thresholds["sigma_pct"], rel=1e-6)
    grid, brain, pre, noise, zooms = _brain((1.0, 1.0, 1.0))
    pre_n, post_n = pre + noise(), pre + noise()
    iso = _run(post_n, pre_n, brain, zooms, **kw).thresholds
    assert iso == _run(post_n, pre_n, brain, zooms, classifier="none",
                       min_peak_enhancement_pct=1.0).thresholds
    assert iso["high_pct"] == pytest.approx(4.0 * iso["sigma_pct"], rel=1e-6)


def test_a_candidate_within_the_noise_of_its_surroundings_is_rejected_whatever_the_model():
    """A sizeable region a noise SD or two above its shell (residual bias, sequence contrast) is
    not a lesion: min_contrast_z rejects it before the classifier, in both decision modes."""
    from lesionpipe.lesions.detect import FAINT, _hard_reject, _reject_reason

    grid, brain, pre, noise, zooms = _brain()
    post = pre.copy()
    post[_ball(grid, (40, 40, 24), 3.0)] += 40
    det = _run(post + noise(), pre + noise(), brain, zooms)
    row = det.candidates[det.candidates["decision"] == "accept"].iloc[0].to_dict()
    assert row["contrast_z"] > 5
    assert _hard_reject(row, Settings()) == "" and _reject_reason(row, Settings()) == ""
    faint = dict(row, contrast_z=1.5)
    assert _hard_reject(faint, Settings()) == FAINT == _reject_reason(faint, Settings())
    off = Settings(min_contrast_z=0.0)
    assert _hard_reject(faint, off) == "" and _reject_reason(faint, off) == ""
