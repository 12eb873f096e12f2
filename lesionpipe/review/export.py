"""``lesionpipe review-export``: reviewed counts, reviewed masks and the audit trail.

``gel_counts_reviewed.tsv`` has the columns of ``gel_counts.tsv`` plus ``read_status`` and
``automated_gel_count``. A visit whose review is final (``agreed`` or ``adjudicated``) has
``status`` ``ok`` and the reviewed count; any other visit is a missing value for the efficacy
model: ``gel_count`` is ``n/a``, ``status`` is ``failed`` and ``error`` says why.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from lesionpipe import __version__
from lesionpipe.imageio import (atomic_save_nifti, atomic_write_json, atomic_write_text,
                                atomic_write_tsv, like_image)
from lesionpipe.review.service import ReviewService
from lesionpipe.review.store import ReviewError
from lesionpipe.review.visitdata import read_counts

AUDIT_COLUMNS = ["id", "utc", "user_id", "username", "action", "visit_id", "assignment_id",
                 "target", "old_value", "new_value", "reason", "prev_hash", "hash"]


def export_review(service: ReviewService, out_dir: str | Path) -> dict:
    """Write the export folder; refuses when the audit chain does not verify."""
    out = Path(out_dir)
    check = service.store.verify()
    if not check.ok:
        raise ReviewError("refusing to export: " + check.summary())
    counts = read_counts(service.output_dir)
    visits = {(v["participant_id"], v["session_id"]): v["id"] for v in service.store.visits()}
    rows, tally = [], {}
    for rec in counts.to_dict("records"):
        row = {c: rec[c] for c in counts.columns}
        row["automated_gel_count"] = rec["gel_count"]
        key = (rec["participant_id"], rec["session_id"])
        if rec["status"] != "ok" or key not in visits:
            read_status = "not_reviewed"
            final = None
        else:
            final = service.final_read(visits[key])
            read_status = final["status"]
        tally[read_status] = tally.get(read_status, 0) + 1
        row["read_status"] = read_status
        if final is not None and final["lesions"] is not None:
            n, vol = _write_masks(out, key, final)
            row.update(gel_count=str(n), gel_volume_mm3=f"{vol:.1f}", status="ok", error="")
        elif rec["status"] == "ok":
            row.update(gel_count="n/a", gel_volume_mm3="n/a", status="failed",
                       error=f"central review not final ({read_status})")
        rows.append(row)
    columns = list(counts.columns) + ["read_status", "automated_gel_count"]
    atomic_write_tsv(pd.DataFrame(rows, columns=columns),
                     out / "gel_counts_reviewed.tsv")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(AUDIT_COLUMNS)
    for r in service.store.audit_rows():
        writer.writerow(["" if r[c] is None else r[c] for c in AUDIT_COLUMNS])
    atomic_write_text(out / "audit_trail.csv", buf.getvalue())
    atomic_write_json(out / "dataset_description.json", {
        "Name": "lesionpipe central review", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionpipe review", "Version": __version__}]})
    summary = {"visits": tally, "audit_records": check.n_records, "audit_head": check.head,
               "disagreement_rule": service.settings.disagreement_rule}
    atomic_write_json(out / "review_summary.json", summary)
    return summary


def _write_masks(out: Path, key: tuple[str, str], final: dict) -> tuple[int, float]:
    """Reviewed binary mask, instance labels and lesion table on the post-contrast grid."""
    data = final["data"]
    sub, ses = key
    anat = out / sub / ses / "anat"
    stem = data.files.stem
    dseg = np.zeros(data.shape, np.int16)
    table = []
    for n, les in enumerate(final["lesions"], start=1):
        vox = np.asarray(les["voxels"], int).reshape(-1, 3)
        free = dseg[tuple(vox.T)] == 0
        vox = vox[free]
        dseg[tuple(vox.T)] = n
        c = vox.mean(axis=0) if len(vox) else np.full(3, np.nan)
        xyz = data.affine[:3, :3] @ c + data.affine[:3, 3]
        table.append({"lesion_id": n, "origin": les["origin"], "source": les["key"],
                      "n_voxels": len(vox), "volume_mm3": round(len(vox) * data.voxel_volume, 3),
                      "centroid_x": round(xyz[0], 2), "centroid_y": round(xyz[1], 2),
                      "centroid_z": round(xyz[2], 2), "centroid_i": round(c[0], 2),
                      "centroid_j": round(c[1], 2), "centroid_k": round(c[2], 2)})
    ref = data.post_img
    atomic_save_nifti(like_image((dseg > 0).astype(np.uint8), ref),
                      anat / f"{stem}_label-GEL_desc-reviewed_mask.nii.gz")
    atomic_save_nifti(like_image(dseg, ref), anat / f"{stem}_label-GEL_desc-reviewed_dseg.nii.gz")
    cols = ["lesion_id", "origin", "source", "n_voxels", "volume_mm3", "centroid_x", "centroid_y",
            "centroid_z", "centroid_i", "centroid_j", "centroid_k"]
    atomic_write_tsv(pd.DataFrame(table, columns=cols),
                     anat / f"{stem}_label-GEL_desc-reviewed_lesions.tsv")
    atomic_write_json(anat / f"{stem}_label-GEL_desc-reviewed_mask.json",
                      {"read_status": final["status"], "n_lesions": len(table),
                       "GeneratedBy": [{"Name": "lesionpipe review", "Version": __version__}]})
    return len(table), float((dseg > 0).sum() * data.voxel_volume)


def read_back(path: str | Path) -> pd.DataFrame:
    """Read ``gel_counts_reviewed.tsv`` the way ``lesionpipe analyze`` reads ``gel_counts.tsv``."""
    return pd.read_csv(path, sep="\t", na_values=["n/a"])


