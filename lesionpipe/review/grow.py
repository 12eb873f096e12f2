"""Grow a missed lesion from a reader's click on the enhancement map."""

from __future__ import annotations

from collections import deque

import numpy as np

_OFFSETS = [(di, dj, dk) for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1)
            if (di, dj, dk) != (0, 0, 0)]


def grow_region(enh: np.ndarray, seed, *, spacing=(1.0, 1.0, 1.0), fraction: float = 0.5,
                min_enhancement: float = 10.0, radius_mm: float = 10.0, max_voxels: int = 2000,
                snap_voxels: int = 1) -> np.ndarray:
    """Voxels (N x 3 indices) of the region grown from ``seed`` on an enhancement map.

    The seed moves to the brightest voxel within ``snap_voxels`` (clicks are imprecise). Voxels
    join when they are 26-connected to the region, lie within ``radius_mm`` of the seed and
    enhance by at least ``max(fraction * seed value, min_enhancement)``. Growth stops, nearest
    voxels first, at ``max_voxels``. An empty array means nothing enhances enough at the click.

    >>> e = np.zeros((9, 9, 9)); e[3:6, 3:6, 3:6] = 40; e[4, 4, 4] = 60; e[0, 0, 0] = 90
    >>> len(grow_region(e, (4, 4, 3)))
    27
    >>> len(grow_region(e, (1, 1, 8)))
    0
    >>> len(grow_region(e, (4, 4, 4), max_voxels=5))
    5
    """
    enh = np.asarray(enh, float)
    shape = enh.shape
    s = np.clip(np.round(np.asarray(seed, float)).astype(int), 0, np.array(shape) - 1)
    lo = np.maximum(s - snap_voxels, 0)
    hi = np.minimum(s + snap_voxels + 1, shape)
    box = enh[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    s = lo + np.array(np.unravel_index(int(np.argmax(box)), box.shape))
    seed_val = float(enh[tuple(s)])
    thr = max(fraction * seed_val, min_enhancement)
    if not np.isfinite(seed_val) or seed_val < thr:
        return np.zeros((0, 3), int)
    spacing = np.asarray(spacing, float)
    seen = np.zeros(shape, bool)
    seen[tuple(s)] = True
    queue = deque([tuple(s)])
    out = []
    while queue and len(out) < max_voxels:
        v = queue.popleft()
        out.append(v)
        for d in _OFFSETS:
            n = (v[0] + d[0], v[1] + d[1], v[2] + d[2])
            if not (0 <= n[0] < shape[0] and 0 <= n[1] < shape[1] and 0 <= n[2] < shape[2]):
                continue
            if seen[n]:
                continue
            seen[n] = True
            if enh[n] < thr:
                continue
            if np.sqrt((((np.array(n) - s) * spacing) ** 2).sum()) > radius_mm:
                continue
            queue.append(n)
    return np.array(out, int).reshape(-1, 3)
