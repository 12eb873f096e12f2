"""Interfaces that write what users read: the QA report and the BIDS-derivative files."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from lesionpipe import __version__


class _ReportInputSpec(BaseInterfaceInputSpec):
    post_file = File(exists=True, mandatory=True, desc="normalised post-contrast")
    pre_file = File(exists=True, desc="normalised pre-contrast on the post grid")
    labels = File(exists=True, mandatory=True, desc="lesion instance labels")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask")
    enhancement = File(exists=True, desc="enhancement map")
    lesion_table = File(exists=True, mandatory=True, desc="lesion table TSV")
    registration_json = File(exists=True, desc="registration figures")
    title = traits.Str(mandatory=True, desc="visit title, e.g. 'sub-01 ses-w04'")
    settings_toml = traits.Str(mandatory=True, desc="Settings as TOML (shown in the facts)")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="self-contained HTML report")


class VisitReport(SimpleInterface):
    """Render the per-visit QA report (lesion gallery, overview, registration and mask checks)."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.reports.visit import write_visit_report
        from lesionpipe.settings import Settings

        table = pd.read_csv(self.inputs.lesion_table, sep="\t")
        settings = Settings.from_toml_string(self.inputs.settings_toml)
        labels = nb.load(self.inputs.labels)
        vox = float(abs(np.linalg.det(labels.affine[:3, :3])))
        facts = {
            "GEL count": int(len(table)),
            "total GEL volume (mm3)": round(float(table["volume_mm3"].sum()), 1) if len(table)
            else 0.0,
            "mode": "pre + post (subtraction)" if isdefined(self.inputs.pre_file) else
                    "post-only (no pre-contrast scan)",
            "voxel size (mm)": " x ".join(f"{z:.2f}" for z in labels.header.get_zooms()[:3]),
            "voxel volume (mm3)": round(vox, 3),
            "counting rule": f"{settings.connectivity}-connected, >= {settings.min_voxels} voxels "
                             f"and >= {settings.min_volume_mm3:g} mm3",
            "lesionpipe version": __version__,
        }
        if isdefined(self.inputs.registration_json):
            reg = json.loads(Path(self.inputs.registration_json).read_text())
            facts["registration NCC (pre vs post)"] = reg.get("ncc")
            facts["head motion pre->post"] = (f"{reg.get('rotation_deg', 0):.1f} deg, "
                                              f"{reg.get('translation_mm', 0):.1f} mm")
        out = os.path.abspath("report.html")
        write_visit_report(
            out, post_img=nb.load(self.inputs.post_file), labels_img=labels,
            brain_mask_img=nb.load(self.inputs.brain_mask), lesion_table=table,
            pre_img=nb.load(self.inputs.pre_file) if isdefined(self.inputs.pre_file) else None,
            enhancement_img=(nb.load(self.inputs.enhancement)
                             if isdefined(self.inputs.enhancement) else None),
            title=self.inputs.title, facts=facts)
        self._results["out_report"] = out
        return runtime


class _DerivInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="derivatives root")
    prefix = traits.Str(mandatory=True, desc="sub-<s>_ses-<v>[_entities]")
    subject = traits.Str(mandatory=True, desc="subject label")
    session = traits.Str(mandatory=True, desc="session label")
    week = traits.Either(None, traits.Float, default=None, usedefault=True, desc="visit week")
    source_post = File(exists=True, mandatory=True, desc="original post-contrast input")
    source_pre = File(exists=True, desc="original pre-contrast input")
    labels = File(exists=True, mandatory=True, desc="lesion instance labels")
    lesion_table = File(exists=True, mandatory=True, desc="lesion table TSV")
    candidates = File(exists=True, mandatory=True, desc="candidate table TSV")
    candidate_labels = File(exists=True, mandatory=True, desc="candidate label image")
    post_norm = File(exists=True, mandatory=True, desc="normalised post-contrast")
    pre_norm = File(exists=True, desc="normalised registered pre-contrast")
    enhancement = File(exists=True, mandatory=True, desc="enhancement map")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask")
    registration_json = File(exists=True, desc="registration figures")
    detection_json = File(exists=True, mandatory=True, desc="detection figures")
    report = File(exists=True, desc="HTML QA report")
    settings_toml = traits.Str(mandatory=True, desc="Settings as TOML")


class _DerivOutputSpec(TraitedSpec):
    gel_count = traits.Int(desc="number of GELs")
    out_mask = File(desc="binary GEL mask in the output folder")
    out_summary = File(desc="visit summary JSON in the output folder")


