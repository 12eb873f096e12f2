"""Brain mask on a phantom head with skull, scalp fat, marrow, face and neck muscle."""

from __future__ import annotations

import numpy as np
import pytest

from lesionpipe import phantom as P
from lesionpipe.preproc.bias import head_mask
from lesionpipe.preproc.brain import brain_mask


@pytest.fixture(scope="module")
def anat():
    return P.make_anatomy(np.random.default_rng(5), size="small")


@pytest.fixture(scope="module")
def head(anat):
    rng = np.random.default_rng(0)
    pre = (anat.pre + rng.normal(0, 0.03, anat.pre.shape)).astype(np.float32) * 731.0
    mask, levels = brain_mask(pre, (1.0, 1.0, 1.0), head_mask(pre))
    return anat.tissue, mask, levels


def _inside(tissue, mask, cls):
    return float(mask[tissue == cls].mean())


def test_brain_is_inside(head):
    tissue, mask, _ = head
    assert _inside(tissue, mask, P.WM) >= 0.93
    assert _inside(tissue, mask, P.GM) >= 0.7
    assert _inside(tissue, mask, P.DGM) >= 0.95
    assert _inside(tissue, mask, P.VENT) >= 0.95
    # the cerebellum hangs on a small piece of white matter: it must not be dropped
    assert _inside(tissue, mask, P.CEREB_GM) >= 0.85


def test_skull_scalp_and_neck_are_outside(head):
    tissue, mask, _ = head
    for cls in (P.FAT, P.MUSCLE, P.SKIN, P.BONE, P.EYE):
        assert _inside(tissue, mask, cls) <= 0.01, P.CLASS_NAMES[cls]
    assert _inside(tissue, mask, P.MARROW) <= 0.05


def test_tissue_levels_follow_the_gain(head):
    _, _, levels = head
    assert levels.csf < levels.gm < levels.wm
    assert levels.wm == pytest.approx(731.0, rel=0.05)


def test_noisy_scan_keeps_the_whole_brain(anat):
    """At SNR ~17 (Rician) the white matter thresholded voxel by voxel falls apart under the
    erosion; the seed comes from a smoothed copy, so the cerebellum and both hemispheres stay."""
    rng = np.random.default_rng(0)
    noisy = np.sqrt((anat.pre + rng.normal(0, 0.06, anat.pre.shape)) ** 2
                    + rng.normal(0, 0.06, anat.pre.shape) ** 2).astype(np.float32) * 731.0
    mask, _ = brain_mask(noisy, (1.0, 1.0, 1.0), head_mask(noisy))
    assert _inside(anat.tissue, mask, P.WM) >= 0.93
    assert _inside(anat.tissue, mask, P.CEREB_GM) >= 0.85
    for cls in (P.FAT, P.MARROW):
        assert _inside(anat.tissue, mask, cls) <= 0.05, P.CLASS_NAMES[cls]
