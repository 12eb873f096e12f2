"""The ``lesionpipe`` command line: the only place that turns argv into Settings and calls.

Exit codes: 0 = everything succeeded, 1 = some items (visits, series) failed and are listed,
2 = bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    p.set_defaults(func=_cmd_phantoms)


def _cmd_phantoms(args) -> int:
    from lesionpipe.phantom import write_dataset

    truth = args.truth_dir or args.out_dir.resolve().parent / f"{args.out_dir.name}_truth"
    if args.subjects < 1:
        raise UsageError("--subjects must be >= 1")
    if sorted(set(args.weeks)) != list(args.weeks) or min(args.weeks) < 0:
        raise UsageError(f"--weeks must be increasing non-negative integers, got {args.weeks}")
    write_dataset(args.out_dir, truth, n_subjects=args.subjects, weeks=tuple(args.weeks),
                  seed=args.seed, stress=args.stress, size=args.size, progress=LOG.info)
    print(f"dataset: {args.out_dir}\ntruth:   {truth}")
    return 0


# ============================================================================================
# analyze / simulate-trial  (lesionpipe.stats)
# ============================================================================================
def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="efficacy model from gel_counts.tsv",
                       description="Negative-binomial efficacy analysis of per-visit GEL counts.")
    p.add_argument("counts_tsv", type=Path)
    p.add_argument("--design", type=Path, required=True, help="participant_id, arm, covariates")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: efficacy/)")
    p.add_argument("--settings", default=None, metavar="FILE.toml")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from lesionpipe.stats.efficacy import run_analysis

    settings = _load_settings(args.settings)
    out = args.out or args.counts_tsv.resolve().parent / "efficacy"
    result = run_analysis(args.counts_tsv, args.design, out, settings.analysis)
    print(json.dumps(result.get("primary", result), indent=2, default=str))
    return 0


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate-trial", help="draw a MESEMS-like trial's counts and design",
                       description="Simulate per-visit GEL counts of a two-arm crossover trial.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from lesionpipe.stats.simulate import simulate_trial_cli

    return simulate_trial_cli(args)


# ============================================================================================
# import-dicom  (lesionpipe.dicom)
# ============================================================================================
def _add_import_dicom(sub) -> None:
    p = sub.add_parser("import-dicom", help="convert a site's DICOM export to de-identified BIDS",
                       description="Convert DICOM series to BIDS with dcm2niix, recognising pre- and "
                                   "post-contrast T1 and removing identifying information.")
    p.add_argument("dicom_dir", type=Path, nargs="?")
    p.add_argument("bids_dir", type=Path)
    p.add_argument("--participant-label")
    p.add_argument("--session-label")
    p.add_argument("--week", type=float, default=None)
    p.add_argument("--batch", type=Path, default=None,
                   help="TSV: dicom_dir, participant_id, session_id, week")
    p.set_defaults(func=_cmd_import_dicom)


def _cmd_import_dicom(args) -> int:
    from lesionpipe.dicom import import_dicom_cli

    return import_dicom_cli(args)


# ============================================================================================
# review, review-admin, review-export  (lesionpipe.review)
# ============================================================================================
def _add_review(sub) -> None:
    p = sub.add_parser("review", help="serve the central-reader review application")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--settings", default=None, metavar="FILE.toml")
    p.set_defaults(func=_cmd_review)

    a = sub.add_parser("review-admin", help="readers, assignments, audit verification")
    a.add_argument("--db", type=Path, required=True)
    a.add_argument("admin_args", nargs=argparse.REMAINDER)
    a.set_defaults(func=_cmd_review_admin)

    e = sub.add_parser("review-export", help="write reviewed counts, masks and the audit trail")
    e.add_argument("output_dir", type=Path)
    e.add_argument("--db", type=Path, required=True)
    e.add_argument("--out", type=Path, default=None)
    e.set_defaults(func=_cmd_review_export)


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
