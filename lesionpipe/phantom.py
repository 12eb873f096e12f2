"""Synthetic head MRI with known gadolinium-enhancing lesions (GELs), written as a BIDS trial dataset.

Each subject gets a head of its own (deformed brain with folded cortex, ventricles, deep grey
nuclei, cerebellum and brainstem, CSF, dura, skull with marrow, scalp fat and muscle, eyes) defined
on a 1 mm subject-space grid, plus the structures that enhance after gadolinium and that a detector
must not count: dural layer, falx and venous sinuses, choroid plexus, cortical, medullary and deep
veins, arteries. Multiple-sclerosis lesions are placed in white matter; some enhance at a visit
(nodular, ring or irregular), most stop enhancing by the next visit, non-enhancing T1-hypointense
lesions ("black holes") persist on both scans.

Every scan is the subject anatomy resampled through the scan's own grid (1 mm 3-D or thick-slice
2-D, RAS/LAS/LPS/oblique) and a rigid head pose, with thick slices averaged along the slice axis,
then multiplied by a smooth bias field, given Rician noise and an arbitrary scanner gain, and stored
as float32 or int16 (sometimes with ``scl_slope``). The ground truth of each visit is an instance
label image on the post-contrast grid, built from every lesion's own mask so that neighbouring
lesions keep separate labels. See docs/phantoms.md.

Only numpy, scipy and nibabel are used. The main entry point is :func:`write_dataset`.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from lesionpipe import __version__
from lesionpipe.imageio import atomic_write_bytes

# --- tissue classes on the subject grid ----------------------------------------------------------
AIR, CSF, GM, WM, DGM, VENT, DURA, BONE, MARROW, FAT, MUSCLE, SKIN, EYE, CEREB_GM = range(14)
CLASS_NAMES = ["air", "csf", "gm", "wm", "deep_gm", "ventricle", "dura", "bone", "marrow", "fat",
               "muscle", "skin", "eye", "cerebellar_gm"]
#: pre-contrast T1 intensity of each class, white matter = 1 (arbitrary units)
T1_PRE = np.array([0.0, 0.25, 0.68, 1.0, 0.84, 0.23, 0.45, 0.05, 1.0, 1.4, 0.62, 0.75, 0.2, 0.72],
                  np.float32)
#: enhancement after gadolinium (added to the pre intensity, white-matter units)
T1_ENH = np.array([0.0, 0.0, 0.04, 0.0, 0.02, 0.0, 0.7, 0.0, 0.08, 0.0, 0.12, 0.25, 0.0, 0.04],
                  np.float32)

# --- enhancing mimics on the post grid (label-mimics truth image) ----------------------------------
MIMIC_VESSEL, MIMIC_SINUS, MIMIC_DURA, MIMIC_CHOROID, MIMIC_NONENH, MIMIC_FAT = 1, 2, 3, 4, 5, 6
MIMIC_NAMES = {1: "vessel", 2: "sinus_or_falx", 3: "dura", 4: "choroid_plexus",
               5: "non_enhancing_lesion", 6: "fat_or_marrow"}

#: the pipeline's counting rule (lesionpipe.settings defaults)
MIN_VOXELS, MIN_VOLUME_MM3 = 3, 10.0


# =================================================================================================
# small numerical helpers
# =================================================================================================
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], step: float,
                  sigma: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std random field on ``shape`` varying over ~``step`` voxels.

    White noise on a grid ``step`` times coarser is smoothed there and linearly up-sampled, which
    is much faster than filtering at full resolution.

    >>> f = _smooth_noise(np.random.default_rng(0), (20, 30, 10), 5.0)
    >>> f.shape, bool(abs(f.mean()) < 1e-5), bool(abs(f.std() - 1) < 1e-3)
    ((20, 30, 10), True, True)
    """
    coarse_shape = tuple(int(math.ceil(n / step)) + 3 for n in shape)
    fine = ndi.gaussian_filter(rng.standard_normal(coarse_shape), sigma, mode="wrap").astype(np.float32)
    for axis, n in enumerate(shape):
        pos = np.arange(n, dtype=np.float64) / step + 1.0
        i0 = np.floor(pos).astype(int)
        f = (pos - i0).astype(np.float32)
        view = [None] * len(shape)
        view[axis] = slice(None)
        f = f[tuple(view)]
        fine = np.take(fine, i0, axis=axis) * (1 - f) + np.take(fine, i0 + 1, axis=axis) * f
    fine -= fine.mean()
    fine /= max(float(fine.std()), 1e-12)
    return fine


def _rotation(angles_deg) -> np.ndarray:
    """Rotation matrix from three Euler angles (degrees, about x then y then z).

    >>> np.allclose(_rotation([0, 0, 90]) @ [1, 0, 0], [0, 1, 0])
    True
    """
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _smooth_curve(rng: np.random.Generator, start, direction, length: float, *, step: float = 0.5,
                  wiggle: float = 0.08) -> np.ndarray:
    """A random smooth 3-D curve (points ``step`` mm apart) from ``start`` heading ``direction``."""
    n = max(int(length / step), 2)
    d = np.asarray(direction, float)
    d /= np.linalg.norm(d)
    turns = ndi.gaussian_filter1d(rng.standard_normal((n, 3)), 6, axis=0) * wiggle * 6
    pts = np.empty((n, 3))
    p = np.asarray(start, float)
    for i in range(n):
        d = d + turns[i]
        d /= np.linalg.norm(d)
        p = p + step * d
        pts[i] = p
    return pts


def _polyline(control, step: float = 0.5) -> np.ndarray:
    """Points every ~``step`` mm along straight segments through ``control`` points."""
    control = np.asarray(control, float)
    out = [control[:1]]
    for a, b in zip(control[:-1], control[1:]):
        n = max(int(np.ceil(np.linalg.norm(b - a) / step)), 1)
        t = (np.arange(1, n + 1) / n)[:, None]
        out.append(a + t * (b - a))
    return np.concatenate(out)


# =================================================================================================
# subject grid
# =================================================================================================
@dataclass
class SubjectGrid:
    """1 mm grid in subject space (RAS mm, brain centre near the origin)."""

    shape: tuple[int, int, int]
    origin: np.ndarray  # subject mm of voxel (0, 0, 0)

    def coords(self, axis: int) -> np.ndarray:
        return (self.origin[axis] + np.arange(self.shape[axis])).astype(np.float32)

    def to_index(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, float) - self.origin

    def mesh(self, box=None):
        """Open mesh (x, y, z) of subject coordinates for a box of slices (or the whole grid)."""
        box = box or tuple(slice(0, n) for n in self.shape)
        xs = [self.coords(a)[box[a]] for a in range(3)]
        return xs[0][:, None, None], xs[1][None, :, None], xs[2][None, None, :]

    def box_around(self, lo, hi, margin=0.0):
        lo = np.floor(np.asarray(lo) - self.origin - margin).astype(int)
        hi = np.ceil(np.asarray(hi) - self.origin + margin).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _ellipsoid_dist(grid: SubjectGrid, centre, semi, box=None, deform=None) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a (deformed) ellipsoid surface."""
    x, y, z = grid.mesh(box)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    rn = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2) + 1e-6
    if deform is not None:
        rn = rn / (1 + deform)
    r = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
    return (r * (1 - 1 / rn)).astype(np.float32)


def _local_ellipsoid(grid: SubjectGrid, centre, semi):
    """(box, inside mask) of an ellipsoid, computed only in its bounding box."""
    centre, semi = np.asarray(centre, float), np.asarray(semi, float)
    box = grid.box_around(centre - semi, centre + semi, 1)
    x, y, z = grid.mesh(box)
    q = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    return box, q < 1


def _softmin(*ds, k: float = 4.0) -> np.ndarray:
    m = np.minimum.reduce(ds)
    acc = np.zeros_like(m)
    for d in ds:
        acc += np.exp(-(d - m) / k)
    return (m - k * np.log(acc)).astype(np.float32)


def _splat_tubes(shape, curves, *, sigma_bins=(0.45, 0.7, 1.0, 1.5, 2.2, 3.2)) -> np.ndarray:
    """Render curves (index-space points with per-point radius and weight) as soft tubes.

    ``curves`` is a list of (points (n, 3) in voxel index units, radius mm, amplitude). Each curve is
    deposited as a line density and blurred with a Gaussian of its radius; the result is scaled so
    the centre line reaches ``amplitude`` and saturates above it, giving a tube with a soft edge.
    """
    out = np.zeros(shape, np.float32)
    bins = np.asarray(sigma_bins)
    groups: dict[int, list] = {}
    for pts, radius, amp in curves:
        b = int(np.argmin(abs(bins - radius)))
        groups.setdefault(b, []).append((pts, amp))
    for b, items in groups.items():
        sigma = float(bins[b])
        pts = np.concatenate([p for p, _ in items])
        w = np.concatenate([np.full(len(p), a, np.float32) for p, a in items])
        keep = np.all((pts >= 0) & (pts <= np.array(shape) - 1.001), axis=1)
        pts, w = pts[keep], w[keep]
        if len(pts) == 0:
            continue
        margin = int(np.ceil(4 * sigma)) + 2
        lo = np.maximum(np.floor(pts.min(0)).astype(int) - margin, 0)
        hi = np.minimum(np.ceil(pts.max(0)).astype(int) + margin + 1, shape)
        sub_shape = tuple(hi - lo)
        dens = np.zeros(sub_shape, np.float32)
        local = pts - lo
        base = np.floor(local).astype(int)
        frac = local - base
        for corner in np.ndindex(2, 2, 2):
            c = np.array(corner)
            wt = np.prod(np.where(c, frac, 1 - frac), axis=1) * w
            idx = np.minimum(base + c, np.array(sub_shape) - 1)
            np.add.at(dens, (idx[:, 0], idx[:, 1], idx[:, 2]), wt.astype(np.float32))
        # points are 0.5 mm apart: line density 2 per mm; a line of unit density peaks at 1/(2 pi s^2)
        dens = ndi.gaussian_filter(dens, sigma) * (2 * np.pi * sigma ** 2) * 0.5 * 1.6
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.maximum(out[region], np.minimum(dens, w.max()), out=out[region])
    return out


# =================================================================================================
# anatomy
# =================================================================================================
@dataclass
class Anatomy:
    """One subject's head on the subject grid (identical in every visit)."""

    grid: SubjectGrid
    scale: float
    tissue: np.ndarray        # uint8 class map
    pre: np.ndarray           # float32 pre-contrast T1 (WM = 1)
    enh: np.ndarray           # float32 enhancement added on post
    mimic: np.ndarray         # uint8 MIMIC_* codes
    wm_depth: np.ndarray      # float32 distance (mm) from each WM voxel to non-WM, 2 mm grid
    vent_dist: np.ndarray     # float32 distance (mm) to lateral ventricles, 2 mm grid
    medullary: list = field(default_factory=list)  # deep vein centre lines (subject mm, radius)
    params: dict = field(default_factory=dict)


