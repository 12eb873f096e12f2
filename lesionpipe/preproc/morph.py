"""Morphology in millimetres on anisotropic grids (distance-transform based).

Distances come from the ``edt`` package (a separable anisotropic Euclidean distance transform,
float32, no feature transform): the same distances as ``scipy.ndimage.distance_transform_edt`` to
float32 precision at about a seventh of the time on a 230 x 230 x 180 grid, which matters because
the brain mask alone needs nine full-grid transforms per visit.
"""

from __future__ import annotations

import edt
import numpy as np
from scipy import ndimage as ndi

# squared distances are float32: compare with a relative tolerance so that a voxel exactly at the
# radius (3 voxels away on a 1 mm grid) falls on the same side as with exact arithmetic
_TOL = 1e-5


def ball(radius_mm: float, zooms) -> np.ndarray:
    """Structuring element of all voxel offsets within ``radius_mm`` (always includes the 6-cross).

    >>> int(ball(1.0, (1, 1, 1)).sum()), int(ball(1.5, (1, 1, 1)).sum()), ball(2, (1, 1, 3)).shape
    (7, 19, (5, 5, 1))
    """
    zooms = np.asarray(zooms, float)
    half = np.maximum(np.floor(radius_mm / zooms + 1e-6).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * z for h, z in zip(half, zooms)], indexing="ij")
    se = sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-6
    return se


def distance_mm(mask: np.ndarray, zooms, *, squared: bool = False) -> np.ndarray:
    """Distance in mm from each voxel of ``mask`` to the nearest voxel outside it (0 outside).

    The grid's border is not background, except when ``mask`` has no background at all: then the
    distance is to the border (not infinite).

    >>> m = np.zeros((1, 1, 9), bool); m[..., 2:7] = True
    >>> distance_mm(m, (1, 1, 2)).ravel().tolist()
    [0.0, 0.0, 2.0, 4.0, 6.0, 4.0, 2.0, 0.0, 0.0]
    >>> distance_mm(np.ones((1, 1, 3), bool), (1, 1, 1)).ravel().tolist()
    [1.0, 1.0, 1.0]
    """
    mask = np.asarray(mask, bool)
    spacing = tuple(float(z) for z in np.asarray(zooms, float)[: mask.ndim])
    fn = edt.edtsq if squared else edt.edt
    return fn(mask, anisotropy=spacing, black_border=bool(mask.all()), parallel=1)


def dilate(mask: np.ndarray, radius_mm: float, zooms) -> np.ndarray:
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return distance_mm(~np.asarray(mask, bool), zooms, squared=True) <= radius_mm ** 2 * (1 + _TOL)


def erode(mask: np.ndarray, radius_mm: float, zooms) -> np.ndarray:
    if radius_mm <= 0:
        return mask.copy()
    return distance_mm(mask, zooms, squared=True) > radius_mm ** 2 * (1 + _TOL)


def close(mask: np.ndarray, radius_mm: float, zooms) -> np.ndarray:
    pad = int(np.ceil(radius_mm / min(zooms))) + 1
    padded = np.pad(mask, pad)
    out = erode(dilate(padded, radius_mm, zooms), radius_mm, zooms)
    return out[pad:-pad, pad:-pad, pad:-pad]


def largest_component(mask: np.ndarray, *, connectivity: int = 1) -> np.ndarray:
    lab, n = ndi.label(mask, structure=ndi.generate_binary_structure(3, connectivity))
    if n <= 1:
        return lab > 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fill_holes_2d(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill holes slice by slice along ``axis`` (closes ventricles open at a slice's edge in 3-D)."""
    out = np.moveaxis(mask.copy(), axis, 0)
    for i in range(out.shape[0]):
        if out[i].any():
            out[i] = ndi.binary_fill_holes(out[i])
    return np.moveaxis(out, 0, axis)


def smooth_mm(data: np.ndarray, sigma_mm: float, zooms) -> np.ndarray:
    sig = [sigma_mm / z for z in zooms]
    return ndi.gaussian_filter(np.asarray(data, np.float32), sig, mode="nearest")


def downsample_factors(zooms, target_mm: float) -> tuple[int, ...]:
    return tuple(max(1, int(round(target_mm / z))) for z in zooms)
