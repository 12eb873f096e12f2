"""Nipype interfaces of the per-visit steps: load, check, call the pure function, save.

Intermediate images are written uncompressed on the post-contrast grid in the node's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from lesionpipe.settings import Settings


def _settings(toml: str) -> Settings:
    return Settings.from_toml_string(toml)


def _save(data: np.ndarray, ref: nb.spatialimages.SpatialImage, name: str, dtype=np.float32) -> str:
    from lesionpipe.imageio import like_image

    path = os.path.abspath(name)
    nb.save(like_image(np.asarray(data).astype(dtype), ref), path)
    return path


def _load(path: str) -> tuple[np.ndarray, nb.spatialimages.SpatialImage]:
    img = nb.load(path)
    return np.asanyarray(img.dataobj), img


class _PrepareInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1-weighted scan (NIfTI)")
    label = traits.Str(mandatory=True, desc="name used in error messages, e.g. 'sub-01 ses-w04 post'")
    settings_toml = traits.Str(mandatory=True, desc="Settings as TOML")
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True, desc="threads for N4")


class _PrepareOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected scan, float32, same grid")
    head_mask = File(exists=True, desc="head (not air) mask")


class PrepareScan(SimpleInterface):
    """Validate a scan (3-D, readable, finite, non-constant, sane affine) and N4-correct it."""

    input_spec = _PrepareInputSpec
    output_spec = _PrepareOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.imageio import load_scan
        from lesionpipe.visit import prepare

        name = f"{self.inputs.label} ({Path(self.inputs.in_file).name})"
        img = load_scan(self.inputs.in_file, label=name)
        data, head = prepare(img.get_fdata(dtype=np.float32), img.affine,
                             _settings(self.inputs.settings_toml),
                             threads=self.inputs.omp_nthreads, name=name)
        self._results["out_file"] = _save(data, img, "corrected.nii")
        self._results["head_mask"] = _save(head, img, "head_mask.nii", np.uint8)
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    post_file = File(exists=True, mandatory=True, desc="bias-corrected post-contrast (fixed)")
    post_head = File(exists=True, mandatory=True, desc="head mask of the post-contrast scan")
    pre_file = File(exists=True, mandatory=True, desc="bias-corrected pre-contrast (moving)")
    settings_toml = traits.Str(mandatory=True, desc="Settings as TOML")
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True, desc="threads for registration")


class _RegisterOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="pre-contrast resampled onto the post-contrast grid")
    valid_mask = File(exists=True, desc="post-grid voxels covered by the pre-contrast scan")
    out_json = File(exists=True, desc="registration parameters and quality (NCC)")
    ncc = traits.Float(desc="normalised cross-correlation of post and registered pre in the head")


class RegisterToPost(SimpleInterface):
    """Rigid registration of the pre-contrast scan to the post-contrast scan."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.visit import register

        post, post_img = _load(self.inputs.post_file)
        head, _ = _load(self.inputs.post_head)
        pre, pre_img = _load(self.inputs.pre_file)
        reg = register(np.asarray(post, np.float32), post_img.affine,
                       np.asarray(pre, np.float32), pre_img.affine,
                       _settings(self.inputs.settings_toml), post_head=head > 0,
                       threads=self.inputs.omp_nthreads)
        self._results["out_file"] = _save(reg.pre_on_post, post_img, "pre_on_post.nii")
        self._results["valid_mask"] = _save(reg.valid, post_img, "pre_valid.nii", np.uint8)
        path = os.path.abspath("registration.json")
        Path(path).write_text(json.dumps(reg.info, indent=2))
        self._results["out_json"] = path
        self._results["ncc"] = float(reg.info.get("ncc", 0.0))
        return runtime


class _MasksInputSpec(BaseInterfaceInputSpec):
    post_file = File(exists=True, mandatory=True, desc="bias-corrected post-contrast")
    head_mask = File(exists=True, mandatory=True, desc="head mask on the post grid")
    pre_file = File(exists=True, desc="pre-contrast on the post grid (preferred for masking)")
    label = traits.Str(mandatory=True, desc="name used in error messages")


class _MasksOutputSpec(TraitedSpec):
    brain_mask = File(exists=True, desc="brain mask")
    wm_mask = File(exists=True, desc="confident normal white matter")
    csf_level = traits.Float(desc="CSF/GM threshold in % of white matter")


class BrainMasks(SimpleInterface):
    """Brain and white-matter masks (skull, scalp fat and marrow excluded)."""

    input_spec = _MasksInputSpec
    output_spec = _MasksOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.imageio import voxel_sizes
        from lesionpipe.visit import masks

        post, img = _load(self.inputs.post_file)
        head, _ = _load(self.inputs.head_mask)
        pre = _load(self.inputs.pre_file)[0] if isdefined(self.inputs.pre_file) else None
        m = masks(np.asarray(post, np.float32), voxel_sizes(img.affine), head > 0,
                  pre_on_post=None if pre is None else np.asarray(pre, np.float32),
                  name=self.inputs.label)
        self._results["brain_mask"] = _save(m.brain, img, "brain_mask.nii", np.uint8)
        self._results["wm_mask"] = _save(m.wm, img, "wm_mask.nii", np.uint8)
        self._results["csf_level"] = float(100.0 * m.levels.csf_gm / m.levels.wm)
        return runtime


