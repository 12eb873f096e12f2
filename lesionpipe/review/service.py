"""Review rules on top of the store: what a user may see and do, visit status, final reads.

The web app and the export call only this layer, so the rules (blinding, locking after
signature, adjudication readiness) live in one place and are enforced on the server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from lesionpipe.review.consensus import (Comparison, ReadSummary, compare_reads, final_keys,
                                         row_final, unresolved)
from lesionpipe.review.grow import grow_region
from lesionpipe.review.store import REJECT_REASONS, ReviewError, Store, canonical
from lesionpipe.review.visitdata import (VOLUME_KINDS, OutputError, VisitCache, VisitData,
                                         VisitFiles, read_lesions)
from lesionpipe.settings import ReviewSettings

READER_MEANING = ("I, {name}, reviewed every automated lesion of visit {code} independently and "
                  "sign this read as my own assessment.")
ADJUDICATOR_MEANING = ("I, {name}, adjudicated the disagreements of visit {code}; this is the "
                       "final read of the visit.")
VOLUME_LABELS = {"post": "Post-contrast", "pre": "Pre-contrast", "sub": "Subtraction (post - pre)",
                 "enh": "Enhancement map (%)"}


class ReviewService:
    def __init__(self, store: Store, output_dir: str | Path, settings: ReviewSettings):
        self.store = store
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.cache = VisitCache(self.output_dir)
        self._light: dict[int, tuple[list[int], np.ndarray]] = {}

    # --- access ----------------------------------------------------------------------------
    def assignment_for(self, user, code: str):
        """The user's own assignment with this code; 404 otherwise (never reveals others')."""
        a = self.store.assignment_by_code(str(code))
        if a is None or a["user_id"] != user["id"]:
            raise ReviewError("no such visit in your worklist", 404)
        if a["kind"] == "adjudication":
            status = self.visit_status(a["visit_id"])["status"]
            if status not in ("needs_adjudication", "adjudicated"):
                raise ReviewError("this visit is not ready for adjudication", 409)
        return a

    def data(self, assignment) -> VisitData:
        v = self.store.visit(assignment["visit_id"])
        return self.cache.get(v["participant_id"], v["session_id"])

    # --- summaries ---------------------------------------------------------------------------
    def latest(self, assignment_id: int, conn=None) -> dict[str, dict[str, Any]]:
        conn = conn or self.store.conn
        out: dict[str, dict[str, Any]] = {}
        for r in conn.execute("SELECT * FROM decisions WHERE assignment_id=? ORDER BY id",
                              (assignment_id,)):
            out[r["lesion_key"]] = dict(r)
        return out

    def summary(self, assignment_id: int, conn=None) -> ReadSummary:
        conn = conn or self.store.conn
        latest = {k: v["decision"] for k, v in self.latest(assignment_id, conn).items()}
        added = {r["id"]: json.loads(r["centroid"]) for r in conn.execute(
            "SELECT id, centroid FROM added_lesions WHERE assignment_id=?", (assignment_id,))}
        return ReadSummary(latest, added)

    def light(self, visit_id: int) -> tuple[list[int], np.ndarray]:
        """(automated lesion ids, post-contrast affine) without loading any image data."""
        if visit_id not in self._light:
            v = self.store.visit(visit_id)
            files = VisitFiles(self.output_dir, v["participant_id"], v["session_id"])
            if not files.post.is_file():
                raise OutputError(f"{files.post.name}: post-contrast image not found")
            ids = [int(i) for i in read_lesions(files.lesions)["lesion_id"]]
            self._light[visit_id] = (ids, nb.load(str(files.post)).affine)
        return self._light[visit_id]

    def auto_ids(self, visit_id: int) -> list[int]:
        return self.light(visit_id)[0]

    def visit_status(self, visit_id: int, conn=None) -> dict[str, Any]:
        """status: unassigned | reading | agreed | needs_adjudication | adjudicated, or
        single_read when ``readers_per_visit`` is 1."""
        conn = conn or self.store.conn
        rows = conn.execute("SELECT * FROM assignments WHERE visit_id=?", (visit_id,)).fetchall()
        reads = sorted((r for r in rows if r["kind"] == "read"), key=lambda r: r["slot"])
        adj = next((r for r in rows if r["kind"] == "adjudication"), None)
        out: dict[str, Any] = {"reads": reads, "adjudication": adj, "comparison": None}
        if len(reads) < self.settings.readers_per_visit:
            out["status"] = "unassigned"
            return out
        if not all(self.store.is_signed(r["id"], conn) for r in reads):
            out["status"] = "reading"
            return out
        ids, affine = self.light(visit_id)
        s1 = self.summary(reads[0]["id"], conn)
        s2 = self.summary(reads[1]["id"], conn) if len(reads) > 1 else s1
        comp = compare_reads(ids, s1, s2, affine=affine, rule=self.settings.disagreement_rule,
                             match_distance_mm=self.settings.match_distance_mm)
        out["comparison"] = comp
        if len(reads) == 1:
            out["status"] = "single_read"
        elif not comp.disagree:
            out["status"] = "agreed"
        elif adj is not None and self.store.is_signed(adj["id"], conn):
            out["status"] = "adjudicated"
        else:
            out["status"] = "needs_adjudication"
        return out

    # --- locking --------------------------------------------------------------------------
    def _lock_check(self, assignment):
        def check(conn, correction_reason: str) -> str:
            correction_reason = (correction_reason or "").strip()
            st = self.visit_status(assignment["visit_id"], conn)
            if assignment["kind"] == "read":
                adj = st["adjudication"]
                if st["status"] == "adjudicated" or (
                        adj is not None and self.store.is_signed(adj["id"], conn)):
                    raise ReviewError("the visit has been adjudicated; reads are closed", 409)
            elif st["status"] not in ("needs_adjudication", "adjudicated"):
                raise ReviewError("this visit is not ready for adjudication", 409)
            if self.store.is_signed(assignment["id"], conn):
                if not correction_reason:
                    raise ReviewError("this read is signed and locked; a change needs a "
                                      "correction reason", 409)
                return correction_reason
            return ""
        return check

    # --- actions ------------------------------------------------------------------------------
    def _valid_key(self, assignment, key: str, conn=None) -> None:
        conn = conn or self.store.conn
        kind, _, ident = str(key).partition(":")
        if not ident.isdigit():
            raise ReviewError(f"unknown lesion {key!r}", 400)
        if kind == "auto":
            if int(ident) not in self.auto_ids(assignment["visit_id"]):
                raise ReviewError(f"unknown lesion {key!r}", 400)
            return
        if kind == "added":
            owner = conn.execute("SELECT a.* FROM added_lesions l JOIN assignments a ON "
                                 "a.id = l.assignment_id WHERE l.id=?", (int(ident),)).fetchone()
            if owner is not None and owner["visit_id"] == assignment["visit_id"] and (
                    owner["id"] == assignment["id"]
                    or (assignment["kind"] == "adjudication" and owner["kind"] == "read")):
                return
        raise ReviewError(f"unknown lesion {key!r}", 400)

    def decide(self, user, assignment, payload: dict) -> dict:
        key = str(payload.get("lesion", ""))
        decision = payload.get("decision")
        reason = str(payload.get("reason") or "")
        note = str(payload.get("note") or "")[:2000]
        if decision not in ("confirm", "reject"):
            raise ReviewError("decision must be 'confirm' or 'reject'")
        if decision == "reject":
            if reason not in REJECT_REASONS:
                raise ReviewError(f"a rejection needs a reason: {', '.join(REJECT_REASONS)}")
            if reason == "other" and not note.strip():
                raise ReviewError("reason 'other' needs a note")
        elif reason:
            raise ReviewError("a confirmation takes no rejection reason")
        self._valid_key(assignment, key)
        return self.store.add_decision(user, assignment, lesion_key=key, decision=decision,
                                       reason=reason, note=note,
                                       correction_reason=str(payload.get("correction_reason")
                                                             or "")[:2000],
                                       check_locked=self._lock_check(assignment))

    def grow(self, assignment, display_ijk) -> dict:
        """Grow a region from a click given in display voxels; returns both grids' voxels."""
        data = self.data(assignment)
        try:
            disp = np.asarray([float(v) for v in display_ijk], float)
        except (TypeError, ValueError):
            raise ReviewError("seed must be three numbers") from None
        if disp.shape != (3,) or not np.isfinite(disp).all():
            raise ReviewError("seed must be three numbers")
        if ((disp < 0) | (disp > np.array(data.grid.display_shape) - 1)).any():
            raise ReviewError("seed is outside the image")
        seed = np.round(data.grid.to_original(disp)).astype(int)
        s = self.settings
        spacing = np.sqrt((data.affine[:3, :3] ** 2).sum(0))
        vox = grow_region(data.enh, seed, spacing=spacing, fraction=s.grow_fraction,
                          min_enhancement=s.grow_min_enhancement_pct, radius_mm=s.grow_radius_mm,
                          max_voxels=s.grow_max_voxels)
        if len(vox) == 0:
            raise ReviewError("nothing enhances enough at this point; click on the enhancing "
                              "spot", 422)
        label = int(data.dseg[tuple(vox[0])])
        if label:
            raise ReviewError(f"this is automated lesion {label}: confirm or reject it in the "
                              "table", 422)
        # a lesion is counted once: leave out voxels of automated and already added lesions
        taken = data.dseg[tuple(vox.T)] > 0
        known = self._added_voxels(assignment)
        if known:
            taken |= np.array([tuple(v) in known for v in vox.tolist()])
        vox = vox[~taken]
        if len(vox) == 0:
            raise ReviewError("this region has already been added", 422)
        if data.brain is not None:
            vox = vox[data.brain[tuple(vox.T)]]
            if len(vox) == 0:
                raise ReviewError("the region lies outside the brain mask", 422)
        centroid = vox.mean(axis=0)
        return {"seed": seed.tolist(), "voxels": vox.tolist(), "centroid": centroid.tolist(),
                "n_voxels": int(len(vox)),
                "volume_mm3": round(len(vox) * data.voxel_volume, 2),
                "display_voxels": np.round(data.grid.to_display(vox)).astype(int).tolist(),
                "display_centroid": data.grid.to_display(centroid).round(2).tolist()}

    def _added_voxels(self, assignment) -> set[tuple[int, int, int]]:
        """Voxels of the added lesions this user sees as confirmed (own; readers' for an
        adjudicator)."""
        ids = [assignment["id"]]
        if assignment["kind"] == "adjudication":
            ids += [a["id"] for a in self.store.assignments_for_visit(assignment["visit_id"])
                    if a["kind"] == "read"]
        out: set[tuple[int, int, int]] = set()
        for aid in ids:
            latest = self.latest(aid)
            for row in self.store.added_lesions(aid):
                d = latest.get(f"added:{row['id']}")
                if d and d["decision"] == "confirm":
                    out.update(tuple(v) for v in json.loads(row["voxels"]))
        return out

    def add_lesion(self, user, assignment, payload: dict) -> dict:
        region = self.grow(assignment, payload.get("seed") or [])
        res = self.store.add_lesion(user, assignment, seed=region["seed"],
                                    voxels=region["voxels"], centroid=region["centroid"],
                                    correction_reason=str(payload.get("correction_reason")
                                                          or "")[:2000],
                                    check_locked=self._lock_check(assignment))
        res.update(n_voxels=region["n_voxels"])
        return res

    def comment(self, user, assignment, payload: dict) -> dict:
        text = str(payload.get("text") or "").strip()
        if not text:
            raise ReviewError("empty comment")
        return self.store.add_comment(user, assignment, text=text[:4000],
                                      correction_reason=str(payload.get("correction_reason")
                                                            or "")[:2000],
                                      check_locked=self._lock_check(assignment))

    def meaning(self, user, assignment) -> str:
        tmpl = READER_MEANING if assignment["kind"] == "read" else ADJUDICATOR_MEANING
        return tmpl.format(name=user["display_name"], code=assignment["code"])

    def sign(self, user, assignment, password: str) -> dict:
        if self.store.verify_password(user["username"], password or "") is None:
            self.store.audit_event(user=user, action="sign_refused", reason="wrong password",
                                   target=f"assignment:{assignment['id']}")
            raise ReviewError("password does not match; the read is not signed", 403)

        def ready(conn):
            if self.store.is_signed(assignment["id"], conn):
                raise ReviewError("already signed; nothing changed since", 409)
            if assignment["kind"] == "read":
                st = self.visit_status(assignment["visit_id"], conn)
                adj = st["adjudication"]
                if adj is not None and self.store.is_signed(adj["id"], conn):
                    raise ReviewError("the visit has been adjudicated; reads are closed", 409)
                latest = self.latest(assignment["id"], conn)
                missing = [i for i in self.auto_ids(assignment["visit_id"])
                           if f"auto:{i}" not in latest]
                if missing:
                    raise ReviewError(f"{len(missing)} lesion(s) still need a decision "
                                      f"(lesion {', '.join(map(str, missing[:10]))})", 409)
            else:
                st = self.visit_status(assignment["visit_id"], conn)
                if st["comparison"] is None or st["status"] not in ("needs_adjudication",
                                                                     "adjudicated"):
                    raise ReviewError("this visit is not ready for adjudication", 409)
                adjudicated = {k: v["decision"] for k, v in
                               self.latest(assignment["id"], conn).items()}
                left = unresolved(st["comparison"], adjudicated)
                if left:
                    raise ReviewError(f"{len(left)} disputed lesion(s) still need your decision",
                                      409)

        def content_hash(conn):
            latest = self.latest(assignment["id"], conn)
            body = {k: [v["decision"], v["reason"], v["note"]] for k, v in latest.items()}
            comments = [r[0] for r in conn.execute(
                "SELECT id FROM comments WHERE assignment_id=?", (assignment["id"],))]
            return hashlib.sha256(canonical({"decisions": body, "comments": comments})
                                  .encode()).hexdigest()

        return self.store.sign(user, assignment, meaning=self.meaning(user, assignment),
                               content_hash_fn=content_hash, check_ready=ready)

    # --- what the browser gets ----------------------------------------------------------------
    def meta(self, assignment) -> dict:
        data = self.data(assignment)
        vols = []
        for kind in ("post", "pre", "sub", "enh"):
            if data.volume_array(kind) is None:
                continue
            _, scale = data.display_bytes(kind)
            lo, hi = data.default_window(kind)
            vols.append({"kind": kind, "label": VOLUME_LABELS[kind], "scale": scale,
                         "window": [lo, hi]})
        return {"code": assignment["code"], "shape": list(data.grid.display_shape),
                "spacing": list(data.grid.display_spacing), "volumes": vols,
                "orientation": "RAS (axial slices shown in radiological convention)"}

    def volume(self, assignment, kind: str) -> tuple[bytes, float]:
        if kind not in VOLUME_KINDS:
            raise ReviewError("unknown volume", 404)
        try:
            return self.data(assignment).display_bytes(kind)
        except KeyError:
            raise ReviewError("this visit has no such volume", 404) from None

    def _added_json(self, data: VisitData, row, decision: dict | None, owner: str) -> dict:
        vox = np.asarray(json.loads(row["voxels"]), int).reshape(-1, 3)
        centroid = json.loads(row["centroid"])
        return {"key": f"added:{row['id']}", "id": row["id"], "owner": owner,
                "n_voxels": row["n_voxels"], "volume_mm3": round(row["n_voxels"] *
                                                               data.voxel_volume, 2),
                "display_centroid": data.grid.to_display(centroid).round(2).tolist(),
                "display_voxels": np.round(data.grid.to_display(vox)).astype(int).tolist(),
                "decision": decision["decision"] if decision else None,
                "reason": decision["reason"] if decision else "",
                "note": decision["note"] if decision else ""}

    def state(self, user, assignment) -> dict:
        """Everything the viewer shows for this user's read (nothing about anyone else's)."""
        data = self.data(assignment)
        aid = assignment["id"]
        latest = self.latest(aid)
        lesions = []
        for r in data.lesions.itertuples():
            key = f"auto:{int(r.lesion_id)}"
            d = latest.get(key)
            lesions.append({
                "key": key, "lesion_id": int(r.lesion_id), "n_voxels": int(r.n_voxels),
                "volume_mm3": float(r.volume_mm3),
                "mean_enhancement_pct": float(r.mean_enhancement_pct),
                "peak_enhancement_pct": float(r.peak_enhancement_pct),
                "display_centroid": data.grid.to_display(
                    [r.centroid_i, r.centroid_j, r.centroid_k]).round(2).tolist(),
                "decision": d["decision"] if d else None, "reason": d["reason"] if d else "",
                "note": d["note"] if d else ""})
        added = [self._added_json(data, row, latest.get(f"added:{row['id']}"), "me")
                 for row in self.store.added_lesions(aid)]
        sigs = [{"signer_name": s["signer_name"], "signed_utc": s["signed_utc"],
                 "meaning": s["meaning"]} for s in self.store.signatures(aid)]
        history = [{"utc": d["created_utc"], "lesion": d["lesion_key"], "decision": d["decision"],
                    "reason": d["reason"], "note": d["note"],
                    "correction_reason": d["correction_reason"]} for d in self.store.decisions(aid)]
        signed = self.store.is_signed(aid)
        out = {"code": assignment["code"], "kind": assignment["kind"],
               "user": user["display_name"], "signed": signed, "signatures": sigs,
               "lesions": lesions, "added": added, "history": history,
               "comments": [{"utc": c["created_utc"], "text": c["text"]}
                            for c in self.store.comments(aid)],
               "reject_reasons": list(REJECT_REASONS),
               "meaning": self.meaning(user, assignment),
               "undecided": [x["key"] for x in lesions if x["decision"] is None]}
        confirmed = {k for k, v in latest.items() if v["decision"] == "confirm"}
        out["confirmed_count"] = len(confirmed)
        if assignment["kind"] == "adjudication":
            out.update(self._adjudication_state(assignment, data, latest))
            out["undecided"] = out["unresolved"]
        return out

    def _adjudication_state(self, assignment, data: VisitData, latest) -> dict:
        st = self.visit_status(assignment["visit_id"])
        comp: Comparison = st["comparison"]
        reads = st["reads"]
        adjudicated = {k: v["decision"] for k, v in latest.items()}
        reader_latest = [self.latest(r["id"]) for r in reads]
        rows = []
        for row in comp.rows:
            item = {"key": row["key"], "kind": row["kind"], "agree": row["agree"],
                    "r1": row["r1"], "r2": row["r2"],
                    "adjudicator": adjudicated.get(row["key"]),
                    "final": row_final(row, adjudicated)}
            if row["kind"] == "auto":
                for n, rl in enumerate(reader_latest, start=1):
                    d = rl.get(row["key"])
                    item[f"r{n}_reason"] = d["reason"] if d else ""
                    item[f"r{n}_note"] = d["note"] if d else ""
            rows.append(item)
        reader_added = []
        for n, r in enumerate(reads, start=1):
            rl = reader_latest[n - 1]
            for row in self.store.added_lesions(r["id"]):
                d = rl.get(f"added:{row['id']}")
                if d and d["decision"] == "confirm":
                    reader_added.append(self._added_json(data, row, d, f"Reader {n}"))
        comments = {}
        for n, r in enumerate(reads, start=1):
            comments[f"Reader {n}"] = [c["text"] for c in self.store.comments(r["id"])]
        return {"rows": rows, "reader_counts": list(comp.counts), "reader_added": reader_added,
                "reader_comments": comments, "rule": self.settings.disagreement_rule,
                "unresolved": unresolved(comp, adjudicated)}

    def worklist(self, user) -> list[dict]:
        items = []
        for a in self.store.assignments_for_user(user["id"]):
            if a["kind"] == "adjudication":
                status = self.visit_status(a["visit_id"])["status"]
                if status not in ("needs_adjudication", "adjudicated"):
                    continue
                mine = "signed" if self.store.is_signed(a["id"]) else "to adjudicate"
            else:
                sigs = self.store.signatures(a["id"])
                if self.store.is_signed(a["id"]):
                    mine = "signed"
                elif sigs:
                    mine = "corrected, needs signature"
                elif self.store.decisions(a["id"]) or self.store.comments(a["id"]):
                    mine = "in progress"
                else:
                    mine = "not started"
            items.append({"code": a["code"], "kind": a["kind"], "status": mine})
        return items

    # --- final reads (export) -------------------------------------------------------------------
    def final_read(self, visit_id: int) -> dict[str, Any]:
        """Final status and confirmed lesions of a visit, with voxels on the original grid."""
        st = self.visit_status(visit_id)
        out = {"status": st["status"], "lesions": None}
        if st["status"] not in ("agreed", "adjudicated", "single_read"):
            return out
        comp = st["comparison"]
        adj = st["adjudication"]
        if st["status"] == "adjudicated":
            latest = {k: v["decision"] for k, v in self.latest(adj["id"]).items()}
            own = [r["id"] for r in self.store.added_lesions(adj["id"])]
            keys = final_keys(comp, latest, own_added=own)
        else:
            keys = final_keys(comp, None, own_added=[])
        v = self.store.visit(visit_id)
        data = self.cache.get(v["participant_id"], v["session_id"])
        lesions = []
        for key in keys:
            kind, _, ident = key.partition(":")
            if kind == "auto":
                vox = np.argwhere(data.dseg == int(ident))
                lesions.append({"key": key, "origin": "automated", "voxels": vox})
            else:
                row = self.store.one("SELECT * FROM added_lesions WHERE id=?", (int(ident),))
                vox = np.asarray(json.loads(row["voxels"]), int).reshape(-1, 3)
                lesions.append({"key": key, "origin": "reader-added", "voxels": vox})
        out["lesions"] = lesions
        out["data"] = data
        return out
