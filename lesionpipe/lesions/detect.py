"""Enhancing-lesion detection on normalised images: enhancement map, candidates, rejection.

Everything works in physical units (mm, mm3, percent of normal white matter), so the same rules
apply to 1 mm 3-D and thick-slice 2-D grids and to any scanner gain.

A candidate is a hysteresis region of the lightly smoothed enhancement map. What is not a lesion is
rejected by what it is made of and where it sits, never by an image's identity:

- *outside or at the surface of the brain* (dura, venous sinus, falx, scalp, marrow): centroid
  closer than ``surface_margin_mm`` to the outside of the brain mask, or most of its surrounding
  shell outside the brain;
- *in CSF spaces* (choroid plexus, sulcal and cisternal vessels): most of its surrounding shell is
  CSF-dark on the pre-contrast (or post-only) image, or it lies largely in the ventricles;
- *tubular or sheet-like* (vessels, dural folds): elongation or flatness of its principal axes in mm
  above limits. Before candidates are split into peaks, the centre lines of long thin bright tubes
  (Hessian of the map: two strong curvatures, one flat) are cut out with a 1 mm margin, so a
  lesion touching a vessel is a candidate of its own; thin tubes still attached to a candidate
  (elongated, or far larger than its inscribed ball) are cut off by a 1 mm opening;
- *too faint or too small*: peak enhancement below ``min_peak_enhancement_pct``, or fewer than
  ``min_voxels`` voxels / ``min_volume_mm3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold

from lesionpipe.preproc.brain import enclosed_bright
from lesionpipe.preproc.morph import ball, dilate, distance_mm, fill_holes_2d, smooth_mm
from lesionpipe.settings import Settings


@dataclass
class Detection:
    labels: np.ndarray                 # int32 instance labels of accepted lesions (1..N)
    enhancement: np.ndarray            # enhancement map, % of NAWM
    candidates: pd.DataFrame           # every candidate with its features and the decision
    noise_sigma: float                 # robust SD of the (smoothed) enhancement map in WM
    candidate_labels: np.ndarray | None = None  # value k = row k-1 of ``candidates``
    thresholds: dict = field(default_factory=dict)


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation.

    >>> x = np.random.default_rng(1).normal(0, 2.0, 100000)
    >>> round(robust_sigma(x), 1)
    2.0
    """
    values = np.asarray(values, float)
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def enhancement_map(post_n: np.ndarray, pre_n: np.ndarray | None) -> np.ndarray:
    """Enhancement in % of normal white matter: post - pre, or post - 100 without a pre scan.

    >>> enhancement_map(np.array([130.]), np.array([100.])).tolist(), enhancement_map(np.array([130.]), None).tolist()
    ([30.0], [30.0])
    """
    if pre_n is None:
        return (post_n - 100.0).astype(np.float32)
    return (post_n - pre_n).astype(np.float32)


def principal_axes_mm(coords_vox: np.ndarray, zooms) -> np.ndarray:
    """Principal standard deviations (mm, descending) of a voxel set, each voxel a uniform box.

    >>> c = np.argwhere(np.ones((10, 2, 2), bool))
    >>> np.round(principal_axes_mm(c, (1, 1, 1)), 2).tolist()
    [2.92, 0.58, 0.58]
    """
    pts = coords_vox * np.asarray(zooms, float)
    cov = np.cov(pts.T) if len(pts) > 1 else np.zeros((3, 3))
    cov = cov + np.diag(np.asarray(zooms, float) ** 2 / 12.0)
    ev = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
    return np.sqrt(ev)


