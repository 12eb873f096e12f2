#!/usr/bin/env python
"""Draw docs/phantom_montage.png: pre, post and post-pre of one phantom visit (axial, coronal).

    python scripts/phantom_montage.py [--out docs/phantom_montage.png] [--seed 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from lesionpipe import phantom as P  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "docs" / "phantom_montage.png")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    anat = P.make_anatomy(rng, size="full")
    lesions = P.plan_lesions(rng, anat, [0], stress=True, pair_dirs=[np.array([1.0, 0, 0])])
    pre_vol, post_vol = P.visit_volumes(anat, lesions, 0)
    # one grid and pose for both scans so post - pre shows enhancement only (display only)
    pose = (P._rotation((4, 0, 2)), np.array([1.0, -2.0, 0.0]))
    acq = P.draw_acquisition(rng, size="full", stress=False, grid="3d", pose=pose, storage="float32")
    acq.snr, acq.bias_amp, acq.gain, acq.gamma, acq.noise_corr = 30.0, 0.15, 1.0, 1.0, 0.0
    state = np.random.default_rng(1)
    pre = P.finish_scan(state, P.sample(pre_vol, anat.grid.origin, acq), acq)
    state = np.random.default_rng(1)
    post = P.finish_scan(state, P.sample(post_vol, anat.grid.origin, acq), acq)
    labels, rows = P.truth_labels(anat, lesions, 0, acq)
    # canonical (RAS) display
    import nibabel as nb

    def ras(a):
        return np.asarray(nb.as_closest_canonical(nb.Nifti1Image(a, acq.affine)).dataobj)

    pre, post, labels = ras(pre), ras(post), ras(labels)
    big = max(rows, key=lambda r: r["n_voxels"])["lesion_id"] if rows else 0
    c = np.round(ndi.center_of_mass(labels == big)).astype(int) if big else np.array(post.shape) // 2
    fig, axes = plt.subplots(3, 2, figsize=(6.4, 8.4))
    for r, (name, img, lim) in enumerate((("pre", pre, (0, 1.8)), ("post", post, (0, 1.8)),
                                         ("post - pre", post - pre, (-0.3, 1.2)))):
        for col, sl in enumerate((np.s_[:, :, c[2]], np.s_[:, c[1], :])):
            ax = axes[r, col]
            ax.imshow(img[sl].T, origin="lower", cmap="gray", vmin=lim[0], vmax=lim[1])
            ax.contour((labels[sl] > 0).T.astype(float), [0.5], colors="red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} ({'axial' if col == 0 else 'coronal'})", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=52)
    print(f"wrote {args.out} ({len(rows)} enhancing lesions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
