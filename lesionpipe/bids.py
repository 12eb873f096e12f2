"""Find the visits of a BIDS dataset: post-contrast T1 (required), pre-contrast T1, visit week.

Indexing is a directory walk over ``sub-*/ses-*/anat``; no BIDS database is built, so a dataset of
thousands of visits is listed in well under a second per thousand and nothing is written.

A visit is one ``sub-<s>/ses-<v>`` folder holding ``sub-<s>_ses-<v>[_acq-..][_run-..]_ce-gadolinium_T1w.nii[.gz]``.
The pre-contrast scan is the plain ``..._T1w.nii[.gz]`` of that session (no ``ce-`` entity) with the same
``acq``/``run`` entities when the post-contrast name has them, else the only plain T1w of the session.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

POST_RE = re.compile(r"^(?P<prefix>sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)"
                     r"(?P<mid>(?:_[a-z]+-[A-Za-z0-9]+)*?))_ce-gadolinium"
                     r"(?P<after>(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
PRE_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)"
                    r"(?P<ents>(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")


class BidsError(ValueError):
    """The dataset cannot be indexed (bad layout, ambiguous scans, unreadable sessions.tsv)."""


@dataclass(frozen=True)
class Visit:
    """One MRI visit: what the per-visit workflow needs, no image read."""

    subject: str          # without "sub-"
    session: str          # without "ses-"
    post: Path            # post-contrast T1w
    pre: Path | None      # pre-contrast T1w or None (post-only mode)
    week: float | None    # from sub-<s>_sessions.tsv, else None
    entities: str = ""    # extra entities of the post file (e.g. "_acq-3d"), kept in output names

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    @property
    def session_id(self) -> str:
        return f"ses-{self.session}"

    @property
    def prefix(self) -> str:
        """``sub-<s>_ses-<v>[_acq-..]`` used in every output name."""
        return f"sub-{self.subject}_ses-{self.session}{self.entities}"

    @property
    def key(self) -> str:
        """A Nipype-safe identifier (letters, digits, underscores)."""
        return re.sub(r"[^A-Za-z0-9]", "_", f"{self.subject}_{self.session}{self.entities}")


def strip_label(label: str, prefix: str) -> str:
    """``'sub-01'`` or ``'01'`` -> ``'01'``.

    >>> strip_label('sub-01', 'sub'), strip_label('01', 'sub'), strip_label('ses-w04', 'ses')
    ('01', '01', 'w04')
    """
    label = label.strip()
    return label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label


def read_weeks(sessions_tsv: Path) -> dict[str, float | None]:
    """Map session label (without ``ses-``) to week from a ``sub-<s>_sessions.tsv``."""
    weeks: dict[str, float | None] = {}
    try:
        with open(sessions_tsv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BidsError(f"{sessions_tsv.name}: cannot be read ({exc})") from None
    for i, row in enumerate(rows, start=2):
        ses = (row.get("session_id") or "").strip()
        if not ses:
            raise BidsError(f"{sessions_tsv.name}: line {i} has no session_id")
        raw = (row.get("week") or "").strip()
        if raw in ("", "n/a", "NA", "nan"):
            week = None
        else:
            try:
                week = float(raw)
            except ValueError:
                raise BidsError(f"{sessions_tsv.name}: line {i}: week {raw!r} is not a number") \
                    from None
        weeks[strip_label(ses, "ses")] = week
    return weeks


def find_visits(bids_dir: str | Path, *, participants: list[str] | None = None,
                sessions: list[str] | None = None) -> list[Visit]:
    """List visits (sorted by subject, then week, then session) with their pre/post scans."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise BidsError(f"{bids_dir} is not a directory")
    bids_dir = bids_dir.resolve()  # Nipype nodes run in their own folders: absolute paths only
    want_sub = {strip_label(p, "sub") for p in participants} if participants else None
    want_ses = {strip_label(s, "ses") for s in sessions} if sessions else None
    subjects = sorted(p for p in bids_dir.glob("sub-*") if p.is_dir())
    if want_sub is not None:
        missing = want_sub - {p.name[4:] for p in subjects}
        if missing:
            raise BidsError("participant(s) not found in the dataset: "
                            + ", ".join(f"sub-{m}" for m in sorted(missing)))
        subjects = [p for p in subjects if p.name[4:] in want_sub]
    visits: list[Visit] = []
    for sub_dir in subjects:
        sub = sub_dir.name[4:]
        tsv = sub_dir / f"sub-{sub}_sessions.tsv"
        weeks = read_weeks(tsv) if tsv.exists() else {}
        for ses_dir in sorted(p for p in sub_dir.glob("ses-*") if p.is_dir()):
            ses = ses_dir.name[4:]
            if want_ses is not None and ses not in want_ses:
                continue
            anat = ses_dir / "anat"
            if not anat.is_dir():
                continue
            visits.extend(_visits_in(anat, sub, ses, weeks.get(ses)))
    visits.sort(key=lambda v: (v.subject, v.week if v.week is not None else float("inf"),
                               v.session, v.entities))
    return visits


def _visits_in(anat: Path, sub: str, ses: str, week: float | None) -> list[Visit]:
    names = sorted(p.name for p in anat.iterdir() if not p.name.startswith("."))
    posts = [(n, POST_RE.match(n)) for n in names]
    posts = [(n, m) for n, m in posts if m and m["sub"] == sub and m["ses"] == ses]
    pres = [(n, PRE_RE.match(n)) for n in names if "_ce-" not in n]
    pres = [(n, m) for n, m in pres if m and m["sub"] == sub and m["ses"] == ses]
    _refuse_duplicates([n for n, _ in posts], anat)
    _refuse_duplicates([n for n, _ in pres], anat)
    out = []
    for name, m in posts:
        entities = (m["mid"] or "") + (m["after"] or "")
        same = [n for n, pm in pres if (pm["ents"] or "") == entities]
        if same:
            pre = anat / same[0]
        elif len(pres) == 1 and not entities:
            pre = anat / pres[0][0]
        elif len(pres) > 1 and not entities:
            raise BidsError(f"sub-{sub}/ses-{ses}: several pre-contrast T1w scans "
                            f"({', '.join(n for n, _ in pres)}); cannot tell which pairs with {name}")
        else:
            pre = None
        out.append(Visit(subject=sub, session=ses, post=anat / name, pre=pre, week=week,
                         entities=entities))
    return out


def _refuse_duplicates(names: list[str], anat: Path) -> None:
    stems = [n.removesuffix(".gz").removesuffix(".nii") for n in names]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise BidsError(f"{anat}: both .nii and .nii.gz of {sorted(dup)[0]}; keep one")