def detect_lesions(post_n: np.ndarray, zooms, brain: np.ndarray, settings: Settings, *,
                   pre_n: np.ndarray | None = None, wm: np.ndarray | None = None,
                   csf_level: float = 40.0, valid: np.ndarray | None = None) -> Detection:
    """Find enhancing lesions.

    ``post_n``/``pre_n``: images normalised so that NAWM = 100, on one grid; ``brain``: brain mask;
    ``wm``: confident white-matter mask for the noise estimate; ``csf_level``: normalised intensity
    below which a voxel counts as CSF; ``valid``: where the pre image has data after registration.
    """
    zooms = np.asarray(zooms, float)
    enh = enhancement_map(post_n, pre_n)
    # a lesion brighter than any tissue may have been left out of the mask where it touches CSF
    brain = brain | enclosed_bright(post_n > 122.0, brain)
    search = brain.copy()
    if valid is not None and pre_n is not None:
        search &= valid
    thick = zooms.max() >= settings.thick_slice_mm
    enh_s = smooth_mm(enh, settings.enhancement_smooth_mm, zooms)
    noise_region = wm if wm is not None and wm.sum() > 1000 else brain
    sigma = robust_sigma(enh_s[noise_region])
    z_hi = settings.subtraction_z if pre_n is not None else settings.post_only_z
    if thick:
        z_hi = min(z_hi, settings.thick_slice_z)
    hi = max(z_hi * sigma, 0.6 * settings.min_peak_enhancement_pct)
    lo = max(2.5 * sigma, 0.4 * settings.min_peak_enhancement_pct)
    cand = apply_hysteresis_threshold(np.where(search, enh_s, 0), lo, hi)
    cand &= search
    conn = ndi.generate_binary_structure(3, settings.skimage_connectivity)
    lab, n = ndi.label(cand, structure=conn)
    # centre lines of long thin bright tubes (vessels), widened to their flanks: taken out of each
    # component before it is split into peaks, so a lesion touching a vessel stands on its own
    vessel_cut = np.zeros(cand.shape, bool)
    if settings.vessel_cut_mm > 0:
        centre = tube_centrelines(enh_s, cand, zooms, min_length_mm=settings.min_vessel_length_mm)
        vessel_cut = dilate(centre, settings.vessel_cut_mm, zooms) & cand

    ref = pre_n if pre_n is not None else post_n
    depth = distance_mm(brain, zooms)
    csf = (ref < csf_level) & brain
    ventricles = _ventricles(csf, depth, zooms)
    vox_vol = float(np.prod(zooms))

    model = None
    if settings.classifier != "none":
        from lesionpipe.lesions.classifier import load_model

        model = load_model(settings.classifier or None)

    rows = []
    boxes: dict[int, tuple] = {}          # row index -> (slices, piece) of candidates still open
    cand_labels = np.zeros(lab.shape, np.int32)
    pad = np.ceil(3.0 / zooms).astype(int) + 1
    for idx, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        comp_sl = _grow_box(box, pad, lab.shape)
        comp = lab[comp_sl] == idx
        origin = np.array([x.start for x in comp_sl])
        comp_n = int(comp.sum())
        comp &= ~vessel_cut[comp_sl]
        pieces = ((piece, how, origin + start, attached)
                  for start, region, attached in _peel(comp, enh_s[comp_sl], lo=lo, hi=hi,
                                                       conn=conn, zooms=zooms,
                                                       dynamic=2.0 * sigma,
                                                       recover_flanks=settings.recover_flanks,
                                                       flank_mm=settings.peel_flank_mm)
                  for piece, how in _split_tubes(region, zooms, settings))
        for piece, how, offset, attached in pieces:
            # work in the piece's own box: a lesion peeled off a long vessel is small
            coords = np.argwhere(piece) + offset
            sl, piece = _voxel_box(coords, pad, lab.shape)
            feats = _cheap_features(piece, sl, enh, depth, zooms, vox_vol)
            reason = _cheap_reject(feats, settings)
            if not reason:
                feats.update(_shape_context_features(piece, sl, enh, csf, ventricles, brain, ref,
                                                     zooms))
                feats["has_pre"] = pre_n is not None
                feats["slice_mm"] = float(zooms.max())
                feats["contrast_z"] = feats["local_contrast_pct"] / max(sigma, 1e-6)
                # a piece of a larger enhancing structure (vessel tree, plexus) vs on its own
                feats["parent_ratio"] = comp_n / max(feats["n_voxels"], 1)
                feats["attached"] = float(attached)
                feats.update(surround_features(coords, enh_s, zooms))
                reason = _hard_reject(feats, settings) if model else _reject_reason(feats, settings)
            feats["split"] = how
            feats["reason"] = reason
            rows.append(feats)
            cand_labels[sl][piece & (cand_labels[sl] == 0)] = len(rows)
            if not reason:
                boxes[len(rows) - 1] = (sl, piece)

    table = pd.DataFrame(rows)
    if model is not None and boxes:
        keys = sorted(boxes)
        prob = model.probability(table.loc[keys])
        table["probability"] = np.nan
        table.loc[keys, "probability"] = prob
        min_p = (settings.min_probability if pre_n is not None
                 else settings.min_probability_post_only)
        for key, p in zip(keys, prob):
            if p < min_p:
                table.loc[key, "reason"] = f"classifier: p = {p:.2f}"
                del boxes[key]
    if len(table):
        table["decision"] = np.where(table["reason"].astype(bool), "reject", "accept")
    accepted = []
    for key in sorted(boxes):
        sl, piece = boxes[key]
        full = np.zeros(lab.shape, bool)
        full[sl] = piece
        accepted.append(full)

    labels = np.zeros(lab.shape, np.int32)
    # number accepted lesions by position (superior to inferior, then left-right): stable ids
    order = sorted(range(len(accepted)),
                   key=lambda i: tuple(-c for c in ndi.center_of_mass(accepted[i])[::-1]))
    for new_id, i in enumerate(order, start=1):
        labels[accepted[i] & (labels == 0)] = new_id
    labels = _relabel_connected(labels, conn)
    return Detection(labels=labels, enhancement=enh, candidates=table, noise_sigma=sigma,
                     candidate_labels=cand_labels,
                     thresholds={"high_pct": hi, "low_pct": lo, "sigma_pct": sigma,
                                 "vessel_cut_voxels": int(vessel_cut.sum())})


