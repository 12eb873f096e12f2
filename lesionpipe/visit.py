"""The per-visit steps as plain functions on arrays, and one function chaining them.

The Nipype interfaces in :mod:`lesionpipe.interfaces` call these one step per node; a notebook
or a test can call :func:`process_visit` directly. No Nipype import here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import nibabel as nb
import numpy as np

from lesionpipe.imageio import ScanError, load_scan, voxel_sizes
from lesionpipe.lesions.detect import Detection, detect_lesions, lesion_table
from lesionpipe.preproc.bias import head_mask, n4_correct
from lesionpipe.preproc.brain import (TissueLevels, brain_mask, match_levels, normalise,
                                      tissue_levels, wm_mask)
from lesionpipe.preproc.register import ncc, rigid_register
from lesionpipe.settings import Settings


def prepare(data: np.ndarray, affine: np.ndarray, settings: Settings, *, threads: int = 1,
            name: str = "scan") -> tuple[np.ndarray, np.ndarray]:
    """Head mask and N4 bias correction. Returns ``(corrected, head_mask)``."""
    head = head_mask(data)
    if head.sum() < 1000:
        raise ScanError(f"{name}: no head found (fewer than 1000 voxels above background)")
    if settings.bias_correct:
        data, _ = n4_correct(data, affine, mask=head, shrink=settings.n4_shrink,
                             iterations=settings.n4_iterations, threads=threads)
    return data.astype(np.float32), head


@dataclass
class Registration:
    pre_on_post: np.ndarray
    valid: np.ndarray
    info: dict = field(default_factory=dict)


def register(post: np.ndarray, post_affine: np.ndarray, pre: np.ndarray, pre_affine: np.ndarray,
             settings: Settings, *, post_head: np.ndarray | None = None,
             threads: int = 1) -> Registration:
    """Rigid pre-to-post registration, with the quality figure (NCC in the head, 0-1)."""
    if settings.register:
        res = rigid_register(post, post_affine, pre, pre_affine, fixed_mask=post_head,
                             sampling=settings.registration_sampling, threads=threads)
        moved, valid = res.resampled, res.valid
        info = {"rotation_deg": round(res.rotation_deg, 3),
                "translation_mm": round(res.translation_mm, 3),
                "mattes_mi": round(res.metric, 5), "parameters": res.parameters}
    else:
        from lesionpipe.preproc.register import resample_to
        moved = resample_to(pre, pre_affine, post.shape, post_affine, order=1)
        valid = resample_to(np.ones(pre.shape, np.float32), pre_affine, post.shape, post_affine,
                            order=0) > 0.5
        info = {}
    region = (post_head if post_head is not None else np.ones(post.shape, bool)) & valid
    info["ncc"] = round(ncc(post, moved, region), 4) if region.any() else 0.0
    return Registration(pre_on_post=moved, valid=valid, info=info)


@dataclass
class Masks:
    brain: np.ndarray
    wm: np.ndarray
    levels: TissueLevels


def masks(post: np.ndarray, zooms, post_head: np.ndarray, *, pre_on_post: np.ndarray | None = None,
          name: str = "scan") -> Masks:
    """Brain and white-matter masks from the pre-contrast image when present, else the post."""
    ref = pre_on_post if pre_on_post is not None else post
    try:
        brain, levels = brain_mask(ref, zooms, post_head)
    except ValueError as exc:
        raise ScanError(f"{name}: {exc}") from None
    wm = wm_mask(ref, brain, levels, zooms)
    if wm.sum() < 200:
        raise ScanError(f"{name}: white matter could not be identified (brain mask "
                        f"{int(brain.sum())} voxels); is this a T1-weighted head scan?")
    return Masks(brain=brain, wm=wm, levels=levels)


def normalised(data: np.ndarray, wm: np.ndarray, zooms) -> np.ndarray:
    return normalise(data, wm, zooms)


def matched_pre(pre_n: np.ndarray, post_n: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Pre-contrast intensities mapped onto the post-contrast tissue levels (see match_levels)."""
    region = brain & (post_n < 130) & (pre_n < 130)
    return match_levels(pre_n, tissue_levels(pre_n, region), tissue_levels(post_n, region))


@dataclass
class VisitResult:
    labels: np.ndarray
    table: "object"
    detection: Detection
    post_n: np.ndarray
    pre_n: np.ndarray | None
    brain: np.ndarray
    registration: dict
    seconds: float


def process_visit(post_file, pre_file=None, settings: Settings | None = None, *,
                  threads: int = 1) -> VisitResult:
    """All steps for one visit in memory (tests, notebooks, benchmarks of the science alone)."""
    settings = settings or Settings()
    t0 = time.perf_counter()
    post_img = load_scan(post_file)
    zooms = voxel_sizes(post_img.affine)
    post, head = prepare(post_img.get_fdata(dtype=np.float32), post_img.affine, settings,
                         threads=threads, name=str(post_file))
    pre_on, valid, reg_info = None, None, {}
    if pre_file is not None:
        pre_img = load_scan(pre_file)
        pre, _ = prepare(pre_img.get_fdata(dtype=np.float32), pre_img.affine, settings,
                         threads=threads, name=str(pre_file))
        reg = register(post, post_img.affine, pre, pre_img.affine, settings, post_head=head,
                       threads=threads)
        pre_on, valid, reg_info = reg.pre_on_post, reg.valid, reg.info
    m = masks(post, zooms, head, pre_on_post=pre_on, name=str(post_file))
    post_n = normalised(post, m.wm, zooms)
    pre_n = normalised(pre_on, m.wm, zooms) if pre_on is not None else None
    if pre_n is not None:
        pre_n = matched_pre(pre_n, post_n, m.brain)
    csf_level = 100.0 * m.levels.csf_gm / m.levels.wm
    det = detect_lesions(post_n, zooms, m.brain, settings, pre_n=pre_n, wm=m.wm,
                         csf_level=csf_level, valid=valid)
    table = lesion_table(det.labels, det.enhancement, post_img.affine)
    return VisitResult(labels=det.labels, table=table, detection=det, post_n=post_n, pre_n=pre_n,
                       brain=m.brain, registration=reg_info, seconds=time.perf_counter() - t0)