def make_anatomy(rng: np.random.Generator, *, size: str = "full") -> Anatomy:
    """Draw one subject's head (see the module docstring)."""
    s = 1.0 if size == "full" else 0.72
    if size == "full":
        lo, hi = np.array([-96, -122, -128]), np.array([96, 122, 98])
    else:
        lo, hi = np.array([-72, -90, -92]), np.array([72, 90, 74])
    grid = SubjectGrid(tuple(int(v) for v in (hi - lo)), lo.astype(float))
    shape = grid.shape
    sj = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    params: dict = {"size": size, "scale": s}

    # --- brain hull: cerebrum, cerebellum, brainstem ----------------------------------------------
    cer_semi = np.array([68 * sj(0.93, 1.05), 84 * sj(0.93, 1.05), 60 * sj(0.93, 1.05)]) * s
    deform = 0.06 * _smooth_noise(rng, shape, 28 * s) + 0.02 * _smooth_noise(rng, shape, 12 * s)
    x, y, z = grid.mesh()
    # egg shape: a little wider at the back and flatter at the base
    deform = deform + (0.05 * np.clip(-y / cer_semi[1], 0, 1) - 0.06 * np.clip(-z / cer_semi[2], 0, 1)
                       ).astype(np.float32)
    d_cer = _ellipsoid_dist(grid, (0, 0, 0), cer_semi, deform=deform)
    d_cbl = _ellipsoid_dist(grid, np.array([0, -46, -46]) * s, np.array([50, 30, 21]) * s,
                            deform=0.5 * deform)
    d_stem = _ellipsoid_dist(grid, np.array([0, -18, -42]) * s, np.array([13, 13, 30]) * s)
    d_cord = _ellipsoid_dist(grid, np.array([0, -26, -95]) * s, np.array([8, 8, 45]) * s)
    d_brain = _softmin(d_cer, d_cbl, _softmin(d_stem, d_cord, k=2.0), k=3.0)

    tissue = np.zeros(shape, np.uint8)

    # --- shells outside the brain (thicknesses vary smoothly over the head) -----------------------
    def thick(mean, spread, step=30):
        return np.maximum(mean + spread * _smooth_noise(rng, shape, step * s), 0.3 * mean)

    t_csf = thick(2.2, 0.9)
    t_dura = np.float32(1.0)
    t_inner = thick(1.6, 0.4)
    t_dip = thick(3.2 * max(s, 0.85), 1.3)
    t_outer = thick(1.6, 0.4)
    t_fat = thick(4.5 * max(s, 0.85), 1.8)
    temporal = (9 * np.clip((np.abs(x) / cer_semi[0] - 0.55) / 0.45, 0, 1)
                * np.clip(1 - np.abs(z - 0.1 * cer_semi[2]) / (0.6 * cer_semi[2]), 0, 1)).astype(np.float32)
    t_musc = 1.0 + temporal * s
    t_skin = np.float32(1.6)
    b0 = t_csf
    b1 = b0 + t_dura
    b2 = b1 + t_inner
    b3 = b2 + t_dip
    b4 = b3 + t_outer
    b5 = b4 + t_fat
    b6 = b5 + t_musc
    b7 = b6 + t_skin
    tissue[d_brain < b7] = SKIN
    tissue[d_brain < b6] = MUSCLE
    tissue[d_brain < b5] = FAT
    tissue[d_brain < b4] = BONE
    tissue[d_brain < b3] = MARROW
    tissue[d_brain < b2] = BONE
    tissue[d_brain < b1] = DURA
    tissue[d_brain < b0] = CSF
    del t_inner, t_dip, t_outer, t_fat, t_musc, b2, b3, b4, b5, b6

    # --- face and neck soft tissue below the brain -----------------------------------------------
    d_face = _ellipsoid_dist(grid, np.array([0, 18, -78]) * s, np.array([62, 82, 58]) * s,
                             deform=0.05 * _smooth_noise(rng, shape, 20 * s))
    lower = (d_face < 0) & (tissue == AIR)
    fatty = _smooth_noise(rng, shape, 7 * s) > 0.3
    tissue[lower & fatty] = FAT
    tissue[lower & ~fatty] = MUSCLE
    tissue[(d_face < 1.8) & (d_face >= 0) & (tissue == AIR)] = SKIN
    # air in the nasal cavity and sinuses
    box, ins = _local_ellipsoid(grid, np.array([0, 62, -52]) * s, np.array([16, 22, 24]) * s)
    tissue[box][ins & (d_brain[box] > b1[box] + 2)] = AIR
    # skull base: thick bone/marrow under the cerebrum, above the face
    base = (d_brain > b1) & (d_brain < b1 + 14 * s) & (z < -0.55 * cer_semi[2]) & (np.abs(y) < 55 * s)
    tissue[base & (tissue != AIR)] = np.where(_smooth_noise(rng, shape, 5 * s)[base & (tissue != AIR)] > 0,
                                               MARROW, BONE)
    # eyes with orbital fat
    for side in (-1, 1):
        c = np.array([side * 31, 66, -36]) * s
        box, ins = _local_ellipsoid(grid, c + np.array([0, -6, 0]) * s, np.array([17, 20, 16]) * s)
        tissue[box][ins & (d_brain[box] > b1[box])] = FAT
        box, ins = _local_ellipsoid(grid, c, np.array([12, 12, 12]) * s)
        tissue[box][ins & (d_brain[box] > b1[box])] = EYE
    del d_face, fatty, lower, base

    # --- inside the brain: cortex with sulci, interhemispheric fissure ------------------------------
    inside = d_brain < 0
    g = _smooth_noise(rng, shape, 2.6 * s ** 0.4)
    gx, gy, gz = np.gradient(g)
    sulc_dist = np.abs(g) / (np.sqrt(gx ** 2 + gy ** 2 + gz ** 2) + 1e-4)
    del gx, gy, gz, g
    sulc_depth = thick(17 * s ** 0.5, 5, step=25)
    atrophy = sj(0.0, 0.5)
    sulc_width = 0.55 + atrophy + 0.2 * np.clip(_smooth_noise(rng, shape, 30 * s), -1.5, 2)
    params["atrophy"] = round(atrophy, 3)
    depth = -d_brain
    in_cerebrum = (d_cer <= d_cbl) & (d_cer <= np.minimum(d_stem, d_cord) + 1) & inside
    in_cbl = inside & (d_cbl < d_cer) & (d_cbl < np.minimum(d_stem, d_cord))
    in_stem = inside & ~in_cerebrum & ~in_cbl
    # interhemispheric fissure, open above the corpus callosum and at the poles
    x_mid = (1.5 * s * np.sin(y / (40 * s))).astype(np.float32)
    fis_core = ((y + 5 * s) / (52 * s)) ** 2 + ((z + 2 * s) / (26 * s)) ** 2 > 1
    fis_dist = np.where(fis_core, np.abs(x - x_mid), 99).astype(np.float32)
    # sylvian fissure: a deep lateral cleft
    syl_z = -8 * s + 0.25 * y + 4 * s * _smooth_noise(rng, shape, 12 * s)
    syl_dist = np.where((np.abs(x) > 0.55 * cer_semi[0]) & (y > -35 * s) & (y < 30 * s),
                        np.abs(z - syl_z), 99).astype(np.float32)
    del syl_z
    csf_like = in_cerebrum & (((sulc_dist < sulc_width) & (depth < sulc_depth))
                              | (fis_dist < 1.3) | (syl_dist < 1.2))
    t_gm = thick(2.7, 0.35, step=20)
    wall = np.minimum(np.minimum(depth, np.where(depth < sulc_depth + t_gm, sulc_dist - sulc_width, 99)),
                      np.minimum(fis_dist - 1.3, syl_dist - 1.2))
    del sulc_dist, sulc_width, sulc_depth
    tissue[in_cerebrum] = WM
    tissue[in_cerebrum & (wall < t_gm)] = GM
    tissue[csf_like] = CSF
    # cerebellum: grey folia around a white core
    f = _smooth_noise(rng, shape, 2.6 * s ** 0.5)
    tissue[in_cbl] = CEREB_GM
    box, core = _local_ellipsoid(grid, np.array([0, -42, -44]) * s, np.array([30, 14, 11]) * s)
    tissue[box][in_cbl[box] & core] = WM
    tissue[in_cbl & (np.abs(f) < 0.12) & (depth < 12 * s)] = CSF
    tissue[in_stem] = WM
    del f, core, t_gm, wall

    # --- deep grey nuclei ----------------------------------------------------------------------------
    for cx, cy, cz, a, b, c in ((14, 16, 8, 5, 10, 7), (23, 4, -2, 5, 13, 9), (10, -12, 1, 8, 12, 8)):
        for side in (-1, 1):
            box = grid.box_around(np.array([side * cx - a, cy - b, cz - c]) * s,
                                  np.array([side * cx + a, cy + b, cz + c]) * s, 2)
            dd = _ellipsoid_dist(grid, np.array([side * cx, cy, cz]) * s, np.array([a, b, c]) * s, box)
            sub = tissue[box]
            sub[(dd < 0) & (sub == WM)] = DGM

    # --- ventricles ----------------------------------------------------------------------------------
    vs = sj(0.75, 1.5)  # ventricle size (atrophy)
    params["ventricle_scale"] = vs
    vent_curves = []
    for side in (-1, 1):
        ctrl = np.array([[8, 30, 6], [9, 12, 14], [11, -8, 15], [16, -26, 8], [20, -34, 0],
                         [25, -24, -10], [27, -6, -20]], float)
        ctrl[:, 0] *= side
        rad = np.array([[4, 5], [6, 4], [6, 4], [7, 6], [6, 6], [3.5, 3.5], [2.5, 2.5]]) * vs
        pts = _polyline(ctrl * s, 0.5)
        # per-point radii interpolated along the polyline
        seg = np.linalg.norm(np.diff(ctrl * s, axis=0), axis=1)
        cum = np.concatenate([[0], np.cumsum(seg)])
        along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        rx = np.interp(along, cum, rad[:, 0]) * max(s, 0.85)
        rz = np.interp(along, cum, rad[:, 1]) * max(s, 0.85)
        vent_curves.append((pts, rx, rz))
    vent_pts = np.concatenate([c[0] for c in vent_curves])
    box = grid.box_around(vent_pts.min(0), vent_pts.max(0), 12)
    xb, yb, zb = grid.mesh(box)
    vn = np.full(tissue[box].shape, 99.0, np.float32)
    for pts, rx, rz in vent_curves:
        for p, a, c in zip(pts[::2], rx[::2], rz[::2]):
            q = ((xb - p[0]) / a) ** 2 + ((yb - p[1]) / c) ** 2 + ((zb - p[2]) / c) ** 2
            np.minimum(vn, q, out=vn)
    vent_local = vn < 1
    # third ventricle
    third = ((np.abs(xb) < 2.2 * vs * max(s, 0.85)) & (np.abs(yb + 4 * s) < 14 * s)
             & (np.abs(zb + 4 * s) < 9 * s))
    sub = tissue[box]
    sub[(vent_local | third) & (in_cerebrum[box] | in_stem[box])] = VENT
    tissue[box] = sub

    # --- base intensities --------------------------------------------------------------------------
    jitter = np.array([rng.normal(1, 0.03) for _ in range(len(T1_PRE))], np.float32)
    jitter[WM] = 1.0
    pre = (T1_PRE * jitter)[tissue]
    pre *= 1 + 0.025 * _smooth_noise(rng, shape, 6 * s)  # tissue texture
    wm_like = (tissue == WM) | (tissue == DGM)
    pre[wm_like] *= (1 + 0.035 * _smooth_noise(rng, shape, 18 * s))[wm_like]  # regional WM variation
    enh = T1_ENH[tissue].copy()
    mimic = np.zeros(shape, np.uint8)
    mimic[(tissue == FAT) | (tissue == MARROW)] = MIMIC_FAT  # bright without contrast
    # patchy dura
    dura = tissue == DURA
    patch = np.clip(0.7 + 0.45 * _smooth_noise(rng, shape, 12 * s), 0.15, 1.4)
    enh[dura] = (T1_ENH[DURA] * patch[dura]).astype(np.float32)
    mimic[dura] = MIMIC_DURA
    del patch

    # --- falx, sinuses, vessels, choroid plexus -------------------------------------------------------
    curves = []          # (index points, radius mm, amplitude 1)
    enh_amp = []         # enhancement per curve
    kinds = []
    to_idx = grid.to_index
    top = cer_semi[2]

    def add(pts, radius, amp, kind):
        curves.append((to_idx(pts), radius, 1.0))
        enh_amp.append(amp)
        kinds.append(kind)

    # superior sagittal sinus along the top of the falx, at the inner table
    ang = np.linspace(np.deg2rad(20), np.deg2rad(200), 160)
    ssp = np.stack([np.zeros_like(ang), cer_semi[1] * np.cos(ang), top * np.sin(ang) * 1.02], 1)
    # push to just outside the brain surface along the midline
    ssp = _project_to_level(ssp, d_brain, grid, target=1.8)
    ssp[:, 0] = 0
    add(ssp, 3.2 * max(s, 0.8), sj(1.3, 2.2), MIMIC_SINUS)
    torcula = ssp[-1]
    # straight sinus from the vein of Galen to the torcula, transverse + sigmoid sinuses
    galen = np.array([0, -30 * s, 6 * s])
    add(_polyline([galen, torcula], 0.5), 2.2 * max(s, 0.8), sj(1.2, 2.0), MIMIC_SINUS)
    for side in (-1, 1):
        tr = np.array([[0, torcula[1], torcula[2]], [side * 35 * s, torcula[1] + 4 * s, torcula[2] - 2 * s],
                       [side * 55 * s, -35 * s, torcula[2] - 8 * s], [side * 50 * s, -20 * s, -55 * s],
                       [side * 40 * s, -15 * s, -85 * s]])
        trp = _project_to_level(_polyline(tr, 0.5)[:int(1.5 * len(_polyline(tr[:3], 0.5)))], d_brain,
                                grid, target=2.0)
        add(np.concatenate([trp, _polyline([trp[-1], tr[-2], tr[-1]], 0.5)]), 2.8 * max(s, 0.8),
            sj(1.2, 2.0), MIMIC_SINUS)
    # internal cerebral veins (paired, on the roof of the third ventricle) -> vein of Galen
    for side in (-1, 1):
        icv = _polyline([[side * 2 * s, 8 * s, 9 * s], [side * 2.5 * s, -12 * s, 10 * s],
                         [side * 1 * s, -26 * s, 7 * s], galen], 0.5)
        add(icv, 1.0, sj(1.0, 1.8), MIMIC_VESSEL)
        # thalamostriate vein along the ventricle floor
        tsv = _polyline([[side * 12 * s, -10 * s, 12 * s], [side * 10 * s, 0, 12 * s],
                         [side * 3 * s, 8 * s, 9 * s]], 0.5)
        add(tsv, 0.7, sj(0.8, 1.5), MIMIC_VESSEL)
        # basal vein of Rosenthal
        add(_polyline([[side * 20 * s, 5 * s, -14 * s], [side * 18 * s, -15 * s, -8 * s], galen], 0.5),
            0.8, sj(0.8, 1.5), MIMIC_VESSEL)
        # middle cerebral artery into the sylvian fissure
        mca = _smooth_curve(rng, np.array([side * 8, 8, -18]) * s, [side, 0.2, 0.25], 50 * s, wiggle=0.05)
        add(mca, 1.3, sj(0.8, 1.6), MIMIC_VESSEL)
        for _ in range(3):
            p0 = mca[rng.integers(len(mca) // 2, len(mca))]
            add(_smooth_curve(rng, p0, [side * 0.3, rng.normal(), 1], sj(20, 45) * s), 0.6, sj(0.7, 1.4),
                MIMIC_VESSEL)
        # internal carotid / posterior cerebral artery
        add(_polyline([[side * 16, 10, -90], [side * 14, 12, -40], [side * 10, 8, -22]], 0.5) * s, 2.0,
            sj(0.8, 1.5), MIMIC_VESSEL)
        pca = _smooth_curve(rng, np.array([side * 4, -10, -24]) * s, [side, -1, 0.3], 60 * s, wiggle=0.04)
        add(pca, 1.0, sj(0.7, 1.4), MIMIC_VESSEL)
    # pituitary gland and cavernous sinuses (enhance strongly), below the brain in the sella
    add(_polyline([[0, 14, -50], [0, 10, -50]], 0.5) * s, 3.0 * max(s, 0.8), sj(1.0, 1.6), MIMIC_SINUS)
    for side in (-1, 1):
        add(_polyline([[side * 9, 22, -50], [side * 10, 0, -48]], 0.5) * s, 2.2 * max(s, 0.8),
            sj(1.0, 1.6), MIMIC_SINUS)
    # basilar artery in front of the brainstem, pericallosal arteries above the corpus callosum
    add(_polyline([[0, 0, -80], [0, -2, -45], [0, -6, -24]], 0.5) * s, 1.5, sj(0.8, 1.5), MIMIC_VESSEL)
    for side in (-1, 1):
        ang2 = np.linspace(np.deg2rad(-40), np.deg2rad(150), 120)
        per = np.stack([np.full_like(ang2, side * 1.2 * s), 40 * s * np.cos(ang2) - 2 * s,
                        22 * s * np.sin(ang2) + 2 * s], 1)
        add(per, 0.9, sj(0.7, 1.4), MIMIC_VESSEL)
    # cortical veins over the convexity and into sulci
    n_cort = int(rng.integers(18, 32))
    for _ in range(n_cort):
        u = rng.standard_normal(3)
        u[2] = abs(u[2]) + 0.2
        u /= np.linalg.norm(u)
        p0 = u * cer_semi
        tangent = np.cross(u, rng.standard_normal(3))
        c = _smooth_curve(rng, p0, tangent, sj(25, 80) * s, wiggle=0.06)
        c = _project_to_level(c, d_brain, grid, target=sj(-1.0, 1.0))
        add(c, sj(0.6, 1.6), sj(0.6, 1.6), MIMIC_VESSEL)
    # veins dipping into sulci (and through grey matter into white matter)
    n_sulc = int(rng.integers(20, 40))
    for _ in range(n_sulc):
        u = rng.standard_normal(3)
        u[2] = abs(u[2]) * 0.8
        u /= np.linalg.norm(u)
        p0 = _project_to_level((u * cer_semi)[None], d_brain, grid, target=0.0)[0]
        c = _smooth_curve(rng, p0, -u + 0.3 * rng.standard_normal(3), sj(8, 25) * s, wiggle=0.05)
        add(c, sj(0.45, 0.9), sj(0.5, 1.3), MIMIC_VESSEL)
    # deep medullary veins: thin, running radially from the ventricle wall through white matter
    medullary = []
    n_med = int(rng.integers(25, 50))
    for _ in range(n_med):
        pts, rx, rz = vent_curves[int(rng.integers(2))]
        i = int(rng.integers(0, int(len(pts) * 0.7)))
        centre = pts[i]
        out_dir = np.array([np.sign(centre[0]) * rng.uniform(0.3, 1), rng.normal(0, 0.4),
                            rng.uniform(0.2, 1)])
        out_dir /= np.linalg.norm(out_dir)
        p0 = centre + out_dir * (rz[i] + 0.5)
        c = _smooth_curve(rng, p0, out_dir, sj(12, 30) * s, wiggle=0.03)
        r = sj(0.45, 0.75)
        add(c, r, sj(0.4, 1.2), MIMIC_VESSEL)
        medullary.append((c, r))
    # choroid plexus: strand along the ventricle body into the temporal horn, glomus in the atrium
    chor_curves = []
    for pts, rx, rz in vent_curves:
        n = len(pts)
        seg = pts[int(0.3 * n):int(0.93 * n)]
        off = np.array([-np.sign(seg[0, 0]) * 1.5, 0, -1.2]) * s
        seg = seg + off + ndi.gaussian_filter1d(rng.standard_normal(seg.shape), 8, axis=0) * 3
        # patchy strand: pieces of 5-20 mm with gaps, so parts look like separate blobs
        i = int(rng.integers(0, 10))
        while i < len(seg) - 4:
            n_piece = int(rng.uniform(10, 40))
            chor_curves.append((to_idx(seg[i:i + n_piece]), sj(0.8, 1.6), 1.0))
            i += n_piece + int(rng.uniform(6, 16))
        glom = pts[int(0.52 * n)] + off
        for _ in range(int(rng.integers(3, 7))):
            blob = glom + rng.normal(0, 2.5, 3) * vs
            chor_curves.append((to_idx(_smooth_curve(rng, blob, rng.standard_normal(3), sj(3, 8) * vs)),
                                sj(1.2, 2.4) * min(vs, 1.2), 1.0))
    chor = _splat_tubes(shape, chor_curves)
    vent_grow = ndi.binary_dilation(tissue == VENT, iterations=1)
    chor = np.where(vent_grow, np.clip(chor * 1.3, 0, 1), 0).astype(np.float32)
    chor_patch = np.clip(1 + 0.3 * _smooth_noise(rng, shape, 4 * s), 0.5, 1.5)
    c_amp = sj(1.0, 1.8)
    pre = pre * (1 - chor) + chor * 0.55
    enh = enh * (1 - chor) + chor * c_amp * chor_patch
    mimic[chor > 0.4] = MIMIC_CHOROID
    del chor_patch, vent_grow

    # falx: a thin enhancing sheet in the fissure; tentorium is the dura between cerebrum/cerebellum
    falx = (fis_dist < 0.6) & (depth > -b0) & (z > -20 * s)
    enh[falx] = np.maximum(enh[falx], sj(0.5, 1.0))
    pre[falx] = 0.45
    mimic[falx] = MIMIC_SINUS

    # vessels (one tube image per amplitude keeps the soft profiles)
    amps = np.asarray(enh_amp)
    for kind in (MIMIC_SINUS, MIMIC_VESSEL):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        tubes = [(curves[i][0], curves[i][1], float(amps[i])) for i in sel]
        field_amp = _splat_tubes(shape, tubes)
        occ = np.clip(field_amp / max(float(amps[sel].max()), 1e-6) * 1.6, 0, 1)
        occ = np.where(tissue == AIR, 0, occ).astype(np.float32)
        blood_pre = 0.5 if kind == MIMIC_SINUS else 0.45
        sel_mask = occ > 0.02
        pre[sel_mask] = pre[sel_mask] * (1 - occ[sel_mask]) + occ[sel_mask] * blood_pre
        enh[sel_mask] = np.maximum(enh[sel_mask] * (1 - occ[sel_mask]), field_amp[sel_mask])
        mimic[occ > 0.4] = kind
        del field_amp, occ, sel_mask

    # perivascular spaces: short thin CSF-filled tubes in the basal ganglia and centrum semiovale
    # (dark on both scans, never enhancing)
    pvs = []
    n_pvs = int(rng.integers(15, 60))
    for _ in range(n_pvs):
        if rng.random() < 0.5:
            c0 = np.array([rng.choice([-1, 1]) * rng.uniform(12, 26), rng.uniform(-5, 15),
                           rng.uniform(-8, 4)])
        else:
            c0 = np.array([rng.choice([-1, 1]) * rng.uniform(8, 35), rng.uniform(-35, 30),
                           rng.uniform(18, 38)])
        pvs.append((to_idx(_smooth_curve(rng, c0 * s, [0.2 * rng.normal(), 0.2 * rng.normal(), 1],
                                         sj(3, 10), wiggle=0.03)), 0.45, 1.0))
    pocc = np.clip(_splat_tubes(shape, pvs) * 1.2, 0, 1)
    pocc = np.where(in_cerebrum & ((tissue == WM) | (tissue == DGM)), pocc, 0).astype(np.float32)
    pre = pre * (1 - pocc) + pocc * T1_PRE[CSF]
    del pocc

    # light blur removes staircase edges of the class map
    pre = ndi.gaussian_filter(pre, 0.45).astype(np.float32)
    enh = ndi.gaussian_filter(enh, 0.35).astype(np.float32)

    # --- maps used to place lesions (2 mm grid) ------------------------------------------------------
    wm2 = (tissue == WM)[::2, ::2, ::2] & in_cerebrum[::2, ::2, ::2]
    wm_depth = (ndi.distance_transform_edt(wm2) * 2).astype(np.float32)
    vent2 = (tissue == VENT)[::2, ::2, ::2]
    vent_dist = (ndi.distance_transform_edt(~vent2) * 2).astype(np.float32)
    params.update(cerebrum_semi_axes_mm=cer_semi.round(1).tolist(), choroid_enhancement=round(c_amp, 3),
                  n_cortical_veins=n_cort, n_sulcal_veins=n_sulc, n_medullary_veins=n_med)
    return Anatomy(grid=grid, scale=s, tissue=tissue, pre=pre, enh=enh, mimic=mimic, wm_depth=wm_depth,
                   vent_dist=vent_dist, medullary=medullary, params=params)


def _project_to_level(pts: np.ndarray, dist: np.ndarray, grid: SubjectGrid, *, target: float,
                      iters: int = 6) -> np.ndarray:
    """Move points along the gradient of ``dist`` until ``dist`` equals ``target`` (Newton steps)."""
    pts = np.array(pts, float)
    h = 1.0
    for _ in range(iters):
        idx = grid.to_index(pts).T
        val = ndi.map_coordinates(dist, idx, order=1, mode="nearest")
        grad = np.stack([
            (ndi.map_coordinates(dist, idx + h * e[:, None], order=1, mode="nearest")
             - ndi.map_coordinates(dist, idx - h * e[:, None], order=1, mode="nearest")) / (2 * h)
            for e in np.eye(3)], 1)
        gn = np.maximum((grad ** 2).sum(1), 1e-3)
        pts -= ((val - target) / gn)[:, None] * grad
    # remove kinks left by the projection
    return ndi.gaussian_filter1d(pts, 2, axis=0, mode="nearest")


# =================================================================================================
# lesions
# =================================================================================================
@dataclass
class Lesion:
    """One MS lesion in subject space with its enhancement history."""

    uid: int
    kind: str                 # nodular, ring, irregular
    centre: np.ndarray        # subject mm
    box: tuple                # slices into the subject grid
    occ: np.ndarray           # float32 occupancy 0..1 in the box
    rim: np.ndarray           # float32 enhancement profile 0..1 in the box (ring: rim bright)
    volume_mm3: float
    t1_factor: float          # pre-contrast intensity relative to white matter (1 = invisible)
    onset: int                # first visit index where the lesion exists
    enhancement: dict         # visit index -> enhancement amplitude (WM units); absent = none
    site: str = "deep"
    touching: str = ""        # "vessel", "ventricle", "pair" when deliberately placed so

    def enhancing_at(self, v: int) -> float:
        return float(self.enhancement.get(v, 0.0))


def _lesion_shape(rng: np.random.Generator, grid: SubjectGrid, centre: np.ndarray, volume: float,
                  kind: str, axes_dir=None, ratios=None):
    """Occupancy and enhancement profile of one lesion on the subject grid.

    Returns (box, occ, rim, realised volume mm3). Occupancy has a soft ~0.4 mm edge so that partial
    volume in resampling is realistic.
    """
    r0 = (3 * volume / (4 * np.pi)) ** (1 / 3)
    ratios = rng.uniform(0.75, 1.3, 3) if ratios is None else np.asarray(ratios, float)
    ratios = ratios / np.prod(ratios) ** (1 / 3)
    semi = r0 * ratios
    rot = _random_rotation(rng, 180) if axes_dir is None else axes_dir
    blobs = [(np.zeros(3), semi, rot)]
    if kind == "irregular":
        for _ in range(int(rng.integers(2, 4))):
            off = rng.standard_normal(3)
            off = off / np.linalg.norm(off) * r0 * rng.uniform(0.45, 0.8)
            blobs.append((off, semi * rng.uniform(0.5, 0.8), _random_rotation(rng, 180)))
    ext = r0 * 1.6 * (2.0 if kind == "irregular" else 1.0) + 2
    box = grid.box_around(centre - ext, centre + ext, 1)
    x, y, z = grid.mesh(box)
    rel = [x - centre[0], y - centre[1], z - centre[2]]
    rho = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), 9.0, np.float32)
    for off, ax, rm in blobs:
        q = [rel[0] - off[0], rel[1] - off[1], rel[2] - off[2]]
        # coordinates in the blob frame: rm.T @ q
        u = [(rm[0, i] * q[0] + rm[1, i] * q[1] + rm[2, i] * q[2]) / ax[i] for i in range(3)]
        np.minimum(rho, np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2), out=rho)
    if kind == "irregular":
        rho = rho * (1 + 0.15 * _smooth_noise(rng, rho.shape, 2.5))
    edge = 0.4 / max(r0, 1.0)
    occ = (1 / (1 + np.exp(np.clip((rho - 1) / edge, -30, 30)))).astype(np.float32)
    if kind == "ring":
        wall = rng.uniform(0.22, 0.35)
        centre_level = rng.uniform(0.1, 0.35)
        rim = np.clip(np.exp(-((rho - (1 - wall / 2)) / (wall * 0.6)) ** 2), 0, 1)
        rim = centre_level + (1 - centre_level) * np.where(rho > 1 - wall / 2, 1.0, rim)
        if rng.random() < 0.5:
            # open ring: the rim fades over one side (typical of demyelinating lesions)
            side = rng.standard_normal(3)
            side /= np.linalg.norm(side)
            proj = (rel[0] * side[0] + rel[1] * side[1] + rel[2] * side[2]) / r0
            rim = rim * np.clip(0.5 + 1.5 * proj, 0.35, 1.0) ** 1.0
        rim = rim * occ
    else:
        rim = occ * np.clip(1.15 - 0.3 * rho ** 2, 0.6, 1.0)
    return box, occ, rim.astype(np.float32), float(occ.sum())


