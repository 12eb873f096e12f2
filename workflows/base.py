"""Nipype wiring of lesionpipe: one top workflow holding one sub-workflow per visit."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from lesionpipe import __version__
from lesionpipe.interfaces.outputs import VisitReport, WriteDerivatives
from lesionpipe.interfaces.visit import (BrainMasks, DetectGEL, NormaliseIntensity, PrepareScan,
                                         RegisterToPost)


def workflow_name() -> str:
    """Version-stamped top workflow name, so a new release never reuses a stale cache."""
    return "lesionpipe_%s_wf" % "_".join(__version__.split(".")[:2])


def init_lesionpipe_wf(*, visits, output_dir: str, work_dir: str, settings, omp_nthreads: int = 1,
                       reports: bool = True, name: str | None = None) -> pe.Workflow:
    """Top workflow: every visit of the batch, independent of each other.

    Only this factory sees the whole Settings object; it passes it on as TOML text, which is also
    what makes a change of any setting re-run the affected steps.
    """
    workflow = pe.Workflow(name=name or workflow_name(), base_dir=str(work_dir))
    settings_toml = settings.to_toml_string()
    for visit in visits:
        visit_wf = init_visit_wf(
            post_file=str(visit.post), pre_file=str(visit.pre) if visit.pre else None,
            subject=visit.subject, session=visit.session, prefix=visit.prefix, week=visit.week,
            output_dir=str(output_dir), settings_toml=settings_toml,
            omp_nthreads=omp_nthreads, reports=reports, name=f"visit_{visit.key}_wf")
        workflow.add_nodes([visit_wf])
    return workflow


def init_visit_wf(*, post_file: str, pre_file: str | None, subject: str, session: str,
                  prefix: str, week: float | None, output_dir: str, settings_toml: str,
                  omp_nthreads: int = 1, reports: bool = True,
                  name: str = "visit_wf") -> pe.Workflow:
    """One visit: preprocessing, GEL detection, report, derivatives.

    Inputs:  post_t1w, pre_t1w (when ``pre_file`` is given)
    Outputs: gel_count, gel_mask
    """
    workflow = pe.Workflow(name=name)
    has_pre = pre_file is not None
    inputnode = pe.Node(niu.IdentityInterface(fields=["post_t1w", "pre_t1w"]), name="inputnode")
    inputnode.inputs.post_t1w = post_file
    if has_pre:
        inputnode.inputs.pre_t1w = pre_file
    outputnode = pe.Node(niu.IdentityInterface(fields=["gel_count", "gel_mask"]),
                         name="outputnode")
    title = f"sub-{subject} ses-{session}"
    from lesionpipe.settings import PREPARE_FIELDS, REGISTER_FIELDS, Settings

    settings = Settings.from_toml_string(settings_toml)
    preproc_wf = init_preproc_wf(has_pre=has_pre, title=title,
                                 prepare_toml=settings.subset_toml(PREPARE_FIELDS),
                                 register_toml=settings.subset_toml(REGISTER_FIELDS),
                                 omp_nthreads=omp_nthreads)
    gel_wf = init_gel_wf(has_pre=has_pre, settings_toml=settings_toml)
    ds_visit = pe.Node(WriteDerivatives(output_dir=output_dir, prefix=prefix, subject=subject,
                                        session=session, week=week,
                                        settings_toml=settings_toml),
                       name="ds_visit", overwrite=True)
    workflow.connect([
        (inputnode, preproc_wf, [("post_t1w", "inputnode.post_t1w")]),
        (inputnode, gel_wf, [("post_t1w", "inputnode.source_file")]),
        (inputnode, ds_visit, [("post_t1w", "source_post")]),
        (preproc_wf, gel_wf, [("outputnode.post_norm", "inputnode.post_norm"),
                              ("outputnode.brain_mask", "inputnode.brain_mask"),
                              ("outputnode.wm_mask", "inputnode.wm_mask"),
                              ("outputnode.csf_level", "inputnode.csf_level")]),
        (preproc_wf, ds_visit, [("outputnode.post_norm", "post_norm"),
                                ("outputnode.brain_mask", "brain_mask")]),
        (gel_wf, ds_visit, [("outputnode.labels", "labels"),
                            ("outputnode.lesion_table", "lesion_table"),
                            ("outputnode.candidates", "candidates"),
                            ("outputnode.candidate_labels", "candidate_labels"),
                            ("outputnode.enhancement", "enhancement"),
                            ("outputnode.detection_json", "detection_json")]),
        (ds_visit, outputnode, [("gel_count", "gel_count"), ("out_mask", "gel_mask")]),
    ])  # fmt:skip
    if has_pre:
        workflow.connect([
            (inputnode, preproc_wf, [("pre_t1w", "inputnode.pre_t1w")]),
            (inputnode, ds_visit, [("pre_t1w", "source_pre")]),
            (preproc_wf, gel_wf, [("outputnode.pre_norm", "inputnode.pre_norm"),
                                  ("outputnode.valid_mask", "inputnode.valid_mask")]),
            (preproc_wf, ds_visit, [("outputnode.pre_norm", "pre_norm"),
                                    ("outputnode.registration_json", "registration_json")]),
        ])  # fmt:skip
    if reports:
        report = pe.Node(VisitReport(title=title, settings_toml=settings_toml), name="report")
        workflow.connect([
            (preproc_wf, report, [("outputnode.post_norm", "post_file"),
                                  ("outputnode.brain_mask", "brain_mask")]),
            (gel_wf, report, [("outputnode.labels", "labels"),
                              ("outputnode.enhancement", "enhancement"),
                              ("outputnode.lesion_table", "lesion_table")]),
            (report, ds_visit, [("out_report", "report")]),
        ])  # fmt:skip
        if has_pre:
            workflow.connect([
                (preproc_wf, report, [("outputnode.pre_norm", "pre_file"),
                                      ("outputnode.registration_json", "registration_json")]),
            ])  # fmt:skip
    return workflow


def init_preproc_wf(*, has_pre: bool, title: str, prepare_toml: str, register_toml: str,
                    omp_nthreads: int = 1, name: str = "preproc_wf") -> pe.Workflow:
    """Validate, bias-correct, register pre to post, mask the brain, normalise (NAWM = 100).

    Inputs:  post_t1w, pre_t1w (with ``has_pre``)
    Outputs: post_norm, pre_norm, valid_mask, registration_json (with ``has_pre``),
             brain_mask, wm_mask, csf_level
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["post_t1w", "pre_t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["post_norm", "pre_norm", "valid_mask", "registration_json", "brain_mask",
                "wm_mask", "csf_level"]), name="outputnode")
    prep_post = pe.Node(PrepareScan(label=f"{title} ce-gadolinium T1w",
                                    settings_toml=prepare_toml, omp_nthreads=omp_nthreads),
                        name="prep_post", n_procs=omp_nthreads)
    brain_masks = pe.Node(BrainMasks(label=f"{title} ce-gadolinium T1w"), name="brain_masks")
    norm_post = pe.Node(NormaliseIntensity(), name="norm_post")
    workflow.connect([
        (inputnode, prep_post, [("post_t1w", "in_file")]),
        (prep_post, brain_masks, [("out_file", "post_file"), ("head_mask", "head_mask")]),
        (prep_post, norm_post, [("out_file", "in_file")]),
        (brain_masks, norm_post, [("wm_mask", "wm_mask")]),
        (norm_post, outputnode, [("out_file", "post_norm")]),
        (brain_masks, outputnode, [("brain_mask", "brain_mask"), ("wm_mask", "wm_mask"),
                                   ("csf_level", "csf_level")]),
    ])  # fmt:skip
    if has_pre:
        prep_pre = pe.Node(PrepareScan(label=f"{title} T1w (pre-contrast)",
                                       settings_toml=prepare_toml, omp_nthreads=omp_nthreads),
                           name="prep_pre", n_procs=omp_nthreads)
        register = pe.Node(RegisterToPost(settings_toml=register_toml, omp_nthreads=omp_nthreads),
                           name="register", n_procs=omp_nthreads)
        norm_pre = pe.Node(NormaliseIntensity(), name="norm_pre")
        workflow.connect([
            (inputnode, prep_pre, [("pre_t1w", "in_file")]),
            (prep_post, register, [("out_file", "post_file"), ("head_mask", "post_head")]),
            (prep_pre, register, [("out_file", "pre_file")]),
            (register, brain_masks, [("out_file", "pre_file")]),
            (register, norm_pre, [("out_file", "in_file")]),
            (brain_masks, norm_pre, [("wm_mask", "wm_mask"), ("brain_mask", "brain_mask")]),
            (norm_post, norm_pre, [("out_file", "match_to")]),
            (norm_pre, outputnode, [("out_file", "pre_norm")]),
            (register, outputnode, [("valid_mask", "valid_mask"),
                                    ("out_json", "registration_json")]),
        ])  # fmt:skip
    return workflow


