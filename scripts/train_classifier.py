#!/usr/bin/env python
"""Train the candidate classifier shipped as lesionpipe/data/gel_classifier.json.

Reproducible from seeds: draw phantom datasets, run the pipeline with the classifier switched off
(so every candidate keeps its features), label candidates against the truth, fit the model
(boosted trees, or ``--kind logistic``), and report subject-grouped cross-validated figures before
writing the model::

    python scripts/train_classifier.py TRAIN_ROOT --seeds 201 202 203 --subjects 4 [--stress-seeds 301]
    python scripts/train_classifier.py TRAIN_ROOT --reuse   # candidates already computed

A seed may carry the dataset's lesion activity, share of post-only visits and share of new
lesions placed juxtacortically, ``SEED[:ACTIVITY[:P[:JUXTACORTICAL]]]`` (see ``lesionpipe phantoms
--activity --juxtacortical``); ``--real-seeds SEED[:MEAN_LESIONS]`` adds trials drawn on the real
brain of ``--real-anatomy`` (``lesionpipe phantoms --real-anatomy``). The shipped model is built in
three stages. The first (``lesionpipe/data/gel_classifier_phantoms.json``) was trained on 8 subjects
x weeks 0/4/12 of each of ``--seeds 301 302:4 303:4:0.6 304:4:0.8 311 312:2 313:4:0.6
314:2:0.5:0.6 --peel-flank-mm 3`` (the defaults here; 192 visits, 558 lesion candidates, 51269
mimics), on candidates peeled as the detector peels them (``Settings.peel_flank_mm``). The second
(``lesionpipe/data/gel_classifier_real.json``) continues it with 100 trees on what it gets wrong
on trials of the real brain::

    python scripts/train_classifier.py TRAIN2 --seeds 315:4:0.5 --real-seeds 41001:5 41002:5 \
        --real-anatomy ../shared/real_scans/open_ms_patient07 \
        --base-model lesionpipe/data/gel_classifier_phantoms.json --n-trees 100

(72 visits, 292 lesion candidates). The third (``lesionpipe/data/gel_classifier.json``) continues
the second with 100 trees that also read four features of a candidate's surroundings
(``lesionpipe.lesions.detect.surround_features``), on the four sets of ``lesionpipe phantoms``
drawn for the evaluation of the second (real-brain seeds 40001 and 40002, geometric seeds 30101
and 30102 at activity 2; 132 visits, 380 lesion candidates), each run with ``lesionpipe run``
into ``TRAIN3/<name>/out`` beside its ``truth``::

    python scripts/train_classifier.py TRAIN3 --reuse \
        --base-model lesionpipe/data/gel_classifier_real.json \
        --extra-features shell_bright ring_bright shell_exits ring_p90 --n-trees 100

(docs/evaluation.md, last sections). The thresholds (``Settings.min_probability``,
``min_probability_post_only``) are the highest cross-validated candidate sensitivity at no more
than 0.2 false positives per visit with a pre-contrast scan and 0.5 without: 0.4 and 0.4 for the
first stage, which the second kept; 0.5 and 0.4 for the third. The earlier model (the first
four seeds, whole-basin candidates, 357 lesion candidates) is compared with it in
docs/evaluation.md.

A candidate is labelled a lesion when at least 30 % of its voxels lie on counted truth lesions,
a mimic when none do; candidates touching only uncounted (sub-threshold) truth lesions or
half-overlapping ones are left out of training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd


#: defaults of a seed's activity, post-only share and juxtacortical share, and the tag each one
#: adds to the dataset's folder name when it differs (``seed302_a4``, ``seed305_a6_p0.5_j0.6``)
_SEED_DEFAULTS = (1.0, 0.25, 0.25)
_SEED_TAGS = ("a", "p", "j")


def _parse_seed(text: str) -> tuple[int, float, float, float]:
    """``SEED[:ACTIVITY[:P_POST_ONLY[:JUXTACORTICAL]]]`` -> (seed, activity, p_post_only, share).

    >>> _parse_seed("303:4:0.6"), _parse_seed("301"), _parse_seed("305:6:0.5:0.6")
    ((303, 4.0, 0.6, 0.25), (301, 1.0, 0.25, 0.25), (305, 6.0, 0.5, 0.6))
    """
    parts = text.split(":")
    if not 1 <= len(parts) <= 4:
        raise argparse.ArgumentTypeError(
            f"expected SEED[:ACTIVITY[:P_POST_ONLY[:JUXTACORTICAL]]], got {text!r}")
    values = [int(parts[0])] + [float(p) for p in parts[1:]] + list(_SEED_DEFAULTS[len(parts) - 1:])
    return tuple(values)


def _parse_real_seed(text: str) -> tuple[int, float]:
    """``SEED[:MEAN_LESIONS]`` of a trial on the real brain -> (seed, mean lesions per visit).

    >>> _parse_real_seed("41001:5"), _parse_real_seed("41002")
    ((41001, 5.0), (41002, 3.0))
    """
    seed, _, mean = text.partition(":")
    return int(seed), float(mean or 3.0)


def _datasets(root: Path, seeds, stress_seeds, subjects, weeks, real_seeds=(), real_anatomy=None):
    from lesionpipe.phantom import write_dataset

    out = []
    for spec, stress in [(s, False) for s in seeds] + [(s, True) for s in stress_seeds]:
        seed, activity, p_post_only, juxtacortical = spec
        name = f"seed{seed}" + "".join(
            f"_{tag}{value:g}" for tag, value, default in zip(_SEED_TAGS, spec[1:], _SEED_DEFAULTS)
            if value != default) + ("_stress" if stress else "")
        base = root / name
        if not (base / "bids").exists():
            write_dataset(base / "bids", base / "truth", n_subjects=subjects, weeks=weeks,
                          seed=seed, stress=stress, size="full", activity=activity,
                          p_post_only=p_post_only, juxtacortical=juxtacortical)
        out.append(base)
    if real_seeds:
        from lesionpipe.realtrial import write_real_trial
    for seed, mean_lesions in real_seeds:
        base = root / f"real{seed}_m{mean_lesions:g}"
        if not (base / "bids").exists():
            write_real_trial(real_anatomy, base / "bids", base / "truth", n_subjects=subjects,
                             weeks=weeks, seed=seed, mean_lesions=mean_lesions)
        out.append(base)
    return out


def _run(base: Path, nprocs: int, peel_flank_mm: float) -> None:
    from lesionpipe.cli import main as cli

    toml = base / "rules_only.toml"
    toml.write_text(f'classifier = "none"\npeel_flank_mm = {peel_flank_mm!r}\n')
    cli(["run", str(base / "bids"), str(base / "out"), "-w", str(base / "work"),
         "--nprocs", str(nprocs), "--no-reports", "--settings", str(toml)])


def labelled_candidates(out_dir: Path, truth_dir: Path) -> pd.DataFrame:
    if not (truth_dir / "truth_lesions.tsv").is_file():
        raise SystemExit(f"{truth_dir}: no truth_lesions.tsv "
                         "(the truth folder that lesionpipe phantoms writes)")
    truth_lesions = pd.read_csv(truth_dir / "truth_lesions.tsv", sep="\t")
    rows = []
    for table_file in sorted(out_dir.glob("sub-*/ses-*/anat/*_desc-candidates_table.tsv")):
        sub, ses = table_file.name.split("_")[:2]
        table = pd.read_csv(table_file, sep="\t")
        if "contrast_z" not in table or table.empty:
            continue
        cand = np.asanyarray(nb.load(str(table_file).replace("_table.tsv", "_dseg.nii.gz")).dataobj)
        truth = np.asanyarray(nb.load(truth_dir / sub / ses /
                                      f"{sub}_{ses}_label-GEL_dseg.nii.gz").dataobj)
        tl = truth_lesions[(truth_lesions.participant_id == sub) &
                           (truth_lesions.session_id == ses)]
        counted = np.zeros(int(truth.max()) + 1, bool)
        counted[tl[tl.counted == 1].lesion_id.astype(int)] = True
        on_counted = counted[truth]
        on_any = truth > 0
        n = np.bincount(cand.ravel(), minlength=len(table) + 1)
        hit = np.bincount(cand.ravel(), weights=on_counted.ravel(), minlength=len(table) + 1)
        anyhit = np.bincount(cand.ravel(), weights=on_any.ravel(), minlength=len(table) + 1)
        frac = hit[1:len(table) + 1] / np.maximum(n[1:len(table) + 1], 1)
        frac_any = anyhit[1:len(table) + 1] / np.maximum(n[1:len(table) + 1], 1)
        table["label"] = np.where(frac >= 0.3, 1, np.where(frac_any == 0, 0, -1))
        table["participant_id"], table["session_id"] = sub, ses
        table["dataset"] = out_dir.parent.name
        rows.append(table)
    if not rows:
        raise SystemExit(f"{out_dir}: no candidate table with features "
                         "(sub-*/ses-*/anat/*_desc-candidates_table.tsv); "
                         "has the pipeline run there?")
    data = pd.concat(rows, ignore_index=True)
    # only what reaches the classifier in the pipeline: features computed, hard rules passed
    keep = data["contrast_z"].notna() & (data["shell_outside"] <= 0.3) & (data["label"] >= 0)
    return data[keep].reset_index(drop=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--seeds", type=_parse_seed, nargs="*",
                    default=[_parse_seed(s) for s in ("301", "302:4", "303:4:0.6", "304:4:0.8", "311",
                                                         "312:2", "313:4:0.6", "314:2:0.5:0.6")],
                    help="SEED[:ACTIVITY[:P_POST_ONLY[:JUXTACORTICAL]]] of each phantom dataset")
    ap.add_argument("--stress-seeds", type=_parse_seed, nargs="*", default=[])
    ap.add_argument("--real-seeds", type=_parse_real_seed, nargs="*", default=[],
                    help="SEED[:MEAN_LESIONS] of trials drawn on the real brain of --real-anatomy "
                         "(lesionpipe phantoms --real-anatomy)")
    ap.add_argument("--real-anatomy", type=Path, default=None, help="with --real-seeds")
    ap.add_argument("--base-model", type=Path, default=None,
                    help="continue this trees model on the candidates (new trees learn what it "
                         "gets wrong) instead of fitting from scratch")
    ap.add_argument("--extra-features", nargs="*", default=[], metavar="NAME",
                    help="with --base-model: features the new trees read besides the base's own "
                         "(see lesionpipe.lesions.classifier)")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--weeks", type=int, nargs="+", default=[0, 4, 12])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="use candidates already computed")
    ap.add_argument("--peel-flank-mm", type=float, default=3.0,
                    help="candidate peeling of the training runs (Settings.peel_flank_mm, "
                         "the shipped model's 3 mm; 0 = whole basins, the earlier model's)")
    ap.add_argument("--kind", choices=["trees", "logistic"], default="trees")
    ap.add_argument("--l2", type=float, default=1.0, help="logistic only")
    ap.add_argument("--n-trees", type=int, default=300, help="trees only")
    ap.add_argument("--depth", type=int, default=3, help="trees only: depth of each tree")
    ap.add_argument("--monotone", action="store_true",
                    help="trees only: constrain each feature to its physical direction "
                         "(lesionpipe.lesions.classifier.MONOTONE)")
    ap.add_argument("--drop-features", nargs="*", default=[], metavar="NAME",
                    help="features the model does not read (see lesionpipe.lesions.classifier)")
    ap.add_argument("--folds", type=int, default=5, help="subject-grouped cross-validation folds")
    ap.add_argument("--out", type=Path, default=None, help="model JSON (default: the shipped one)")
    args = ap.parse_args()

    from lesionpipe.lesions.classifier import DEFAULT_MODEL, FEATURES, train, train_trees

    for option in ("drop_features", "extra_features"):
        unknown = sorted(set(getattr(args, option)) - set(FEATURES))
        if unknown:
            ap.error(f"--{option.replace('_', '-')}: unknown {unknown} (known: {list(FEATURES)})")
    names = [n for n in FEATURES if n not in args.drop_features]

    if args.real_seeds and args.real_anatomy is None:
        ap.error("--real-seeds needs --real-anatomy")
    if args.base_model is None and args.extra_features:
        ap.error("--extra-features continues a model: it needs --base-model")
    base_model = None
    if args.base_model is not None:
        # a continued model reads its base's features (and --extra-features) and is its kind
        given = [flag for flag, on in (("--kind logistic", args.kind != "trees"),
                                       ("--monotone", args.monotone),
                                       ("--drop-features", bool(args.drop_features))) if on]
        if given:
            ap.error(f"{', '.join(given)}: not with --base-model (the continued trees read the "
                     "base model's features; add features with --extra-features)")
        from lesionpipe.lesions.classifier import TreeModel, continue_trees, load_model

        base_model = load_model(args.base_model)
        if not isinstance(base_model, TreeModel):
            ap.error(f"--base-model {args.base_model}: not a trees model")

    def fit(table, labels, info=None):
        if base_model is not None:
            return continue_trees(base_model, table, labels, n_trees=args.n_trees,
                                  depth=args.depth, info=info, extra_names=args.extra_features)
        if args.kind == "trees":
            return train_trees(table, labels, n_trees=args.n_trees, depth=args.depth, info=info,
                               names=names, monotone=args.monotone)
        return train(table, labels, l2=args.l2, info=info, names=names)

    if args.reuse:
        bases = sorted(p for p in args.root.iterdir() if (p / "out").is_dir())
    else:
        bases = _datasets(args.root, args.seeds, args.stress_seeds, args.subjects,
                          tuple(args.weeks), args.real_seeds, args.real_anatomy)
        for base in bases:
            _run(base, args.nprocs, args.peel_flank_mm)
    data = pd.concat([labelled_candidates(b / "out", b / "truth") for b in bases],
                     ignore_index=True)
    y = data["label"].to_numpy()
    print(f"training candidates: {len(data)} ({int(y.sum())} lesions, {int((y == 0).sum())} "
          f"mimics) from {data.groupby(['dataset', 'participant_id', 'session_id']).ngroups} "
          "visits")

    # subject-grouped cross-validation: each candidate's probability comes from a model that
    # never saw its subject (no visit of the same head in training and test)
    groups = (data["dataset"] + "/" + data["participant_id"]).to_numpy()
    uniq = np.unique(groups)
    fold_of = {g: i % args.folds for i, g in
               enumerate(np.random.default_rng(0).permutation(uniq))}
    fold = np.array([fold_of[g] for g in groups])
    prob = np.zeros(len(data))
    for k in range(args.folds):
        test = fold == k
        prob[test] = fit(data[~test], y[~test]).probability(data[test])
    visits = data.groupby(["dataset", "participant_id", "session_id"]).ngroups
    scored = [("CV", prob)]
    if base_model is not None:      # the base model never saw these candidates
        scored.append(("base model", base_model.probability(data)))
    for what, p in scored:
        for has_pre in (True, False):
            sel = data["has_pre"].astype(bool).to_numpy() == has_pre
            nv = data[sel].groupby(["dataset", "participant_id", "session_id"]).ngroups
            for thr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
                tp = int(((p >= thr) & (y == 1) & sel).sum())
                fp = int(((p >= thr) & (y == 0) & sel).sum())
                print(f"{what} {'pre+post ' if has_pre else 'post-only'} threshold {thr}: "
                      f"candidate sensitivity {tp / max((y[sel] == 1).sum(), 1):.3f}, false "
                      f"positives per visit {fp / max(nv, 1):.2f} ({nv} visits)")
    model = fit(data, y, info={
        "kind": args.kind, "trained_on": [b.name for b in bases],
        "n_candidates": int(len(data)), "n_lesions": int(y.sum()), "n_visits": int(visits),
        "labelling": "lesion if >= 30% of voxels on counted truth lesions; mimic if none"})
    out = args.out or DEFAULT_MODEL
    model.to_json(out)
    if args.kind == "logistic":
        print("coefficients (standardised features):")
        for name, c in sorted(zip(model.names, model.coef), key=lambda t: -abs(t[1])):
            print(f"  {name:20s} {c:+.3f}")
    print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
