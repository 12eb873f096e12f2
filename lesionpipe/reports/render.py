"""Slices, windows, outlines and PNG encoding for the visit report.

Everything here works on arrays that have been reoriented to RAS+ voxel order (first axis towards
the patient's right, second anterior, third superior), whatever the storage orientation of the file.
Display planes are then cut in radiological convention: the patient's left on the image's right,
anterior (axial) or superior (coronal, sagittal) at the top, and the sagittal face looking left.

Matplotlib is used through ``Figure`` and ``FigureCanvasAgg`` objects only; the global backend is
never touched and every figure is released after it is encoded.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import nibabel as nb
import numpy as np

PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

LESION_COLOUR = "#ffd400"
OTHER_LESION_COLOUR = "#ff8c1a"
MASK_COLOUR = "#19c3ff"
EDGE_COLOUR = "#ff3df5"


# --- orientation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RasGrid:
    """How a stored grid maps onto RAS+ voxel order.

    ``ornt`` is nibabel's orientation array (storage axis -> RAS axis and flip), ``affine`` the
    voxel-to-world affine of the reoriented array, ``zooms`` its voxel sizes in mm (RAS axis order).
    """

    ornt: np.ndarray
    shape: tuple
    affine: np.ndarray
    stored_affine: np.ndarray
    stored_code: str
    obliquity_deg: float

    @property
    def zooms(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def to_ras_index(self, ijk) -> np.ndarray:
        """Voxel coordinates of the stored grid -> voxel coordinates of the RAS array (float)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        m = np.linalg.inv(self.affine) @ self.stored_affine
        return ijk @ m[:3, :3].T + m[:3, 3]


def ras_grid(img) -> RasGrid:
    """Describe the reorientation of ``img``'s grid to RAS+.

    >>> g = ras_grid(nb.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([-1., 1., 3., 1.])))
    >>> g.stored_code, g.shape, g.zooms.tolist()
    ('LAS', (4, 5, 6), [1.0, 1.0, 3.0])
    >>> g.to_ras_index([0, 0, 0]).round(6).tolist()
    [[3.0, 0.0, 0.0]]
    """
    affine = np.asarray(img.affine, dtype=float)
    shape = tuple(int(s) for s in img.shape[:3])
    ornt = nb.orientations.io_orientation(affine)
    new_affine = affine @ nb.orientations.inv_ornt_aff(ornt, shape)
    new_shape = tuple(int(shape[int(i)]) for i in np.argsort(ornt[:, 0]))
    code = "".join(nb.orientations.aff2axcodes(affine))
    try:
        obl = float(np.degrees(np.max(nb.affines.obliquity(affine))))
    except Exception:  # degenerate affines are rejected earlier; keep the report going regardless
        obl = float("nan")
    return RasGrid(ornt=ornt, shape=new_shape, affine=new_affine, stored_affine=affine,
                   stored_code=code, obliquity_deg=obl)


def to_ras(data: np.ndarray, grid: RasGrid) -> np.ndarray:
    """Reorder a stored-grid 3-D array into RAS+ voxel order (a view where possible)."""
    return nb.orientations.apply_orientation(np.asarray(data), grid.ornt)


def plane_slice(vol_ras: np.ndarray, zooms, plane: str, index: int):
    """Cut one plane from a RAS+ volume in radiological display order.

    Returns ``(array2d, aspect)`` where row 0 is the top of the picture and ``aspect`` is the height
    of one row divided by the width of one column (pass it to ``imshow(aspect=...)``).

    >>> v = np.zeros((4, 5, 3)); v[0, 4, 1] = 1        # patient's far left, most anterior voxel
    >>> s, aspect = plane_slice(v, (1, 2, 3), 'axial', 1)
    >>> s.shape, np.argwhere(s).tolist(), aspect
    ((5, 4), [[0, 3]], 2.0)
    """
    axis = _PLANE_AXIS[plane]
    sl = vol_ras[(slice(None),) * axis + (int(index),)]
    # remaining axes keep their order: axial (x, y), coronal (x, z), sagittal (y, z).
    # transpose -> rows = second axis; flip rows so anterior/superior is up; flip columns so that
    # patient's right (+x) is on the left of the image, and anterior (+y) is on the left in sagittal.
    rest = [a for a in range(3) if a != axis]
    z = np.asarray(zooms, dtype=float)
    return sl.T[::-1, ::-1], float(z[rest[1]] / z[rest[0]])


