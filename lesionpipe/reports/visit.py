"""The per-visit HTML QA report: one self-contained page, no network, no scripts.

The page shows the GEL count and total volume, the lesion table, a numbered gallery of every lesion
(up to a cap), an overview montage of axial slices with all outlines, the pre/post registration check,
the brain-mask check and a table of facts (settings, versions, timing, warnings). Images are PNGs
embedded as base64 ``data:`` URIs and a Content-Security-Policy forbids the page from loading
anything else, so it can be e-mailed or archived and opened anywhere offline.

The report only receives what it shows. It is also defensive: fact keys that name a treatment arm,
randomisation or a personal detail (name, birth date, sex, ...) are dropped before rendering.
"""

from __future__ import annotations

import html
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from lesionpipe import __version__
from lesionpipe.imageio import atomic_write_text
from lesionpipe.reports import render as R

log = logging.getLogger("lesionpipe")

#: Fact keys containing one of these words (split on ``_``, ``-``, spaces, dots) are never shown.
BLOCKED_FACT_WORDS = frozenset({
    "arm", "arms", "treatment", "treatments", "allocation", "allocated", "randomisation",
    "randomization", "randomised", "randomized", "placebo", "drug", "dose", "dosage", "blinding",
    "unblinded", "patient", "name", "names", "birth", "birthdate", "dob", "date", "dates", "age",
    "sex", "gender", "mrn", "accession", "dicom", "institution", "address", "phone", "weight",
    "height", "initials", "study_date", "acquisitiondatetime",
})

_REQUIRED_COLUMNS = ("lesion_id", "volume_mm3")


@dataclass
class _Lesion:
    lesion_id: int
    row: dict
    centroid_ras: np.ndarray | None  # float voxel coordinates in the RAS array
    present: bool


@dataclass
class _Visit:
    grid: R.RasGrid
    post: np.ndarray
    pre: np.ndarray | None
    enh: np.ndarray | None
    labels: np.ndarray
    mask: np.ndarray
    lesions: list
    post_win: tuple
    pre_win: tuple | None
    enh_win: tuple | None
    notes: list = field(default_factory=list)

    @property
    def zooms(self):
        return self.grid.zooms


# --- public entry point ------------------------------------------------------------------------
def write_visit_report(out_html, *, post_img, labels_img, brain_mask_img, lesion_table, pre_img=None,
                       enhancement_img=None, title="", facts=None, max_gallery: int = 40,
                       overview_slices: int = 16, dpi: int = 90) -> Path:
    """Write the self-contained QA report of one visit and return its path.

    Parameters
    ----------
    out_html : path of the HTML file (written atomically; parent folders are created).
    post_img : post-contrast image (normalised, NAWM ~ 100) on the post-contrast grid.
    labels_img : integer instance labels on the same grid; value k is ``lesion_id`` k.
    brain_mask_img : binary brain mask on the same grid.
    lesion_table : DataFrame with ``lesion_id``, ``volume_mm3`` and, when available, ``n_voxels``,
        ``centroid_x/y/z``, ``centroid_i/j/k``, ``mean_enhancement_pct``, ``peak_enhancement_pct``.
    pre_img : pre-contrast image registered onto the post grid, or None (post-only visit).
    enhancement_img : enhancement map (%) on the same grid, or None.
    title : page title, e.g. ``"sub-01 ses-w04"`` (participant/session labels only).
    facts : mapping of things to list in the facts table (nested mappings become sub-tables).
    max_gallery : at most this many lesions get a gallery entry; the rest are counted as omitted.
    overview_slices : number of axial slices in the overview montage.
    dpi : resolution of the embedded figures.
    """
    out_html = Path(out_html)
    visit = _prepare(post_img=post_img, pre_img=pre_img, labels_img=labels_img,
                     brain_mask_img=brain_mask_img, enhancement_img=enhancement_img,
                     lesion_table=lesion_table)
    facts, dropped = filter_facts(dict(facts or {}))
    if dropped:
        log.warning("visit report: fact(s) %s not shown (they may identify a participant or reveal "
                    "the treatment arm)", ", ".join(sorted(dropped)))
    sections = [
        _section_header(visit, title, facts),
        _section_table(visit),
        _section_gallery(visit, max_gallery=max_gallery, dpi=dpi),
        _section_overview(visit, n_slices=overview_slices, dpi=dpi),
        _section_registration(visit, facts, dpi=dpi),
        _section_mask(visit, dpi=dpi),
        _section_facts(visit, facts),
    ]
    page = _page(title, sections)
    atomic_write_text(out_html, page)
    return out_html


# --- input checks and preparation --------------------------------------------------------------
def _array3d(img, role: str, dtype=np.float32) -> np.ndarray:
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"visit report: {role} is {len(img.shape)}-D {tuple(img.shape)}; "
                         f"expected one 3-D volume")
    return np.asanyarray(img.dataobj).reshape(shape).astype(dtype, copy=False)


