"""Run a batch of visits through Nipype and collect per-visit status into ``gel_counts.tsv``.

A visit fails alone: Nipype keeps running the other visits' nodes (``stop_on_first_crash`` off);
each visit's crash files (plain text) go to ``OUTPUT_DIR/logs/<visit>/`` and the reason, read from
the crash file's last exception line, goes into ``gel_counts.tsv`` with an empty count.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lesionpipe import __version__
from lesionpipe.bids import Visit
from lesionpipe.imageio import atomic_write_json, atomic_write_tsv
from lesionpipe.settings import Settings

LOG = logging.getLogger("lesionpipe")
COUNT_COLUMNS = ["participant_id", "session_id", "week", "gel_count", "gel_volume_mm3",
                 "has_pre", "status", "error"]


@dataclass
class BatchResult:
    table: pd.DataFrame
    failed: pd.DataFrame

    @property
    def all_ok(self) -> bool:
        return self.failed.empty


def run_batch(visits: list[Visit], *, bids_dir: Path, output_dir: Path, work_dir: Path,
              settings: Settings, nprocs: int = 1, omp_nthreads: int = 1,
              plugin: str | None = None, plugin_args: dict | None = None,
              reports: bool = True, echo=print) -> BatchResult:
    """Process ``visits``; write derivatives, ``gel_counts.tsv`` and ``dataset_description.json``."""
    from nipype import config as nipype_config

    from lesionpipe.workflows.base import init_lesionpipe_wf

    output_dir = Path(output_dir).resolve()
    work_dir = Path(work_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(output_dir, bids_dir)
    log_root = output_dir / "logs"

    nipype_config.set("execution", "check_version", "false")
    _quiet_nipype()
    workflow = init_lesionpipe_wf(visits=visits, output_dir=str(output_dir), work_dir=str(work_dir),
                                  settings=settings, omp_nthreads=omp_nthreads, reports=reports)
    workflow.config["execution"] = {
        "crashfile_format": "txt", "stop_on_first_crash": "false", "check_version": "false",
        "remove_unnecessary_outputs": "false", "hash_method": "content",
        "crashdump_dir": str(log_root),
    }
    by_key = {}
    for visit in visits:
        sub_wf = workflow.get_node(f"visit_{visit.key}_wf")
        log_dir = log_root / f"{visit.prefix}"
        for node_name in sub_wf.list_node_names():
            node = sub_wf.get_node(node_name)
            node.config = {"execution": {"crashdump_dir": str(log_dir)}}
        by_key[f"visit_{visit.key}_wf"] = visit

    progress = _Progress(by_key, echo=echo)
    plugin_args = dict(plugin_args or {})
    plugin_args["status_callback"] = progress
    if plugin is None:
        plugin = "MultiProc" if nprocs > 1 else "Linear"
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", nprocs)
        plugin_args.setdefault("raise_insufficient", False)
    started = time.time()
    echo(f"lesionpipe {__version__}: {len(visits)} visit(s), plugin {plugin}, "
         f"work dir {work_dir}")
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # some nodes failed; the others completed
        LOG.info("some nodes failed: %s", str(exc).splitlines()[0])

    rows = []
    for key, visit in by_key.items():
        row = _visit_row(visit, output_dir, ok=progress.finished.get(key) == "ok")
        if row["status"] == "failed":
            row["error"] = _failure_reason(log_root / visit.prefix, since=started) or \
                progress.reasons.get(key) or "processing did not finish (see logs/)"
        rows.append(row)
    table = merge_counts(output_dir / "gel_counts.tsv", pd.DataFrame(rows, columns=COUNT_COLUMNS))
    atomic_write_tsv(table, output_dir / "gel_counts.tsv")
    run_df = pd.DataFrame(rows, columns=COUNT_COLUMNS)
    failed = run_df[run_df.status == "failed"]
    _print_summary(run_df, failed, output_dir, echo=echo)
    return BatchResult(table=run_df, failed=failed)


def _quiet_nipype() -> None:
    """Nipype's per-node INFO lines drown the progress lines; keep its warnings and errors."""
    from nipype import logging as nlogging

    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logger = nlogging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.propagate = False