def radiological_slice(img, *, plane: str = "axial", index: int | None = None,
                       world: tuple | None = None):
    """The 2-D array the report shows for one plane of ``img`` (for checking orientation).

    ``index`` is the slice number along the RAS axis of ``plane``; ``world`` picks the slice through
    a scanner-space point (mm) instead; by default the middle slice. Returns ``(array2d, aspect)``;
    the patient's left is on the right half of ``array2d`` whatever the storage orientation.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    grid = ras_grid(img)
    vol = to_ras(np.asanyarray(img.dataobj).reshape(img.shape[:3]), grid)
    axis = _PLANE_AXIS[plane]
    if world is not None:
        idx = np.linalg.inv(grid.affine) @ np.r_[np.asarray(world, float), 1.0]
        index = int(np.clip(np.rint(idx[axis]), 0, vol.shape[axis] - 1))
    elif index is None:
        index = vol.shape[axis] // 2
    return plane_slice(vol, grid.zooms, plane, index)


# --- intensities -------------------------------------------------------------------------------
def robust_window(data: np.ndarray, mask: np.ndarray | None = None, *, low: float = 1.0,
                  high: float = 99.5) -> tuple[float, float]:
    """Display window from percentiles of the finite voxels inside ``mask`` (all voxels if empty).

    >>> robust_window(np.arange(101.0), low=0, high=100)
    (0.0, 100.0)
    >>> robust_window(np.full(5, 7.0))
    (7.0, 8.0)
    """
    data = np.asarray(data)
    sel = np.isfinite(data)
    if mask is not None and (sel & mask).any():
        sel &= mask
    if not sel.any():
        return 0.0, 1.0
    vals = data[sel]
    if vals.size > 400_000:  # percentiles of a strided sample are indistinguishable on screen
        vals = vals[:: vals.size // 200_000]
    lo, hi = (float(v) for v in np.percentile(vals, [low, high]))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


# --- outlines ----------------------------------------------------------------------------------
def outline_segments(labels2d: np.ndarray) -> np.ndarray:
    """Voxel-edge outline of a label (or boolean) image as line segments in pixel coordinates.

    A segment is drawn on every edge between two pixels with different values when at least one of
    them is non-zero, so touching lesions keep a border between them. Returns an ``(n, 2, 2)`` array
    of ``((x0, y0), (x1, y1))`` with pixel ``(r, c)`` spanning ``c +- 0.5``, ``r +- 0.5``.

    >>> outline_segments(np.array([[0, 0], [0, 1]])).shape     # one pixel: four edges
    (4, 2, 2)
    """
    lab = np.asarray(labels2d)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    p = np.pad(lab, 1)
    # vertical edges at x = c - 0.5 between columns c-1 and c (c = 0..C)
    dv = p[1:-1, 1:] != p[1:-1, :-1]
    r, c = np.nonzero(dv)
    vert = np.stack([np.stack([c - 0.5, r - 0.5], 1), np.stack([c - 0.5, r + 0.5], 1)], 1)
    # horizontal edges at y = r - 0.5 between rows r-1 and r (r = 0..R)
    dh = p[1:, 1:-1] != p[:-1, 1:-1]
    r, c = np.nonzero(dh)
    horiz = np.stack([np.stack([c - 0.5, r - 0.5], 1), np.stack([c + 0.5, r - 0.5], 1)], 1)
    return np.concatenate([vert, horiz]).astype(float) if (len(vert) or len(horiz)) else \
        np.zeros((0, 2, 2))


def edge_map(img2d: np.ndarray, mask2d: np.ndarray | None = None) -> np.ndarray:
    """Boolean edges of a slice (Canny, thresholds from quantiles of the gradient)."""
    from skimage.feature import canny

    img2d = np.nan_to_num(np.asarray(img2d, dtype=float))
    if img2d.shape[0] < 3 or img2d.shape[1] < 3 or np.ptp(img2d) == 0:
        return np.zeros(img2d.shape, bool)
    return canny(img2d, sigma=1.2, low_threshold=0.80, high_threshold=0.93, use_quantiles=True)


# --- drawing ------------------------------------------------------------------------------------
def new_figure(width_in: float, height_in: float, *, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


class Board:
    """A figure with one Axes spanning it, in inch units with y pointing down.

    Montages place many image panels on a board instead of creating one Axes per panel, which is
    several times faster in matplotlib. Because the figure is exactly ``width x height`` inches and
    the Axes fills it, a panel's box keeps its proportions: give it the physical (mm) aspect of the
    slice and the voxels are drawn to scale.
    """

    def __init__(self, width: float, height: float, *, dpi: int):
        self.width, self.height = float(width), float(height)
        self.fig = new_figure(self.width, self.height, dpi=dpi)
        ax = self.fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(0, self.width)
        ax.set_ylim(self.height, 0)
        ax.set_autoscale_on(False)
        self.ax = ax

    def panel(self, x0: float, y0: float, w: float, h: float, shape) -> "Panel":
        return Panel(self, x0, y0, w, h, shape)

    def text(self, x: float, y: float, text: str, *, size: float = 8, colour: str = "#dddddd",
             ha: str = "center", va: str = "center") -> None:
        self.ax.text(x, y, text, color=colour, fontsize=size, ha=ha, va=va)

    def png(self) -> bytes:
        """Render to PNG and drop the figure (a board draws once; pyplot never knew about it)."""
        try:
            return figure_png(self.fig)
        finally:
            self.fig = self.ax = None


class Panel:
    """A box on a :class:`Board` showing 2-D arrays of one ``shape`` (rows, columns) in pixel
    coordinates: pixel ``(r, c)`` covers ``c +- 0.5``, ``r +- 0.5``."""

    def __init__(self, board: Board, x0, y0, w, h, shape):
        from matplotlib.patches import Rectangle

        self.board, self.ax = board, board.ax
        self.x0, self.y0, self.w, self.h = float(x0), float(y0), float(w), float(h)
        self.shape = (int(shape[0]), int(shape[1]))
        self.sx = self.w / max(self.shape[1], 1)
        self.sy = self.h / max(self.shape[0], 1)
        self.clip = Rectangle((self.x0, self.y0), self.w, self.h, transform=self.ax.transData)

    def xy(self, c, r):
        """Board coordinates of pixel coordinates (arrays allowed)."""
        return self.x0 + (np.asarray(c) + 0.5) * self.sx, self.y0 + (np.asarray(r) + 0.5) * self.sy

    def _extent(self):
        return (self.x0, self.x0 + self.w, self.y0 + self.h, self.y0)

    def image(self, arr2d, window, *, cmap: str = "gray") -> None:
        arr = np.nan_to_num(np.asarray(arr2d, dtype=np.float32), nan=window[0])
        im = self.ax.imshow(arr, cmap=cmap, vmin=window[0], vmax=window[1], extent=self._extent(),
                            aspect="auto", interpolation="nearest", origin="upper")
        im.set_clip_path(self.clip)

    def rgba(self, rgba) -> None:
        im = self.ax.imshow(rgba, extent=self._extent(), aspect="auto", interpolation="nearest",
                            origin="upper")
        im.set_clip_path(self.clip)

    def outline(self, labels2d, *, colour, lw: float = 1.0, linestyle="solid",
                alpha: float = 1.0) -> None:
        from matplotlib.patches import PathPatch
        from matplotlib.path import Path

        segs = outline_segments(labels2d)
        if not len(segs):
            return
        x, y = self.xy(segs[..., 0], segs[..., 1])
        # one compound path (move-to, line-to per edge) draws far faster than a collection
        verts = np.stack([x, y], axis=-1).reshape(-1, 2)
        codes = np.tile(np.array([Path.MOVETO, Path.LINETO], dtype=Path.code_type), len(segs))
        patch = PathPatch(Path(verts, codes), fill=False, edgecolor=colour, linewidth=lw,
                          linestyle=linestyle, alpha=alpha, capstyle="butt",
                          transform=self.ax.transData)
        patch.set_clip_path(self.clip)
        self.ax.add_artist(patch)  # not add_patch: data limits are fixed, skip their update

    def label(self, c, r, text: str, *, colour: str = LESION_COLOUR, size: float = 9) -> None:
        """A number with a dark halo, its lower-left corner at pixel ``(r, c)``."""
        from matplotlib import patheffects

        x, y = self.xy(c, r)
        t = self.ax.text(float(x), float(y), text, color=colour, fontsize=size,
                         fontweight="bold", ha="left", va="bottom",
                         path_effects=[patheffects.withStroke(linewidth=2.2, foreground="black")])
        t.set_clip_path(self.clip)

    def note(self, text: str, *, where: str = "bottom", size: float = 7,
             colour: str = "#bbbbbb") -> None:
        pad = 0.04
        if where == "top":
            x, y, ha, va = self.x0 + self.w / 2, self.y0 + pad, "center", "top"
        else:
            x, y, ha, va = self.x0 + pad, self.y0 + self.h - pad, "left", "bottom"
        self.ax.text(x, y, text, color=colour, fontsize=size, ha=ha, va=va)

    def side_letters(self, plane: str, *, size: float = 7) -> None:
        """R/L (A/P on sagittal slices) at the left and right edges, radiological convention."""
        left, right = ("A", "P") if plane == "sagittal" else ("R", "L")
        ym = self.y0 + self.h / 2
        for x, t, ha in ((self.x0 + 0.03, left, "left"), (self.x0 + self.w - 0.03, right, "right")):
            self.ax.text(x, ym, t, color="#d0d0d0", fontsize=size, ha=ha, va="center",
                         fontweight="bold")


def figure_png(fig, *, colours: int = 256) -> bytes:
    """Render a figure to PNG bytes (palette-quantised to keep the page small)."""
    from PIL import Image

    # ``Figure`` objects made by ``new_figure`` are not registered with pyplot, so there is no
    # window or global state to close: the figure is freed when the caller drops it.
    fig.canvas.draw()
    im = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    if colours:
        im = im.quantize(colors=colours, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
