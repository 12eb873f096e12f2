"""Read one visit's pipeline outputs (docs/outputs.md) for the review app.

Images are served reoriented to RAS for display; every coordinate the app stores is in the
voxel grid of the post-contrast input (the contract's grid). :class:`DisplayGrid` converts
between the two.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

COUNT_COLUMNS = ["participant_id", "session_id", "week", "gel_count", "gel_volume_mm3", "has_pre",
                 "status", "error"]
LESION_COLUMNS = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
                  "centroid_i", "centroid_j", "centroid_k", "mean_enhancement_pct",
                  "peak_enhancement_pct"]
#: volume kinds the viewer may request (nothing else is ever opened from a request)
VOLUME_KINDS = ("post", "pre", "sub", "enh", "labels", "brain")


class OutputError(ValueError):
    """A pipeline output that is missing or malformed (message names the file)."""


def safe_path(root: str | Path, relative: str | Path) -> Path:
    """``root/relative`` resolved, refusing anything that ends up outside ``root``.

    >>> safe_path('/data/out', 'sub-01/x.nii.gz').as_posix()
    '/data/out/sub-01/x.nii.gz'
    >>> safe_path('/data/out', '../etc/passwd')
    Traceback (most recent call last):
    ...
    PermissionError: path '../etc/passwd' is outside the output folder
    >>> safe_path('/data/out', '/etc/passwd')
    Traceback (most recent call last):
    ...
    PermissionError: path '/etc/passwd' is outside the output folder
    """
    root_r = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute() or "\x00" in str(relative):
        raise PermissionError(f"path {str(relative)!r} is outside the output folder")
    full = (root_r / rel).resolve()
    if full != root_r and root_r not in full.parents:
        raise PermissionError(f"path {str(relative)!r} is outside the output folder")
    return full


def read_counts(output_dir: str | Path) -> pd.DataFrame:
    """``gel_counts.tsv`` as strings, checked for the contract's columns."""
    path = Path(output_dir) / "gel_counts.tsv"
    if not path.is_file():
        raise OutputError(f"{path}: not found; is this a lesionpipe OUTPUT_DIR?")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in COUNT_COLUMNS if c not in df.columns]
    if missing:
        raise OutputError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


_LABEL = re.compile(r"^(sub|ses)-[A-Za-z0-9]+$")


def reviewable_visits(output_dir: str | Path) -> list[tuple[str, str]]:
    """(participant_id, session_id) of every visit the pipeline finished (status ``ok``)."""
    df = read_counts(output_dir)
    out = []
    for r in df.itertuples():
        if r.status != "ok":
            continue
        if not (_LABEL.match(r.participant_id) and r.participant_id.startswith("sub-")
                and _LABEL.match(r.session_id) and r.session_id.startswith("ses-")):
            raise OutputError(f"{Path(output_dir) / 'gel_counts.tsv'}: invalid BIDS labels "
                              f"{r.participant_id!r}/{r.session_id!r}")
        out.append((r.participant_id, r.session_id))
    return out