def _peel(comp: np.ndarray, enh_s: np.ndarray, *, lo: float, hi: float, conn: np.ndarray,
          zooms, dynamic: float, window_mm: float = 20.0, recover_flanks: bool = False,
          flank_mm: float = 0.0):
    """Split a hysteresis component into regions, each at half of its own peak.

    Yields ``(offset, region, attached)``: a boolean region in a window of the component's box,
    the window's start, and whether the region reaches beyond the window or touches a region that
    did (a piece of a vessel tree or of the dura rather than something on its own).

    The component is first flooded from its maxima above ``hi`` (watershed on the smoothed
    enhancement), so each voxel belongs to the peak it climbs to; a basin whose peak rises less
    than ``dynamic`` above the saddle to a higher neighbour is noise on a plateau and joins it.
    Peaks are then visited from the brightest down; each one still free takes its half-maximum
    region (within ``window_mm`` of the peak), and that region with a one-voxel margin, together
    with the whole basin of every peak it holds, is removed from what remains. A lesion touching a
    much brighter vessel thus keeps its own extent, not the vessel's partial-volume flank (which
    climbs to the vessel); a ring is one region (its rim is one plateau); smoothing does not
    inflate small lesions, as the extent is a half-maximum. The window keeps the cost linear in
    the number of peaks for large enhancing networks (a vessel tree, the dura).

    With ``flank_mm > 0`` only the part of those basins within ``flank_mm`` of the region (and
    beyond the window) goes with it: a lesion abutting a brighter vessel often has no maximum of
    its own (its values climb towards the vessel) and would go with the vessel's flank. What is
    left above ``hi`` once every peak has been visited is peeled again from its own brightest
    voxel, one region per connected part.
    """
    from skimage.segmentation import watershed

    vals = np.where(comp, enh_s, lo).astype(np.float32)
    is_peak = comp & (vals >= hi) & (vals == ndi.maximum_filter(vals, footprint=conn))
    markers, n = ndi.label(is_peak, structure=conn)
    if n == 0:
        return
    idx = np.arange(1, n + 1)
    basins = watershed(-vals, markers, connectivity=conn, mask=comp)
    peak_val = np.asarray(ndi.maximum(vals, markers, idx), float)
    groups = _merge_basins(basins, vals, peak_val, conn, dynamic=dynamic)
    glab = groups[basins]
    gboxes = ndi.find_objects(glab)
    # each group's peak: its highest marker
    best: dict[int, int] = {}
    for m in idx:
        g = int(groups[m])
        if g not in best or peak_val[m - 1] > peak_val[best[g] - 1]:
            best[g] = int(m)
    peaks_at = np.asarray(ndi.maximum_position(vals, markers, idx), int)
    order = sorted(best, key=lambda g: -peak_val[best[g] - 1])
    peak_of = np.zeros(comp.shape, np.int32)      # group label at each group's peak voxel
    for g, m in best.items():
        peak_of[tuple(peaks_at[m - 1])] = g
    remaining = comp.copy()
    taken = np.zeros(comp.shape, bool)
    large = np.zeros(comp.shape, bool)
    half = np.ceil(window_mm / np.asarray(zooms, float)).astype(int)

    def take(p):
        start = np.maximum(p - half, 0)
        stop = np.minimum(p + half + 1, comp.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        level = max(lo, 0.5 * float(vals[tuple(p)]))
        lab, _ = ndi.label(remaining[sl] & (enh_s[sl] >= level), structure=conn)
        region = lab == lab[tuple(p - start)]
        grown = ndi.binary_dilation(region, structure=conn)
        attached = _touches_cut(region, start, stop, comp.shape) or bool((large[sl] & grown).any())
        if attached:
            large[sl] |= grown
        remaining[sl] &= ~grown
        taken[sl] |= grown
        return sl, start, region, attached

    for g in order:
        p = peaks_at[best[g] - 1]
        if not remaining[tuple(p)]:
            continue
        sl, start, region, attached = take(p)
        yield start, region, attached
        # the flanks of every peak this region holds go with it (with flank_mm: only the near
        # flank inside the window)
        held = [int(h) for h in np.unique(peak_of[sl][region]) if h]
        keep = remaining[sl].copy() if flank_mm > 0 else None
        for h in held:
            box = gboxes[h - 1]
            remaining[box] &= glab[box] != h
        if keep is not None:
            remaining[sl] = keep & ~(dilate(region, flank_mm, zooms) & np.isin(glab[sl], held))
    if flank_mm > 0:
        left, _ = ndi.label(remaining & (vals >= hi), structure=conn)
        for j, box in enumerate(ndi.find_objects(left), start=1):
            if box is None:
                continue
            part = left[box] == j
            p = np.unravel_index(int(np.argmax(np.where(part, vals[box], -np.inf))), part.shape)
            p = np.array(p) + [b.start for b in box]
            if not remaining[tuple(p)]:
                continue
            _, start, region, attached = take(p)
            yield start, region, attached
            remaining[box] &= ~part
    if recover_flanks:
        yield from _orphaned_flanks(comp & ~taken, enh_s, hi=hi, conn=conn, zooms=zooms)


def _orphaned_flanks(rest: np.ndarray, enh_s: np.ndarray, *, hi: float, conn: np.ndarray, zooms):
    """Compact bright parts of a component that no peeled region took: lesions on a vessel's flank.

    A lesion touching a much brighter vessel may have no peak of its own after smoothing (it rises
    less than the merge dynamic above its saddle to the vessel), so its voxels go with the
    vessel's flanks and no region holds them. What is left of the component once every region has
    been taken, above ``hi``, opened by one voxel in-plane (a vessel's flank is a thin shell, a
    lesion is not), is given back as regions of its own, marked attached.

    >>> rest = np.zeros((1, 12, 12), bool); rest[0, 2:7, 2:7] = True; rest[0, 10, :] = True
    >>> [(int(r.sum()), a) for _, r, a in _orphaned_flanks(rest, rest * 20.0, hi=10.0,
    ...     conn=np.ones((3, 3, 3), bool), zooms=(3.0, 1.0, 1.0))]
    [(21, True)]
    """
    zooms = np.asarray(zooms, float)
    se = ndi.generate_binary_structure(3, 1)
    for ax in np.flatnonzero(zooms > 1.5 * zooms.min()):
        se = np.moveaxis(se, ax, 0)
        se[[0, 2]] = False
        se = np.moveaxis(se, 0, ax)
    bright = rest & (enh_s >= hi)
    core = ndi.binary_erosion(bright, structure=se)
    cl, n = ndi.label(core, structure=conn)
    for i, box in enumerate(ndi.find_objects(cl), start=1):
        if box is None:
            continue
        sl = _grow_box(box, np.ones(3, int), rest.shape)
        region = ndi.binary_dilation(cl[sl] == i, structure=se) & bright[sl]
        yield np.array([x.start for x in sl]), region, True


def _merge_basins(basins: np.ndarray, vals: np.ndarray, peak_val: np.ndarray, conn: np.ndarray,
                  *, dynamic: float) -> np.ndarray:
    """Group label of each basin (index 0 = background) after merging insignificant peaks.

    Pairs of touching basins are visited from the highest saddle (the highest value at which the
    two meet) down, as in a persistence merge; the lower peak joins the higher one when it rises
    less than ``dynamic`` above the saddle.

    >>> b = np.array([[[1, 1, 2, 2, 3, 3]]]); v = np.array([[[5., 9, 8, 6, 20, 30]]], np.float32)
    >>> _merge_basins(b, v, np.array([9., 8, 30]), np.ones((3, 3, 3), bool), dynamic=1.5).tolist()
    [0, 1, 1, 3]
    """
    n = len(peak_val)
    parent = np.arange(n + 1)
    pairs = _basin_saddles(basins, vals, conn)
    top = np.r_[0.0, peak_val]

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), saddle in sorted(pairs.items(), key=lambda kv: -kv[1]):
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        low, high = (ra, rb) if top[ra] < top[rb] else (rb, ra)
        if top[low] - saddle < dynamic:
            parent[low] = high
    return np.array([root(i) for i in range(n + 1)])