def _gradient_at(field: np.ndarray, idx) -> np.ndarray:
    """Central-difference gradient of ``field`` at fractional index ``idx``."""
    idx = np.asarray(idx, float)
    g = np.zeros(3)
    for a in range(3):
        e = np.zeros(3)
        e[a] = 1
        hi = ndi.map_coordinates(field, (idx + e)[:, None], order=1, mode="nearest")[0]
        lo = ndi.map_coordinates(field, (idx - e)[:, None], order=1, mode="nearest")[0]
        g[a] = (hi - lo) / 2
    return g


def _frame(direction, rng) -> np.ndarray:
    """Rotation matrix whose first column is ``direction`` (random when degenerate)."""
    d = np.asarray(direction, float)
    if np.linalg.norm(d) < 1e-6:
        d = rng.standard_normal(3)
    d = d / np.linalg.norm(d)
    t = np.cross(d, rng.standard_normal(3))
    t /= np.linalg.norm(t)
    return np.stack([d, t, np.cross(d, t)], axis=1)


def _site_shares(juxtacortical: float) -> list[float]:
    """Probabilities of periventricular, juxtacortical and deep placement of a new lesion.

    The rest beside the juxtacortical share is split 60 : 40; rounding keeps the default exactly
    the shares of earlier draws, so a seed reproduces its files byte for byte.

    >>> _site_shares(0.25)
    [0.45, 0.25, 0.3]
    """
    if not 0.0 <= juxtacortical <= 1.0:
        raise ValueError(f"juxtacortical share must be in [0, 1], got {juxtacortical}")
    rest = 1.0 - juxtacortical
    return [round(0.6 * rest, 12), juxtacortical, round(0.4 * rest, 12)]


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _draw_volume(rng, stress: bool) -> float:
    if stress and rng.random() < 0.55:
        return _log_uniform(rng, 8, 40)
    u = rng.random()
    if u < 0.15:
        return _log_uniform(rng, 9, 18)
    if u < 0.8:
        return _log_uniform(rng, 15, 150)
    if u < 0.95:
        return _log_uniform(rng, 150, 600)
    return _log_uniform(rng, 600, 1500)


