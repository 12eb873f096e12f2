"""Tests of synthetic lesion insertion into real scans (lesionpipe.realinsert)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from lesionpipe import realinsert as R


def _head(shape=(70, 70, 60), seed=0):
    """A T1-like volume: a white-matter slab (100) inside grey matter (70), noise, air outside."""
    rng = np.random.default_rng(seed)
    t1 = np.zeros(shape, np.float32)
    t1[4:-4, 4:-4, 4:-4] = 70
    t1[12:-12, 12:-12, 10:-10] = 100
    t1 += rng.normal(0, 2, shape).astype(np.float32) * (t1 > 0)
    return t1


@pytest.fixture(scope="module")
def inserted():
    post = _head(seed=1)
    pre = _head(seed=2)
    wm = np.zeros(post.shape, bool)
    wm[12:-12, 12:-12, 10:-10] = True
    res = R.insert_lesions(post, pre, wm, np.eye(4), np.random.default_rng(3), 6,
                           volume_range=(15, 300), ring_fraction=0.5)
    return post, pre, wm, res


def test_number_labels_and_inputs_untouched(inserted):
    post, pre, wm, res = inserted
    post0, pre0 = _head(seed=1), _head(seed=2)
    assert np.array_equal(post, post0) and np.array_equal(pre, pre0)  # inputs not modified
    assert res.labels.dtype == np.int16 and res.post.dtype == np.float32
    assert sorted(np.unique(res.labels[res.labels > 0]).tolist()) == [1, 2, 3, 4, 5, 6]
    assert [les.label for les in res.lesions] == [1, 2, 3, 4, 5, 6]
    for les in res.lesions:  # each truth label is one connected piece
        _, n = ndi.label(res.labels == les.label)
        assert n == 1


def test_lesions_only_in_white_matter_and_separated(inserted):
    _, _, wm, res = inserted
    assert not (res.labels[~wm] > 0).any()
    changed = res.post != _head(seed=1)
    # enhancement (including the partial-volume edge) stays within 1 voxel of white matter
    assert not (changed & ~ndi.binary_dilation(wm)).any()
    pts = {les.label: np.argwhere(res.labels == les.label) for les in res.lesions}
    for a in pts:
        for b in pts:
            if a < b:
                d = np.sqrt(((pts[a][:, None, :] - pts[b][None, :, :]) ** 2).sum(-1)).min()
                assert d >= 8.0, (a, b, d)
    for les in res.lesions:
        assert les.depth_mm >= 3.0 - 0.9  # eroded 3 mm (centres jitter within their voxel)


def test_truth_volume_and_enhancement(inserted):
    post, _, _, res = inserted
    for les in res.lesions:
        assert les.volume_mm3 == les.n_voxels == int((res.labels == les.label).sum())
        assert 15 <= les.requested_volume_mm3 <= 300
        assert abs(les.volume_mm3 - les.requested_volume_mm3) <= 0.25 * les.requested_volume_mm3 + 3
        assert 0.2 <= les.enhancement <= 0.8
        assert abs(les.local_wm - 100) < 3
        ratio = res.post[res.labels == les.label] / post[res.labels == les.label]
        assert ratio.min() >= 1.0 - 1e-6
        peak = ratio.max() - 1
        assert peak == pytest.approx(les.enhancement, rel=0.02)  # full occupancy reaches `a`
        if les.kind == "ring":  # the centre is dimmer than the wall
            c = tuple(int(round(v)) for v in les.centre_ijk)
            assert res.post[c] / post[c] - 1 < 0.6 * les.enhancement
    assert not np.array_equal(res.post[res.labels == 0], post[res.labels == 0])  # partial volume edge
    assert {les.kind for les in res.lesions} <= {"nodular", "ring"}


def test_reproducible_with_seed():
    post, pre = _head(seed=1), _head(seed=2)
    a = R.insert_lesions(post, pre, None, np.eye(4), 11, 4)
    b = R.insert_lesions(post, pre, None, np.eye(4), np.random.default_rng(11), 4)
    c = R.insert_lesions(post, pre, None, np.eye(4), 12, 4)
    assert np.array_equal(a.post, b.post) and np.array_equal(a.labels, b.labels)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.labels, c.labels)


def test_white_matter_from_pre_intensity():
    pre = _head(seed=2)
    wm = R.wm_mask_from_t1(pre)
    truth = np.zeros(pre.shape, bool)
    truth[12:-12, 12:-12, 10:-10] = True
    inner = ndi.binary_erosion(truth)  # the light smoothing may take the border voxel layer
    assert (wm & inner).sum() / inner.sum() > 0.97
    assert not (wm & ~ndi.binary_dilation(truth)).any()
    mode, sd = R.wm_mode(pre)
    assert abs(mode - 100) < 1.5 and 1 < sd < 4


def test_excluded_mask_and_probability_map():
    post = _head(seed=1)
    prob = np.zeros(post.shape, np.float32)
    prob[12:-12, 12:-12, 10:-10] = 0.9
    excl = np.zeros(post.shape, bool)
    excl[12:35, 12:-12, 10:-10] = True  # half the white matter holds (pretend) T2 lesions
    res = R.insert_lesions(post, None, prob, np.eye(4), 5, 3, exclude=excl, volume_range=(15, 40))
    grown = ndi.distance_transform_edt(~excl) <= 2.0
    assert (res.labels > 0).any() and not (res.labels[grown] > 0).any()


def test_anisotropic_affine_volume():
    shape = (60, 60, 24)
    post = np.zeros(shape, np.float32)
    post[5:-5, 5:-5, 2:-2] = 100
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    res = R.insert_lesions(post, None, post > 0, aff, 2, 3, volume_range=(300, 400), min_separation_mm=5)
    for les in res.lesions:
        assert les.volume_mm3 == pytest.approx(3 * les.n_voxels)
        assert abs(les.volume_mm3 - les.requested_volume_mm3) < 0.3 * les.requested_volume_mm3
        assert les.centre_mm[2] == pytest.approx(3 * les.centre_ijk[2])


def test_bad_input_raises():
    post = _head()
    with pytest.raises(ValueError, match="shape"):
        R.insert_lesions(post, post[:-1], None, np.eye(4), 0, 2)
    with pytest.raises(ValueError, match="3-D"):
        R.insert_lesions(post[..., None], None, None, np.eye(4), 0, 2)
    with pytest.raises(ValueError, match="affine"):
        R.insert_lesions(post, None, None, np.zeros((4, 4)), 0, 2)
    tiny = np.zeros(post.shape, bool)
    tiny[30:40, 30:40, 25:35] = True
    with pytest.raises(ValueError, match="could place only|deep"):
        R.insert_lesions(post, None, tiny, np.eye(4), 0, 5, volume_range=(15, 20), max_tries=200)
