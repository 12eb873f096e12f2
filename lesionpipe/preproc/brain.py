"""Brain mask and intensity normalisation to normal-appearing white matter (NAWM = 100).

The scans carry skull, bright scalp fat and marrow, so the mask is built from tissue intensity
classes and morphology in millimetres:

1. head mask (air removed); tissue classes estimated in the head's core, away from scalp and skull;
2. brain-like tissue = grey-to-white matter intensities (CSF, bone, air and fat excluded), below
   the outermost layer of the head;
3. an erosion of a few mm cuts the thin bridges through skull and meninges; the deep components
   near the eroded white matter are the brain's core (neck and face muscle, grey-matter-like on
   T1, stay out), grown back inside the tissue by no more than the erosion;
4. the cortex is added (tissue near the core, bridges thinner than ~3 mm cut by an opening), and
   the ventricles and sulci are filled by closing and hole filling.

Normalisation divides by a smooth map of local white-matter intensity, so residual bias and gain
vanish and enhancement is measured in percent of the surrounding white matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_multiotsu

from lesionpipe.preproc.morph import (ball, close, dilate, distance_mm, downsample_factors, erode,
                                      fill_holes_2d, largest_component, smooth_mm)


@dataclass
class TissueLevels:
    csf: float
    gm: float
    wm: float

    @property
    def csf_gm(self) -> float:
        """Threshold between CSF and grey matter."""
        return 0.5 * (self.csf + self.gm)


def _mode(values: np.ndarray, bins: int = 128) -> float:
    """Mode of a smoothed histogram.

    >>> x = np.concatenate([np.random.default_rng(0).normal(100, 5, 5000), np.full(100, 300.)])
    >>> abs(_mode(x) - 100) < 5
    True
    """
    lo, hi = np.percentile(values, [0.5, 99.5])
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(float), 2)
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def tissue_levels(data: np.ndarray, region: np.ndarray, *, min_wm_share: float = 0.15) -> TissueLevels:
    """CSF, GM and WM intensity levels from a region holding mostly brain.

    White matter is the mode of the upper Otsu class (the brightest large tissue on T1); grey
    matter the histogram peak between 0.45 and 0.92 of it; CSF the peak below 0.45 of it, or a
    quarter of white matter when CSF is too scarce to form a peak. An upper class holding less
    than ``min_wm_share`` of the region is not white matter: it is dropped and the classes are
    found again (at most twice).

    >>> rng = np.random.default_rng(0)   # CSF, GM, WM and a small bright class (6 %)
    >>> vals = np.concatenate([rng.normal(30, 4, 3000), rng.normal(80, 5, 5000),
    ...                        rng.normal(100, 5, 5000), rng.normal(150, 6, 800)])
    >>> round(tissue_levels(vals, np.ones(vals.size, bool)).wm / 10)
    10
    """
    vals = data[region & np.isfinite(data)]
    if vals.size > 400_000:
        vals = vals[:: vals.size // 400_000 + 1]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    vals = vals[(vals >= lo) & (vals <= hi)]
    t2 = threshold_multiotsu(vals, classes=3)[1]
    for _ in range(2):
        # white matter is a third or more of the brain; a bright class much smaller than that
        # (orbital or marrow fat, enhancing vessels and sinuses reaching the region) is set aside
        if np.mean(vals > t2) >= min_wm_share:
            break
        vals = vals[vals <= t2]
        t2 = threshold_multiotsu(vals, classes=3)[1]
    wm = _mode(vals[vals > t2])
    gm = _band_mode(vals, 0.45 * wm, 0.92 * wm, default=0.7 * wm)
    csf = _band_mode(vals, 0.02 * wm, 0.45 * wm, default=0.25 * wm)
    gm = min(gm, 0.92 * wm)
    csf = min(csf, 0.75 * gm)
    return TissueLevels(csf=csf, gm=gm, wm=wm)


def _band_mode(vals: np.ndarray, lo: float, hi: float, *, default: float,
               dip: float = 0.9) -> float:
    """Histogram peak of ``vals`` inside [lo, hi]; ``default`` when the band is nearly empty or
    holds no peak of its own.

    A peak of its own falls to under ``dip`` of its height on both sides within the band. A
    histogram that rises up to the band's edge (only the tail of a neighbouring class) has its
    smoothed maximum on or next to the edge bin, and choosing that shoulder would make the level
    jump with small changes of the region:

    >>> edges = np.linspace(2, 45, 49)             # the CSF band, 48 bins
    >>> rising = 10 * np.arange(1, 49); rising[-1] = 0.8 * rising[-2]   # a tail, last bin short
    >>> tail = np.repeat(0.5 * (edges[1:] + edges[:-1]), rising)
    >>> _band_mode(tail, 2, 45, default=25.0)        # not the shoulder at 41.9
    25.0
    >>> rng = np.random.default_rng(0)
    >>> round(_band_mode(np.concatenate([tail, rng.normal(30, 4, 8000)]), 2, 45, default=25.0))
    30
    """
    band = vals[(vals >= lo) & (vals <= hi)]
    if band.size < 0.01 * vals.size or band.size < 50:
        return default
    hist, edges = np.histogram(band, bins=48, range=(lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(float), 1.5)
    i = int(np.argmax(hist))
    if i in (0, len(hist) - 1):
        return default
    if hist[:i].min() >= dip * hist[i] or hist[i + 1:].min() >= dip * hist[i]:
        return default
    return float(0.5 * (edges[i] + edges[i + 1]))


def brain_mask(data: np.ndarray, zooms, head: np.ndarray, *, erosion_mm: float = 4.0,
               closing_mm: float = 2.0, cortex_mm: float = 12.0, bridge_mm: float = 1.5,
               scalp_mm: float = 6.0, white_erosion_mm: float = 3.0,
               white_min_share: float = 0.02,
               white_smooth_mm: float = 1.0) -> tuple[np.ndarray, TissueLevels]:
    """Brain mask (cerebrum, cerebellum, ventricles, sulci) of a bias-corrected T1 with skull.

    Returns the mask and the tissue levels found. Works at the native grid; anisotropy is handled
    by millimetre morphology. ``white_erosion_mm`` erodes the white-matter band so that the skull's
    marrow (thinner than twice it) goes and the cerebral and cerebellar white matter stay;
    besides the largest piece, pieces of at least ``white_min_share`` of it are kept (the
    cerebellar white matter is 3-4 % of the cerebral; a higher share loses the cerebellum).
    The white-matter seed is thresholded on the image smoothed by ``white_smooth_mm`` (Gaussian
    sigma), the tissue classes on the image itself.
    """
    zooms = np.asarray(zooms, float)
    head_depth = distance_mm(head, zooms)
    inner_head = head & (head_depth > min(25.0, 0.35 * head_depth.max()))
    levels = tissue_levels(data, inner_head)
    # brain-like intensities, and never in the outermost layer of the head (skin, scalp fat):
    # the brain lies under at least the scalp and the skull
    below_scalp = head & (head_depth > scalp_mm)

    def brain_like(img, lowest):
        return below_scalp & (img > lowest) & (img < levels.wm * 1.22)

    tissue = brain_like(data, levels.csf_gm)
    # the seed is the eroded tissue near eroded white matter: after the erosion the cerebral
    # white matter is one thick piece while neck and face muscle (grey-matter-like on T1) and
    # thin marrow are gone, so the neck cannot join the brain through the skull base or the
    # muscles around the brainstem
    # (on a lightly smoothed copy: on a noisy scan the white matter thresholded voxel by voxel
    # is a sieve that the erosion breaks into crumbs, and the hemispheres come apart)
    white = brain_like(smooth_mm(data, white_smooth_mm, zooms), 0.5 * (levels.gm + levels.wm))
    white = _central_component(erode(white, white_erosion_mm, zooms), head_depth, zooms,
                               min_share=white_min_share)
    seed = erode(tissue, erosion_mm, zooms) & dilate(white, cortex_mm, zooms)
    seed = _central_component(seed, head_depth, zooms)
    if not seed.any():
        raise ValueError("no brain found: the tissue classes did not separate (check the image)")
    # geodesic growth back into the tissue, no further than the erosion: the safe core
    core = largest_component(geodesic_dilation(seed, tissue, erosion_mm + 1.0, zooms))
    # then out into the cortex, which may reach well beyond the white matter: tissue within
    # ``cortex_mm`` of the core, thin bridges (dura, vessels, marrow touching the cortex) cut by
    # an opening, kept where connected to the core
    ext = tissue & dilate(core, cortex_mm, zooms)
    ext = ndi.binary_opening(ext, structure=ball(bridge_mm, zooms))
    lab, _ = ndi.label(ext)
    touching = np.unique(lab[core & ext])
    mask = core | np.isin(lab, touching[touching > 0])
    mask = close(mask, closing_mm, zooms)
    mask = ndi.binary_fill_holes(mask)
    mask = fill_holes_2d(mask, int(np.argmax(zooms)))
    # a thin ring of CSF/dura may have been added by closing; keep it: the surface filter handles it
    refined = tissue_levels(data, erode(mask, 3.0, zooms))
    return mask, refined


def enclosed_bright(bright: np.ndarray, mask: np.ndarray, *, min_inside: float = 0.6) -> np.ndarray:
    """Bright components (brighter than any tissue) mostly surrounded by the mask.

    A strongly enhancing lesion on a post-only scan is brighter than white matter and so not
    "tissue"; where it touches a ventricle or a sulcus the hole it leaves is not closed, and it
    would sit at the mask's surface. It is added back (by the detector, on the normalised post
    image) when most of its one-voxel rim is brain. Scalp fat and marrow have their rim outside
    the brain and stay out.

    >>> m = np.zeros((9, 9, 9), bool); m[1:8, 1:8, 1:8] = True; m[4, 4, 3:9] = False
    >>> b = np.zeros_like(m); b[4, 4, 4:6] = True; b[0, 0, 0] = True
    >>> int(enclosed_bright(b, m).sum())
    2
    """
    near = bright & ~mask & ndi.binary_dilation(mask, iterations=2)
    lab, n = ndi.label(near)
    if n == 0:
        return near
    grown = ndi.grey_dilation(lab, size=(3, 3, 3))
    rim = (grown > 0) & (lab == 0)
    inside = np.asarray(ndi.mean(mask[rim], grown[rim], index=np.arange(1, n + 1)))
    keep = np.zeros(n + 1, bool)
    keep[1:] = np.nan_to_num(inside) >= min_inside
    return keep[lab]


def geodesic_dilation(seed: np.ndarray, allowed: np.ndarray, distance_mm: float,
                      zooms) -> np.ndarray:
    """Grow ``seed`` inside ``allowed`` by about ``distance_mm`` (one voxel per step, 6-connected).

    On thick slices a step crosses one slice, so growth across slices is faster: the distance is a
    limit on leaks, not a measurement.

    >>> allowed = np.zeros((1, 1, 12), bool); allowed[..., :5] = allowed[..., 6:] = True
    >>> seed = np.zeros_like(allowed); seed[..., 0] = True
    >>> [int(geodesic_dilation(seed, allowed, d, (1, 1, 1)).sum()) for d in (3, 20)]
    [4, 5]
    """
    steps = max(int(round(distance_mm / float(np.min(zooms)))), 1)
    return ndi.binary_dilation(seed, structure=ndi.generate_binary_structure(3, 1),
                               iterations=steps, mask=allowed) | seed


def _central_component(mask: np.ndarray, head_depth: np.ndarray, zooms, *,
                       min_share: float = 0.0) -> np.ndarray:
    """Components reaching deep inside the head (the brain's pieces), not the scalp or marrow.

    After the erosion the brain may fall into several pieces (cerebrum, cerebellum, a deep gyrus);
    every sizeable piece whose deepest point is well inside the head is kept.
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    vox = float(np.prod(zooms))
    sizes = np.bincount(lab.ravel()) * vox
    sizes[0] = 0
    # pieces reaching deep into the head (a count of deep voxels: no sort over all labels)
    reaches = np.bincount(lab[head_depth > 0.45 * head_depth.max()], minlength=n + 1) > 0
    deep = reaches & (sizes >= max(500.0, min_share * sizes.max()))
    deep[0] = False
    if not deep.any():
        return largest_component(mask)
    return deep[lab]


def wm_mask(data: np.ndarray, brain: np.ndarray, levels: TissueLevels, zooms) -> np.ndarray:
    """Voxels confidently in white matter: WM intensity, away from the brain surface."""
    gm_wm = 0.5 * (levels.gm + levels.wm)
    inner = erode(brain, 4.0, zooms)
    return inner & (data > gm_wm) & (data < levels.wm * 1.15)


def local_reference(data: np.ndarray, mask: np.ndarray, zooms, *, sigma_mm: float = 15.0,
                    fallback: float | None = None) -> np.ndarray:
    """Smooth map of the mean of ``data`` over ``mask`` (normalised convolution), everywhere.

    Computed on a ~4 mm grid and interpolated back: cheap and as smooth as a bias field.
    """
    zooms = np.asarray(zooms, float)
    f = downsample_factors(zooms, 4.0)
    sl = tuple(slice(None, None, k) for k in f)
    small = np.where(mask, data, 0)[sl].astype(np.float32)
    w = mask[sl].astype(np.float32)
    small_z = zooms * np.array(f)
    sig = [sigma_mm / z for z in small_z]
    num = ndi.gaussian_filter(small, sig, mode="constant")
    den = ndi.gaussian_filter(w, sig, mode="constant")
    ref_val = fallback if fallback is not None else float(np.median(data[mask]))
    # where there is little WM nearby, blend toward the global level
    ref = (num + 1e-3 * ref_val) / (den + 1e-3)
    zoom = [a / b for a, b in zip(data.shape, small.shape)]
    up = ndi.zoom(ref, zoom, order=1, mode="nearest", grid_mode=True)
    up = _fit_shape(up, data.shape, fill=ref_val)
    return up.astype(np.float32)


def _fit_shape(arr: np.ndarray, shape, *, fill: float) -> np.ndarray:
    out = np.full(shape, fill, np.float32)
    s = tuple(slice(0, min(a, b)) for a, b in zip(arr.shape, shape))
    out[s] = arr[s]
    return out


def normalise(data: np.ndarray, wm: np.ndarray, zooms, *, sigma_mm: float = 15.0) -> np.ndarray:
    """Scale so local normal white matter reads 100."""
    ref = local_reference(data, wm, zooms, sigma_mm=sigma_mm)
    global_wm = float(np.median(data[wm]))
    ref = np.clip(ref, 0.5 * global_wm, 2.0 * global_wm)
    return (100.0 * data / ref).astype(np.float32)


def match_levels(data: np.ndarray, src: TissueLevels, dst: TissueLevels) -> np.ndarray:
    """Map ``data`` piecewise-linearly so its CSF, GM and WM levels land on ``dst``'s.

    Pre- and post-contrast T1 often come from different sequences (spin echo before, gradient
    echo after), whose grey/white contrast differs; matching the tissue levels first keeps that
    difference out of the subtraction. Above white matter the slope is 1 (percent stays percent).

    >>> src, dst = TissueLevels(20, 60, 100), TissueLevels(30, 75, 100)
    >>> match_levels(np.array([20., 60., 100., 130.]), src, dst).tolist()
    [30.0, 75.0, 100.0, 130.0]
    """
    xs = [0.0, src.csf, src.gm, src.wm]
    ys = [0.0, dst.csf, dst.gm, dst.wm]
    if not (np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)):
        return data.astype(np.float32)
    out = np.interp(data, xs, ys)
    above = data > src.wm
    out[above] = dst.wm + (data[above] - src.wm) * (dst.wm / src.wm)
    return out.astype(np.float32)