def init_gel_wf(*, has_pre: bool, settings_toml: str, name: str = "gel_wf") -> pe.Workflow:
    """Segment and count gadolinium-enhancing lesions for one visit.

    Inputs:  post_norm, pre_norm and valid_mask (with ``has_pre``), brain_mask, wm_mask,
             csf_level, source_file (the original post-contrast scan, for the grid)
    Outputs: labels, lesion_table, candidates, candidate_labels, enhancement, detection_json,
             gel_count
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["post_norm", "pre_norm", "valid_mask", "brain_mask", "wm_mask", "csf_level",
                "source_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["labels", "lesion_table", "candidates", "candidate_labels", "enhancement",
                "detection_json", "gel_count"]), name="outputnode")
    detect = pe.Node(DetectGEL(settings_toml=settings_toml), name="detect")
    workflow.connect([
        (inputnode, detect, [("post_norm", "post_file"), ("brain_mask", "brain_mask"),
                             ("wm_mask", "wm_mask"), ("csf_level", "csf_level"),
                             ("source_file", "source_file")]),
        (detect, outputnode, [("labels", "labels"), ("lesion_table", "lesion_table"),
                              ("candidates", "candidates"),
                              ("candidate_labels", "candidate_labels"),
                              ("enhancement", "enhancement"),
                              ("out_json", "detection_json"), ("n_lesions", "gel_count")]),
    ])  # fmt:skip
    if has_pre:
        workflow.connect([
            (inputnode, detect, [("pre_norm", "pre_file"), ("valid_mask", "valid_mask")]),
        ])  # fmt:skip
    return workflow
