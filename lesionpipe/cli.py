"""The ``lesionpipe`` command line: the only place that turns argv into Settings and calls.

Exit codes: 0 = everything succeeded, 1 = some items (visits, series) failed and are listed,
2 = bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from lesionpipe import __version__
from lesionpipe.settings import Settings

LOG = logging.getLogger("lesionpipe")


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.captureWarnings(True)


def _load_settings(path: str | None) -> Settings:
    if not path:
        return Settings()
    try:
        return Settings.from_toml(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ============================================================================================
# run
# ============================================================================================
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="segment and count GELs in a BIDS dataset",
                       description="Segment and count gadolinium-enhancing lesions in every visit "
                                   "of a BIDS dataset; write BIDS derivatives to OUTPUT_DIR.")
    p.add_argument("bids_dir", type=Path, help="BIDS dataset root")
    p.add_argument("output_dir", type=Path, help="derivatives folder (created)")
    p.add_argument("analysis_level", nargs="?", default="participant", choices=["participant"],
                   help="BIDS-App analysis level (only 'participant')")
    p.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                   help="process only these participants ('01' or 'sub-01')")
    p.add_argument("--session-label", nargs="+", default=None, metavar="LABEL",
                   help="process only these sessions ('w04' or 'ses-w04')")
    p.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="Nipype working directory (default: <OUTPUT_DIR parent>/lesionpipe_work); "
                        "re-using it resumes finished visits")
    p.add_argument("--nprocs", type=int, default=1,
                   help="parallel processes (Nipype MultiProc); 1 = Linear")
    p.add_argument("--omp-nthreads", type=int, default=1,
                   help="threads per visit for SimpleITK (default 1)")
    p.add_argument("--plugin", default=None,
                   help="Nipype execution plugin name (e.g. SLURM, SGE, PBS, MultiProc, Linear)")
    p.add_argument("--plugin-args", default=None, metavar="JSON",
                   help="JSON object of plugin arguments, e.g. '{\"sbatch_args\": \"-p short\"}'")
    p.add_argument("--settings", default=None, metavar="FILE.toml", help="all tunables as TOML")
    p.add_argument("--no-reports", action="store_true", help="skip the HTML QA reports")
    p.set_defaults(func=_cmd_run)


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _cmd_run(args) -> int:
    from lesionpipe.bids import BidsError, find_visits

    settings = _load_settings(args.settings)
    bids_dir = args.bids_dir
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS_DIR {bids_dir} is not a directory")
    out_dir = args.output_dir
    work_dir = args.work_dir or out_dir.resolve().parent / "lesionpipe_work"
    for what, path in (("OUTPUT_DIR", out_dir), ("--work-dir", work_dir)):
        if _inside(path, bids_dir):
            raise UsageError(f"{what} {path} is inside the input dataset {bids_dir}; "
                             "choose a folder outside it (the input is never modified)")
    if args.nprocs < 1:
        raise UsageError("--nprocs must be >= 1")
    plugin_args = {}
    if args.plugin_args:
        try:
            plugin_args = json.loads(args.plugin_args)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--plugin-args is not valid JSON: {exc}") from None
        if not isinstance(plugin_args, dict):
            raise UsageError("--plugin-args must be a JSON object")
    try:
        visits = find_visits(bids_dir, participants=args.participant_label,
                             sessions=args.session_label)
    except BidsError as exc:
        raise UsageError(str(exc)) from None
    if not visits:
        raise UsageError(f"no visits with a *_ce-gadolinium_T1w.nii[.gz] scan found in {bids_dir}"
                         + (" for the selected participants/sessions"
                            if args.participant_label or args.session_label else ""))

    from lesionpipe.runner import run_batch

    result = run_batch(visits, bids_dir=bids_dir, output_dir=out_dir, work_dir=work_dir,
                       settings=settings, nprocs=args.nprocs, omp_nthreads=args.omp_nthreads,
                       plugin=args.plugin, plugin_args=plugin_args,
                       reports=not args.no_reports)
    return 0 if result.all_ok else 1


# ============================================================================================
# evaluate
# ============================================================================================
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="compare pipeline outputs with ground truth",
                       description="Lesion-wise and count-wise accuracy of OUTPUT_DIR against a "
                                   "ground-truth folder written by the phantom generator.")
    p.add_argument("output_dir", type=Path)
    p.add_argument("truth_dir", type=Path)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for evaluation.json/TSVs/HTML (default OUTPUT_DIR/evaluation)")
    p.add_argument("--min-truth-volume", type=float, default=0.0,
                   help="ignore truth lesions smaller than this (mm3) when scoring")
    p.add_argument("--bids-dir", type=Path, default=None,
                   help="raw dataset, used for the HTML crops when preprocessed images are absent")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from lesionpipe.evaluate import EvaluationError, evaluate_outputs

    if not args.output_dir.is_dir():
        raise UsageError(f"OUTPUT_DIR {args.output_dir} is not a directory")
    if not args.truth_dir.is_dir():
        raise UsageError(f"TRUTH_DIR {args.truth_dir} is not a directory")
    try:
        report = evaluate_outputs(args.output_dir, args.truth_dir,
                                  out_dir=args.out or args.output_dir / "evaluation",
                                  bids_dir=args.bids_dir, min_truth_volume=args.min_truth_volume)
    except EvaluationError as exc:
        raise UsageError(str(exc)) from None
    print(report.summary_text())
    return 0


# ============================================================================================
# phantoms
# ============================================================================================
def _add_phantoms(sub) -> None:
    p = sub.add_parser("phantoms", help="write a synthetic BIDS trial dataset with ground truth",
                       description="Draw realistic synthetic head scans (skull, scalp fat, vessels, "
                                   "dura, sinus, choroid plexus, lesions, motion, bias, noise) as a "
                                   "BIDS dataset plus a ground-truth folder.")
    p.add_argument("out_dir", type=Path, help="BIDS dataset to create")
    p.add_argument("--truth-dir", type=Path, default=None,
                   help="ground truth folder (default OUT_DIR/../<name>_truth)")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--weeks", type=int, nargs="+", default=[0, 4, 12])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stress", action="store_true",
                   help="stress set: many small faint lesions, low SNR, heavy bias, large motion")
    p.add_argument("--size", choices=["small", "full"], default="full",
                   help="field of view: 'full' ~ 230x230x180 mm, 'small' ~ 150 mm (fast tests)")
    p.add_argument("--activity", type=float, default=1.0,
                   help="scale of the rate of new enhancing lesions (1 = a trial population; "
                        "e.g. 4 for lesion-rich training or evaluation data)")
    p.add_argument("--juxtacortical", type=float, default=0.25,
                   help="share of new lesions placed at the grey-white junction (0-1)")
    p.add_argument("--real-anatomy", type=Path, default=None, metavar="SCANS_DIR",
                   help="draw the trial on a real brain instead of geometric anatomy: a folder with "
                        "T1POST_mni, T1_mni and T2_lesions_consensus_mni (e.g. "
                        "../shared/real_scans/open_ms_patient07); a synthetic head is wrapped around it "
                        "and each visit gets its own inserted lesions and acquisition "
                        "(docs/real_scan_evaluation.md)")
    p.add_argument("--mean-lesions", type=float, default=3.0,
                   help="with --real-anatomy: mean number of enhancing lesions per visit")
    p.set_defaults(func=_cmd_phantoms)


def _cmd_phantoms(args) -> int:
    from lesionpipe.phantom import write_dataset

    truth = args.truth_dir or args.out_dir.resolve().parent / f"{args.out_dir.name}_truth"
    if args.subjects < 1:
        raise UsageError("--subjects must be >= 1")
    if sorted(set(args.weeks)) != list(args.weeks) or min(args.weeks) < 0:
        raise UsageError(f"--weeks must be increasing non-negative integers, got {args.weeks}")
    if not args.activity > 0:
        raise UsageError("--activity must be positive")
    if not 0.0 <= args.juxtacortical <= 1.0:
        raise UsageError("--juxtacortical must be between 0 and 1")
    if args.real_anatomy is not None:
        from lesionpipe.realtrial import write_real_trial

        if args.stress or args.size != "full":
            raise UsageError("--real-anatomy draws full-size scans of one real brain; "
                             "--stress and --size do not apply")
        if not args.mean_lesions >= 0:
            raise UsageError("--mean-lesions must be >= 0")
        try:
            write_real_trial(args.real_anatomy, args.out_dir, truth, n_subjects=args.subjects,
                             weeks=tuple(args.weeks), seed=args.seed, mean_lesions=args.mean_lesions,
                             progress=LOG.info)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    else:
        write_dataset(args.out_dir, truth, n_subjects=args.subjects, weeks=tuple(args.weeks),
                      seed=args.seed, stress=args.stress, size=args.size, activity=args.activity,
                      juxtacortical=args.juxtacortical, progress=LOG.info)
    print(f"dataset: {args.out_dir}\ntruth:   {truth}")
    return 0


# ============================================================================================
# analyze / simulate-trial  (lesionpipe.stats)
# ============================================================================================
def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="efficacy model from gel_counts.tsv",
                       description="Negative-binomial efficacy analysis of per-visit GEL counts: "
                                   "primary NB2 regression, Poisson/overdispersion check, "
                                   "within-patient crossover analyses, per-visit summaries, "
                                   "plots and an HTML summary (see docs/analyze.md).")
    p.add_argument("counts_tsv", type=Path,
                   help="gel_counts.tsv or gel_counts_reviewed.tsv (extra columns are ignored)")
    p.add_argument("--design", type=Path, required=True,
                   help="TSV: participant_id, arm (two labels), optional covariate columns")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: efficacy/ beside COUNTS_TSV)")
    p.add_argument("--settings", default=None, metavar="FILE.toml",
                   help="settings TOML; its [analysis] section holds visit windows and model "
                        "choices")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from lesionpipe.stats.efficacy import InputError, ModelError, run_analysis

    settings = _load_settings(args.settings)
    out = args.out or args.counts_tsv.resolve().parent / "efficacy"
    try:
        result = run_analysis(args.counts_tsv, args.design, out, settings.analysis)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    except ModelError as exc:
        print(f"lesionpipe analyze: model failed: {exc}", file=sys.stderr)
        return 1
    p = result["primary"]
    lo, hi = p["ci95"]
    print(f"primary: rate ratio {p['comparison']} = {p['rate_ratio']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}), Wald p = {p['p_value']:.4g}, LR p = {p['p_value_lr']:.4g}")
    print(f"         dispersion alpha = {p['dispersion']['alpha']:.4g} "
          f"(theta = {p['dispersion']['theta']:.4g}); n = "
          + ", ".join(f"{k}: {v}" for k, v in p["n"].items())
          + f"; excluded: {len(result['excluded'])}")
    print(f"outputs: {out}")
    return 0


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate-trial", help="draw a MESEMS-like trial's counts and design",
                       description="Simulate per-visit GEL counts of a two-arm crossover trial "
                                   "(gamma-Poisson, i.e. negative-binomial patient totals) and "
                                   "write gel_counts.tsv and design.tsv to OUT_DIR.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=144, help="patients randomised (default 144)")
    p.add_argument("--arm-split", default="1:1", metavar="A:B",
                   help="allocation ratio active-first:reference-first (default 1:1)")
    p.add_argument("--arms", nargs=2, default=["MSC-first", "placebo-first"],
                   metavar=("ACTIVE_FIRST", "REFERENCE"), help="arm labels")
    p.add_argument("--baseline-week", type=int, default=0)
    p.add_argument("--period1-weeks", type=int, nargs="+", default=[4, 12, 24])
    p.add_argument("--period2-weeks", type=int, nargs="*", default=[28, 36, 48])
    p.add_argument("--baseline-rate", type=float, default=1.0,
                   help="mean GELs per scan off treatment (default 1.0)")
    p.add_argument("--dispersion", type=float, default=2.0,
                   help="NB2 dispersion alpha of patient activity (variance mu + alpha mu^2; "
                        "theta = 1/alpha; default 2.0)")
    p.add_argument("--rate-ratio", type=float, default=1.0,
                   help="true rate ratio active vs placebo (default 1.0)")
    p.add_argument("--period-ratio", type=float, default=1.0,
                   help="multiplicative change in GEL rate in period 2 (default 1.0)")
    p.add_argument("--missing-rate", type=float, default=0.05,
                   help="probability that any visit fails (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from lesionpipe.stats.simulate import simulate_trial, write_trial

    try:
        a, b = (float(x) for x in args.arm_split.split(":"))
        if a <= 0 or b <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--arm-split must look like 1:1 or 2:1, not {args.arm_split!r}") from None
    try:
        counts, design = simulate_trial(
            n=args.n, active_fraction=a / (a + b), arms=tuple(args.arms),
            baseline_week=args.baseline_week, period1_weeks=tuple(args.period1_weeks),
            period2_weeks=tuple(args.period2_weeks), baseline_rate=args.baseline_rate,
            dispersion=args.dispersion, rate_ratio=args.rate_ratio,
            period_ratio=args.period_ratio, missing_rate=args.missing_rate, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    c, d = write_trial(args.out_dir, counts, design)
    print(f"counts: {c}\ndesign: {d}")
    return 0


# ============================================================================================
# import-dicom  (lesionpipe.dicom)
# ============================================================================================
def _add_import_dicom(sub) -> None:
    p = sub.add_parser(
        "import-dicom", help="convert a site's DICOM export to de-identified BIDS",
        description="Convert a site's DICOM series to BIDS with dcm2niix: post-contrast T1 -> "
                    "*_ce-gadolinium_T1w, pre-contrast T1 -> *_T1w, FLAIR/T2/PD kept with their "
                    "suffix, other series skipped with a reason. Patient, site and date "
                    "information is removed. DICOM_DIR is only read.")
    p.add_argument("dicom_dir", type=Path, nargs="?",
                   help="one session's DICOM folder (omit with --batch)")
    p.add_argument("bids_dir", type=Path, help="BIDS dataset to create or add to")
    p.add_argument("--participant-label", metavar="LABEL", help="'01' or 'sub-01'")
    p.add_argument("--session-label", metavar="LABEL", help="'w04' or 'ses-w04'")
    p.add_argument("--week", type=float, default=None,
                   help="trial week of this session (written to sub-<s>_sessions.tsv)")
    p.add_argument("--post-series", type=int, default=None, metavar="N",
                   help="series number of the post-contrast T1w when the tags cannot tell")
    p.add_argument("--pre-series", type=int, default=None, metavar="N",
                   help="series number of the pre-contrast T1w when the tags cannot tell")
    p.add_argument("--batch", type=Path, default=None, metavar="FILE.tsv",
                   help="TSV with columns dicom_dir, participant_id, session_id and optional "
                        "week, post_series, pre_series (folders relative to the TSV)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing scans and a different week in sessions.tsv")
    p.add_argument("--dcm2niix", type=Path, default=None, metavar="PATH",
                   help="dcm2niix executable (default: next to Python, then PATH)")
    p.set_defaults(func=_cmd_import_dicom)


def _cmd_import_dicom(args) -> int:
    from lesionpipe.dicom import (DicomImportError, ImportJob, bids_label, find_dcm2niix,
                                  format_report, import_many, read_batch)

    if args.week is not None and not math.isfinite(args.week):
        raise UsageError("--week must be a finite number")
    if args.batch:
        single = [o for o, v in (("DICOM_DIR", args.dicom_dir),
                                 ("--participant-label", args.participant_label),
                                 ("--session-label", args.session_label), ("--week", args.week),
                                 ("--post-series", args.post_series),
                                 ("--pre-series", args.pre_series)) if v is not None]
        if single:
            raise UsageError(f"--batch takes every session from the TSV; drop {', '.join(single)}")
        if not args.batch.is_file():
            raise UsageError(f"--batch {args.batch} is not a file")
        try:
            jobs = read_batch(args.batch)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        if args.dicom_dir is None:
            raise UsageError("give DICOM_DIR and BIDS_DIR, or --batch FILE.tsv and BIDS_DIR")
        if not args.participant_label or not args.session_label:
            raise UsageError("--participant-label and --session-label are required "
                             "(or use --batch)")
        try:
            jobs = [ImportJob(dicom_dir=args.dicom_dir,
                              participant=bids_label(args.participant_label, "sub"),
                              session=bids_label(args.session_label, "ses"), week=args.week,
                              post_series=args.post_series, pre_series=args.pre_series)]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    for job in jobs:
        if not job.dicom_dir.is_dir():
            raise UsageError(f"DICOM folder {job.dicom_dir} is not a directory")
        if _inside(args.bids_dir, job.dicom_dir):
            raise UsageError(f"BIDS_DIR {args.bids_dir} is inside the DICOM folder "
                             f"{job.dicom_dir}; the source folder is never written to")
    if args.bids_dir.exists() and not args.bids_dir.is_dir():
        raise UsageError(f"BIDS_DIR {args.bids_dir} exists and is not a directory")
    try:
        exe = find_dcm2niix(args.dcm2niix)
    except DicomImportError as exc:
        raise UsageError(str(exc)) from None
    LOG.info("import-dicom: %d session(s) with %s", len(jobs), exe.name)
    reports = import_many(jobs, args.bids_dir, overwrite=args.overwrite, dcm2niix=exe)
    for rep in reports:
        print(format_report(rep))
    bad = [r.name for r in reports if not r.ok]
    if bad:
        print(f"\n{len(bad)} of {len(reports)} session(s) need attention: {', '.join(bad)} "
              f"(details above and in {args.bids_dir / 'logs' / 'import-dicom'})", file=sys.stderr)
        return 1
    return 0


# ============================================================================================
# review, review-admin, review-export  (lesionpipe.review)
# ============================================================================================
def _add_review(sub) -> None:
    from lesionpipe.review.cli import add_review_parsers

    add_review_parsers(sub)
    sub.choices["review"].set_defaults(func=_cmd_review)
    sub.choices["review-admin"].set_defaults(func=_cmd_review_admin)
    sub.choices["review-export"].set_defaults(func=_cmd_review_export)


def _cmd_review(args) -> int:
    from lesionpipe.review.cli import serve_cli

    return serve_cli(args, _load_settings(args.settings))


def _cmd_review_admin(args) -> int:
    from lesionpipe.review.cli import admin_cli

    return admin_cli(args)


def _cmd_review_export(args) -> int:
    from lesionpipe.review.cli import export_cli

    return export_cli(args)


# ============================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lesionpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_evaluate, _add_phantoms, _add_analyze, _add_simulate,
                _add_import_dicom, _add_review):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"lesionpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