def _draw_amplitude(rng, stress: bool) -> float:
    if stress and rng.random() < 0.5:
        return rng.uniform(0.12, 0.3)
    return float(np.clip(np.exp(rng.normal(np.log(0.45), 0.5)), 0.15, 1.0))


class _Placer:
    """Finds lesion centres in white matter that do not collide with earlier lesions."""

    def __init__(self, rng, anat: Anatomy):
        self.rng, self.anat = rng, anat
        g = anat.grid
        wm = anat.wm_depth > 0
        self.cand = np.argwhere(wm) * 2 + g.origin  # subject mm (2 mm grid)
        self.depth = anat.wm_depth[wm]
        self.vdist = anat.vent_dist[wm]
        self.taken: list[tuple[np.ndarray, float]] = []

    def free(self, c, r, gap=2.5) -> bool:
        return all(np.linalg.norm(c - c2) > r + r2 + gap for c2, r2 in self.taken)

    def pick(self, r: float, site: str) -> np.ndarray | None:
        rng = self.rng
        if site == "periventricular":
            ok = (self.vdist <= r + 6) & (self.vdist >= r * 0.6) & (self.depth >= 0.5 * r)
        elif site == "juxtacortical":
            ok = (self.depth <= max(r, 3)) & (self.depth >= 0.5 * r) & (self.vdist > 12)
        elif site == "ventricle":  # touching the ventricle wall
            ok = (self.vdist <= r + 1.5) & (self.vdist >= max(r - 1.0, 1))
        else:
            ok = (self.depth >= r + 1.5)
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            idx = np.flatnonzero(self.depth >= min(r, 4))
        for _ in range(60):
            c = self.cand[idx[int(rng.integers(len(idx)))]] + rng.uniform(-1, 1, 3)
            if self.free(c, r):
                return c
        return None


