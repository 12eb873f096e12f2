#!/usr/bin/env python
"""Re-run the detection step of every visit of a finished work dir with the current code.

For work on the detector (features, rules, the classifier): Nipype's cache is keyed on a step's
inputs, not on the code, so after a change to ``lesionpipe.lesions`` a re-run of ``lesionpipe
run`` on the same work dir would reuse the old detection. This script runs the detection step
(``DetectGEL``) again on each visit's cached inputs (normalised images, masks, settings) and
writes what ``lesionpipe evaluate`` reads: the lesion labels, the candidate image and table, and
``gel_counts.tsv``. Preprocessing is not repeated: 36 real-brain visits took 10-13 minutes on
two cores shared with another pipeline run (the whole pipeline: about 20 minutes)::

    lesionpipe run BIDS OUT -w WORK --no-reports            # once
    python scripts/redetect.py WORK OUT2 [--settings changes.toml] [--nprocs 2]
    lesionpipe evaluate OUT2 TRUTH

``--settings`` holds only the settings to change; the rest are each visit's own. Visits whose
detection step never ran (failed earlier) are listed and left out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_VISIT = re.compile(r"(sub-[a-zA-Z0-9]+)_(ses-[a-zA-Z0-9]+)_")


def _detect_dirs(work: Path) -> list[Path]:
    return sorted(p.parent for p in work.glob("*/visit_*_wf/gel_wf/detect/_inputs.pklz"))


def _one(job: tuple[Path, Path, str]) -> tuple[str, str, int, bool]:
    node_dir, out, changes = job
    import nibabel as nb
    import numpy as np
    from nipype.utils.filemanip import loadpkl

    from lesionpipe.evaluate import _visit_files
    from lesionpipe.imageio import atomic_save_nifti, atomic_write_text, like_image
    from lesionpipe.interfaces.visit import DetectGEL
    from lesionpipe.settings import Settings

    inputs = {k: v for k, v in loadpkl(str(node_dir / "_inputs.pklz")).items()
              if v is not None and not repr(v).startswith("<undefined")}
    if changes:
        settings = Settings.from_toml_string(inputs["settings_toml"]).to_dict()
        settings.update(tomllib.loads(changes))
        inputs["settings_toml"] = Settings.from_dict(settings).to_toml_string()
    sub, ses = _VISIT.search(Path(inputs["source_file"]).name).groups()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            res = DetectGEL(**inputs).run().outputs
        finally:
            os.chdir(cwd)
        src = nb.load(inputs["source_file"])
        files = _visit_files(out, sub, ses)      # the names lesionpipe evaluate reads
        files["dseg"].parent.mkdir(parents=True, exist_ok=True)
        for key, path in (("dseg", res.labels), ("candidates", res.candidate_labels)):
            data = np.asanyarray(nb.load(path).dataobj).astype(np.int32)
            atomic_save_nifti(like_image(data, src), files[key])
        atomic_write_text(files["candidate_table"], Path(res.candidates).read_text())
    return sub, ses, int(res.n_lesions), "pre_file" in inputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="work dir of a finished `lesionpipe run`")
    ap.add_argument("out", type=Path, help="folder for the new detection (for lesionpipe evaluate)")
    ap.add_argument("--settings", type=Path, default=None, help="TOML of the settings to change")
    ap.add_argument("--nprocs", type=int, default=2)
    args = ap.parse_args(argv)
    dirs = _detect_dirs(args.work)
    if not dirs:
        ap.error(f"{args.work}: no detection step found (expected */visit_*_wf/gel_wf/detect)")
    found = {d.parents[1] for d in dirs}
    for visit in sorted(set(args.work.glob("*/visit_*_wf")) - found):
        print(f"{visit.name}: no detection step in the work dir (the visit failed earlier); left out")
    changes = args.settings.read_text() if args.settings else ""
    jobs = [(d, args.out, changes) for d in dirs]
    if args.nprocs > 1:
        with ProcessPoolExecutor(args.nprocs) as pool:
            rows = list(pool.map(_one, jobs))
    else:
        rows = [_one(job) for job in jobs]
    from lesionpipe.imageio import atomic_write_text

    lines = ["participant_id\tsession_id\tgel_count\thas_pre\tstatus\terror"]
    lines += [f"{sub}\t{ses}\t{n}\t{int(pre)}\tok\t" for sub, ses, n, pre in sorted(rows)]
    atomic_write_text(args.out / "gel_counts.tsv", "\n".join(lines) + "\n")
    print(f"{len(rows)} visits re-detected into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