def _check_grid(img, ref, role: str) -> None:
    if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
        raise ValueError(f"visit report: {role} shape {tuple(img.shape[:3])} differs from the "
                         f"post-contrast grid {tuple(ref.shape[:3])}")
    if not np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3):
        raise ValueError(f"visit report: {role} affine differs from the post-contrast affine "
                         f"(images must share the post-contrast grid)")


def _prepare(*, post_img, pre_img, labels_img, brain_mask_img, enhancement_img, lesion_table):
    import pandas as pd

    for role, img in (("labels_img", labels_img), ("brain_mask_img", brain_mask_img),
                      ("pre_img", pre_img), ("enhancement_img", enhancement_img)):
        if img is not None:
            _check_grid(img, post_img, role)
    if not isinstance(lesion_table, pd.DataFrame):
        raise TypeError("visit report: lesion_table must be a pandas DataFrame")
    missing = [c for c in _REQUIRED_COLUMNS if c not in lesion_table.columns]
    if missing:
        raise ValueError(f"visit report: lesion table lacks column(s) {', '.join(missing)}")

    grid = R.ras_grid(post_img)
    post = R.to_ras(_array3d(post_img, "post_img"), grid)
    pre = None if pre_img is None else R.to_ras(_array3d(pre_img, "pre_img"), grid)
    enh = None if enhancement_img is None else R.to_ras(
        _array3d(enhancement_img, "enhancement_img"), grid)
    lab = _array3d(labels_img, "labels_img", dtype=np.float64)
    lab = np.rint(np.nan_to_num(lab, nan=0.0)).astype(np.int32)
    labels = R.to_ras(lab, grid)
    m = _array3d(brain_mask_img, "brain_mask_img", dtype=np.float32)
    mask = R.to_ras(np.nan_to_num(m, nan=0.0) > 0, grid)

    notes = []
    if not mask.any():
        notes.append("The brain mask is empty; display windows use the whole image.")
    table = lesion_table.sort_values("lesion_id", kind="stable").reset_index(drop=True)
    dup = table.lesion_id[table.lesion_id.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"visit report: lesion table repeats lesion_id {_id_list(dup)}")
    ids_in_image = set(np.unique(labels[labels > 0]).tolist())
    lesions = []
    has_ijk = all(c in table.columns for c in ("centroid_i", "centroid_j", "centroid_k"))
    for row in table.to_dict("records"):
        lid = int(row["lesion_id"])
        present = lid in ids_in_image
        cen = None
        ijk = [_num(row.get(c)) for c in ("centroid_i", "centroid_j", "centroid_k")]
        if has_ijk and np.isfinite(ijk).all():
            cen = grid.to_ras_index(ijk)[0]
        elif present:
            cen = np.argwhere(labels == lid).mean(axis=0)
        lesions.append(_Lesion(lid, row, cen, present))
    absent = [le.lesion_id for le in lesions if not le.present]
    if absent:
        notes.append(f"Lesion(s) {_id_list(absent)} of the table have no voxel in the label image.")
    extra = sorted(ids_in_image - {le.lesion_id for le in lesions})
    if extra:
        notes.append(f"Label value(s) {_id_list(extra)} are in the label image but not in the table.")

    post_win = R.robust_window(post, mask)
    lesion_post = post[(labels > 0) & np.isfinite(post)]
    if lesion_post.size:  # keep enhancing lesions brighter than white matter, not clipped with it
        post_win = (post_win[0], max(post_win[1], float(np.percentile(lesion_post, 90))))
    pre_win = None
    if pre is not None:
        # same window as post after matching brain medians, so equal tissue looks equally bright
        sel = mask if mask.any() else np.ones(mask.shape, bool)
        med_post = float(np.nanmedian(post[sel])) if np.isfinite(post[sel]).any() else 0.0
        med_pre = float(np.nanmedian(pre[sel])) if np.isfinite(pre[sel]).any() else 0.0
        if med_post > 0 and med_pre > 0:
            pre_win = (post_win[0] * med_pre / med_post, post_win[1] * med_pre / med_post)
        else:
            pre_win = R.robust_window(pre, mask)
    enh_win = None
    if enh is not None:
        lo, hi = R.robust_window(enh, mask, low=0.5, high=99.9)
        lesion_vals = enh[(labels > 0) & np.isfinite(enh)]
        if lesion_vals.size:
            hi = max(hi, float(np.percentile(lesion_vals, 95)))
        enh_win = (0.0, max(hi, 10.0))
    return _Visit(grid=grid, post=post, pre=pre, enh=enh, labels=labels, mask=mask, lesions=lesions,
                  post_win=post_win, pre_win=pre_win, enh_win=enh_win, notes=notes)