def plan_lesions(rng: np.random.Generator, anat: Anatomy, weeks: list[int], *, stress: bool,
                 pair_dirs: list | None = None, activity: float = 1.0,
                 juxtacortical: float = 0.25) -> list[Lesion]:
    """Draw every lesion of one subject with its enhancement history over the visits.

    ``activity`` scales the subject's rate of new enhancing lesions (1 = a trial population;
    larger values make lesion-rich data for training and evaluation, with every subject active).
    ``juxtacortical``: share of the freely placed new lesions put at the grey-white junction (the
    rest periventricular and deep, 45 : 30); raised for training data, where lesions near the
    cortex are outnumbered by cortical and sulcal vessels.
    """
    site_p = _site_shares(juxtacortical)
    placer = _Placer(rng, anat)
    grid = anat.grid
    lesions: list[Lesion] = []

    def make(kind, volume, site, onset, t1_factor, centre=None, touching="", ratios=None):
        r = (3 * volume / (4 * np.pi)) ** (1 / 3)
        if centre is None:
            centre = placer.pick(r * (1.3 if kind == "irregular" else 1.0), site)
            if centre is None:
                return None
        axes = None
        if site in ("periventricular", "ventricle") and ratios is None and kind != "irregular":
            # ovoid with its long axis pointing away from the ventricle ("Dawson's finger")
            axes = _frame(_gradient_at(anat.vent_dist, (centre - grid.origin) / 2.0), rng)
            ratios = (rng.uniform(1.3, 1.8), 1.0, 1.0)
        box, occ, rim, vol = _lesion_shape(rng, grid, centre, volume, kind, axes_dir=axes, ratios=ratios)
        placer.taken.append((centre, r * (1.4 if kind == "irregular" else 1.0)))
        les = Lesion(uid=len(lesions) + 1, kind=kind, centre=centre, box=box, occ=occ, rim=rim,
                     volume_mm3=vol, t1_factor=t1_factor, onset=onset, enhancement={}, site=site,
                     touching=touching)
        lesions.append(les)
        return les

    sites = ["periventricular", "juxtacortical", "deep"]
    # chronic, non-enhancing lesions present from the start (T2 lesions, some black holes)
    for _ in range(int(rng.integers(4, 20))):
        bh = rng.random() < 0.3
        make("nodular" if rng.random() < 0.6 else "irregular", _log_uniform(rng, 20, 2500),
             sites[int(rng.choice(3, p=[0.5, 0.2, 0.3]))], 0,
             rng.uniform(0.5, 0.8) if bh else rng.uniform(0.82, 0.97))
    # disease activity: new GELs per visit from a subject-specific rate (negative binomial)
    rate = rng.gamma(0.6, 1.8) * (2.0 if stress else 1.0) * activity + 0.5 * (activity - 1.0)
    for v, wk in enumerate(weeks):
        gap = 4.0 if v == 0 else max(weeks[v] - weeks[v - 1], 1)
        n_new = min(int(rng.poisson(rate * min(gap, 8) ** 0.6 / 4 ** 0.6)),
                    int(round(10 * max(activity, 1.0))))
        if stress and v == 0:
            n_new = max(n_new, 3)
        for _ in range(n_new):
            vol = _draw_volume(rng, stress)
            u = rng.random()
            kind = "ring" if (vol > 60 and u < (0.5 if stress else 0.3)) else (
                "irregular" if (vol > 30 and u > 0.7) else "nodular")
            amp = _draw_amplitude(rng, stress)
            t1f = rng.uniform(0.8, 1.0)
            u2 = rng.random()
            touch_p = 0.35 if stress else 0.12
            les = None
            if u2 < touch_p and anat.medullary:
                # beside a deep medullary vein (a few tries to find white matter with room)
                r = (3 * vol / (4 * np.pi)) ** (1 / 3)
                for _ in range(12):
                    c_pts, vr = anat.medullary[int(rng.integers(len(anat.medullary)))]
                    p = c_pts[int(rng.integers(len(c_pts) // 4, len(c_pts)))]
                    perp = np.cross(c_pts[-1] - c_pts[0], rng.standard_normal(3))
                    perp /= np.linalg.norm(perp)
                    c = p + perp * (r + vr + rng.uniform(-0.3, 0.6))
                    ti = np.round(grid.to_index(c)).astype(int)
                    if (np.all(ti >= 0) and np.all(ti < grid.shape) and anat.tissue[tuple(ti)] == WM
                            and placer.free(c, r, gap=1.0)):
                        les = make(kind, vol, "deep", v, t1f, centre=c, touching="vessel")
                        break
            elif u2 < 2 * touch_p:
                les = make(kind, vol, "ventricle", v, t1f, touching="ventricle")
            elif u2 < 2 * touch_p + (0.2 if stress else 0.08) and pair_dirs is not None:
                # confluent-looking pair separated by a thin gap of normal tissue
                vol2 = _draw_volume(rng, False)
                r1 = (3 * vol / (4 * np.pi)) ** (1 / 3)
                r2 = (3 * vol2 / (4 * np.pi)) ** (1 / 3)
                first = make("nodular", vol, "deep", v, t1f, touching="pair", ratios=(1, 1, 1))
                if first is not None:
                    d = pair_dirs[v]
                    gap_mm = rng.uniform(2.2, 3.0)
                    c2 = first.centre + d * (r1 + r2 + gap_mm)
                    ti = np.round(grid.to_index(c2)).astype(int)
                    first.enhancement[v] = amp
                    # the first lesion is already taken: only other lesions may block the second
                    if (np.all(ti >= 0) and np.all(ti < grid.shape) and anat.tissue[tuple(ti)] == WM
                            and placer.free(c2, r2, gap=0.0)):
                        les = make("nodular", vol2, "deep", v, t1f, centre=c2, touching="pair",
                                   ratios=(1, 1, 1))
                    else:
                        les = None
                    if les is not None:
                        les.enhancement[v] = _draw_amplitude(rng, stress)
                    continue
            if les is None:
                les = make(kind, vol, sites[int(rng.choice(3, p=site_p))], v, t1f)
            if les is None:
                continue
            les.enhancement[v] = amp
            # enhancement usually stops within 4-8 weeks
            for v2 in range(v + 1, len(weeks)):
                dt = weeks[v2] - weeks[v]
                p_keep = 0.35 if dt <= 4 else (0.12 if dt <= 8 else 0.0)
                if rng.random() < p_keep and v2 - 1 in les.enhancement:
                    les.enhancement[v2] = les.enhancement[v2 - 1] * rng.uniform(0.4, 0.8)
                else:
                    break
            # after enhancement: iso-intense or a black hole
            les.t1_factor_late = rng.uniform(0.55, 0.8) if rng.random() < 0.25 else rng.uniform(0.85, 0.98)
    return lesions


def _lesion_t1(les: Lesion, v: int) -> float:
    if v in les.enhancement or not hasattr(les, "t1_factor_late"):
        return les.t1_factor
    return les.t1_factor_late


def visit_volumes(anat: Anatomy, lesions: list[Lesion], v: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre- and post-contrast intensity on the subject grid for visit index ``v``."""
    pre = anat.pre.copy()
    post_add = anat.enh.copy()
    for les in lesions:
        if les.onset > v:
            continue
        f = _lesion_t1(les, v)
        sub = pre[les.box]
        sub *= 1 - les.occ * (1 - f)
        amp = les.enhancing_at(v)
        if amp > 0:
            post_add[les.box] += amp * les.rim
    return pre, pre + post_add


# =================================================================================================
# acquisition: grid, head pose, bias, noise, gain, storage
# =================================================================================================
ORIENTATIONS = {"RAS": np.diag([1.0, 1, 1]), "LAS": np.diag([-1.0, 1, 1]), "LPS": np.diag([-1.0, -1, 1])}


@dataclass
class Acquisition:
    """One scan's grid and head pose. ``affine`` maps voxel indices to scanner mm; the head pose
    maps subject mm to scanner mm: ``w = rot @ p + trans``."""

    grid: str                 # '3d' or '2d'
    zooms: tuple
    shape: tuple
    affine: np.ndarray
    orientation: str
    rot: np.ndarray
    trans: np.ndarray
    bias_amp: float = 0.2
    snr: float = 25.0
    gain: float = 1.0
    storage: str = "float32"
    gamma: float = 1.0        # sequence contrast: intensities are raised to this power
    noise_corr: float = 0.0   # spatial correlation of the noise (Gaussian sigma, voxels)

    @property
    def n_sub(self) -> int:
        """Sub-samples along the slice axis (thick slices are averaged from a fine grid)."""
        return max(int(round(self.zooms[2] / 0.5)), 1) if self.zooms[2] > 1.2 else 1


def make_grid(*, grid: str, size: str, thickness: float, orientation: str, oblique_deg=(0, 0, 0),
              centre=(0.0, 0.0, -4.0)):
    """Shape and affine of a scan whose field of view is centred on ``centre`` (scanner mm).

    >>> shape, aff = make_grid(grid='2d', size='small', thickness=3, orientation='LAS')
    >>> shape, float(aff[0, 0]), float(aff[2, 2])
    ((160, 160, 43), -1.0, 3.0)
    """
    fov = np.array([230.0, 230, 180]) if size == "full" else np.array([160.0, 160, 130])
    zooms = np.array([1.0, 1.0, 1.0 if grid == "3d" else float(thickness)])
    shape = tuple(int(round(f / zm)) for f, zm in zip(fov, zooms))
    base = ORIENTATIONS["RAS" if orientation == "oblique" else orientation]
    rot = _rotation(oblique_deg) if orientation == "oblique" else np.eye(3)
    lin = rot @ base @ np.diag(zooms)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(centre, float) - lin @ ((np.array(shape) - 1) / 2)
    return shape, aff


def draw_acquisition(rng, *, size: str, stress: bool, grid: str | None = None, pose=None,
                     storage: str | None = None, gain_range=(0.01, 5000.0),
                     thickness: float | None = None) -> Acquisition:
    if grid is None:
        grid = "2d" if rng.random() < 0.4 else "3d"
    drawn = 1.0
    if grid == "2d":
        drawn = float(rng.choice([5.0, 6.0])) if stress and rng.random() < 0.6 else (
            3.0 if rng.random() < 0.8 else 5.0)
    thickness = 1.0 if grid == "3d" else float(thickness or drawn)
    orientation = str(rng.choice(["RAS", "LAS", "LPS", "oblique"], p=[0.3, 0.3, 0.2, 0.2]))
    obl = (rng.uniform(-15, 15), rng.uniform(-5, 5), rng.uniform(-5, 5))
    centre = np.array([0.0, 0.0, -4.0]) + rng.uniform(-4, 4, 3)
    shape, aff = make_grid(grid=grid, size=size, thickness=thickness, orientation=orientation,
                           oblique_deg=obl, centre=centre)
    rot, trans = pose
    if storage is None:
        storage = str(rng.choice(["float32", "int16", "int16_scaled"], p=[0.35, 0.3, 0.35]))
    return Acquisition(grid=grid, zooms=tuple(np.sqrt((aff[:3, :3] ** 2).sum(0)).round(4)), shape=shape,
                       affine=aff, orientation=orientation, rot=rot, trans=trans,
                       bias_amp=float(rng.uniform(0.3, 0.45) if stress else rng.uniform(0.1, 0.35)),
                       snr=float(rng.uniform(8, 16) if stress else rng.uniform(15, 40)),
                       gain=float(10 ** rng.uniform(*np.log10(gain_range))), storage=storage,
                       gamma=float(rng.uniform(0.85, 1.2)), noise_corr=float(rng.uniform(0.0, 0.7)))


def draw_pose(rng, max_deg: float, max_mm: float, base=None):
    """A random rigid head pose, optionally composed with ``base`` (rot, trans)."""
    r = _random_rotation(rng, max_deg)
    t = rng.standard_normal(3)
    t = t / np.linalg.norm(t) * rng.uniform(0, max_mm)
    if base is None:
        return r, t
    r0, t0 = base
    return r @ r0, r @ t0 + t


def _index_map(acq: Acquisition, origin: np.ndarray):
    """Linear map from scan voxel index to index of a 1 mm array whose voxel 0 is at ``origin``."""
    m = acq.rot.T @ acq.affine[:3, :3]
    off = acq.rot.T @ (acq.affine[:3, 3] - acq.trans) - np.asarray(origin, float)
    return m, off


def sample(volume: np.ndarray, origin, acq: Acquisition, *, box=None, order: int = 1,
           chunk: int = 12) -> np.ndarray:
    """Resample a 1 mm subject-space array onto the scan grid (or the ``box`` of it).

    Thick slices average ``acq.n_sub`` samples spread evenly across the slice thickness, i.e. the
    partial-volume effect of a 2-D acquisition rather than nearest-neighbour sampling.
    """
    m, off = _index_map(acq, origin)
    box = box or tuple(slice(0, n) for n in acq.shape)
    ii = np.arange(box[0].start, box[0].stop, dtype=np.float64)
    jj = np.arange(box[1].start, box[1].stop, dtype=np.float64)
    kk_all = np.arange(box[2].start, box[2].stop, dtype=np.float64)
    n_sub = acq.n_sub if order == 1 else 1
    deltas = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    out = np.zeros((len(ii), len(jj), len(kk_all)), np.float32)
    base_ij = (m[:, 0, None, None] * ii[None, :, None] + m[:, 1, None, None] * jj[None, None, :]
               + off[:, None, None])  # (3, ni, nj)
    for k0 in range(0, len(kk_all), chunk):
        kk = kk_all[k0:k0 + chunk]
        acc = np.zeros((len(ii), len(jj), len(kk)), np.float32)
        for d in deltas:
            coords = base_ij[..., None] + m[:, 2, None, None, None] * (kk + d)[None, None, None, :]
            acc += ndi.map_coordinates(volume, coords.reshape(3, -1), order=order, cval=0.0,
                                       prefilter=False).reshape(acc.shape)
        out[..., k0:k0 + len(kk)] = acc / len(deltas)
    return out


def _scan_box(acq: Acquisition, lo_mm, hi_mm, margin=2):
    """Box of scan voxels covering a subject-space box (slices, or None when outside the scan)."""
    corners = np.array(np.meshgrid(*zip(lo_mm, hi_mm), indexing="ij")).reshape(3, -1).T
    w = corners @ acq.rot.T + acq.trans
    ijk = (w - acq.affine[:3, 3]) @ np.linalg.inv(acq.affine[:3, :3]).T
    lo = np.floor(ijk.min(0)).astype(int) - margin
    hi = np.ceil(ijk.max(0)).astype(int) + margin + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, acq.shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def bias_field(rng, shape, amp: float) -> np.ndarray:
    """Smooth multiplicative field (cubic polynomial in the scan's normalised coordinates).

    The log-field is scaled so the field spans about ``1 - amp`` to ``1 + amp`` across the volume.
    """
    powers = [np.stack([np.linspace(-1, 1, n) ** p for p in range(4)]) for n in shape]  # (4, n)
    coef = np.zeros((4, 4, 4))
    for i, j, k in np.ndindex(4, 4, 4):
        if 0 < i + j + k <= 3:
            coef[i, j, k] = rng.normal(0, 1.0 / (i + j + k))
    # separable evaluation: sum_i x^i sum_j y^j sum_k c_ijk z^k
    a = np.tensordot(coef, powers[2], axes=([2], [0]))            # (4, 4, nz)
    b = np.einsum("jy,ijz->iyz", powers[1], a)                     # (4, ny, nz)
    logf = np.tensordot(powers[0].T, b, axes=([1], [0])).astype(np.float32)  # (nx, ny, nz)
    span = float(logf.max() - logf.min())
    logf = (logf - float(logf.mean())) * (2 * np.log1p(amp) / max(span, 1e-6))
    return np.exp(logf)


def finish_scan(rng, clean: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Sequence contrast, bias field, Rician noise (sigma = 1/SNR of white matter), scanner gain.

    The two Gaussian channels of the noise are optionally smoothed (k-space filtering and
    zero-filling make real noise spatially correlated) and rescaled to the same sigma.
    """
    img = np.power(np.maximum(clean, 0), acq.gamma, dtype=np.float32) if acq.gamma != 1 else clean
    img = img * bias_field(rng, clean.shape, acq.bias_amp)
    sigma = 1.0 / acq.snr

    def channel():
        n = rng.standard_normal(img.shape, dtype=np.float32)
        if acq.noise_corr > 0.05:
            n = ndi.gaussian_filter(n, (acq.noise_corr, acq.noise_corr, 0))
            n /= max(float(n.std()), 1e-6)
        return n * sigma

    n1, n2 = channel(), channel()
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    return (img * acq.gain).astype(np.float32)


def to_nifti(data: np.ndarray, acq: Acquisition) -> nb.Nifti1Image:
    """NIfTI image in the acquisition's storage type (float32, int16, or int16 with scl_slope)."""
    hdr = nb.Nifti1Header()
    storage = acq.storage
    peak = float(np.percentile(data, 99.99)) if data.size else 0.0
    if storage == "int16" and not (20 < peak and float(data.max()) < 32000):
        storage = "int16_scaled"
    if storage == "int16":
        arr = np.round(data).astype(np.int16)
        img = nb.Nifti1Image(arr, acq.affine, hdr)
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(1.0, 0.0)
    elif storage == "int16_scaled":
        img = nb.Nifti1Image(data.astype(np.float32), acq.affine, hdr)
        img.header.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter when saving
    else:
        img = nb.Nifti1Image(data.astype(np.float32), acq.affine, hdr)
        img.header.set_data_dtype(np.float32)
    img.set_qform(acq.affine, 1)
    img.set_sform(acq.affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    return img


# =================================================================================================
# ground truth on the post grid
# =================================================================================================
def truth_labels(anat: Anatomy, lesions: list[Lesion], v: int, acq: Acquisition):
    """Instance labels of the lesions enhancing at visit ``v`` on the post grid, and their table rows.

    Each lesion's own occupancy is resampled (with the same thick-slice averaging as the image) and
    kept where it is >= 0.5 (a lesion that nowhere reaches 0.5 keeps the voxels above 80 % of its
    peak when the peak is >= 0.2, and is never counted); a voxel claimed by two lesions goes to the
    larger occupancy, so lesions that touch after resampling keep separate labels. Lesions that
    leave no voxel are dropped.
    """
    labels = np.zeros(acq.shape, np.int16)
    best = np.zeros(acq.shape, np.float32)
    vox_vol = float(np.prod(acq.zooms))
    rows = []
    nxt = 1
    for les in lesions:
        amp = les.enhancing_at(v)
        if les.onset > v or amp <= 0:
            continue
        lo = anat.grid.origin + np.array([s.start for s in les.box])
        hi = anat.grid.origin + np.array([s.stop - 1 for s in les.box])
        box = _scan_box(acq, lo, hi)
        if box is None:
            continue
        occ = sample(les.occ, lo, acq, box=box)
        peak = float(occ.max()) if occ.size else 0.0
        # a lesion thinner than the slice never reaches 50 % in any voxel but can still be seen:
        # keep its most occupied voxels so that a detection there is not a false positive
        cut = 0.5 if peak >= 0.5 else max(0.2, 0.8 * peak)
        sel = (occ >= cut) & (occ > best[box])
        n = int(sel.sum())
        if n == 0:
            continue
        lab = labels[box]
        lab[sel] = nxt
        best[box][sel] = occ[sel]
        rows.append({"lesion_id": nxt, "uid": les.uid, "kind": les.kind, "amp": amp, "les": les,
                     "partial": peak < 0.5})
        nxt += 1
    # recount after possible take-overs, compute centroids
    out = []
    ids = np.arange(1, nxt)
    if len(ids):
        counts = ndi.sum_labels(np.ones_like(labels), labels, ids)
        cents = ndi.center_of_mass(np.ones_like(labels), labels, ids)
    for row, n, c in zip(rows, counts if len(ids) else [], cents if len(ids) else []):
        n = int(n)
        les = row["les"]
        world = acq.affine[:3, :3] @ np.asarray(c) + acq.affine[:3, 3] if n else [np.nan] * 3
        out.append({
            "lesion_id": row["lesion_id"], "n_voxels": n, "volume_mm3": round(n * vox_vol, 2),
            "enhancement_pct": round(100 * row["amp"], 1), "kind": les.kind,
            "counted": int(n >= MIN_VOXELS and n * vox_vol >= MIN_VOLUME_MM3 and not row["partial"]),
            "new": int(les.onset == v), "site": les.site, "touching": les.touching or "none",
            "centroid_x": round(float(world[0]), 2), "centroid_y": round(float(world[1]), 2),
            "centroid_z": round(float(world[2]), 2), "subject_lesion": les.uid,
        })
    return labels, out


def mimic_labels(anat: Anatomy, lesions: list[Lesion], v: int, acq: Acquisition) -> np.ndarray:
    """Enhancing look-alikes on the post grid (MIMIC_* codes), for explaining false positives."""
    mim = np.rint(sample(anat.mimic.astype(np.float32), anat.grid.origin, acq, order=0)).astype(np.uint8)
    for les in lesions:
        if les.onset > v or les.enhancing_at(v) > 0 or _lesion_t1(les, v) > 0.97:
            continue
        lo = anat.grid.origin + np.array([s.start for s in les.box])
        hi = anat.grid.origin + np.array([s.stop - 1 for s in les.box])
        box = _scan_box(acq, lo, hi)
        if box is None:
            continue
        occ = sample(les.occ, lo, acq, box=box)
        mim[box][occ >= 0.5] = MIMIC_NONENH
    return mim


# =================================================================================================
# dataset writer
# =================================================================================================
TRUTH_COUNT_COLUMNS = ["participant_id", "session_id", "week", "gel_count", "n_truth_lesions", "has_pre",
                       "grid", "voxel_x", "voxel_y", "voxel_z", "orientation", "pre_grid",
                       "pre_voxel_z", "snr_post", "bias_post", "motion_pre_post_deg",
                       "motion_pre_post_mm", "storage_post"]
TRUTH_LESION_COLUMNS = ["participant_id", "session_id", "lesion_id", "n_voxels", "volume_mm3",
                        "enhancement_pct", "kind", "counted", "new", "site", "touching",
                        "centroid_x", "centroid_y", "centroid_z", "subject_lesion"]


def _write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    lines = ["\t".join(columns)]
    for r in rows:
        lines.append("\t".join("n/a" if r.get(c) is None else str(r.get(c)) for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _save(img: nb.Nifti1Image, path: Path) -> None:
    """Write ``.nii.gz`` with a fixed gzip timestamp (identical bytes for identical images)."""
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _rot_deg(r: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


def draw_visit_design(rng, ov: dict, *, size: str, stress: bool, storage, gain_range, p_post_only: float,
                      p_2d: float) -> tuple[Acquisition, Acquisition | None]:
    """Post and (or None) pre acquisitions of one visit: grids, head poses, noise, gain, storage.

    ``ov`` may force ``has_pre``, ``grid``, ``pre_grid``, ``thickness`` and ``pre_thickness``
    (see :func:`write_dataset`). The head moves between visits and between pre and post; most
    visits acquire pre and post on the same grid.
    """
    has_pre = ov.get("has_pre", rng.random() >= p_post_only)
    grid = ov.get("grid", "2d" if rng.random() < p_2d else "3d")
    pre_grid = ov.get("pre_grid", grid if rng.random() > 0.12 else ("3d" if grid == "2d" else "2d"))
    vpose = draw_pose(rng, 8 if stress else 4, 10 if stress else 6)
    post = draw_acquisition(rng, size=size, stress=stress, grid=grid, pose=vpose, storage=storage,
                            gain_range=gain_range, thickness=ov.get("thickness"))
    ppose = draw_pose(rng, 7 if stress else 5, 9 if stress else 6, base=vpose)
    pre = draw_acquisition(rng, size=size, stress=stress, grid=pre_grid, pose=ppose,
                           storage=storage, gain_range=gain_range,
                           thickness=ov.get("pre_thickness")) if has_pre else None
    if pre is not None and rng.random() < 0.6 and pre.grid == post.grid:
        # same protocol for pre and post in most visits
        pre.affine, pre.shape, pre.zooms, pre.orientation = (post.affine, post.shape, post.zooms,
                                                             post.orientation)
        pre.grid = post.grid
    return post, pre


def write_visit_scans(noise_rng, anat_dir: Path, stem: str, origin, post: Acquisition, post_vol: np.ndarray,
                      pre: Acquisition | None, pre_vol: np.ndarray | None) -> None:
    """Acquire the subject-space volumes (``origin``: subject mm of voxel 0) and write the BIDS
    post-contrast scan, the pre-contrast scan when ``pre`` is given, and their JSON sidecars."""
    anat_dir.mkdir(parents=True, exist_ok=True)
    scans = [(post, post_vol, f"{stem}_ce-gadolinium_T1w", True)]
    if pre is not None:
        scans.append((pre, pre_vol, f"{stem}_T1w", False))
    for acq, vol, name, is_post in scans:
        img = finish_scan(noise_rng, sample(vol, origin, acq), acq)
        _save(to_nifti(img, acq), anat_dir / f"{name}.nii.gz")
        side = {"MRAcquisitionType": acq.grid.upper(), "SliceThickness": float(acq.zooms[2]),
                "MagneticFieldStrength": 3}
        if is_post:
            side.update(ContrastBolusIngredient="GADOLINIUM")
        (anat_dir / f"{name}.json").write_text(json.dumps(side, indent=2) + "\n")


def save_label_image(labels: np.ndarray, acq: Acquisition, path: Path) -> None:
    """A truth label image on the acquisition's grid (dtype kept, qform = sform = its affine)."""
    img = nb.Nifti1Image(labels, acq.affine)
    img.set_qform(acq.affine, 1)
    img.set_sform(acq.affine, 1)
    if labels.dtype == np.int16:
        img.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(img, path)


def truth_count_row(sub: str, ses: str, week: int, n_counted: int, n_lesions: int, post: Acquisition,
                    pre: Acquisition | None) -> dict:
    """One row of truth_counts.tsv (TRUTH_COUNT_COLUMNS): the visit's count and how it was acquired."""
    rel_r = post.rot @ pre.rot.T if pre is not None else None
    return {
        "participant_id": sub, "session_id": ses, "week": week, "gel_count": n_counted,
        "n_truth_lesions": n_lesions, "has_pre": int(pre is not None), "grid": post.grid,
        "voxel_x": post.zooms[0], "voxel_y": post.zooms[1], "voxel_z": post.zooms[2],
        "orientation": post.orientation, "pre_grid": pre.grid if pre is not None else None,
        "pre_voxel_z": pre.zooms[2] if pre is not None else None,
        "snr_post": round(post.snr, 1), "bias_post": round(post.bias_amp, 2),
        "motion_pre_post_deg": round(_rot_deg(rel_r), 2) if pre is not None else None,
        "motion_pre_post_mm": (round(float(np.linalg.norm(post.trans - rel_r @ pre.trans)), 2)
                               if pre is not None else None),
        "storage_post": post.storage,
    }


def write_dataset(bids_dir, truth_dir, *, n_subjects: int = 4, weeks=(0, 4, 12), seed: int = 0,
                  stress: bool = False, size: str = "full", p_post_only: float = 0.25,
                  p_2d: float = 0.4, storage: str | None = None, overrides: dict | None = None,
                  gain_range=(0.01, 5000.0), activity: float = 1.0, juxtacortical: float = 0.25,
                  progress=None) -> dict:
    """Write a synthetic BIDS dataset to ``bids_dir`` and its ground truth to ``truth_dir``.

    ``overrides`` maps ``(subject_index, visit_index)`` to a dict with any of ``grid`` ('3d'/'2d'),
    ``pre_grid``, ``has_pre`` (bool), ``thickness``, ``pre_thickness`` (mm, 2-D scans), forcing that
    visit's design (used for the sample dataset).
    ``storage`` forces 'float32', 'int16' or 'int16_scaled' for every scan; ``gain_range`` bounds
    the arbitrary scanner gain (white matter intensity before noise).
    ``activity`` scales the rate of new enhancing lesions and ``juxtacortical`` sets the share
    placed at the grey-white junction (see :func:`plan_lesions`).
    Returns a summary dict (also written to ``truth_dir/generation.json``).
    """
    if activity <= 0:
        raise ValueError(f"activity must be positive, not {activity}")
    _site_shares(juxtacortical)     # a bad share fails here, not after the first anatomy
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', not {size!r}")
    weeks = [int(w) for w in weeks]
    if not weeks or sorted(set(weeks)) != weeks or weeks[0] < 0:
        raise ValueError(f"weeks must be increasing non-negative integers, got {weeks}")
    if n_subjects < 1:
        raise ValueError("n_subjects must be >= 1")
    bids_dir, truth_dir = Path(bids_dir), Path(truth_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    t_start = time.time()
    master = np.random.default_rng(seed)
    subj_seeds = master.integers(0, 2 ** 31, n_subjects)
    (bids_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "lesionpipe synthetic MS trial phantoms" + (" (stress set)" if stress else ""),
        "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "lesionpipe phantoms", "Version": __version__}],
    }, indent=2) + "\n")
    count_rows, lesion_rows, participants = [], [], []
    for si in range(n_subjects):
        sub = f"sub-{si + 1:02d}"
        participants.append(sub)
        # independent streams: forcing a visit's design does not change the anatomy or lesions
        anat_ss, design_ss, lesion_ss, noise_ss = np.random.SeedSequence(int(subj_seeds[si])).spawn(4)
        anat = make_anatomy(np.random.default_rng(anat_ss), size=size)
        noise_rng = np.random.default_rng(noise_ss)
        # design of every visit first: grids and poses (pairs of lesions need the post grid)
        design = []
        for v, visit_ss in enumerate(design_ss.spawn(len(weeks))):
            rng = np.random.default_rng(visit_ss)
            post, pre = draw_visit_design(rng, overrides.get((si, v), {}), size=size, stress=stress,
                                          storage=storage, gain_range=gain_range,
                                          p_post_only=p_post_only, p_2d=p_2d)
            # pairs are laid out across the slice axis' perpendicular plane of the post grid
            sl = post.rot.T @ (post.affine[:3, 2] / np.linalg.norm(post.affine[:3, 2]))
            d = np.cross(sl, rng.standard_normal(3))
            design.append({"post": post, "pre": pre, "pair_dir": d / np.linalg.norm(d)})
        lesions = plan_lesions(np.random.default_rng(lesion_ss), anat, weeks, stress=stress,
                               pair_dirs=[d["pair_dir"] for d in design], activity=activity,
                               juxtacortical=juxtacortical)
        sess_rows = []
        for v, wk in enumerate(weeks):
            ses = f"ses-w{wk:02d}"
            sess_rows.append({"session_id": ses, "week": wk})
            post, pre = design[v]["post"], design[v]["pre"]
            pre_vol, post_vol = visit_volumes(anat, lesions, v)
            anat_dir = bids_dir / sub / ses / "anat"
            stem = f"{sub}_{ses}"
            write_visit_scans(noise_rng, anat_dir, stem, anat.grid.origin, post, post_vol, pre, pre_vol)
            del pre_vol, post_vol
            labels, rows = truth_labels(anat, lesions, v, post)
            tdir = truth_dir / sub / ses
            save_label_image(labels.astype(np.int16), post, tdir / f"{stem}_label-GEL_dseg.nii.gz")
            save_label_image(mimic_labels(anat, lesions, v, post), post,
                             tdir / f"{stem}_label-mimics_dseg.nii.gz")
            n_counted = sum(r["counted"] for r in rows)
            count_rows.append(truth_count_row(sub, ses, wk, n_counted, len(rows), post, pre))
            for r in rows:
                lesion_rows.append({"participant_id": sub, "session_id": ses, **r})
            if progress:
                progress(f"{sub} {ses}: {n_counted} GELs ({post.grid}, pre={'yes' if pre else 'no'})")
        _write_tsv(bids_dir / sub / f"{sub}_sessions.tsv", sess_rows, ["session_id", "week"])
    _write_tsv(bids_dir / "participants.tsv", [{"participant_id": p} for p in participants],
               ["participant_id"])
    _write_tsv(truth_dir / "truth_counts.tsv", count_rows, TRUTH_COUNT_COLUMNS)
    _write_tsv(truth_dir / "truth_lesions.tsv", lesion_rows, TRUTH_LESION_COLUMNS)
    summary = {
        "generator": "lesionpipe.phantom", "version": __version__, "seed": seed,
        "n_subjects": n_subjects, "weeks": weeks, "stress": stress, "size": size,
        "p_post_only": p_post_only, "p_2d": p_2d, "activity": activity,
        "juxtacortical": juxtacortical, "storage": storage,
        "gain_range": list(gain_range),
        "overrides": {f"{k[0]},{k[1]}": v for k, v in overrides.items()},
        "counting_rule": {"min_voxels": MIN_VOXELS, "min_volume_mm3": MIN_VOLUME_MM3},
        "mimic_codes": MIMIC_NAMES,
        "n_visits": len(count_rows), "total_gels": int(sum(r["gel_count"] for r in count_rows)),
    }
    (truth_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "ground truth of the lesionpipe synthetic phantoms", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionpipe phantoms", "Version": __version__}],
    }, indent=2) + "\n")
    (truth_dir / "generation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "seconds": round(time.time() - t_start, 1)}