def _basin_saddles(basins: np.ndarray, vals: np.ndarray, conn: np.ndarray) -> dict:
    """``{(a, b): saddle}`` for touching basins a < b: highest min(value) across their border."""
    offsets = [o for o in np.argwhere(conn) - 1 if tuple(o) > (0, 0, 0)]
    keys, saddles = [], []
    nb = int(basins.max()) + 1
    for o in offsets:
        src = tuple(slice(max(0, -d), s - max(0, d)) for d, s in zip(o, basins.shape))
        dst = tuple(slice(max(0, d), s - max(0, -d)) for d, s in zip(o, basins.shape))
        a, b = basins[src], basins[dst]
        edge = (a != b) & (a > 0) & (b > 0)
        if not edge.any():
            continue
        aa, bb = a[edge].astype(np.int64), b[edge].astype(np.int64)
        keys.append(np.minimum(aa, bb) * nb + np.maximum(aa, bb))
        saddles.append(np.minimum(vals[src][edge], vals[dst][edge]))
    if not keys:
        return {}
    keys, saddles = np.concatenate(keys), np.concatenate(saddles)
    order = np.argsort(keys, kind="stable")
    keys, saddles = keys[order], saddles[order]
    uniq, first = np.unique(keys, return_index=True)
    best = np.maximum.reduceat(saddles, first)
    return {(int(k // nb), int(k % nb)): float(s) for k, s in zip(uniq, best)}


def _touches_cut(region: np.ndarray, start, stop, shape) -> bool:
    """Whether ``region`` reaches a face of its window that is not a face of the whole box."""
    for axis in range(3):
        r = np.moveaxis(region, axis, 0)
        if start[axis] > 0 and r[0].any():
            return True
        if stop[axis] < shape[axis] and r[-1].any():
            return True
    return False


def _relabel_connected(labels: np.ndarray, conn: np.ndarray) -> np.ndarray:
    """Merge accepted pieces that touch (counting rule: one connected region is one lesion)."""
    lab, n = ndi.label(labels > 0, structure=conn)
    if n == 0:
        return lab.astype(np.int32)
    # keep the superior-to-inferior ordering of the first piece of each region
    firsts = ndi.minimum(np.where(labels > 0, labels, np.iinfo(np.int32).max), lab,
                         index=np.arange(1, n + 1))
    order = np.argsort(np.asarray(firsts))
    remap = np.zeros(n + 1, np.int32)
    remap[order + 1] = np.arange(1, n + 1)
    return remap[lab]


def _split_tubes(comp: np.ndarray, zooms, settings: Settings):
    """Yield ``(piece, how)``: the component itself, or its blob cores when thin tubes attach.

    A component is split when it is elongated, or when it holds far more than its largest
    inscribed ball (tubularity above ``max_tubularity``: a blob with vessels running off it).

    A 1 mm opening removes tubes thinner than ~2 mm; each surviving core is grown back inside the
    component by up to 1.5 mm so the lesion keeps its extent but not the vessel.
    """
    n = int(comp.sum())
    axes = principal_axes_mm(np.argwhere(comp), zooms)
    elong = axes[0] / max(axes[1], 1e-6)
    if n < 20 or (elong <= settings.max_elongation
                  and thickness_tubularity(comp, zooms)[1] <= settings.max_tubularity):
        yield comp, ""
        return
    se = ball(1.0 + 0.5 * min(zooms), zooms)
    core = ndi.binary_opening(comp, structure=se)
    lab, k = ndi.label(core)
    if k == 0:
        yield comp, ""
        return
    for j in range(1, k + 1):
        piece = dilate(lab == j, 1.5, zooms) & comp
        yield piece, "opened"


def tube_centrelines(enh_s: np.ndarray, where: np.ndarray, zooms, *, sigma_mm: float = 1.0,
                     flat: float = 0.3, slope_per_mm: float = 0.3, max_width_mm: float = 1.8,
                     min_length_mm: float = 8.0) -> np.ndarray:
    """Voxels of ``where`` on the centre line of a bright tube at least ``min_length_mm`` long.

    From the Hessian of the map smoothed at ``sigma_mm``: across a tube the curvature is strongly
    negative in two directions and nearly zero along it (the smallest magnitude below ``flat`` of
    the next). The shoulder of a compact blob has the same curvatures, with the flat direction
    pointing down the blob's steep side; along a vessel the intensity changes slowly, so the
    relative slope along the flat direction must stay below ``slope_per_mm``. A thin tube is
    sharply curved for its brightness: value / |cross curvature| (the squared width of the
    smoothed profile) at most ``max_width_mm`` squared, which keeps the arms of a large irregular
    lesion (a few mm across) out. Compact lesions
    (all curvatures alike) and short ovoids (the centre-line piece is short) are not tubes. On
    thick slices the two in-plane curvatures are compared instead (a vessel in the slice plane).

    >>> g = np.indices((30, 21, 21)) - 10.0
    >>> rod = 100 * np.exp(-(g[1] ** 2 + g[2] ** 2) / 3.0)
    >>> ball = 100 * np.exp(-((g[0] - 5) ** 2 + g[1] ** 2 + g[2] ** 2) / 8.0)
    >>> tube = lambda x: int(tube_centrelines(x, x > 20, (1, 1, 1)).sum())
    >>> tube(rod) > 20, tube(ball)
    (True, 0)
    """
    zooms = np.asarray(zooms, float)
    out = np.zeros(where.shape, bool)
    if not where.any():
        return out
    box = ndi.find_objects(where.astype(np.int8))[0]
    pad = np.ceil(3 * sigma_mm / zooms).astype(int) + 1
    box = _grow_box(box, pad, where.shape)
    data = np.asarray(enh_s[box], np.float32)
    inside = where[box]
    thick_axis = int(np.argmax(zooms))
    thick = zooms[thick_axis] > 1.5 * np.delete(zooms, thick_axis).max()
    axes = [a for a in range(3) if not (thick and a == thick_axis)]
    sig = [sigma_mm / z for z in zooms]
    if thick:
        sig[thick_axis] = 0.0
    idx = np.nonzero(inside)
    k = len(axes)
    hess = np.empty((len(idx[0]), k, k), np.float32)
    grad = np.empty((len(idx[0]), k), np.float32)
    level = np.maximum(ndi.gaussian_filter(data, sig, mode="nearest")[idx], 1e-3)
    for i, a in enumerate(axes):
        order = [0, 0, 0]
        order[a] = 1
        grad[:, i] = ndi.gaussian_filter(data, sig, order=order, mode="nearest")[idx] / zooms[a]
        for j, b in enumerate(axes[i:], start=i):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndi.gaussian_filter(data, sig, order=order, mode="nearest")[idx]
            hess[:, i, j] = hess[:, j, i] = d / (zooms[a] * zooms[b])
    w, v = np.linalg.eigh(hess)
    mag = np.argsort(np.abs(w), axis=1)
    w = np.take_along_axis(w, mag, axis=1)
    v = np.take_along_axis(v, mag[:, None, :], axis=2)
    null = v[:, :, 0]
    slope = np.abs((grad * null).sum(axis=1)) / level
    tube = (w[:, 1:] < 0).all(axis=1) & (np.abs(w[:, 0]) < flat * np.abs(w[:, 1]))
    tube &= slope < slope_per_mm
    tube &= level <= max_width_mm ** 2 * np.abs(w[:, 1])
    sub = np.zeros(inside.shape, bool)
    sub[tuple(i[tube] for i in idx)] = True
    lab, n = ndi.label(sub, structure=np.ones((3, 3, 3), bool))
    for j, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        piece = lab[sl] == j
        if 4.0 * principal_axes_mm(np.argwhere(piece), zooms)[0] >= min_length_mm:
            out[box][sl] |= piece
    return out


def _voxel_box(coords: np.ndarray, pad, shape) -> tuple[tuple, np.ndarray]:
    """The box around voxel indices ``coords`` grown by ``pad`` voxels (clipped to ``shape``), and
    the voxels as a boolean mask in it.

    >>> sl, m = _voxel_box(np.array([[0, 2, 2], [1, 2, 3]]), np.array([1, 1, 1]), (5, 5, 5))
    >>> sl == (slice(0, 3), slice(1, 4), slice(1, 5)), int(m.sum()), bool(m[1, 1, 2])
    (True, 2, True)
    """
    lo_c = np.maximum(coords.min(axis=0) - pad, 0)
    hi_c = np.minimum(coords.max(axis=0) + pad + 1, shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c))
    mask = np.zeros(tuple(hi_c - lo_c), bool)
    mask[tuple((coords - lo_c).T)] = True
    return sl, mask


def _grow_box(box, pad, shape):
    return tuple(slice(max(0, s.start - p), min(dim, s.stop + p))
                 for s, p, dim in zip(box, pad, shape))


def _cheap_features(piece, sl, enh, depth, zooms, vox_vol) -> dict:
    """Size, brightness and position: enough to drop most candidates before shape analysis."""
    coords = np.argwhere(piece)
    n = len(coords)
    e = enh[sl][piece]
    centroid = coords.mean(axis=0) + np.array([s.start for s in sl])
    ci = tuple(int(round(c)) for c in centroid)
    return {
        "n_voxels": n,
        "volume_mm3": n * vox_vol,
        "centroid_i": centroid[0], "centroid_j": centroid[1], "centroid_k": centroid[2],
        "peak_pct": float(np.percentile(e, 90)) if n else 0.0,
        "mean_pct": float(e.mean()) if n else 0.0,
        "depth_mm": float(depth[ci]),
        "max_depth_mm": float(depth[sl][piece].max()),
    }


def _cheap_reject(f: dict, s: Settings) -> str:
    if f["n_voxels"] < s.min_voxels or f["volume_mm3"] < s.min_volume_mm3:
        return "too small"
    if f["volume_mm3"] > s.max_volume_mm3:
        return "implausibly large (global enhancement or misregistration)"
    if f["peak_pct"] < s.min_peak_enhancement_pct:
        return "faint"
    if f["max_depth_mm"] < s.surface_margin_mm:
        return "brain surface (dura/sinus/meninges)"
    return ""


def _shape_context_features(piece, sl, enh, csf, ventricles, brain, ref, zooms) -> dict:
    """Shape (principal axes, inscribed ball) and surroundings (2 mm shell) of a candidate."""
    coords = np.argwhere(piece)
    n = len(coords)
    e = enh[sl][piece]
    axes = principal_axes_mm(coords, zooms)
    thick, tub = thickness_tubularity(piece, zooms)
    blob = blobness(enh[sl], piece, zooms)
    shell = ndi.binary_dilation(piece, structure=ball(2.0, zooms)) & ~piece
    shell_n = max(int(shell.sum()), 1)
    shell_ref = ref[sl][shell]
    shell_enh = enh[sl][shell]
    return {
        "elongation": float(axes[0] / max(axes[1], 1e-6)),
        "flatness": float(axes[1] / max(axes[2], 1e-6)),
        "length_mm": float(4 * axes[0]),
        "thickness_mm": thick,
        "tubularity": tub,
        "blobness": blob,
        "shell_csf": float((csf[sl] & shell).sum() / shell_n),
        "shell_outside": float((~brain[sl] & shell).sum() / shell_n),
        "ventricle_frac": float((ventricles[sl] & piece).sum() / max(n, 1)),
        "ref_mean": float(ref[sl][piece].mean()),
        # enhancement standing out from its immediate surroundings (a lesion has an edge)
        "local_contrast_pct": float(e.mean() - np.median(shell_enh)) if shell_enh.size else 0.0,
        "shell_ref_mean": float(shell_ref.mean()) if shell_ref.size else 0.0,
        # share of the surroundings that reads as white matter (normalised > 85)
        "shell_wm": float((shell_ref > 85.0).mean()) if shell_ref.size else 0.0,
    }


def surround_features(coords: np.ndarray, enh_s: np.ndarray, zooms, *, shell_mm: float = 2.0,
                      ring_mm: float = 5.0) -> dict:
    """How much of a candidate's surroundings is as bright as half its peak (on ``enh_s``).

    ``coords``: the candidate's voxel indices. A piece cut out of a vessel or a dural fold goes on
    beyond its own voxels, so part of its ``shell_mm`` shell and of the ring out to ``ring_mm``
    is still at half its peak or above, and the bright part of its shell is one patch per place
    the structure leaves it (two for a vessel passing through). A lesion stands alone: its
    surroundings fall below half its peak all round, whatever else the low hysteresis level joins
    it to. Returns ``shell_bright`` and ``ring_bright`` (shares at or above half the peak),
    ``shell_exits`` (bright patches of the shell) and ``ring_p90`` (90th percentile of the ring
    over the peak).

    A ball on its own against a piece of the same size cut out of a vessel running through:

    >>> g = np.indices((31, 21, 21)) - 10.0
    >>> blob = 40 * np.exp(-((g[0] - 5) ** 2 + g[1] ** 2 + g[2] ** 2) / 4.0)
    >>> rod = 40 * np.exp(-(g[1] ** 2 + g[2] ** 2) / 2.0)
    >>> alone = surround_features(np.argwhere(blob > 20), blob, (1, 1, 1))
    >>> piece = surround_features(np.argwhere((rod > 20) & (np.abs(g[0] - 5) <= 2)), rod, (1, 1, 1))
    >>> alone["shell_exits"], piece["shell_exits"], alone["ring_bright"] == 0 < piece["ring_bright"]
    (0, 2, True)
    """
    zooms = np.asarray(zooms, float)
    sl, piece = _voxel_box(coords, np.ceil(ring_mm / zooms).astype(int) + 1, enh_s.shape)
    values = enh_s[sl]
    peak = float(values[piece].max())
    half = 0.5 * peak
    near = ndi.binary_dilation(piece, structure=ball(shell_mm, zooms))
    shell = near & ~piece
    ring = ndi.binary_dilation(piece, structure=ball(ring_mm, zooms)) & ~near
    bright = values >= half
    exits = ndi.label(shell & bright, structure=np.ones((3, 3, 3), bool))[1]
    return {
        "shell_bright": float((shell & bright).sum() / max(int(shell.sum()), 1)),
        "ring_bright": float((ring & bright).sum() / max(int(ring.sum()), 1)),
        "shell_exits": int(exits),
        "ring_p90": float(np.percentile(values[ring], 90) / max(peak, 1e-6))
        if ring.any() else 0.0,
    }


def thickness_tubularity(piece: np.ndarray, zooms) -> tuple[float, float]:
    """Diameter of the largest inscribed ball (mm) and volume / that ball's volume.

    A compact lesion fills its inscribed ball (ratio ~1-2, ~3 for a 3:1 ovoid) whatever its
    orientation; a vessel segment, straight or curved, has a thin inscribed ball and a ratio that
    grows with its length. Holes are filled first so a ring-enhancing lesion counts as solid.

    >>> ball = np.linalg.norm(np.indices((11, 11, 11)) - 5, axis=0) <= 3.2
    >>> tube = np.zeros((30, 5, 5), bool); tube[2:28, 1:4, 2] = True; tube[2:28, 2, 1:4] = True
    >>> round(thickness_tubularity(ball, (1, 1, 1))[1], 1) < 2 < 4 < thickness_tubularity(tube, (1, 1, 1))[1]
    True
    """
    zooms = np.asarray(zooms, float)
    solid = ndi.binary_fill_holes(ndi.binary_closing(np.pad(piece, 2)))
    for axis in range(3):
        solid |= fill_holes_2d(solid, axis)
    thick_axis = int(np.argmax(zooms))
    if zooms[thick_axis] > 1.5 * np.delete(zooms, thick_axis).max():
        # thick slices: judge the shape within the slice holding most of the candidate
        sl = np.moveaxis(solid, thick_axis, 0)
        k = int(np.argmax(sl.reshape(sl.shape[0], -1).sum(axis=1)))
        inplane = np.delete(zooms, thick_axis)
        edt = ndi.distance_transform_edt(np.pad(sl[k], 1), sampling=inplane)
        radius = float(edt.max())
        area = float(sl[k].sum() * np.prod(inplane))
        return 2.0 * radius, area / (np.pi * radius ** 2)
    edt = ndi.distance_transform_edt(np.pad(solid, 1), sampling=zooms)
    radius = float(edt.max())  # voxel centre to the nearest outside voxel centre
    volume = float(solid.sum() * np.prod(zooms))
    return 2.0 * radius, volume / (4.0 / 3.0 * np.pi * radius ** 3)


def blobness(enh: np.ndarray, piece: np.ndarray, zooms, *, sigma_mm: float = 1.2) -> float:
    """Smallest over largest Hessian eigenvalue magnitude at the candidate's brightest point.

    Computed on the enhancement map smoothed at ~1 mm, which continues beyond the candidate: at
    the peak of a compact bright blob all curvatures are alike (~1; ~0.3 for a 2:1 ovoid), along
    a vessel one curvature vanishes (~0), on a sheet two do. On thick slices the curvature across
    slices is unreliable, so the two in-plane curvatures are compared instead. 0 when the peak is
    not a bright maximum (a saddle or a ridge of something else).

    >>> g = np.indices((21, 21, 21)) - 10
    >>> ball = np.exp(-(g ** 2).sum(0) / 8.0); rod = np.exp(-(g[1] ** 2 + g[2] ** 2) / 8.0)
    >>> m = np.zeros(ball.shape, bool); m[8:13, 8:13, 8:13] = True
    >>> blobness(ball, m, (1, 1, 1)) > 0.8, blobness(rod, m, (1, 1, 1)) < 0.1
    (True, True)
    """
    zooms = np.asarray(zooms, float)
    thick_axis = int(np.argmax(zooms))
    thick = zooms[thick_axis] > 1.5 * np.delete(zooms, thick_axis).max()
    sig = [sigma_mm / z for z in zooms]
    if thick:
        sig[thick_axis] = 0.0
    data = np.asarray(enh, np.float32)
    smooth = ndi.gaussian_filter(data, sig, mode="nearest")
    peak = np.unravel_index(int(np.argmax(np.where(piece, smooth, -np.inf))), piece.shape)
    axes = [a for a in range(3) if not (thick and a == thick_axis)]
    hess = np.zeros((len(axes), len(axes)))
    for i, a in enumerate(axes):
        for j, b in enumerate(axes[i:], start=i):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndi.gaussian_filter(data, sig, order=order, mode="nearest")[peak]
            hess[i, j] = hess[j, i] = d / (zooms[a] * zooms[b])
    ev = np.linalg.eigvalsh(hess)
    if ev.max() >= 0:          # not a bright maximum in every direction
        return 0.0
    mags = np.abs(ev)
    return float(mags.min() / mags.max())


#: reason of a candidate that does not stand out of the noise against its surroundings
FAINT = "faint against its surroundings (contrast under min_contrast_z noise SDs)"


def _hard_reject(f: dict, s: Settings) -> str:
    """What no lesion can be, whatever the classifier says: outside the brain's surroundings,
    no brighter than its surroundings by more than the noise, a long tube, or a thin piece of a
    larger enhancing structure.

    These shapes are outside what the classifier was trained on in any number (on lesion-rich
    phantoms they removed 1 of 147 lesion candidates and 838 of 6911 mimics), so they are not
    left to its extrapolation.
    """
    if f["shell_outside"] > 0.3:
        return "brain surface (dura/sinus/meninges)"
    if f["contrast_z"] < s.min_contrast_z:
        return FAINT
    if f["n_voxels"] >= 6 and f["elongation"] > s.max_lesion_elongation:
        return "tubular (vessel)"
    if f.get("attached") and f["thickness_mm"] <= s.max_attached_thickness_mm:
        return "thin piece of a larger enhancing structure (vessel)"
    return ""


def _reject_reason(f: dict, s: Settings) -> str:
    """Rules only (``classifier = "none"``): each feature on its own limit."""
    if f.get("has_pre") and f["ref_mean"] < s.min_pre_level_pct:
        return "CSF or sulcal vessel (dark before contrast)"
    if f["local_contrast_pct"] < s.min_local_contrast_pct:
        return "no edge (diffuse signal change)"
    if f["contrast_z"] < s.min_contrast_z:
        return FAINT
    if f["shell_outside"] > 0.3:
        return "brain surface (dura/sinus/meninges)"
    if f["ventricle_frac"] > s.max_ventricle_overlap or f["shell_csf"] > 0.5:
        return "CSF space (choroid plexus / cisternal vessel)"
    if f["shell_wm"] < s.min_shell_wm:
        return "not in white matter (cortical / sulcal vessel)"
    if f["n_voxels"] >= 30 and f["tubularity"] > s.max_tubularity:
        return "tubular (vessel)"
    if f["n_voxels"] >= 6 and f["elongation"] > s.max_elongation:
        return "tubular (vessel)"
    if f["n_voxels"] >= 6 and f["flatness"] > 4.0:
        return "sheet-like (dural fold)"
    if f.get("attached"):
        return "part of a larger enhancing structure (vessel tree, dura)"
    return ""


def _ventricles(csf: np.ndarray, depth: np.ndarray, zooms) -> np.ndarray:
    """Ventricular CSF: CSF deep inside the brain, in sizeable components, slightly dilated."""
    deep = csf & (depth > 10.0)
    lab, n = ndi.label(deep)
    if n == 0:
        return deep
    sizes = np.bincount(lab.ravel()) * float(np.prod(zooms))
    sizes[0] = 0
    keep = sizes >= 300.0
    return dilate(keep[lab], 1.0, zooms)


def lesion_table(labels: np.ndarray, enhancement: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """One row per lesion: id, size, centroid (voxel and scanner mm), mean/peak enhancement.

    >>> lab = np.zeros((6, 6, 6), np.int32); lab[1:3, 1:3, 1:3] = 1; lab[4, 4, 4] = 2
    >>> t = lesion_table(lab, np.full(lab.shape, 20.0), np.diag([2., 1., 1., 1.]))
    >>> t[['n_voxels', 'volume_mm3', 'centroid_x']].values.tolist()
    [[8.0, 16.0, 3.0], [1.0, 2.0, 8.0]]
    """
    ids = np.arange(1, int(labels.max()) + 1)
    cols = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
            "centroid_i", "centroid_j", "centroid_k", "mean_enhancement_pct",
            "peak_enhancement_pct"]
    if ids.size == 0:
        return pd.DataFrame(columns=cols)
    vox_vol = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    counts = ndi.sum_labels(np.ones(labels.shape), labels, ids)
    com = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, ids), float).reshape(-1, 3)
    world = (np.c_[com, np.ones(len(com))] @ np.asarray(affine).T)[:, :3]
    mean = ndi.mean(enhancement, labels, ids)
    peak = ndi.maximum(enhancement, labels, ids)
    return pd.DataFrame({
        "lesion_id": ids.astype(int), "n_voxels": np.asarray(counts).astype(int),
        "volume_mm3": np.round(np.asarray(counts) * vox_vol, 2),
        "centroid_x": np.round(world[:, 0], 2), "centroid_y": np.round(world[:, 1], 2),
        "centroid_z": np.round(world[:, 2], 2),
        "centroid_i": np.round(com[:, 0], 2), "centroid_j": np.round(com[:, 1], 2),
        "centroid_k": np.round(com[:, 2], 2),
        "mean_enhancement_pct": np.round(np.asarray(mean, float), 2),
        "peak_enhancement_pct": np.round(np.asarray(peak, float), 2),
    })[cols]


def count_lesions(mask: np.ndarray, *, connectivity: int) -> int:
    """Number of connected components in a binary mask (skimage connectivity 1, 2 or 3).

    >>> m = np.zeros((5, 5, 5), bool); m[1, 1, 1] = m[2, 2, 2] = True
    >>> count_lesions(m, connectivity=1), count_lesions(m, connectivity=3)
    (2, 1)
    """
    return int(ndi.label(mask, structure=ndi.generate_binary_structure(3, connectivity))[1])