@dataclass(frozen=True)
class VisitFiles:
    """Paths of one visit's outputs, by the names of docs/outputs.md."""

    output_dir: Path
    participant_id: str
    session_id: str

    def _anat(self, suffix: str) -> Path:
        rel = f"{self.participant_id}/{self.session_id}/anat/{self.participant_id}_{self.session_id}_{suffix}"
        return safe_path(self.output_dir, rel)

    @property
    def post(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_desc-preproc_T1w.nii.gz")

    @property
    def pre(self) -> Path:
        return self._anat("space-orig_desc-preproc_T1w.nii.gz")

    @property
    def enhancement(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_desc-enhancement_map.nii.gz")

    @property
    def dseg(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_label-GEL_dseg.nii.gz")

    @property
    def mask(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_label-GEL_mask.nii.gz")

    @property
    def brain(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_desc-brain_mask.nii.gz")

    @property
    def lesions(self) -> Path:
        return self._anat("ce-gadolinium_space-orig_label-GEL_lesions.tsv")

    @property
    def stem(self) -> str:
        return f"{self.participant_id}_{self.session_id}_ce-gadolinium_space-orig"


def read_lesions(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise OutputError(f"{path.name}: lesion table not found")
    df = pd.read_csv(path, sep="\t")
    missing = [c for c in LESION_COLUMNS if c not in df.columns]
    if missing:
        raise OutputError(f"{path.name}: missing column(s) {', '.join(missing)}")
    return df.sort_values("lesion_id").reset_index(drop=True)


class DisplayGrid:
    """Mapping between the original voxel grid and its closest-RAS display orientation.

    >>> aff = np.diag([-1., 1., 2., 1.])
    >>> g = DisplayGrid(aff, (4, 5, 6))
    >>> g.display_shape, g.to_display([0, 1, 2]).tolist(), g.to_original([3, 1, 2]).tolist()
    ((4, 5, 6), [3.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    """

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...]):
        self.affine = np.asarray(affine, float)
        self.shape = tuple(int(s) for s in shape[:3])
        self.ornt = io_orientation(self.affine)
        # display voxel -> original voxel
        self.disp2orig = inv_ornt_aff(self.ornt, self.shape)
        self.orig2disp = np.linalg.inv(self.disp2orig)
        perm = self.ornt[:, 0].astype(int)
        disp_shape = [0, 0, 0]
        for ax in range(3):
            disp_shape[perm[ax]] = self.shape[ax]
        self.display_shape = tuple(disp_shape)
        disp_aff = self.affine @ self.disp2orig
        self.display_spacing = tuple(float(v) for v in np.sqrt((disp_aff[:3, :3] ** 2).sum(0)))

    def array(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(data, self.ornt))

    def to_display(self, ijk) -> np.ndarray:
        v = np.asarray(ijk, float)
        return (self.orig2disp[:3, :3] @ v.T).T + self.orig2disp[:3, 3]

    def to_original(self, ijk) -> np.ndarray:
        v = np.asarray(ijk, float)
        return (self.disp2orig[:3, :3] @ v.T).T + self.disp2orig[:3, 3]

    def world(self, ijk) -> np.ndarray:
        v = np.asarray(ijk, float)
        return (self.affine[:3, :3] @ v.T).T + self.affine[:3, 3]


def _load(path: Path, *, what: str, ref: nb.Nifti1Image | None = None) -> nb.Nifti1Image:
    if not path.is_file():
        raise OutputError(f"{path.name}: {what} not found")
    try:
        img = nb.load(str(path))
    except Exception as exc:
        raise OutputError(f"{path.name}: cannot read {what} ({type(exc).__name__})") from None
    if len(img.shape) != 3:
        raise OutputError(f"{path.name}: {what} is {len(img.shape)}-D; expected 3-D")
    if ref is not None and (img.shape != ref.shape or not np.allclose(img.affine, ref.affine,
                                                                      atol=1e-3)):
        raise OutputError(f"{path.name}: {what} is not on the post-contrast grid "
                          f"(shape {img.shape} vs {ref.shape})")
    return img


class VisitData:
    """The images and lesion table of one visit, loaded once (cached by :class:`VisitCache`)."""

    def __init__(self, files: VisitFiles):
        self.files = files
        post = _load(files.post, what="post-contrast image")
        self.post_img = post
        self.grid = DisplayGrid(post.affine, post.shape)
        self.affine = post.affine
        self.shape = post.shape
        self.post = np.asarray(post.get_fdata(dtype=np.float32))
        self.has_pre = files.pre.is_file()
        self.pre = (np.asarray(_load(files.pre, what="pre-contrast image", ref=post)
                               .get_fdata(dtype=np.float32)) if self.has_pre else None)
        self.enh = np.asarray(_load(files.enhancement, what="enhancement map", ref=post)
                              .get_fdata(dtype=np.float32))
        self.dseg = np.asarray(_load(files.dseg, what="lesion labels", ref=post).dataobj
                               ).astype(np.int32)
        self.brain = (np.asarray(_load(files.brain, what="brain mask", ref=post).dataobj) > 0
                      if files.brain.is_file() else None)
        self.lesions = read_lesions(files.lesions)
        ids = set(int(v) for v in np.unique(self.dseg) if v > 0)
        table_ids = set(int(v) for v in self.lesions["lesion_id"])
        if ids - table_ids:
            raise OutputError(f"{files.dseg.name}: label(s) {sorted(ids - table_ids)[:5]} have "
                              f"no row in {files.lesions.name}")
        self.voxel_volume = float(abs(np.linalg.det(self.affine[:3, :3])))
        for name in ("post", "pre", "enh"):
            arr = getattr(self, name)
            if arr is not None:
                setattr(self, name, np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0))
        self._display: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    @property
    def lesion_ids(self) -> list[int]:
        return [int(v) for v in self.lesions["lesion_id"]]

    def volume_array(self, kind: str) -> np.ndarray | None:
        if kind == "post":
            return self.post
        if kind == "pre":
            return self.pre
        if kind == "sub":
            return None if self.pre is None else self.post - self.pre
        if kind == "enh":
            return self.enh
        if kind == "labels":
            return self.dseg
        if kind == "brain":
            return None if self.brain is None else self.brain.astype(np.int16)
        raise KeyError(kind)

    def display_bytes(self, kind: str) -> tuple[bytes, float]:
        """Little-endian int16 bytes of a volume in display (RAS) order, x fastest; and its scale.

        Intensity = stored value x scale.
        """
        with self._lock:
            if kind in self._display:
                return self._display[kind]
            arr = self.volume_array(kind)
            if arr is None:
                raise KeyError(kind)
            disp = self.grid.array(arr)
            if kind in ("labels", "brain"):
                if disp.max() > 32767:
                    raise OutputError(f"{self.files.dseg.name}: more than 32767 lesions")
                scale, q = 1.0, disp.astype("<i2")
            else:
                peak = float(np.abs(disp).max()) or 1.0
                scale = peak / 30000.0
                q = np.round(disp / scale).astype("<i2")
            # x fastest: Fortran order of the (x, y, z) array
            out = (q.tobytes(order="F"), scale)
            self._display[kind] = out
            return out

    def default_window(self, kind: str) -> tuple[float, float]:
        """(low, high) display window from robust percentiles inside the brain."""
        arr = self.volume_array(kind)
        vals = arr[self.brain] if self.brain is not None and self.brain.any() else arr.ravel()
        if kind in ("sub", "enh"):
            hi = float(np.percentile(vals, 99.9)) or 1.0
            return (-0.25 * hi, hi)
        lo, hi = np.percentile(vals, [0.5, 99.8])
        return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


class VisitCache:
    """A small LRU of loaded visits (the viewer asks for several volumes per visit)."""

    def __init__(self, output_dir: Path, size: int = 4):
        self.output_dir = Path(output_dir)
        self.size = size
        self._items: OrderedDict[tuple[str, str], VisitData] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, participant_id: str, session_id: str) -> VisitData:
        key = (participant_id, session_id)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = VisitData(VisitFiles(self.output_dir, participant_id, session_id))
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data