class _NormInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected image on the post grid")
    wm_mask = File(exists=True, mandatory=True, desc="normal white matter mask")
    match_to = File(exists=True, desc="normalised post-contrast: match tissue levels to it")
    brain_mask = File(exists=True, desc="brain mask (with match_to)")


class _NormOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="image with local normal white matter = 100")


class NormaliseIntensity(SimpleInterface):
    """Divide by a smooth local white-matter map (NAWM = 100); optionally match tissue levels."""

    input_spec = _NormInputSpec
    output_spec = _NormOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.imageio import voxel_sizes
        from lesionpipe.visit import matched_pre, normalised

        data, img = _load(self.inputs.in_file)
        wm, _ = _load(self.inputs.wm_mask)
        out = normalised(np.asarray(data, np.float32), wm > 0, voxel_sizes(img.affine))
        if isdefined(self.inputs.match_to):
            ref, _ = _load(self.inputs.match_to)
            brain, _ = _load(self.inputs.brain_mask)
            out = matched_pre(out, np.asarray(ref, np.float32), brain > 0)
        self._results["out_file"] = _save(out, img, "normalised.nii")
        return runtime


class _DetectInputSpec(BaseInterfaceInputSpec):
    post_file = File(exists=True, mandatory=True, desc="normalised post-contrast")
    pre_file = File(exists=True, desc="normalised pre-contrast on the post grid")
    valid_mask = File(exists=True, desc="where the registered pre-contrast has data")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask")
    wm_mask = File(exists=True, mandatory=True, desc="normal white matter")
    csf_level = traits.Float(mandatory=True, desc="CSF threshold, % of white matter")
    source_file = File(exists=True, mandatory=True, desc="original post-contrast input (grid)")
    settings_toml = traits.Str(mandatory=True, desc="Settings as TOML")


class _DetectOutputSpec(TraitedSpec):
    labels = File(exists=True, desc="instance labels of accepted lesions")
    enhancement = File(exists=True, desc="enhancement map, % of NAWM")
    candidates = File(exists=True, desc="every candidate with features and decision (TSV)")
    candidate_labels = File(exists=True, desc="candidate k = row k of the candidate table")
    lesion_table = File(exists=True, desc="lesion table (TSV)")
    n_lesions = traits.Int(desc="number of GELs")
    out_json = File(exists=True, desc="detection figures: noise, thresholds")


class DetectGEL(SimpleInterface):
    """Candidates on the enhancement map, rejection of non-lesions, labelling and the table."""

    input_spec = _DetectInputSpec
    output_spec = _DetectOutputSpec

    def _run_interface(self, runtime):
        from lesionpipe.imageio import voxel_sizes
        from lesionpipe.lesions.detect import detect_lesions, lesion_table

        settings = _settings(self.inputs.settings_toml)
        post, img = _load(self.inputs.post_file)
        src = nb.load(self.inputs.source_file)
        pre = (np.asarray(_load(self.inputs.pre_file)[0], np.float32)
               if isdefined(self.inputs.pre_file) else None)
        valid = (_load(self.inputs.valid_mask)[0] > 0) if isdefined(self.inputs.valid_mask) else None
        det = detect_lesions(np.asarray(post, np.float32), voxel_sizes(img.affine),
                             _load(self.inputs.brain_mask)[0] > 0, settings, pre_n=pre,
                             wm=_load(self.inputs.wm_mask)[0] > 0,
                             csf_level=self.inputs.csf_level, valid=valid)
        table = lesion_table(det.labels, det.enhancement, src.affine)
        self._results["labels"] = _save(det.labels, img, "labels.nii", np.int16)
        self._results["enhancement"] = _save(det.enhancement, img, "enhancement.nii")
        self._results["candidate_labels"] = _save(det.candidate_labels, img, "candidates.nii",
                                                  np.int32)
        cand = os.path.abspath("candidates.tsv")
        det.candidates.to_csv(cand, sep="\t", index=False, float_format="%.3f")
        self._results["candidates"] = cand
        tab = os.path.abspath("lesions.tsv")
        table.to_csv(tab, sep="\t", index=False)
        self._results["lesion_table"] = tab
        self._results["n_lesions"] = int(len(table))
        info = os.path.abspath("detection.json")
        Path(info).write_text(json.dumps({k: round(float(v), 4)
                                          for k, v in det.thresholds.items()}, indent=2))
        self._results["out_json"] = info
        return runtime