class _Progress:
    """Nipype status callback: one line per finished visit (done/total)."""

    def __init__(self, by_key: dict, *, echo=print):
        self.by_key = by_key
        self.total = len(by_key)
        self.finished: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.echo = echo
        self._lock = threading.Lock()

    def _visit_key(self, node) -> str | None:
        for part in str(getattr(node, "fullname", "")).split("."):
            if part in self.by_key:
                return part
        return None

    def __call__(self, node, status: str) -> None:
        key = self._visit_key(node)
        if key is None or key in self.finished:
            return
        if status == "end" and node.name == "ds_visit":
            outcome = "ok"
        elif status == "exception":
            outcome = "failed"
            self.reasons[key] = f"step '{node.name}' failed"
        else:
            return
        with self._lock:
            self.finished[key] = outcome
            visit = self.by_key[key]
            detail = ""
            if outcome == "ok":
                try:
                    detail = f" ({node.result.outputs.gel_count} GEL)"
                except AttributeError:
                    detail = ""
            self.echo(f"[{len(self.finished)}/{self.total}] {visit.participant_id} "
                      f"{visit.session_id}: {outcome}{detail}")


def _visit_row(visit: Visit, output_dir: Path, *, ok: bool) -> dict:
    row = {"participant_id": visit.participant_id, "session_id": visit.session_id,
           "week": visit.week, "gel_count": None, "gel_volume_mm3": None,
           "has_pre": int(visit.pre is not None), "status": "failed", "error": ""}
    if not ok:
        return row
    sidecar = (output_dir / visit.participant_id / visit.session_id / "anat" /
               f"{visit.prefix}_ce-gadolinium_space-orig_label-GEL_mask.json")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        row["error"] = f"output sidecar unreadable: {exc}"
        return row
    row.update(gel_count=int(info["gel_count"]), gel_volume_mm3=float(info["gel_volume_mm3"]),
               status="ok", error="")
    return row


_EXC_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?(\w*(?:Error|Exception)): (.+)$")


def _failure_reason(log_dir: Path, *, since: float) -> str:
    """The last exception message of this run's crash files of a visit."""
    if not log_dir.is_dir():
        return ""
    crashes = sorted((p for p in log_dir.glob("crash-*.txt") if p.stat().st_mtime >= since - 1),
                     key=lambda p: p.stat().st_mtime)
    for crash in crashes:
        lines = crash.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            m = _EXC_LINE.match(line)
            if m and "nipype" not in m.group(1).lower():
                return f"{m.group(1)}: {m.group(2).strip()}"
    return ""


def merge_counts(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """Rows of this run replace the same visits' rows of an earlier run; others are kept."""
    if path.exists():
        old = pd.read_csv(path, sep="\t", dtype={"participant_id": str, "session_id": str},
                          keep_default_na=True)
        keys = set(zip(new.participant_id, new.session_id))
        old = old[[(p, s) not in keys for p, s in zip(old.participant_id, old.session_id)]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    new = new.sort_values(["participant_id", "week", "session_id"], na_position="last")
    out = new[COUNT_COLUMNS].copy()
    out["gel_count"] = out["gel_count"].astype("Int64")
    out["has_pre"] = out["has_pre"].astype("Int64")
    return out.reset_index(drop=True)


def write_dataset_description(output_dir: Path, bids_dir: Path) -> None:
    atomic_write_json(output_dir / "dataset_description.json", {
        "Name": "lesionpipe: gadolinium-enhancing lesion segmentation and counts",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionpipe", "Version": __version__,
                         "Description": "GEL detection on T1 post-gadolinium (+ pre) MRI"}],
        "SourceDatasets": [{"URL": "file://" + Path(bids_dir).name}],
    })


def _print_summary(table: pd.DataFrame, failed: pd.DataFrame, output_dir: Path, *, echo) -> None:
    show = table[["participant_id", "session_id", "week", "gel_count", "gel_volume_mm3",
                  "has_pre", "status"]].copy()
    show["gel_count"] = show["gel_count"].astype("Int64")
    echo("")
    echo(show.to_string(index=False, na_rep="n/a"))
    echo("")
    echo(f"counts:  {output_dir / 'gel_counts.tsv'}")
    echo(f"outputs: {output_dir}/sub-*/ses-*/anat/")
    echo(f"reports: {output_dir}/sub-*/ses-*/figures/*_report.html")
    if not failed.empty:
        echo(f"\n{len(failed)} visit(s) FAILED:")
        for _, r in failed.iterrows():
            echo(f"  {r.participant_id} {r.session_id}: {r.error}")