class WriteDerivatives(SimpleInterface):
    """Write the visit's BIDS-derivative files atomically (mask, labels, table, sidecar, report).

    Always re-executed (cheap) so a deleted output folder is rewritten from the cache.
    """

    input_spec = _DerivInputSpec
    output_spec = _DerivOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.imageio import (atomic_save_nifti, atomic_write_json, atomic_write_text,
                                        like_image, load_scan, sha256)
        from lesionpipe.settings import Settings

        i = self.inputs
        root = Path(i.output_dir)
        anat = root / f"sub-{i.subject}" / f"ses-{i.session}" / "anat"
        figs = root / f"sub-{i.subject}" / f"ses-{i.session}" / "figures"
        post_pfx = f"{i.prefix}_ce-gadolinium"
        src = nb.load(i.source_post)  # the exact input grid, header and affine
        labels = np.asanyarray(nb.load(i.labels).dataobj).astype(np.int16)
        if labels.shape != src.shape[:3]:
            raise ValueError(f"{Path(i.source_post).name}: lesion labels {labels.shape} do not "
                             f"match the input grid {src.shape[:3]}")
        ref = src
        mask_path = anat / f"{post_pfx}_space-orig_label-GEL_mask.nii.gz"
        atomic_save_nifti(like_image((labels > 0).astype(np.uint8), ref), mask_path)
        atomic_save_nifti(like_image(labels, ref), anat / f"{post_pfx}_space-orig_label-GEL_dseg.nii.gz")
        table = pd.read_csv(i.lesion_table, sep="\t")
        atomic_write_text(anat / f"{post_pfx}_space-orig_label-GEL_lesions.tsv",
                          table.to_csv(sep="\t", index=False))
        atomic_write_text(anat / f"{post_pfx}_space-orig_desc-candidates_table.tsv",
                          Path(i.candidates).read_text())
        cand = np.asanyarray(nb.load(i.candidate_labels).dataobj).astype(np.int32)
        atomic_save_nifti(like_image(cand, ref), anat / f"{post_pfx}_space-orig_desc-candidates_dseg.nii.gz")

        def _img(path, name, dtype=np.float32):
            data = np.asanyarray(nb.load(path).dataobj).astype(np.float32)
            out = like_image(data if dtype == np.float32 else data.astype(dtype), ref)
            if dtype == np.float32:
                # review images: int16 with a scale factor nibabel picks from the range (4x
                # smaller than float32; steps ~ range / 65535)
                out.set_data_dtype(np.int16)
                out.header.set_slope_inter(np.nan, np.nan)
            atomic_save_nifti(out, anat / name)

        _img(i.post_norm, f"{post_pfx}_space-orig_desc-preproc_T1w.nii.gz")
        _img(i.enhancement, f"{post_pfx}_space-orig_desc-enhancement_map.nii.gz")
        _img(i.brain_mask, f"{post_pfx}_space-orig_desc-brain_mask.nii.gz", np.uint8)
        has_pre = isdefined(i.pre_norm)
        if has_pre:
            _img(i.pre_norm, f"{i.prefix}_space-orig_desc-preproc_T1w.nii.gz")
        settings = Settings.from_toml_string(i.settings_toml)
        atomic_write_text(anat / f"{post_pfx}_settings.toml", i.settings_toml)
        reg = json.loads(Path(i.registration_json).read_text()) if isdefined(
            i.registration_json) else None
        inputs = {"post": {"file": _rel_name(i.source_post), "sha256": sha256(i.source_post)}}
        if isdefined(i.source_pre):
            inputs["pre"] = {"file": _rel_name(i.source_pre), "sha256": sha256(i.source_pre)}
        volume = float(table["volume_mm3"].sum()) if len(table) else 0.0
        sidecar = {
            "Description": "Gadolinium-enhancing lesions (binary), on the post-contrast grid",
            "Type": "Lesion",
            "Sources": [inputs["post"]["file"]] + ([inputs["pre"]["file"]] if has_pre else []),
            "GeneratedBy": [{"Name": "lesionpipe", "Version": __version__}],
            "gel_count": int(len(table)),
            "gel_volume_mm3": round(volume, 2),
            "has_pre": int(has_pre),
            "week": i.week,
            "inputs": inputs,
            "registration": reg,
            "detection": json.loads(Path(i.detection_json).read_text()),
            "settings": settings.to_dict(),
            "software": _versions(),
        }
        atomic_write_json(mask_path.with_name(mask_path.name.replace(".nii.gz", ".json")), sidecar)
        if isdefined(i.report):
            dst = figs / f"{post_pfx}_report.html"
            atomic_write_text(dst, Path(i.report).read_text(encoding="utf-8"))
        self._results["gel_count"] = int(len(table))
        self._results["out_mask"] = str(mask_path)
        self._results["out_summary"] = str(mask_path.with_name(
            mask_path.name.replace(".nii.gz", ".json")))
        return runtime


def _rel_name(path: str) -> str:
    """``sub-01/ses-w04/anat/<file>``: the BIDS-relative path (no site or user folder names).

    >>> _rel_name('/data/site3/sub-01/ses-w04/anat/sub-01_ses-w04_T1w.nii.gz')
    'sub-01/ses-w04/anat/sub-01_ses-w04_T1w.nii.gz'
    """
    parts = Path(path).parts
    dirs = [k for k, part in enumerate(parts[:-1]) if part.startswith("sub-")]
    return "/".join(parts[dirs[-1]:]) if dirs else parts[-1]


def _versions() -> dict:
    import nipype
    import scipy
    import SimpleITK
    import skimage

    return {"lesionpipe": __version__, "nipype": nipype.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-image": skimage.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "nibabel": nb.__version__,
            "python": ".".join(map(str, __import__("sys").version_info[:3]))}
