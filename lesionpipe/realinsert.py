"""Synthetic enhancing lesions inserted into a real post-contrast T1 (pure numpy/scipy).

Used to measure the detector on real anatomy (real vessels, sinuses, choroid plexus) with a known
answer: :func:`insert_lesions` places soft-edged ellipsoidal lesions, some ring-enhancing, at random
places of normal-appearing white matter and brightens the post-contrast image there, multiplicatively
on the local tissue, with partial volume at the edge. The pre-contrast image is never changed (a
new enhancing lesion is iso-intense or a little dark before contrast; here it is simply the normal
white matter that was there). See docs/real_scan_evaluation.md and scripts/eval_real_insert.py.

White matter is found from T1 intensity alone (:func:`wm_mask_from_t1`): the brightest mode of the
brain histogram, which on a T1-weighted scan is white matter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

__all__ = ["InsertedLesion", "Insertion", "wm_mode", "wm_mask_from_t1", "normal_white_matter",
           "lesion_occupancy", "insert_lesions"]


@dataclass(frozen=True)
class InsertedLesion:
    """One inserted lesion; ``label`` is its value in the truth label image."""

    label: int
    kind: str                    # "nodular" or "ring"
    centre_ijk: tuple            # voxel index of the centre (fractional)
    centre_mm: tuple             # centre in world (scanner) mm, through the affine
    semi_axes_mm: tuple          # ellipsoid semi-axes
    requested_volume_mm3: float  # volume drawn (log-uniform)
    volume_mm3: float            # truth volume: voxels whose partial volume is >= 0.5
    n_voxels: int
    enhancement: float           # added fraction of the local tissue intensity at full occupancy
    t1_factor: float             # lesion tissue before contrast, as a fraction of the tissue replaced
    local_wm: float              # median post-contrast white-matter intensity within 10 mm
    depth_mm: float              # distance of the centre to the edge of normal white matter

    def row(self) -> dict:
        """Flat dict for a TSV row (tuples rounded and split into columns)."""
        d = asdict(self)
        out = {"label": d["label"], "kind": d["kind"]}
        for name, key in (("centre_i", 0), ("centre_j", 1), ("centre_k", 2)):
            out[name] = round(float(d["centre_ijk"][key]), 2)
        for name, key in (("centre_x", 0), ("centre_y", 1), ("centre_z", 2)):
            out[name] = round(float(d["centre_mm"][key]), 2)
        out["semi_axes_mm"] = ",".join(f"{s:.2f}" for s in d["semi_axes_mm"])
        out["requested_volume_mm3"] = round(d["requested_volume_mm3"], 1)
        out["volume_mm3"] = round(d["volume_mm3"], 1)
        out["n_voxels"] = d["n_voxels"]
        out["enhancement_pct"] = round(100 * d["enhancement"], 1)
        out["t1_factor"] = round(d["t1_factor"], 3)
        out["local_wm"] = round(d["local_wm"], 2)
        out["depth_mm"] = round(d["depth_mm"], 2)
        return out


class Insertion(NamedTuple):
    """Result of :func:`insert_lesions`: ``post, labels, lesions, pre = insert_lesions(...)``."""

    post: np.ndarray              # float32, the post-contrast image with the lesions
    labels: np.ndarray            # int16 instance truth labels 1..n (partial volume >= 0.5)
    lesions: list                 # InsertedLesion per label, in label order
    pre: np.ndarray | None = None  # float32 pre-contrast image with the lesions (``t1_range``), else None


# =================================================================================================
# white matter from T1 intensity
# =================================================================================================
def wm_mode(t1: np.ndarray, mask: np.ndarray | None = None, *, bins: int = 256,
            min_height: float = 0.3) -> tuple[float, float]:
    """White-matter mode of a T1-weighted image and the spread of its upper half.

    The mode is the brightest local maximum of the smoothed brain histogram that reaches
    ``min_height`` of the highest one (white matter is the brightest tissue on T1). The spread is
    the upper half-width at half maximum converted to a Gaussian standard deviation (the lower
    side overlaps grey matter and is not used).

    >>> rng = np.random.default_rng(0)
    >>> t1 = np.concatenate([rng.normal(60, 5, 4000), rng.normal(100, 4, 6000), rng.normal(20, 5, 2000)])
    >>> mode, sd = wm_mode(t1)
    >>> bool(abs(mode - 100) < 2), bool(2.5 < sd < 6)
    (True, True)
    """
    t1 = np.asarray(t1, np.float32)
    sel = np.isfinite(t1) & ((t1 > 0) if mask is None else np.asarray(mask, bool))
    vals = t1[sel]
    if vals.size < 100:
        raise ValueError(f"white-matter mode: only {vals.size} brain voxels (need >= 100)")
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if not hi > lo:
        raise ValueError("white-matter mode: the image is constant inside the brain")
    hist, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    h = ndi.gaussian_filter1d(hist.astype(float), 2.0, mode="constant")
    centres = (edges[:-1] + edges[1:]) / 2
    hp = np.pad(h, 1)  # a mode in the first or last bin is still a peak
    peaks = [i for i in range(bins) if hp[i + 1] >= hp[i] and hp[i + 1] >= hp[i + 2]]
    peaks = [i for i in peaks if h[i] >= min_height * h.max()] or [int(np.argmax(h))]
    top = max(peaks)
    half = h[top] / 2
    above = np.nonzero(h[top:] < half)[0]
    width = (above[0] if above.size else bins - 1 - top) * (edges[1] - edges[0])
    sd = max(width, edges[1] - edges[0]) / np.sqrt(2 * np.log(2))
    return float(centres[top]), float(sd)


def wm_mask_from_t1(t1: np.ndarray, zooms=(1.0, 1.0, 1.0), *, brain: np.ndarray | None = None,
                    low_sd: float = 1.5, high_sd: float = 2.5, smooth_mm: float = 0.7) -> np.ndarray:
    """White matter: voxels within [mode - low_sd*sd, mode + high_sd*sd] of the white-matter mode.

    The image is lightly smoothed first (``smooth_mm`` Gaussian sigma) so that noise does not
    punch holes in the mask; holes of one voxel that remain are closed. ``brain`` restricts the
    histogram and the mask (default: voxels > 0, as in skull-stripped images).

    >>> t1 = np.full((20, 20, 20), 60.0); t1[2:18, 2:18, 2:18] = 100.0
    >>> int(wm_mask_from_t1(t1, smooth_mm=0).sum())
    4096
    """
    t1 = np.asarray(t1, np.float32)
    brain = (np.isfinite(t1) & (t1 > 0)) if brain is None else np.asarray(brain, bool)
    img = t1 if smooth_mm <= 0 else ndi.gaussian_filter(
        np.where(np.isfinite(t1), t1, 0), [smooth_mm / z for z in zooms], mode="nearest")
    mode, sd = wm_mode(img, brain)
    wm = brain & (img >= mode - low_sd * sd) & (img <= mode + high_sd * sd)
    # fill isolated one-voxel holes (a voxel whose 6 neighbours are all white matter)
    neigh = ndi.convolve(wm.astype(np.uint8), ndi.generate_binary_structure(3, 1).astype(np.uint8),
                         mode="constant")
    return wm | (brain & (neigh >= 6))


def normal_white_matter(wm: np.ndarray, zooms, *, exclude: np.ndarray | None = None,
                        exclude_margin_mm: float = 2.0) -> np.ndarray:
    """White matter minus the ``exclude`` mask (e.g. T2 lesions) grown by ``exclude_margin_mm``."""
    nawm = np.asarray(wm, bool).copy()
    if exclude is not None and np.any(exclude):
        grown = ndi.distance_transform_edt(~np.asarray(exclude, bool), sampling=zooms) <= exclude_margin_mm
        nawm &= ~grown
    return nawm


# =================================================================================================
# one lesion
# =================================================================================================
def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _box(centre_ijk, reach_mm: float, zooms, shape) -> tuple[slice, ...]:
    half = np.ceil(reach_mm / np.asarray(zooms, float)).astype(int) + 1
    c = np.round(np.asarray(centre_ijk, float)).astype(int)
    return tuple(slice(int(max(ci - h, 0)), int(min(ci + h + 1, n))) for ci, h, n in zip(c, half, shape))


def lesion_occupancy(shape, affine, centre_ijk, semi_axes_mm, rotation=None, *, profile=None,
                     supersample: int = 4) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Partial-volume occupancy of an ellipsoid on a voxel grid, inside its bounding box.

    Each voxel is sampled at ``supersample``**3 regular points; the occupancy is the fraction of
    points inside the ellipsoid. ``rotation`` (3x3, columns = ellipsoid axes in world mm) defaults
    to the identity. ``profile`` (a function of the normalised radius rho, 0 at the centre and 1
    on the surface) weights the inside points for the enhancement (default: 1).

    Returns (box, occupancy, weighted occupancy), both float32 arrays of the box's shape.

    >>> _, occ, _ = lesion_occupancy((21, 21, 21), np.eye(4), (10, 10, 10), (4, 4, 4))
    >>> int((occ >= 0.5).sum()), bool(abs(occ.sum() - 4 / 3 * np.pi * 4 ** 3) < 3)
    (257, True)
    """
    affine = np.asarray(affine, float)
    lin = affine[:3, :3]
    zooms = np.sqrt((lin ** 2).sum(axis=0))
    semi = np.asarray(semi_axes_mm, float)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    box = _box(centre_ijk, float(semi.max()) + float(zooms.max()), zooms, shape)
    s = int(supersample)
    sub = (np.arange(s) + 0.5) / s - 0.5
    axes = [(np.arange(b.start, b.stop, dtype=float)[:, None] + sub[None, :] - c).ravel()
            for b, c in zip(box, np.asarray(centre_ijk, float))]
    d_ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)   # (Bi*s, Bj*s, Bk*s, 3)
    u = (d_ijk @ lin.T @ rot) / semi                                  # unit-sphere frame
    rho = np.sqrt((u ** 2).sum(axis=-1))
    inside = (rho < 1.0).astype(np.float32)
    weighted = inside if profile is None else inside * np.asarray(profile(rho), np.float32)
    bshape = tuple(b.stop - b.start for b in box)

    def _mean(a):
        return a.reshape(bshape[0], s, bshape[1], s, bshape[2], s).mean(axis=(1, 3, 5)).astype(np.float32)

    return box, _mean(inside), _mean(weighted)