def filter_facts(facts: dict) -> tuple[dict, list]:
    """Drop fact keys that could identify a participant or unblind the reader (recursively).

    >>> filter_facts({'gel_count': 2, 'treatment_arm': 'x', 'settings': {'patient_name': 'y', 'k': 1}})
    ({'gel_count': 2, 'settings': {'k': 1}}, ['settings.patient_name', 'treatment_arm'])
    """
    kept, dropped = {}, []

    def _walk(src, dst, prefix):
        for key, value in src.items():
            words = set(re.split(r"[^a-z0-9]+", str(key).lower())) | {str(key).lower()}
            if words & BLOCKED_FACT_WORDS:
                dropped.append(prefix + str(key))
                continue
            if isinstance(value, dict):
                dst[key] = {}
                _walk(value, dst[key], f"{prefix}{key}.")
            else:
                dst[key] = value

    _walk(facts, kept, "")
    return kept, sorted(dropped)


def _num(v) -> float:
    """``float(v)``, or NaN for anything that is not a number (None, text, missing)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _id_list(ids, limit: int = 12) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# --- geometry helpers --------------------------------------------------------------------------
def _brain_bbox(visit: _Visit, margin_mm: float = 6.0):
    """Bounding box (RAS voxel slices) of the brain mask, or of the non-zero image, plus a margin."""
    src = visit.mask if visit.mask.any() else (np.nan_to_num(visit.post) != 0)
    if not src.any():
        src = np.ones(visit.post.shape, bool)
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(src.any(axis=other))
        pad = int(math.ceil(margin_mm / visit.zooms[ax]))
        out.append(slice(max(idx[0] - pad, 0), min(idx[-1] + pad + 1, src.shape[ax])))
    return tuple(out)


def _crop2d(arr, r0, r1, c0, c1, fill):
    """``arr[r0:r1, c0:c1]`` where out-of-range pixels take ``fill`` (for lesions at the edge)."""
    out = np.full((r1 - r0, c1 - c0), fill, dtype=np.result_type(arr.dtype, np.asarray(fill)))
    rs, re_ = max(r0, 0), min(r1, arr.shape[0])
    cs, ce = max(c0, 0), min(c1, arr.shape[1])
    if rs < re_ and cs < ce:
        out[rs - r0:re_ - r0, cs - c0:ce - c0] = arr[rs:re_, cs:ce]
    return out


def _display_rc(visit: _Visit, plane: str, point_ras) -> tuple[float, float]:
    """Row/column in the radiological display of a RAS voxel coordinate."""
    x, y, z = (float(v) for v in point_ras)
    nx, ny, nz = visit.post.shape
    if plane == "axial":
        return (ny - 1) - y, (nx - 1) - x
    if plane == "coronal":
        return (nz - 1) - z, (nx - 1) - x
    return (nz - 1) - z, (ny - 1) - y


def _fmt(v, nd=1) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if not np.isfinite(f):
        return "n/a"
    return f"{f:.{nd}f}"


# --- sections ----------------------------------------------------------------------------------
def _section_header(visit: _Visit, title: str, facts: dict) -> str:
    n = len(visit.lesions)
    vol = float(np.nansum([float(le.row.get("volume_mm3", np.nan)) for le in visit.lesions])) \
        if n else 0.0
    badges = []
    if visit.pre is None:
        badges.append('<span class="badge warn">post-only visit: no pre-contrast scan</span>')
    else:
        badges.append('<span class="badge">pre- and post-contrast</span>')
    ncc = facts.get("registration_ncc")
    if ncc is not None:
        badges.append(f'<span class="badge">registration NCC {_fmt(ncc, 3)}</span>')
    count_word = "enhancing lesion" if n == 1 else "enhancing lesions"
    none = '<p class="none">No enhancing lesions detected.</p>' if n == 0 else ""
    warnings = facts.get("warnings") or []
    if isinstance(warnings, (str, bytes, dict)) or not hasattr(warnings, "__iter__"):
        warnings = [warnings]
    warnings = list(warnings)
    for key in ("gel_count", "count"):
        if key in facts and _num(facts[key]) != n:
            warnings.append(f"The facts give {key} = {facts[key]} but the lesion table has {n} "
                            f"row{'s' if n != 1 else ''}.")
    warn_html = ""
    if warnings or visit.notes:
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in [*warnings, *visit.notes])
        warn_html = f'<div class="warnbox"><strong>Warnings</strong><ul>{items}</ul></div>'
    return f"""
<header id="summary">
  <h1>{html.escape(title) or "Visit report"}</h1>
  <div class="headline">
    <div class="big"><span class="num" id="gel-count">{n}</span><span
      class="unit">{count_word}</span></div>
    <div class="big"><span class="num" id="gel-volume">{vol:.1f}</span><span
      class="unit">mm&sup3; total GEL volume</span></div>
  </div>
  <p>{" ".join(badges)}</p>
  {none}
  {warn_html}
  <p class="orient">Images are shown in <strong>radiological convention</strong>: the patient's
  <strong>left is on the image's right</strong> (R and L are marked on the panels), anterior at the
  top of axial slices, superior at the top of coronal and sagittal slices, voxels drawn to scale.</p>
  <nav><a href="#lesions">Lesion table</a> &middot; <a href="#gallery">Gallery</a> &middot;
  <a href="#overview">Overview</a> &middot; <a href="#registration">Registration</a> &middot;
  <a href="#brainmask">Brain mask</a> &middot; <a href="#facts">Facts</a></nav>
