"""A synthetic trial on real anatomy: a real patient's brain, acquired the way the phantoms are.

:mod:`lesionpipe.phantom` draws geometric anatomy; :mod:`lesionpipe.realinsert` inserts lesions
into a real scan but leaves it as it was published (skull-stripped, registered, noise-free
compared with a trial scan). This module joins the two so that the detector can be scored on
real vessels, sinuses and choroid plexus under trial conditions:

1. the real pre- and post-contrast T1 (``T1_mni``, ``T1POST_mni``, 1 mm, skull-stripped) are put
   on a padded 1 mm subject grid, white matter scaled to 1 on each;
2. a synthetic head is wrapped around the real brain (:func:`wrap_head`): CSF, patchy enhancing
   dura, a superior sagittal sinus, inner table, diploic marrow, outer table, bright scalp fat,
   muscle and skin, each layer of smoothly varying thickness;
3. every visit gets its own enhancing lesions in normal-appearing white matter
   (:func:`lesionpipe.realinsert.insert_lesions`, T1-hypointense before contrast), the real T2
   lesions staying as non-enhancing look-alikes; odd-numbered subjects are the mirror image;
4. each scan is acquired with the phantoms' acquisition model
   (:func:`lesionpipe.phantom.draw_visit_design`): head motion between visits and between pre and
   post, 1 mm 3-D or 3-5 mm 2-D grids in any orientation, bias field, sequence contrast, Rician
   noise, scanner gain, int or float storage, and a quarter of the visits without a pre scan.

The truth is written in the phantoms' layout (docs/phantoms.md), so ``lesionpipe evaluate``
scores it as it scores the phantoms. One patient's brain serves every subject: the anatomy does
not vary between subjects, only its mirror image, the head around it, the lesions and the
acquisitions do. See docs/real_scan_evaluation.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from lesionpipe import __version__
from lesionpipe.phantom import (MIMIC_DURA, MIMIC_FAT, MIMIC_NAMES, MIMIC_NONENH, MIMIC_SINUS,
                                MIN_VOLUME_MM3, MIN_VOXELS, TRUTH_COUNT_COLUMNS, TRUTH_LESION_COLUMNS,
                                Acquisition, _scan_box, _smooth_noise, _write_tsv, draw_visit_design,
                                sample, save_label_image, truth_count_row, write_visit_scans)
from lesionpipe.realinsert import insert_lesions, normal_white_matter, wm_mask_from_t1, wm_mode

__all__ = ["RealBrain", "load_real_brain", "wrap_head", "write_real_trial"]

SCAN_FILES = {"post": "T1POST_mni.nii.gz", "pre": "T1_mni.nii.gz", "t2": "T2_lesions_consensus_mni.nii.gz"}
PAD_MM = 24                      # room for the synthetic head around the brain
TOP_OF_HEAD_MM = 74.0            # subject z of the vertex: the scan's field of view is centred near z = -4


@dataclass
class RealBrain:
    """The real brain on a padded 1 mm RAS grid; ``origin`` is the subject mm of voxel 0."""

    post: np.ndarray             # float32, white matter = 1, 0 outside the brain
    pre: np.ndarray              # float32, white matter = 1
    t2: np.ndarray               # bool, the real (non-enhancing) T2 lesions
    brain: np.ndarray            # bool, the published brain mask (filled)
    wm: np.ndarray               # bool, white matter of the pre-contrast T1
    origin: np.ndarray

    def mirrored(self) -> "RealBrain":
        """The left-right mirror image (a plausible second brain from the same patient)."""
        flip = (lambda a: np.ascontiguousarray(a[::-1]))
        return RealBrain(flip(self.post), flip(self.pre), flip(self.t2), flip(self.brain), flip(self.wm),
                         self.origin.copy())


def load_real_brain(scans_dir) -> RealBrain:
    """Read ``T1POST_mni``, ``T1_mni`` and the T2 lesion consensus from ``scans_dir``.

    Raises FileNotFoundError (naming the file) when one is missing and ValueError when the three
    grids differ or the grid is not 1 mm.
    """
    scans_dir = Path(scans_dir)
    imgs = {}
    for key, name in SCAN_FILES.items():
        path = scans_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found (real-anatomy scans need {', '.join(SCAN_FILES.values())})")
        imgs[key] = nb.as_closest_canonical(nb.load(str(path)))
    ref = imgs["post"]
    for key, img in imgs.items():
        if img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise ValueError(f"{scans_dir / SCAN_FILES[key]}: grid differs from {SCAN_FILES['post']}")
    if not np.allclose(np.abs(ref.affine[:3, :3]), np.eye(3), atol=1e-3):
        raise ValueError(f"{scans_dir / SCAN_FILES['post']}: expected a 1 mm axis-aligned grid")
    post = np.nan_to_num(ref.get_fdata(dtype=np.float32))
    pre = np.nan_to_num(imgs["pre"].get_fdata(dtype=np.float32))
    t2 = np.asarray(imgs["t2"].dataobj) > 0
    brain = ndi.binary_fill_holes(ndi.binary_closing((post > 0) | (pre > 0), np.ones((3, 3, 3)), iterations=2))
    post_wm = wm_mode(post, brain)[0]
    pre_wm = wm_mode(pre, brain)[0]
    wm = wm_mask_from_t1(pre, (1.0, 1.0, 1.0), brain=brain)
    pad = [(PAD_MM, PAD_MM)] * 3
    post = np.pad(np.clip(post / post_wm, 0, None), pad)
    pre = np.pad(np.clip(pre / pre_wm, 0, None), pad)
    t2, brain, wm = (np.pad(a, pad) for a in (t2, brain, wm))
    # subject mm: centred left-right and front-back on the brain, the vertex at TOP_OF_HEAD_MM
    lo, hi = (np.array([f(np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[0])
                        for ax in range(3)], float) for f in (np.min, np.max))
    top = hi[2] + 12            # the head's layers above the brain
    origin = -np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, top - TOP_OF_HEAD_MM])
    return RealBrain(post.astype(np.float32), pre.astype(np.float32), t2, brain, wm, origin)


def wrap_head(rng: np.random.Generator, brain: np.ndarray, origin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic head around a brain mask: (pre intensity, post enhancement, mimic codes).

    Layers outward from the brain, each of smoothly varying thickness (mm): CSF 1-3.5, dura 1
    (enhancing 0.1-1.0 of white matter, patchy), inner table 1-2, diploic marrow 1.5-5 (T1 1.0,
    slight enhancement), outer table 1-2, scalp fat 2-7 (T1 1.4), muscle 1-4, skin 1.5. A
    superior sagittal sinus (enhancing 1.2-2.0) runs in the dura along the midline above the
    brain. Intensities as in :mod:`lesionpipe.phantom` (white matter = 1).
    """
    shape = brain.shape
    dist = ndi.distance_transform_edt(~brain).astype(np.float32)
    dist[brain] = 0

    def thick(lo, hi, step=25.0):
        f = _smooth_noise(rng, shape, step)
        return lo + (hi - lo) * np.clip(0.5 + 0.3 * f, 0, 1)

    layers = [("csf", 0.24, 0.0, thick(1.0, 3.5)), ("dura", 0.6, None, np.float32(1.0)),
              ("inner", 0.05, 0.0, thick(1.0, 2.0)), ("marrow", 1.0, 0.08, thick(1.5, 5.0)),
              ("outer", 0.05, 0.0, thick(1.0, 2.0)), ("fat", 1.4, 0.0, thick(2.0, 7.0)),
              ("muscle", 0.62, 0.12, thick(1.0, 4.0)), ("skin", 0.75, 0.25, np.float32(1.5))]
    pre = np.zeros(shape, np.float32)
    enh = np.zeros(shape, np.float32)
    mimic = np.zeros(shape, np.uint8)
    inner = np.zeros(shape, np.float32)
    outside = ~brain
    for name, t1, gd, t in layers:
        outer = inner + t
        sel = outside & (dist > inner) & (dist <= outer)
        pre[sel] = t1
        if name == "dura":
            patchy = np.clip(0.55 + 0.45 * _smooth_noise(rng, shape, 15.0), 0.1, 1.0)
            enh[sel] = patchy[sel]
            mimic[sel] = MIMIC_DURA
        else:
            enh[sel] = gd
            if name in ("marrow", "fat"):
                mimic[sel] = MIMIC_FAT
        inner = outer
    # superior sagittal sinus: a triangular channel in the dura and inner table at the midline
    x = origin[0] + np.arange(shape[0], dtype=np.float32)
    z = origin[2] + np.arange(shape[2], dtype=np.float32)
    sinus = (np.abs(x)[:, None, None] <= 3.5 + 0.5 * rng.standard_normal()) & outside & (dist <= 6.0) \
        & (dist > 0.5) & (z[None, None, :] > 0.0)
    pre[sinus] = 0.45
    enh[sinus] = rng.uniform(1.2, 2.0)
    mimic[sinus] = MIMIC_SINUS
    return pre, enh, mimic


