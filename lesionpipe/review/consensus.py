"""Compare two independent reads, decide whether a visit needs adjudication, and final counts.

A read is summarised by the latest decision on each lesion (``auto:<lesion_id>`` for the
pipeline's lesions, ``added:<id>`` for lesions the reader added) and by its added lesions'
centroids. Two readers' added lesions are the same lesion when their centroids lie within
``match_distance_mm`` of each other (greedy, closest pairs first).

>>> r1 = ReadSummary({'auto:1': 'confirm', 'auto:2': 'reject'}, {})
>>> r2 = ReadSummary({'auto:1': 'confirm', 'auto:2': 'confirm'}, {})
>>> c = compare_reads([1, 2], r1, r2, affine=np.eye(4), rule='lesions', match_distance_mm=3)
>>> c.disagree, c.counts, [r['key'] for r in c.rows if not r['agree']]
(True, (1, 2), ['auto:2'])
>>> final_keys(c, {'auto:2': 'reject'}, own_added=[])
['auto:1']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RULES = ("lesions", "count")


@dataclass
class ReadSummary:
    #: lesion key -> 'confirm' | 'reject' (latest decision)
    latest: dict[str, str]
    #: added lesion id -> centroid (original voxel indices)
    added: dict[int, list[float]] = field(default_factory=dict)

    def confirmed(self) -> set[str]:
        return {k for k, v in self.latest.items() if v == "confirm"}

    def confirmed_added(self) -> dict[int, list[float]]:
        return {i: c for i, c in self.added.items() if self.latest.get(f"added:{i}") == "confirm"}

    @property
    def count(self) -> int:
        return len(self.confirmed())


@dataclass
class Comparison:
    rows: list[dict]
    counts: tuple[int, int]
    disagree: bool


def match_added(a: dict[int, list[float]], b: dict[int, list[float]], *, affine: np.ndarray,
                max_mm: float) -> list[tuple[int | None, int | None]]:
    """Pair added lesions of two readers by centroid distance; unpaired ones get ``None``.

    >>> match_added({1: [0, 0, 0], 2: [9, 9, 9]}, {5: [1, 0, 0]}, affine=np.eye(4), max_mm=3)
    [(1, 5), (2, None)]
    """
    aff = np.asarray(affine, float)

    def world(c):
        return aff[:3, :3] @ np.asarray(c, float) + aff[:3, 3]

    pairs = sorted((float(np.linalg.norm(world(ca) - world(cb))), ia, ib)
                   for ia, ca in a.items() for ib, cb in b.items())
    used_a, used_b, out = set(), set(), []
    for dist, ia, ib in pairs:
        if dist <= max_mm and ia not in used_a and ib not in used_b:
            used_a.add(ia)
            used_b.add(ib)
            out.append((ia, ib))
    out += [(ia, None) for ia in a if ia not in used_a]
    out += [(None, ib) for ib in b if ib not in used_b]
    return sorted(out, key=lambda p: (p[0] is None, p[0] or 0, p[1] or 0))


def compare_reads(auto_ids: list[int], r1: ReadSummary, r2: ReadSummary, *, affine: np.ndarray,
                  rule: str, match_distance_mm: float) -> Comparison:
    """Row-by-row comparison of two signed reads and whether the visit needs adjudication."""
    if rule not in RULES:
        raise ValueError(f"review.disagreement_rule must be one of {RULES}, not {rule!r}")
    rows = []
    for lid in auto_ids:
        key = f"auto:{lid}"
        d1, d2 = r1.latest.get(key), r2.latest.get(key)
        rows.append({"key": key, "kind": "auto", "lesion_id": lid, "r1": d1, "r2": d2,
                     "agree": d1 == d2})
    for ia, ib in match_added(r1.confirmed_added(), r2.confirmed_added(), affine=affine,
                              max_mm=match_distance_mm):
        key = f"added:{ia if ia is not None else ib}"
        rows.append({"key": key, "kind": "added", "r1_id": ia, "r2_id": ib,
                     "r1": "confirm" if ia is not None else None,
                     "r2": "confirm" if ib is not None else None,
                     "agree": ia is not None and ib is not None})
    counts = (r1.count, r2.count)
    disagree = counts[0] != counts[1] if rule == "count" else not all(r["agree"] for r in rows)
    return Comparison(rows, counts, disagree)


def row_final(row: dict, adjudicated: dict[str, str]) -> str | None:
    """'confirm'/'reject' for one row: the adjudicator's decision, else the readers' agreement."""
    if row["key"] in adjudicated:
        return adjudicated[row["key"]]
    if row["agree"]:
        return "confirm" if row["r1"] == "confirm" else "reject"
    return None


def unresolved(comparison: Comparison, adjudicated: dict[str, str]) -> list[str]:
    """Keys of disputed rows the adjudicator has not decided yet."""
    return [r["key"] for r in comparison.rows if row_final(r, adjudicated) is None]


def final_keys(comparison: Comparison, adjudicated: dict[str, str] | None,
               *, own_added: list[int]) -> list[str]:
    """Confirmed lesion keys of a finished visit.

    Without adjudication (``adjudicated`` is None) the agreed read is Reader 1's. With it, each
    row takes the adjudicator's decision, else the readers' agreement, plus lesions the adjudicator
    added (``own_added`` ids still confirmed).
    """
    if adjudicated is None:
        keys = [r["key"] for r in comparison.rows if r["r1"] == "confirm"]
        return keys
    keys = [r["key"] for r in comparison.rows if row_final(r, adjudicated) == "confirm"]
    keys += [f"added:{i}" for i in own_added if adjudicated.get(f"added:{i}") == "confirm"]
    return keys