</header>"""


_TABLE_COLUMNS = [
    ("lesion_id", "Lesion", 0), ("n_voxels", "Voxels", 0), ("volume_mm3", "Volume (mm&sup3;)", 1),
    ("centroid_x", "x (mm)", 1), ("centroid_y", "y (mm)", 1), ("centroid_z", "z (mm)", 1),
    ("centroid_i", "i", 1), ("centroid_j", "j", 1), ("centroid_k", "k", 1),
    ("mean_enhancement_pct", "Mean enh. (%)", 1), ("peak_enhancement_pct", "Peak enh. (%)", 1),
]


def _section_table(visit: _Visit) -> str:
    if not visit.lesions:
        return ('<section id="lesions"><h2>Lesion table</h2>'
                '<p class="none">No enhancing lesions detected.</p></section>')
    cols = [(k, h, nd) for k, h, nd in _TABLE_COLUMNS if k in visit.lesions[0].row]
    head = "".join(f"<th>{h}</th>" for _, h, _ in cols)
    rows = []
    for le in visit.lesions:
        cells = "".join(f"<td>{_fmt(le.row.get(k), nd)}</td>" for k, _, nd in cols)
        rows.append(f'<tr><td><a href="#lesion-{le.lesion_id}">&#9656;</a></td>{cells}</tr>')
    return (f'<section id="lesions"><h2>Lesion table</h2>'
            f'<p class="caption">Centroids: x, y, z in scanner (world) mm; i, j, k in voxels of the '
            f'post-contrast grid as stored. Enhancement is relative to normal-appearing white '
            f'matter.</p>'
            f'<div class="scroll"><table class="lesions"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _gallery_png(visit: _Visit, le: _Lesion, *, dpi: int) -> tuple[bytes, int]:
    zx, zy, zz = visit.zooms
    nz = visit.post.shape[2]
    lesion_vox = visit.labels == le.lesion_id if le.present else None
    cen = le.centroid_ras
    if cen is None:
        cen = np.array(visit.post.shape, float) / 2
    k = int(np.clip(np.rint(cen[2]), 0, nz - 1))
    if lesion_vox is not None:
        zs = np.flatnonzero(lesion_vox.any(axis=(0, 1)))
        if k not in zs:
            k = int(zs[np.argmin(np.abs(zs - cen[2]))])
    lab2d, aspect = R.plane_slice(visit.labels, visit.zooms, "axial", k)
    r_c, c_c = _display_rc(visit, "axial", cen)
    target = lab2d == le.lesion_id
    if target.any():  # centre on the visible cross-section, size to the lesion's extent
        rr, cc = np.nonzero(target)
        r_c, c_c = (rr.min() + rr.max()) / 2, (cc.min() + cc.max()) / 2
        ext_mm = max((rr.max() - rr.min() + 1) * zy, (cc.max() - cc.min() + 1) * zx)
    else:
        ext_mm = 0.0
    half_mm = max(22.0, 0.5 * ext_mm + 12.0)
    hr, hc = int(math.ceil(half_mm / zy)), int(math.ceil(half_mm / zx))
    r0, c0 = int(round(r_c)) - hr, int(round(c_c)) - hc
    r1, c1 = r0 + 2 * hr + 1, c0 + 2 * hc + 1

    panels = [("post", visit.post, visit.post_win, "gray")]
    if visit.pre is not None:
        panels.append(("pre", visit.pre, visit.pre_win, "gray"))
    if visit.enh is not None:
        panels.append(("enhancement %", visit.enh, visit.enh_win, "magma"))
    lab_c = _crop2d(lab2d, r0, r1, c0, c1, 0)
    tgt_c = lab_c == le.lesion_id
    other_c = np.where(tgt_c, 0, lab_c)
    w, gap, title_h = 2.0, 0.04, 0.22
    h = w * ((r1 - r0) * zy) / ((c1 - c0) * zx)
    board = R.Board(len(panels) * w + (len(panels) - 1) * gap, h + title_h, dpi=dpi)
    for p, (name, vol, win, cmap) in enumerate(panels):
        x0 = p * (w + gap)
        pan = board.panel(x0, title_h, w, h, tgt_c.shape)
        img2d, _ = R.plane_slice(vol, visit.zooms, "axial", k)
        pan.image(_crop2d(img2d.astype(np.float32), r0, r1, c0, c1, np.nan), win, cmap=cmap)
        pan.outline(other_c, colour=R.OTHER_LESION_COLOUR, lw=0.8, linestyle=(0, (2, 2)))
        pan.outline(tgt_c, colour=R.MASK_COLOUR if cmap != "gray" else R.LESION_COLOUR, lw=1.1)
        if tgt_c.any():
            rr, cc = np.nonzero(tgt_c)
            pan.label(cc.max() + 0.5, rr.min() - 0.5, str(le.lesion_id), size=10)
        board.text(x0 + w / 2, title_h / 2, name)
        if p == 0:
            pan.side_letters("axial")
    return board.png(), k


def _section_gallery(visit: _Visit, *, max_gallery: int, dpi: int) -> str:
    if not visit.lesions:
        return ('<section id="gallery"><h2>Lesion gallery</h2>'
                '<p class="none">No enhancing lesions detected.</p></section>')
    shown = visit.lesions[:max(int(max_gallery), 0)]
    omitted = len(visit.lesions) - len(shown)
    entries = []
    world = visit.grid.affine
    for le in shown:
        png, k = _gallery_png(visit, le, dpi=dpi)
        cx, cy = (le.centroid_ras[:2] if le.centroid_ras is not None
                  else (np.array(visit.post.shape[:2]) - 1) / 2.0)
        zmm = float((world @ np.r_[cx, cy, k, 1.0])[2])
        row = le.row
        enh = ""
        if "mean_enhancement_pct" in row or "peak_enhancement_pct" in row:
            enh = (f"; enhancement mean {_fmt(row.get('mean_enhancement_pct'), 0)} %, "
                   f"peak {_fmt(row.get('peak_enhancement_pct'), 0)} %")
        missing = "" if le.present else " <em>(not found in the label image)</em>"
        entries.append(
            f'<figure class="lesion" id="lesion-{le.lesion_id}" data-lesion-id="{le.lesion_id}">'
            f'<img alt="Lesion {le.lesion_id}" src="{R.png_data_uri(png)}">'
            f'<figcaption><strong>Lesion {le.lesion_id}</strong>{missing}: '
            f'{_fmt(row.get("volume_mm3"), 1)} mm&sup3;{enh}; axial slice at z&nbsp;=&nbsp;'
            f'{_fmt(zmm, 1)}&nbsp;mm</figcaption></figure>')
    note = ""
    if omitted:
        after = f"(those after lesion {shown[-1].lesion_id} in the table) " if shown else ""
        note = (f'<p class="note">{omitted} {"more " if shown else ""}lesion'
                f'{"s" if omitted != 1 else ""} {after}'
                f'{"are" if omitted != 1 else "is"} not shown here to keep the page small; '
                f'{"they are" if omitted != 1 else "it is"} outlined and numbered in the overview.'
                f'</p>')
    return (f'<section id="gallery"><h2>Lesion gallery</h2>'
            f'<p class="caption">Axial crop through each lesion\'s centroid (post-contrast'
            f'{", pre-contrast" if visit.pre is not None else ""}'
            f'{", enhancement map" if visit.enh is not None else ""}). The lesion is outlined and '
            f'numbered as in the table; other lesions in the crop are dashed orange.</p>{note}'
            f'<div class="gallery">{"".join(entries)}</div></section>')


def _pick_slices(lo: int, hi: int, n: int) -> np.ndarray:
    """``n`` slice indices spread over ``lo..hi`` (inclusive), all of them when there are fewer.

    >>> _pick_slices(0, 5, 10).tolist(), _pick_slices(0, 99, 4).tolist()
    ([0, 1, 2, 3, 4, 5], [20, 40, 59, 79])
    """
    if hi - lo + 1 <= n:
        return np.arange(lo, hi + 1)
    return np.unique(np.rint(np.linspace(lo, hi, n + 2)[1:-1]).astype(int))


def _section_overview(visit: _Visit, *, n_slices: int, dpi: int) -> str:
    bb = _brain_bbox(visit, margin_mm=4.0)
    src = visit.mask if visit.mask.any() else None
    if src is not None:
        zs = np.flatnonzero(src.any(axis=(0, 1)))
        zlo, zhi = int(zs[0]), int(zs[-1])
    else:
        zlo, zhi = bb[2].start, bb[2].stop - 1
    picks = _pick_slices(zlo, zhi, max(int(n_slices), 1))
    bounds = np.r_[-np.inf, (picks[:-1] + picks[1:]) / 2.0, np.inf]
    zx, zy, _ = visit.zooms
    # in-plane crop (display rows come from y, columns from x, both flipped)
    nx, ny, _nz = visit.post.shape
    r0, r1 = ny - bb[1].stop, ny - bb[1].start
    c0, c1 = nx - bb[0].stop, nx - bb[0].start
    ncol = min(4, len(picks))
    nrow = int(math.ceil(len(picks) / ncol))
    w = 3.0
    h = w * ((r1 - r0) * zy) / ((c1 - c0) * zx)
    board = R.Board(w * ncol, h * nrow, dpi=dpi)
    for n, k in enumerate(picks):
        pan = board.panel((n % ncol) * w, (n // ncol) * h, w, h, (r1 - r0, c1 - c0))
        img2d, _ = R.plane_slice(visit.post, visit.zooms, "axial", k)
        pan.image(img2d[r0:r1, c0:c1], visit.post_win)
        m2d, _ = R.plane_slice(visit.mask, visit.zooms, "axial", k)
        pan.outline(m2d[r0:r1, c0:c1], colour=R.MASK_COLOUR, lw=0.6, alpha=0.8)
        lab2d, _ = R.plane_slice(visit.labels, visit.zooms, "axial", k)
        lab_c = lab2d[r0:r1, c0:c1]
        pan.outline(lab_c, colour=R.LESION_COLOUR, lw=1.0)
        # lesions inside this panel's slab that miss the displayed slice: dashed projection
        nz = visit.labels.shape[2]
        s0 = 0 if n == 0 else int(math.ceil(bounds[n]))
        s1 = nz if n == len(picks) - 1 else int(math.ceil(bounds[n + 1]))
        slab = visit.labels[:, :, s0:s1]
        in_slab = set(np.unique(slab[slab > 0]).tolist()) - set(np.unique(lab_c[lab_c > 0]).tolist())
        if in_slab:
            proj = np.isin(slab, list(in_slab)).any(axis=2)
            p2d, _ = R.plane_slice(proj[:, :, None], visit.zooms, "axial", 0)
            pan.outline(p2d[r0:r1, c0:c1], colour=R.LESION_COLOUR, lw=0.8,
                        linestyle=(0, (1.5, 1.5)))
        # number every lesion drawn in this panel next to its outline
        numbered = lab_c.copy()
        if in_slab:
            numbered = np.where((numbered == 0) & p2d[r0:r1, c0:c1],
                                _slab_ids(slab, in_slab, visit)[r0:r1, c0:c1], numbered)
        for lid, box in enumerate(ndimage.find_objects(numbered), start=1):
            if box is not None:
                pan.label(box[1].stop - 0.5, box[0].start - 0.5, str(lid), size=8)
        zmm = float((visit.grid.affine @ np.r_[(nx - 1) / 2.0, (ny - 1) / 2.0, k, 1.0])[2])
        pan.note(f"z {zmm:.0f} mm")
        pan.side_letters("axial")
    png = board.png()
    return (f'<section id="overview"><h2>Overview</h2>'
            f'<p class="caption">{len(picks)} axial post-contrast slices spanning the brain. '
            f'Yellow: lesion outlines on the displayed slice (dotted: a lesion lying between this '
            f'slice and the neighbouring panels, projected), numbered as in the table. '
            f'Blue: brain mask.</p>'
            f'<img class="wide" alt="Overview of axial slices" src="{R.png_data_uri(png)}">'
            f'</section>')


def _slab_ids(slab, ids, visit):
    """Display-plane image of the (largest) label id among ``ids`` found through a slab."""
    masked = np.where(np.isin(slab, list(ids)), slab, 0).max(axis=2)
    out, _ = R.plane_slice(masked[:, :, None], visit.zooms, "axial", 0)
    return out


def _ortho_centre(visit: _Visit) -> np.ndarray:
    """Centre of mass of the brain mask (RAS voxel indices), or the grid centre."""
    if not visit.mask.any():
        return np.array(visit.post.shape) // 2
    centre = []
    for ax in range(3):
        w = visit.mask.sum(axis=tuple(a for a in range(3) if a != ax), dtype=np.int64)
        centre.append(int(round(float((np.arange(w.size) * w).sum() / w.sum()))))
    return np.array(centre)


def _ortho_views(visit: _Visit, centre, bb):
    """(plane, index, crop) for the three orthogonal planes through ``centre``, cropped to ``bb``."""
    nx, ny, nz = visit.post.shape
    crops = {
        "axial": (ny - bb[1].stop, ny - bb[1].start, nx - bb[0].stop, nx - bb[0].start),
        "coronal": (nz - bb[2].stop, nz - bb[2].start, nx - bb[0].stop, nx - bb[0].start),
        "sagittal": (nz - bb[2].stop, nz - bb[2].start, ny - bb[1].stop, ny - bb[1].start),
    }
    return [(p, int(centre[R._PLANE_AXIS[p]]), crops[p]) for p in R.PLANES]


def _usable(visit: _Visit, views) -> tuple[list, str]:
    """Drop views that would be slivers (a grid with only a few slices), with a note saying so."""
    keep, dropped = [], []
    for v in views:
        plane, _, crop = v
        if crop[1] - crop[0] >= 3 and _phys_aspect(visit, plane, crop) >= 0.08:
            keep.append(v)
        elif plane not in dropped:
            dropped.append(plane)
    note = ""
    if dropped:
        note = (f" {' and '.join(dropped).capitalize()} view{'s' if len(dropped) > 1 else ''} "
                f"omitted: the volume has only {visit.post.shape[2]} axial slice"
                f"{'s' if visit.post.shape[2] != 1 else ''}.")
    return keep, note


def _phys_aspect(visit: _Visit, plane: str, crop) -> float:
    """Height/width in mm of a cropped display plane."""
    zx, zy, zz = visit.zooms
    rows_mm, cols_mm = {"axial": (zy, zx), "coronal": (zz, zx), "sagittal": (zz, zy)}[plane]
    return ((crop[1] - crop[0]) * rows_mm) / ((crop[3] - crop[2]) * cols_mm)


def _section_registration(visit: _Visit, facts: dict, *, dpi: int) -> str:
    if visit.pre is None:
        return ('<section id="registration"><h2>Registration check</h2>'
                '<p class="note">Post-only visit: there is no pre-contrast scan, so there is no '
                'registration to check. Lesions were found on the post-contrast image alone.</p>'
                '</section>')
    bb = _brain_bbox(visit)
    views = _ortho_views(visit, _ortho_centre(visit), bb)
    others, dropped_note = _usable(visit, views[1:])
    views = views[:1] + others
    w, gap, title_h = 3.0, 0.03, 0.22
    heights = [w * _phys_aspect(visit, p, c) for p, _, c in views]
    board = R.Board(3 * w + 2 * gap, sum(heights) + gap * (len(heights) - 1) + title_h, dpi=dpi)
    for col, name in enumerate(("pre-contrast", "post-contrast", "pre edges on post")):
        board.text(col * (w + gap) + w / 2, title_h / 2, name, size=9)
    y = title_h
    for (plane, idx, (r0, r1, c0, c1)), hgt in zip(views, heights):
        pre2d, _ = R.plane_slice(visit.pre, visit.zooms, plane, idx)
        post2d, _ = R.plane_slice(visit.post, visit.zooms, plane, idx)
        pre_c, post_c = pre2d[r0:r1, c0:c1], post2d[r0:r1, c0:c1]
        edges = R.edge_map(np.clip(np.nan_to_num(pre_c, nan=visit.pre_win[0]), *visit.pre_win))
        rgba = np.zeros(edges.shape + (4,), np.float32)
        rgba[edges] = (1.0, 0.24, 0.96, 0.95)
        for col, (arr, win) in enumerate(((pre_c, visit.pre_win), (post_c, visit.post_win),
                                          (post_c, visit.post_win))):
            pan = board.panel(col * (w + gap), y, w, hgt, arr.shape)
            pan.image(arr, win)
            if col == 2:
                pan.rgba(rgba)
            pan.side_letters(plane)
        y += hgt + gap
    png = board.png()
    ncc = facts.get("registration_ncc")
    ncc_txt = f" Normalised cross-correlation after registration: {_fmt(ncc, 3)}." \
        if ncc is not None else ""
    return (f'<section id="registration"><h2>Registration check</h2>'
            f'<p class="caption">Pre-contrast (registered onto the post-contrast grid) and '
            f'post-contrast images on axial, coronal and sagittal slices through the brain centre. '
            f'Right column: edges of the pre-contrast image (magenta) drawn over the post-contrast '
            f'image; they should follow the ventricles, sulci and brain surface.{ncc_txt}'
            f'{dropped_note}</p>'
            f'<img class="wide" alt="Registration check" src="{R.png_data_uri(png)}"></section>')


def _section_mask(visit: _Visit, *, dpi: int) -> str:
    bb = _brain_bbox(visit)
    centre = _ortho_centre(visit)
    if visit.mask.any():
        zs = np.flatnonzero(visit.mask.any(axis=(0, 1)))
    else:
        zs = np.arange(visit.post.shape[2])
    levels = sorted({int(zs[int(round(f * (len(zs) - 1)))]) for f in (0.25, 0.5, 0.75)})
    views = _ortho_views(visit, centre, bb)
    others, dropped_note = _usable(visit, views[1:])
    panels = [("axial", k, views[0][2]) for k in levels] + others
    h, gap = 2.3, 0.03
    widths = [h / _phys_aspect(visit, p, c) for p, _, c in panels]
    board = R.Board(sum(widths) + gap * (len(widths) - 1), h, dpi=dpi)
    x = 0.0
    for (plane, idx, (r0, r1, c0, c1)), wid in zip(panels, widths):
        post2d, _ = R.plane_slice(visit.post, visit.zooms, plane, idx)
        m2d, _ = R.plane_slice(visit.mask, visit.zooms, plane, idx)
        pan = board.panel(x, 0.0, wid, h, (r1 - r0, c1 - c0))
        pan.image(post2d[r0:r1, c0:c1], visit.post_win)
        pan.outline(m2d[r0:r1, c0:c1], colour=R.MASK_COLOUR, lw=0.9)
        pan.side_letters(plane)
        pan.note(plane, where="top", colour="#dddddd")
        x += wid + gap
    png = board.png()
    return (f'<section id="brainmask"><h2>Brain-mask check</h2>'
            f'<p class="caption">Brain-mask outline (blue) over the post-contrast image: three axial '
            f'levels, then coronal and sagittal slices through the brain centre. The outline should '
            f'follow the brain surface without cutting cortex or including scalp.{dropped_note}</p>'
            f'<img class="wide" alt="Brain-mask check" src="{R.png_data_uri(png)}"></section>')


def _fact_value(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return "n/a" if not np.isfinite(f) else f"{f:.4g}"
    if isinstance(v, dict):
        if not v:
            return "&mdash;"
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fact_value(x)}</td></tr>"
                       for k, x in v.items())
        return f'<table class="sub">{rows}</table>'
    if isinstance(v, (list, tuple, set)):
        items = list(v)
        if not items:
            return "&mdash;"
        if len(items) <= 6 and all(not isinstance(i, (dict, list, tuple)) for i in items) and \
                sum(len(str(i)) for i in items) < 80:
            return ", ".join(_fact_value(i) for i in items)
        return "<ul>" + "".join(f"<li>{_fact_value(i)}</li>" for i in items) + "</ul>"
    return html.escape(str(v))


def _section_facts(visit: _Visit, facts: dict) -> str:
    g = visit.grid
    zooms_stored = np.sqrt((g.stored_affine[:3, :3] ** 2).sum(axis=0))
    shape_stored = tuple(g.shape[int(a)] for a in g.ornt[:, 0])
    display = {
        "matrix (stored)": " x ".join(str(s) for s in shape_stored),
        "voxel size (mm, stored)": " x ".join(f"{z:.3g}" for z in zooms_stored),
        "storage orientation": g.stored_code,
        "obliquity (degrees)": (f"{g.obliquity_deg:.1f} (shown on the nearest anatomical axes)"
                                if g.obliquity_deg > 0.5 else f"{g.obliquity_deg:.1f}"),
        "display": "reoriented to RAS, radiological convention (patient's left on image right)",
        "post-contrast window": f"{visit.post_win[0]:.4g} to {visit.post_win[1]:.4g}",
    }
    if visit.pre_win is not None:
        display["pre-contrast window"] = f"{visit.pre_win[0]:.4g} to {visit.pre_win[1]:.4g}"
    if visit.enh_win is not None:
        display["enhancement colour scale (%)"] = f"{visit.enh_win[0]:.4g} to {visit.enh_win[1]:.4g}"
    display["report generator"] = f"lesionpipe {__version__}"

    def table(d):
        return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fact_value(v)}</td></tr>"
                       for k, v in d.items())

    body = table(facts) if facts else '<tr><td colspan="2">No facts were supplied.</td></tr>'
    return (f'<section id="facts"><h2>Facts</h2><table class="facts">{body}</table>'
            f'<h3>Image grid and display</h3><table class="facts">{table(display)}</table>'
            f'</section>')


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1240px; padding: 0 18px 40px; color: #1b1f24; background: #fff; }
h1 { font-size: 22px; margin: 18px 0 8px; }
h2 { font-size: 19px; border-bottom: 2px solid #d8dee4; padding-bottom: 4px; margin-top: 34px; }
h3 { font-size: 16px; margin-top: 22px; }
header { border-bottom: 1px solid #d8dee4; padding-bottom: 10px; }
.headline { display: flex; gap: 48px; flex-wrap: wrap; margin: 6px 0 8px; }
.big .num { font-size: 54px; font-weight: 700; line-height: 1; margin-right: 10px; color: #0b3d91; }
.big .unit { font-size: 18px; color: #444; }
.badge { display: inline-block; background: #e8eef7; color: #123; border-radius: 4px;
         padding: 2px 8px; margin-right: 6px; font-size: 13px; }
.badge.warn { background: #fff1c2; color: #5a4300; }
.warnbox { background: #fff6d6; border: 1px solid #e6c34d; border-radius: 5px; padding: 6px 12px; }
.warnbox ul { margin: 4px 0; }
.none { font-size: 18px; font-weight: 600; color: #1d6b2f; }
.note { background: #f1f4f8; border-left: 4px solid #8aa0bd; padding: 6px 12px; }
.orient { font-size: 14px; color: #333; }
.caption { color: #444; font-size: 14px; }
nav a { color: #0b5cad; }
.scroll { overflow-x: auto; max-height: 520px; overflow-y: auto; }
table { border-collapse: collapse; font-size: 14px; }
table.lesions th, table.lesions td { padding: 3px 9px; text-align: right;
                                     border-bottom: 1px solid #e3e7eb; }
table.lesions thead th { position: sticky; top: 0; background: #f4f6f8; }
table.lesions a { text-decoration: none; color: #0b5cad; }
table.facts th, table.facts td { text-align: left; vertical-align: top; padding: 3px 12px 3px 0;
                                 border-bottom: 1px solid #eef0f2; }
table.facts th { font-weight: 600; white-space: nowrap; }
table.sub th, table.sub td { padding: 1px 10px 1px 0; border: none; font-size: 13px; }
table.sub th { font-weight: 500; color: #444; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure.lesion { margin: 0; width: min-content; background: #111; color: #eee; padding: 4px;
                border-radius: 4px; }
figure.lesion figcaption { font-size: 12.5px; padding: 3px 2px 1px; }
img { display: block; image-rendering: auto; }
img.wide { max-width: 100%; height: auto; background: #000; }
@media print { .scroll { max-height: none; overflow: visible; } h2 { break-after: avoid; }
               figure.lesion, img.wide { break-inside: avoid; } }
"""


def _page(title: str, sections: list) -> str:
    t = html.escape(title) or "Visit report"
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{t} - GEL report</title><style>{_CSS}</style></head><body>'
            + "\n".join(sections) + "\n</body></html>\n")