def _truth_on_grid(labels: np.ndarray, lesions: list, origin, acq: Acquisition):
    """Instance labels of the inserted lesions on the post grid and their truth_lesions.tsv rows.

    Each lesion's mask is resampled with the acquisition's partial volume and kept where >= 0.5
    (a lesion thinner than the slice keeps its voxels above 80 % of its peak, never counted),
    as :func:`lesionpipe.phantom.truth_labels` does.
    """
    out = np.zeros(acq.shape, np.int16)
    best = np.zeros(acq.shape, np.float32)
    vox = float(np.prod(acq.zooms))
    rows, nxt = [], 1
    objs = ndi.find_objects(labels)
    for les in lesions:
        sl = objs[les.label - 1] if les.label - 1 < len(objs) else None
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, labels.shape))
        lo = np.asarray(origin, float) + [s.start for s in sl]
        hi = np.asarray(origin, float) + [s.stop - 1 for s in sl]
        box = _scan_box(acq, lo, hi)
        if box is None:
            continue
        occ = sample((labels[sl] == les.label).astype(np.float32), lo, acq, box=box)
        peak = float(occ.max()) if occ.size else 0.0
        cut = 0.5 if peak >= 0.5 else max(0.2, 0.8 * peak)
        sel = (occ >= cut) & (occ > best[box])
        if not sel.any():
            continue
        out[box][sel] = nxt
        best[box][sel] = occ[sel]
        rows.append((nxt, les, peak < 0.5))
        nxt += 1
    table = []
    ids = np.arange(1, nxt)
    counts = ndi.sum_labels(np.ones_like(out), out, ids) if len(ids) else []
    cents = ndi.center_of_mass(np.ones_like(out), out, ids) if len(ids) else []
    for (lid, les, partial), n, c in zip(rows, counts, cents):
        n = int(n)
        world = acq.affine[:3, :3] @ np.asarray(c) + acq.affine[:3, 3] if n else [np.nan] * 3
        table.append({
            "lesion_id": lid, "n_voxels": n, "volume_mm3": round(n * vox, 2),
            "enhancement_pct": round(100 * les.enhancement, 1), "kind": les.kind,
            "counted": int(n >= MIN_VOXELS and n * vox >= MIN_VOLUME_MM3 and not partial),
            "new": 1, "site": "white_matter", "touching": "none",
            "centroid_x": round(float(world[0]), 2), "centroid_y": round(float(world[1]), 2),
            "centroid_z": round(float(world[2]), 2), "subject_lesion": None,
        })
    return out, table


