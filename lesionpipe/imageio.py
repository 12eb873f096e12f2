"""Load and validate NIfTI scans; write files atomically.

Every check raises :class:`ScanError` whose message names the file and what is wrong with it, so a
bad visit fails alone with a reason a site can act on. Nothing here modifies an input file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np


class ScanError(ValueError):
    """A scan that cannot be used, with a message naming the file and the failed check."""


def _label(path: str | Path, label: str | None) -> str:
    return label or Path(path).name


def load_scan(path: str | Path, *, label: str | None = None) -> nb.Nifti1Image:
    """Load a 3-D NIfTI scan and check that it is usable; return a float32 image.

    A singleton 4th dimension is squeezed. Raises :class:`ScanError` for an unreadable or truncated
    file, a shape that is not 3-D, a degenerate affine, an all-NaN or constant volume.
    """
    path = Path(path)
    name = _label(path, label)
    if not path.exists():
        raise ScanError(f"{name}: file not found")
    if path.stat().st_size == 0:
        raise ScanError(f"{name}: file is empty (0 bytes)")
    try:
        img = nb.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise ScanError(f"{name}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nb.Nifti1Image, nb.Nifti2Image)):
        raise ScanError(f"{name}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        squeeze = True
    elif len(shape) != 3:
        raise ScanError(f"{name}: is {len(shape)}-D {tuple(shape)}; expected one 3-D volume")
    else:
        squeeze = False
    if min(shape[:3]) < 2:
        raise ScanError(f"{name}: shape {tuple(shape)} has fewer than 2 voxels along an axis")
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:  # truncated gzip / short file
        raise ScanError(f"{name}: image data cannot be read, the file is probably truncated "
                        f"({type(exc).__name__}: {exc})") from None
    if squeeze:
        data = data[..., 0]
    check_affine(img.affine, name=name)
    finite = np.isfinite(data)
    if not finite.any():
        raise ScanError(f"{name}: every voxel is NaN or infinite")
    values = data[finite]
    if float(values.max()) == float(values.min()):
        raise ScanError(f"{name}: image is constant (every voxel = {float(values.max()):g})")
    if not finite.all():
        data = np.where(finite, data, 0).astype(np.float32)
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    out = nb.Nifti1Image(data, img.affine, header)
    out.header.set_data_shape(data.shape)
    return out


def check_affine(affine: np.ndarray, *, name: str) -> None:
    """Raise :class:`ScanError` when the voxel-to-scanner affine is not usable.

    >>> check_affine(np.eye(4), name='x')
    >>> check_affine(np.diag([1, 1, 0, 1]), name='x')
    Traceback (most recent call last):
    ...
    lesionpipe.imageio.ScanError: x: degenerate affine (a voxel axis has zero length or axes are collinear)
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ScanError(f"{name}: affine is not a finite 4x4 matrix")
    rzs = affine[:3, :3]
    zooms = np.sqrt((rzs ** 2).sum(axis=0))
    if (zooms < 1e-3).any() or abs(np.linalg.det(rzs)) < 1e-6 * np.prod(np.maximum(zooms, 1e-3)):
        raise ScanError(f"{name}: degenerate affine (a voxel axis has zero length or axes are "
                        f"collinear)")
    if (zooms > 20).any():
        raise ScanError(f"{name}: voxel size {tuple(np.round(zooms, 2))} mm is implausible for MRI")


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) from an affine.

    >>> voxel_sizes(np.diag([1., 1., 3., 1.])).tolist()
    [1.0, 1.0, 3.0]
    """
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --- atomic writes -----------------------------------------------------------------------------
def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files: give the final file the usual permissions (umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return _atomic(path, _w)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
                             + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def _w(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
    return _atomic(path, _w)


def atomic_save_nifti(img: nb.spatialimages.SpatialImage, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: nb.save(img, tmp))


def atomic_write_tsv(df, path: str | Path) -> Path:
    return atomic_write_text(path, df.to_csv(sep="\t", index=False, na_rep="n/a"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def like_image(data: np.ndarray, ref: nb.spatialimages.SpatialImage, *, dtype=None) -> nb.Nifti1Image:
    """A new NIfTI on exactly ``ref``'s grid (shape, affine, qform/sform codes)."""
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    hdr = nb.Nifti1Header()
    out = nb.Nifti1Image(data, ref.affine, hdr)
    try:
        qform, qcode = ref.get_qform(coded=True)
        sform, scode = ref.get_sform(coded=True)
        out.set_qform(ref.affine if qform is None else qform, int(qcode) or 1)
        out.set_sform(ref.affine if sform is None else sform, int(scode) or 1)
    except AttributeError:
        out.set_qform(ref.affine, 1)
        out.set_sform(ref.affine, 1)
    out.header.set_data_dtype(data.dtype)
    out.header.set_xyzt_units("mm")
    return out
