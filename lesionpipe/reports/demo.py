"""A synthetic visit (head phantom with enhancing spheres) and an example report from it.

``python -m lesionpipe.reports.demo OUT.html [--shape 230 230 180] [--lesions 10] [--post-only]``
writes an example report and prints how long drawing it took. The phantom is defined in scanner
(world) millimetres, so any affine (LAS, LPS, oblique, thick slices) yields the same anatomy:
patient's left is world x < 0, anterior is y > 0, superior is z > 0.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nb
import numpy as np

#: affines' rotation/flip part for common storage orientations (columns = voxel axes in world)
ORIENTATIONS = {
    "RAS": np.eye(3),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def make_affine(shape, zooms, orientation: str = "RAS", *, oblique_deg: float = 0.0) -> np.ndarray:
    """Affine centring ``shape`` on world (0, 0, 0) with the given storage orientation.

    >>> import nibabel as nb
    >>> ''.join(nb.aff2axcodes(make_affine((10, 12, 8), (1, 1, 3), 'LAS')))
    'LAS'
    """
    rot = ORIENTATIONS[orientation].copy()
    if oblique_deg:
        t = np.radians(oblique_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        rot = rx @ rot
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(zooms, float)
    centre = (np.asarray(shape, float) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def world_coords(shape, affine) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:4].astype(np.float32)
    return xyz.reshape((3, *shape))


def lesion_table_from_labels(labels, enhancement, affine):
    """The output-contract lesion table computed from instance labels (for examples and tests)."""
    import pandas as pd

    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ids = np.unique(labels[labels > 0])
    rows = []
    for lid in ids:
        vox = np.argwhere(labels == lid)
        c = vox.mean(axis=0)
        xyz = affine[:3, :3] @ c + affine[:3, 3]
        e = enhancement[labels == lid]
        rows.append(dict(lesion_id=int(lid), n_voxels=len(vox),
                         volume_mm3=float(len(vox) * np.prod(zooms)),
                         centroid_x=xyz[0], centroid_y=xyz[1], centroid_z=xyz[2],
                         centroid_i=c[0], centroid_j=c[1], centroid_k=c[2],
                         mean_enhancement_pct=float(e.mean()),
                         peak_enhancement_pct=float(e.max())))
    cols = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
            "centroid_i", "centroid_j", "centroid_k", "mean_enhancement_pct", "peak_enhancement_pct"]
    return pd.DataFrame(rows, columns=cols)


def synthetic_visit(shape=(40, 48, 30), zooms=(4.0, 4.0, 5.0), orientation="RAS", *,
                    lesions=(), n_random: int = 0, seed: int = 0, oblique_deg: float = 0.0,
                    misregister_mm: float = 0.0):
    """A small head phantom and its derived images, all on one grid.

    ``lesions`` lists ``(x, y, z, radius_mm)`` spheres in world mm; ``n_random`` adds random ones
    inside the white matter. Returns a dict with ``post``, ``pre``, ``labels``, ``mask``,
    ``enhancement`` (nibabel images) and ``table`` (DataFrame).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    aff = make_affine(shape, zooms, orientation, oblique_deg=oblique_deg)
    x, y, z = world_coords(shape, aff)
    # head and brain sizes scale with the field of view so tiny test grids still hold a brain
    fov = np.abs(aff[:3, :3] @ np.asarray(shape, float))
    a, b, c = 0.36 * fov[0], 0.40 * fov[1], 0.36 * fov[2]
    head = (x / (a * 1.15)) ** 2 + (y / (b * 1.12)) ** 2 + (z / (c * 1.15)) ** 2 <= 1
    brain = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1
    wm = (x / (a * 0.8)) ** 2 + (y / (b * 0.82)) ** 2 + (z / (c * 0.8)) ** 2 <= 1
    vent = (((np.abs(x) - 0.12 * a) / (0.08 * a)) ** 2 + ((y - 0.05 * b) / (0.35 * b)) ** 2
            + (z / (0.25 * c)) ** 2) <= 1
    pre = np.where(head, 60.0, 2.0)
    pre = np.where(brain, 80.0, pre)
    pre = np.where(wm, 100.0, pre)
    pre = np.where(vent & brain, 25.0, pre).astype(np.float32)
    pre += rng.normal(0, 3.0, shape).astype(np.float32)
    post = pre + rng.normal(0, 2.0, shape).astype(np.float32)
    spheres = list(lesions)
    for _ in range(n_random):
        while True:
            p = rng.uniform(-0.65, 0.65, 3) * np.array([a, b, c])
            if (p[0] / (a * 0.8)) ** 2 + (p[1] / (b * 0.8)) ** 2 + (p[2] / (c * 0.8)) ** 2 < 0.8:
                break
        spheres.append((*p, float(rng.uniform(2.5, 6.0))))
    labels = np.zeros(shape, np.int16)
    for n, (cx, cy, cz, r) in enumerate(spheres, start=1):
        ball = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r ** 2
        if not ball.any():  # smaller than a voxel: take the nearest voxel
            d = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
            ball = d == d.min()
        labels[ball & (labels == 0)] = n
        post[ball] += 60.0
    # relabel 1..N in case a sphere was fully covered by an earlier one
    ids = [i for i in np.unique(labels) if i > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int16)
    lut[ids] = np.arange(1, len(ids) + 1)
    labels = lut[labels]
    if misregister_mm:
        shift = int(round(misregister_mm / zooms[0]))
        pre = np.roll(pre, shift, axis=0)
    enh = np.where(brain, post - pre, 0).astype(np.float32)
    table = lesion_table_from_labels(labels, enh, aff)

    def img(data, dtype=np.float32):
        out = nb.Nifti1Image(np.asarray(data, dtype=dtype), aff)
        out.set_qform(aff, 1)
        out.set_sform(aff, 1)
        return out

    return dict(post=img(post), pre=img(pre), labels=img(labels, np.int16),
                mask=img(brain, np.uint8), enhancement=img(enh), table=table, affine=aff)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lesionpipe.reports.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_html")
    p.add_argument("--shape", type=int, nargs=3, default=(230, 230, 180))
    p.add_argument("--zooms", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--orientation", choices=sorted(ORIENTATIONS), default="LAS")
    p.add_argument("--oblique", type=float, default=0.0, help="tilt about x, degrees")
    p.add_argument("--lesions", type=int, default=10)
    p.add_argument("--post-only", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from lesionpipe.reports.visit import write_visit_report

    t0 = time.perf_counter()
    v = synthetic_visit(tuple(args.shape), tuple(args.zooms), args.orientation,
                        n_random=args.lesions, seed=args.seed, oblique_deg=args.oblique)
    t1 = time.perf_counter()
    t = v["table"]
    facts = {"gel_count": len(t), "gel_volume_mm3": float(t.volume_mm3.sum()),
             "has_pre": not args.post_only, "registration_ncc": None if args.post_only else 0.962,
             "settings": {"min_size_mm3": 10.0, "connectivity": 3, "enhancement_threshold_pct": 20},
             "versions": {"lesionpipe": "0.1.0", "nibabel": nb.__version__},
             "processing_time_s": 42.0, "warnings": []}
    out = write_visit_report(args.out_html, post_img=v["post"], labels_img=v["labels"],
                             brain_mask_img=v["mask"], lesion_table=t,
                             pre_img=None if args.post_only else v["pre"],
                             enhancement_img=v["enhancement"], title="sub-demo ses-01",
                             facts=facts)
    t2 = time.perf_counter()
    print(f"phantom {t1 - t0:.2f} s; report {t2 - t1:.2f} s; {out} "
          f"{out.stat().st_size / 1e6:.2f} MB; {len(t)} lesions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