def write_real_trial(scans_dir, bids_dir, truth_dir, *, n_subjects: int = 8, weeks=(0, 4, 12),
                     seed: int = 0, mean_lesions: float = 3.0, p_post_only: float = 0.25, p_2d: float = 0.4,
                     enhancement_range=(0.2, 0.8), t1_range=(0.8, 1.0), progress=None) -> dict:
    """Write a BIDS trial on the real brain in ``scans_dir`` and its truth (phantom layout).

    Each visit has a negative-binomial number of lesions (mean ``mean_lesions``, at most 12),
    15-500 mm3, ``enhancement_range`` of white matter added at full occupancy, T1 factor in
    ``t1_range`` before contrast. Returns a summary (also ``truth_dir/generation.json``).
    """
    weeks = [int(w) for w in weeks]
    if not weeks or sorted(set(weeks)) != weeks or weeks[0] < 0:
        raise ValueError(f"weeks must be increasing non-negative integers, got {weeks}")
    if n_subjects < 1:
        raise ValueError("n_subjects must be >= 1")
    t0 = time.time()
    base = load_real_brain(scans_dir)
    bids_dir, truth_dir = Path(bids_dir), Path(truth_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "lesionpipe synthetic MS trial on a real brain", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "lesionpipe phantoms --real-anatomy", "Version": __version__}]}, indent=2) + "\n")
    subj_seeds = np.random.default_rng(seed).integers(0, 2 ** 31, n_subjects)
    count_rows, lesion_rows, participants = [], [], []
    mirrored = None
    for si in range(n_subjects):
        sub = f"sub-{si + 1:02d}"
        participants.append(sub)
        if si % 2 and mirrored is None:
            mirrored = base.mirrored()
        brain = mirrored if si % 2 else base
        head_ss, design_ss, lesion_ss, noise_ss = np.random.SeedSequence(int(subj_seeds[si])).spawn(4)
        head_pre, head_enh, head_mimic = wrap_head(np.random.default_rng(head_ss), brain.brain, brain.origin)
        outside = ~brain.brain
        pre0 = np.where(outside, head_pre, brain.pre)
        post0 = np.where(outside, head_pre + head_enh, brain.post)
        nawm = normal_white_matter(brain.wm, (1.0, 1.0, 1.0), exclude=brain.t2)
        mimic0 = head_mimic.copy()
        mimic0[brain.t2] = MIMIC_NONENH
        noise_rng = np.random.default_rng(noise_ss)
        lesion_rng = np.random.default_rng(lesion_ss)
        sess_rows = []
        for v, (wk, visit_ss) in enumerate(zip(weeks, design_ss.spawn(len(weeks)))):
            ses = f"ses-w{wk:02d}"
            sess_rows.append({"session_id": ses, "week": wk})
            post_acq, pre_acq = draw_visit_design(np.random.default_rng(visit_ss), {}, size="full",
                                                  stress=False, storage=None, gain_range=(0.01, 5000.0),
                                                  p_post_only=p_post_only, p_2d=p_2d)
            n = int(min(lesion_rng.poisson(lesion_rng.gamma(1.5, mean_lesions / 1.5)), 12))
            ins = insert_lesions(post0, pre0, nawm, np.eye(4), lesion_rng, n, erode_mm=2.0,
                                 enhancement_range=enhancement_range, t1_range=t1_range)
            stem = f"{sub}_{ses}"
            write_visit_scans(noise_rng, bids_dir / sub / ses / "anat", stem, brain.origin, post_acq, ins.post,
                              pre_acq, ins.pre)
            labels, rows = _truth_on_grid(ins.labels, ins.lesions, brain.origin, post_acq)
            tdir = truth_dir / sub / ses
            save_label_image(labels, post_acq, tdir / f"{stem}_label-GEL_dseg.nii.gz")
            mim = np.rint(sample(mimic0.astype(np.float32), brain.origin, post_acq, order=0)).astype(np.uint8)
            save_label_image(mim, post_acq, tdir / f"{stem}_label-mimics_dseg.nii.gz")
            n_counted = sum(r["counted"] for r in rows)
            count_rows.append(truth_count_row(sub, ses, wk, n_counted, len(rows), post_acq, pre_acq))
            lesion_rows += [{"participant_id": sub, "session_id": ses, **r} for r in rows]
            if progress:
                progress(f"{sub} {ses}: {n_counted} GELs ({post_acq.grid}, pre={'yes' if pre_acq else 'no'})")
        _write_tsv(bids_dir / sub / f"{sub}_sessions.tsv", sess_rows, ["session_id", "week"])
    _write_tsv(bids_dir / "participants.tsv", [{"participant_id": p} for p in participants], ["participant_id"])
    _write_tsv(truth_dir / "truth_counts.tsv", count_rows, TRUTH_COUNT_COLUMNS)
    _write_tsv(truth_dir / "truth_lesions.tsv", lesion_rows, TRUTH_LESION_COLUMNS)
    summary = {"generator": "lesionpipe.realtrial", "version": __version__, "seed": seed,
               "scans": Path(scans_dir).name, "n_subjects": n_subjects, "weeks": weeks,
               "mean_lesions": mean_lesions, "p_post_only": p_post_only, "p_2d": p_2d,
               "enhancement_range": list(enhancement_range), "t1_range": list(t1_range),
               "counting_rule": {"min_voxels": MIN_VOXELS, "min_volume_mm3": MIN_VOLUME_MM3},
               "mimic_codes": MIMIC_NAMES, "n_visits": len(count_rows),
               "total_gels": int(sum(r["gel_count"] for r in count_rows))}
    (truth_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "ground truth of the lesionpipe real-anatomy trial", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionpipe phantoms --real-anatomy", "Version": __version__}]}, indent=2) + "\n")
    (truth_dir / "generation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "seconds": round(time.time() - t0, 1)}
