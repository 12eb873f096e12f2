"""Conversions between nibabel (RAS, i-j-k arrays) and SimpleITK (LPS, k-j-i arrays) images."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image with the same voxels at the same physical places as ``(data, affine)``.

    A slightly sheared affine is replaced by the nearest orthonormal direction (ITK needs one).
    """
    affine = np.asarray(affine, dtype=float)
    rzs = affine[:3, :3]
    zooms = np.sqrt((rzs ** 2).sum(axis=0))
    direction = rzs / zooms
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).T))
    img.SetSpacing([float(z) for z in zooms])
    img.SetDirection((_LPS @ direction).ravel().tolist())
    img.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    """The voxel array of a SimpleITK image in nibabel's i-j-k order."""
    return sitk.GetArrayFromImage(img).T


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """The RAS affine of a SimpleITK image (inverse of :func:`to_sitk`)."""
    direction = _LPS @ np.array(img.GetDirection()).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = direction * np.array(img.GetSpacing())
    aff[:3, 3] = _LPS @ np.array(img.GetOrigin())
    return aff