def _ring_profile(rng: np.random.Generator, radius_mm: float):
    """Enhancement profile of a ring lesion as a function of rho: bright wall, dim centre (0..1)."""
    wall = max(rng.uniform(0.25, 0.4), 1.3 / max(radius_mm, 1e-3))
    centre_level = rng.uniform(0.1, 0.35)
    inner = max(1.0 - wall, 0.05)

    def profile(rho):
        ramp = np.clip((rho - (inner - 0.2)) / 0.2, 0.0, 1.0)
        return centre_level + (1 - centre_level) * ramp

    return profile


# =================================================================================================
# insertion
# =================================================================================================
def _check_inputs(post, pre, wm, affine):
    post = np.asarray(post)
    if post.ndim != 3:
        raise ValueError(f"insert_lesions: post image is {post.ndim}-D {post.shape}; expected 3-D")
    for name, arr in (("pre image", pre), ("white-matter map", wm)):
        if arr is not None and np.shape(arr) != post.shape:
            raise ValueError(f"insert_lesions: {name} has shape {np.shape(arr)}, post image {post.shape}")
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ValueError(f"insert_lesions: affine is not a finite invertible 4x4 matrix:\n{affine}")
    return affine


def insert_lesions(post: np.ndarray, pre: np.ndarray | None, wm_prob_or_mask: np.ndarray | None,
                   affine, rng, n: int, *, exclude: np.ndarray | None = None,
                   volume_range=(15.0, 500.0), enhancement_range=(0.2, 0.8),
                   ring_fraction: float = 0.3, ring_min_volume_mm3: float = 80.0,
                   erode_mm: float = 3.0, fit_tolerance_mm: float = 1.0,
                   min_separation_mm: float = 8.0, exclude_margin_mm: float = 2.0,
                   t1_range=(1.0, 1.0), max_tries: int = 2000) -> Insertion:
    """Insert ``n`` synthetic enhancing lesions into normal-appearing white matter of ``post``.

    Parameters
    ----------
    post, pre : 3-D arrays on the same grid; ``pre`` (pre-contrast T1) is only used to find white
        matter when ``wm_prob_or_mask`` is None (``post`` is used when both are None). Neither
        input is modified.
    wm_prob_or_mask : white-matter mask, or probability map (>= 0.5 is white matter), or None to
        take it from T1 intensity (:func:`wm_mask_from_t1`).
    affine : voxel-to-world matrix (voxel sizes, anisotropy and orientation are honoured).
    rng : ``numpy.random.Generator`` or an int seed.
    exclude : mask kept free of lesions (e.g. the T2 lesion consensus), grown by
        ``exclude_margin_mm``.

    Placement: centres lie in normal white matter at least ``erode_mm`` from its edge and at least
    the lesion's largest semi-axis minus ``fit_tolerance_mm`` (so the lesion sits in white matter,
    not half in a ventricle); the gap between the bounding spheres of two lesions is at least
    ``min_separation_mm``. Larger lesions are placed first.

    Shape: an ellipsoid of log-uniform volume in ``volume_range`` (axis ratios 0.7-1.4, random
    orientation) with partial volume at the boundary; lesions of at least ``ring_min_volume_mm3``
    are ring-enhancing with probability ``ring_fraction`` (bright wall, 10-35 % in the centre).

    Intensity: ``post * (1 + a * occupancy * profile)`` with ``a`` uniform in
    ``enhancement_range``, i.e. ``a`` of the local white-matter intensity is added at full
    occupancy. With ``t1_range`` other than (1, 1), each lesion's tissue is darker before
    contrast by a factor ``f`` drawn in it (an MS lesion is T1-hypointense): ``pre`` is multiplied
    by ``1 - (1 - f) * occupancy`` and ``post`` by ``1 - (1 - f) * occupancy + a * occupancy *
    profile``. ``pre`` must then be given.

    Returns ``Insertion(post, labels, lesions, pre)``: the new post image (float32), instance truth
    labels (int16, voxels with partial volume >= 0.5), one :class:`InsertedLesion` per label and the
    new pre image (float32; None unless ``t1_range`` darkens the lesions).
    Raises ValueError when the lesions cannot all be placed.
    """
    affine = _check_inputs(post, pre, wm_prob_or_mask, affine)
    rng = np.random.default_rng(rng)
    post = np.asarray(post, np.float32)
    shape = post.shape
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    if n < 0:
        raise ValueError(f"insert_lesions: n = {n}; expected >= 0")
    lo_v, hi_v = (float(v) for v in volume_range)
    if not 0 < lo_v <= hi_v:
        raise ValueError(f"insert_lesions: volume_range {volume_range} must be 0 < low <= high")

    if wm_prob_or_mask is None:
        ref = post if pre is None else np.asarray(pre, np.float32)
        wm = wm_mask_from_t1(ref, zooms)
    else:
        m = np.asarray(wm_prob_or_mask)
        wm = m if m.dtype == bool else (np.nan_to_num(m.astype(np.float32)) >= 0.5)
    nawm = normal_white_matter(wm, zooms, exclude=exclude, exclude_margin_mm=exclude_margin_mm)
    if not nawm.any():
        raise ValueError("insert_lesions: no normal-appearing white matter to place lesions in")
    depth = ndi.distance_transform_edt(np.pad(nawm, 1), sampling=zooms)[1:-1, 1:-1, 1:-1]

    # draw the lesions, then place the largest first
    drafts = []
    for _ in range(n):
        volume = float(np.exp(rng.uniform(np.log(lo_v), np.log(hi_v))))
        ratios = rng.uniform(0.7, 1.4, 3)
        ratios /= np.prod(ratios) ** (1 / 3)
        semi = (3 * volume / (4 * np.pi)) ** (1 / 3) * ratios
        ring = volume >= ring_min_volume_mm3 and rng.random() < ring_fraction
        drafts.append({"volume": volume, "semi": semi, "rot": _random_rotation(rng),
                       "kind": "ring" if ring else "nodular",
                       "amp": float(rng.uniform(*enhancement_range))})
    order = sorted(range(n), key=lambda i: -drafts[i]["semi"].max())

    placed: list[tuple[np.ndarray, float]] = []  # (centre world mm, bounding radius)
    flat_depth = depth.ravel()
    centres: dict[int, np.ndarray] = {}
    for i in order:
        reach = float(drafts[i]["semi"].max())
        need = max(erode_mm, reach - fit_tolerance_mm)
        cand = np.flatnonzero(flat_depth >= need)
        if cand.size == 0:
            raise ValueError(f"insert_lesions: no white matter {need:.1f} mm deep for a "
                             f"{drafts[i]['volume']:.0f} mm3 lesion")
        for _ in range(max_tries):
            ijk = np.array(np.unravel_index(int(cand[rng.integers(cand.size)]), shape), float)
            ijk += rng.uniform(-0.5, 0.5, 3)
            xyz = affine[:3, :3] @ ijk + affine[:3, 3]
            if all(np.linalg.norm(xyz - c) - r - reach >= min_separation_mm for c, r in placed):
                placed.append((xyz, reach))
                centres[i] = ijk
                break
        else:
            raise ValueError(f"insert_lesions: could place only {len(placed)} of {n} lesions "
                             f"{min_separation_mm} mm apart in normal white matter")

    darken = tuple(float(v) for v in t1_range) != (1.0, 1.0)
    if darken and pre is None:
        raise ValueError("insert_lesions: t1_range darkens the lesions before contrast; give the pre image")
    # drawn from a child stream only when asked for, so that the default draws are unchanged
    t1 = (np.random.default_rng(rng.integers(2 ** 63)).uniform(*t1_range, n) if darken
          else np.ones(n))
    pre_out = np.asarray(pre, np.float32).copy() if darken else None
    out = post.copy()
    labels = np.zeros(shape, np.int16)
    lesions = []
    for label, i in enumerate(range(n), start=1):
        dr, ijk = drafts[i], centres[i]
        profile = _ring_profile(rng, float(dr["semi"].min())) if dr["kind"] == "ring" else None
        box, occ, weighted = lesion_occupancy(shape, affine, ijk, dr["semi"], dr["rot"], profile=profile)
        wm_box = _box(ijk, 10.0, zooms, shape)
        local = post[wm_box][nawm[wm_box]]
        local_wm = float(np.median(local)) if local.size else float("nan")
        dark = 1 - (1 - t1[i]) * occ
        out[box] = post[box] * (dark + dr["amp"] * weighted)
        if darken:
            pre_out[box] = pre_out[box] * dark
        inside = (occ >= 0.5) & (labels[box] == 0)
        labels[box][inside] = label
        nvox = int(inside.sum())
        ci = tuple(float(v) for v in ijk)
        lesions.append(InsertedLesion(
            label=label, kind=dr["kind"], centre_ijk=ci,
            centre_mm=tuple(float(v) for v in affine[:3, :3] @ ijk + affine[:3, 3]),
            semi_axes_mm=tuple(float(s) for s in dr["semi"]), requested_volume_mm3=dr["volume"],
            volume_mm3=nvox * voxel_mm3, n_voxels=nvox, enhancement=dr["amp"], t1_factor=float(t1[i]),
            local_wm=local_wm,
            depth_mm=float(ndi.map_coordinates(depth, ijk[:, None], order=1)[0])))
    return Insertion(out, labels, lesions, pre_out)
