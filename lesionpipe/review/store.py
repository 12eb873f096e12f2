"""The review database: SQLite in WAL mode, append-only reads, a hash-chained audit trail.

Everything a reader or adjudicator decides is an INSERT; triggers refuse UPDATE and DELETE on the
tables that hold decisions, added lesions, comments, signatures, assignments and the audit trail.
Every write transaction also appends one audit record whose hash covers the previous record's hash,
so editing, deleting or reordering any record (or a decision behind its record) is detected by
:meth:`Store.verify`.

Durability: ``journal_mode=WAL`` and ``synchronous=FULL`` mean a commit is on disk before it
returns, so anything acknowledged to a browser survives a crash of the server.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> st = Store(os.path.join(d, 'r.sqlite'))
>>> uid = st.add_user('ann', 'Dr Ann Reader', 'reader', 'a long password')
>>> st.verify_password('ann', 'a long password')['username'], st.verify_password('ann', 'x')
('ann', None)
>>> st.verify().ok
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = ("reader", "adjudicator")
REJECT_REASONS = ("vessel", "choroid_plexus", "dura_sinus", "artefact", "not_enhancing", "other")
GENESIS = "0" * 64
_APPEND_ONLY = ("assignments", "decisions", "added_lesions", "comments", "signatures", "audit")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('reader', 'adjudicator')),
    pw_hash TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    created_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS visits (
    id INTEGER PRIMARY KEY,
    participant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    UNIQUE (participant_id, session_id)
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    visit_id INTEGER NOT NULL REFERENCES visits(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    kind TEXT NOT NULL CHECK (kind IN ('read', 'adjudication')),
    slot INTEGER NOT NULL,
    code TEXT NOT NULL UNIQUE,
    order_key INTEGER NOT NULL,
    created_utc TEXT NOT NULL,
    UNIQUE (visit_id, user_id),
    UNIQUE (visit_id, kind, slot)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    lesion_key TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('confirm', 'reject')),
    reason TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    correction_reason TEXT NOT NULL DEFAULT '',
    audit_id INTEGER NOT NULL UNIQUE REFERENCES audit(id),
    created_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_read ON decisions (assignment_id, lesion_key, id);
CREATE TABLE IF NOT EXISTS added_lesions (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    seed TEXT NOT NULL,
    n_voxels INTEGER NOT NULL,
    centroid TEXT NOT NULL,
    voxels TEXT NOT NULL,
    audit_id INTEGER NOT NULL UNIQUE REFERENCES audit(id),
    created_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    text TEXT NOT NULL,
    audit_id INTEGER NOT NULL UNIQUE REFERENCES audit(id),
    created_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signatures (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    signer_name TEXT NOT NULL,
    meaning TEXT NOT NULL,
    signed_utc TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    audit_id INTEGER NOT NULL UNIQUE REFERENCES audit(id)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    utc TEXT NOT NULL,
    user_id INTEGER,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    visit_id INTEGER,
    assignment_id INTEGER,
    target TEXT NOT NULL DEFAULT '',
    old_value TEXT NOT NULL DEFAULT '',
    new_value TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    last_seen REAL NOT NULL
);
"""


def utcnow() -> str:
    """UTC time as ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(obj: Any) -> str:
    """Deterministic JSON used inside audit values and hashes.

    >>> canonical({'b': 1, 'a': [1, 2]})
    '{"a":[1,2],"b":1}'
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def audit_hash(row: dict[str, Any]) -> str:
    """SHA-256 over one audit record's fields and the previous record's hash."""
    fields = [row["id"], row["utc"], row["user_id"], row["username"], row["action"],
              row["visit_id"], row["assignment_id"], row["target"], row["old_value"],
              row["new_value"], row["reason"], row["prev_hash"]]
    return hashlib.sha256(canonical(fields).encode("utf-8")).hexdigest()


class ReviewError(Exception):
    """A refused request; ``status`` is the HTTP status the web app returns."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class VerifyResult:
    ok: bool
    n_records: int
    head: str
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.n_records} records, head {self.head}"
        return (f"audit chain BROKEN ({len(self.problems)} problem(s)):\n  "
                + "\n  ".join(self.problems[:50]))


# Content rows and the audit value that must describe them (checked by verify()).
def decision_value(row: dict[str, Any]) -> str:
    return canonical({"id": row["id"], "lesion": row["lesion_key"], "decision": row["decision"],
                      "reason": row["reason"], "note": row["note"],
                      "correction_reason": row["correction_reason"]})


def added_value(row: dict[str, Any]) -> str:
    return canonical({"id": row["id"], "seed": row["seed"], "n_voxels": row["n_voxels"],
                      "centroid": row["centroid"],
                      "voxels_sha256": hashlib.sha256(row["voxels"].encode()).hexdigest()})


def comment_value(row: dict[str, Any]) -> str:
    return canonical({"id": row["id"], "text": row["text"]})


def signature_value(row: dict[str, Any]) -> str:
    return canonical({"id": row["id"], "signer": row["signer_name"], "meaning": row["meaning"],
                      "signed_utc": row["signed_utc"], "content_hash": row["content_hash"]})


_CONTENT = {"decisions": ("decision", decision_value), "added_lesions": ("add_lesion", added_value),
            "comments": ("comment", comment_value), "signatures": ("sign", signature_value)}


class Store:
    """Thread-safe access to one review database (one connection per thread)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._hasher = PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # readers' signatures and password hashes: owner-only (SQLite copies the mode to
            # its -wal and -shm files)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = self.conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ReviewError(f"{self.path}: cannot switch the database to WAL mode (got {mode})")
        with self.write() as c:
            existing = c.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            for table in _APPEND_ONLY:
                for op in ("UPDATE", "DELETE"):
                    name = f"{table}_no_{op.lower()}"
                    if c.execute("SELECT 1 FROM sqlite_master WHERE type='trigger' AND name=?",
                                 (name,)).fetchone():
                        continue
                    c.execute(f"CREATE TRIGGER {name} BEFORE {op} ON {table} BEGIN SELECT "
                              f"RAISE(ABORT, '{table} is append-only: {op} refused'); END")
                    if existing:
                        # someone removed a safeguard: restore it, and leave a permanent trace
                        self.audit(c, user=None, action="trigger_restored", target=name,
                                   reason="append-only trigger was missing when the database "
                                          "was opened")
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1')")

    # --- connections and transactions -------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s,
                                   isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction (``BEGIN IMMEDIATE``), committed durably on exit.

        Writers inside this process queue on a lock; other processes (the admin command while
        the server runs) wait on SQLite's busy timeout, retried until ``busy_timeout_s``.
        """
        conn = self.conn
        deadline = time.monotonic() + self.busy_timeout_s
        with self._write_lock:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    if time.monotonic() > deadline:
                        raise ReviewError("the database stayed busy; try again", 503) from None
                    time.sleep(0.05)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple | list = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    # --- audit ----------------------------------------------------------------------------
    @staticmethod
    def audit(conn: sqlite3.Connection, *, user: dict | sqlite3.Row | None, action: str,
              visit_id: int | None = None, assignment_id: int | None = None, target: str = "",
              old_value: str = "", new_value: str = "", reason: str = "") -> int:
        """Append one hash-chained audit record inside the caller's write transaction."""
        last = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        row = {"id": (last["id"] + 1) if last else 1, "utc": utcnow(),
               "user_id": user["id"] if user else None,
               "username": user["username"] if user else "admin-cli", "action": action,
               "visit_id": visit_id, "assignment_id": assignment_id, "target": target,
               "old_value": old_value, "new_value": new_value, "reason": reason,
               "prev_hash": last["hash"] if last else GENESIS}
        row["hash"] = audit_hash(row)
        cols = ", ".join(row)
        conn.execute(f"INSERT INTO audit ({cols}) VALUES ({', '.join('?' * len(row))})",
                     list(row.values()))
        return row["id"]

    def verify(self) -> VerifyResult:
        """Recompute the audit chain and check every content row against its audit record."""
        problems: list[str] = []
        prev, n = GENESIS, 0
        audit_rows: dict[int, sqlite3.Row] = {}
        expected_id = 1
        for row in self.conn.execute("SELECT * FROM audit ORDER BY id"):
            n += 1
            r = dict(row)
            audit_rows[r["id"]] = row
            if r["id"] != expected_id:
                problems.append(f"audit record {expected_id} is missing (next is {r['id']})")
            expected_id = r["id"] + 1
            if r["prev_hash"] != prev:
                problems.append(f"audit record {r['id']}: previous-hash link broken")
            if audit_hash(r) != r["hash"]:
                problems.append(f"audit record {r['id']}: contents do not match its hash "
                                f"(edited after it was written)")
            prev = r["hash"]
        for table, (action, value) in _CONTENT.items():
            seen = set()
            for row in self.conn.execute(f"SELECT * FROM {table} ORDER BY id"):
                r = dict(row)
                a = audit_rows.get(r["audit_id"])
                seen.add(r["audit_id"])
                if a is None or a["action"] != action:
                    problems.append(f"{table} row {r['id']}: no matching audit record")
                elif a["new_value"] != value(r) or a["assignment_id"] != r["assignment_id"]:
                    problems.append(f"{table} row {r['id']}: differs from audit record "
                                    f"{r['audit_id']} (edited after it was written)")
            for aid, a in audit_rows.items():
                if a["action"] == action and aid not in seen:
                    problems.append(f"audit record {aid} ({action}): its {table} row is missing")
        for table in _APPEND_ONLY:
            for op in ("update", "delete"):
                if not self.one("SELECT 1 FROM sqlite_master WHERE type='trigger' AND name=?",
                                (f"{table}_no_{op}",)):
                    problems.append(f"append-only trigger {table}_no_{op} has been removed")
        for a in audit_rows.values():
            if a["action"] == "trigger_restored":
                problems.append(f"append-only trigger {a['target']} had been removed (found and "
                                f"restored at {a['utc']}, audit record {a['id']})")
        return VerifyResult(not problems, n, prev, problems)

    # --- users -----------------------------------------------------------------------------
    def add_user(self, username: str, display_name: str, role: str, password: str) -> int:
        if role not in ROLES:
            raise ReviewError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not username or not username.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ReviewError(f"user name {username!r}: use letters, digits, '.', '-', '_'")
        if len(password) < 10:
            raise ReviewError("password must have at least 10 characters")
        pw_hash = self._hasher.hash(password)
        with self.write() as c:
            if c.execute("SELECT 1 FROM users WHERE username=?", (username,)).fetchone():
                raise ReviewError(f"user {username!r} already exists")
            cur = c.execute("INSERT INTO users (username, display_name, role, pw_hash, created_utc)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (username, display_name, role, pw_hash, utcnow()))
            uid = cur.lastrowid
            self.audit(c, user=None, action="add_user", target=f"user:{uid}",
                       new_value=canonical({"username": username, "display_name": display_name,
                                            "role": role}))
        return uid

    def set_password(self, username: str, password: str) -> None:
        if len(password) < 10:
            raise ReviewError("password must have at least 10 characters")
        pw_hash = self._hasher.hash(password)
        with self.write() as c:
            row = c.execute("SELECT id FROM users WHERE username=?", (username,)).fetchone()
            if not row:
                raise ReviewError(f"no user {username!r}")
            c.execute("UPDATE users SET pw_hash=? WHERE id=?", (pw_hash, row["id"]))
            c.execute("DELETE FROM sessions WHERE user_id=?", (row["id"],))
            self.audit(c, user=None, action="set_password", target=f"user:{row['id']}")

    def set_active(self, username: str, active: bool) -> None:
        with self.write() as c:
            row = c.execute("SELECT id, active FROM users WHERE username=?", (username,)).fetchone()
            if not row:
                raise ReviewError(f"no user {username!r}")
            c.execute("UPDATE users SET active=? WHERE id=?", (int(active), row["id"]))
            if not active:
                c.execute("DELETE FROM sessions WHERE user_id=?", (row["id"],))
            self.audit(c, user=None, action="set_active", target=f"user:{row['id']}",
                       old_value=str(row["active"]), new_value=str(int(active)))

    def user(self, user_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM users WHERE id=?", (user_id,))

    def user_by_name(self, username: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM users WHERE username=?", (username,))

    def verify_password(self, username: str, password: str) -> sqlite3.Row | None:
        """The user when the password is right and the account active; else None.

        A missing user costs the same hash verification, so timing does not reveal names.
        """
        row = self.user_by_name(username)
        try:
            self._hasher.verify(row["pw_hash"] if row else self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None or not row["active"]:
            return None
        return row

    def recent_login_failures(self, username: str, *, minutes: float) -> int:
        """Failed logins for a user name in the last ``minutes`` since their last success."""
        since = datetime.fromtimestamp(time.time() - 60 * minutes, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        last_ok = self.one("SELECT MAX(id) FROM audit WHERE action='login' AND username=?",
                           (username,))[0] or 0
        return self.one("SELECT COUNT(*) FROM audit WHERE action='login_failed' AND target=? "
                        "AND utc >= ? AND id > ?", (username, since, last_ok))[0]

    # --- sessions ----------------------------------------------------------------------------
    def create_session(self, user: sqlite3.Row) -> tuple[str, str]:
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self.write() as c:
            c.execute("INSERT INTO sessions (token_hash, user_id, csrf, created_utc, last_seen) "
                      "VALUES (?, ?, ?, ?, ?)", (_sha(token), user["id"], csrf, utcnow(),
                                                 time.time()))
            self.audit(c, user=user, action="login")
        return token, csrf

    def session(self, token: str, *, timeout_s: float) -> tuple[sqlite3.Row, str] | None:
        """(user, csrf token) for a live session cookie, else None; refreshes the idle timer."""
        if not token:
            return None
        row = self.one("SELECT s.token_hash, s.csrf, s.last_seen, u.* FROM sessions s "
                       "JOIN users u ON u.id = s.user_id WHERE s.token_hash=?", (_sha(token),))
        if row is None or not row["active"]:
            return None
        now = time.time()
        if now - row["last_seen"] > timeout_s:
            with self.write() as c:
                c.execute("DELETE FROM sessions WHERE token_hash=?", (row["token_hash"],))
            return None
        if now - row["last_seen"] > 60:
            with self.write() as c:
                c.execute("UPDATE sessions SET last_seen=? WHERE token_hash=?",
                          (now, row["token_hash"]))
        return row, row["csrf"]

    def end_session(self, token: str, user: sqlite3.Row) -> None:
        with self.write() as c:
            c.execute("DELETE FROM sessions WHERE token_hash=?", (_sha(token),))
            self.audit(c, user=user, action="logout")

    def audit_event(self, *, user, action: str, reason: str = "", target: str = "") -> None:
        with self.write() as c:
            self.audit(c, user=user, action=action, reason=reason, target=target)

    # --- visits and assignments ---------------------------------------------------------
    def add_visits(self, visits: list[tuple[str, str]]) -> int:
        """Register (participant_id, session_id) pairs; returns how many were new."""
        new = 0
        with self.write() as c:
            for sub, ses in visits:
                if c.execute("SELECT 1 FROM visits WHERE participant_id=? AND session_id=?",
                             (sub, ses)).fetchone():
                    continue
                cur = c.execute("INSERT INTO visits (participant_id, session_id, created_utc) "
                                "VALUES (?, ?, ?)", (sub, ses, utcnow()))
                self.audit(c, user=None, action="add_visit", visit_id=cur.lastrowid,
                           new_value=canonical({"participant_id": sub, "session_id": ses}))
                new += 1
        return new

    def visits(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM visits ORDER BY participant_id, session_id")

    def visit(self, visit_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM visits WHERE id=?", (visit_id,))

    def assign(self, visit_id: int, username: str, kind: str) -> sqlite3.Row:
        """Give a visit to a reader (next free slot of 1..2) or to an adjudicator (slot 0)."""
        user = self.user_by_name(username)
        if user is None:
            raise ReviewError(f"no user {username!r}")
        if kind == "read" and user["role"] != "reader":
            raise ReviewError(f"{username} is an {user['role']}, not a reader")
        if kind == "adjudication" and user["role"] != "adjudicator":
            raise ReviewError(f"{username} is a {user['role']}, not an adjudicator")
        with self.write() as c:
            existing = c.execute("SELECT * FROM assignments WHERE visit_id=? AND user_id=?",
                                 (visit_id, user["id"])).fetchone()
            if existing:
                if existing["kind"] != kind:
                    raise ReviewError(f"{username} already has this visit as "
                                      f"{existing['kind']}; a reader cannot adjudicate a visit "
                                      f"they read")
                return existing
            taken = {r["slot"] for r in c.execute(
                "SELECT slot FROM assignments WHERE visit_id=? AND kind=?", (visit_id, kind))}
            if kind == "read":
                free = [s for s in (1, 2) if s not in taken]
                if not free:
                    raise ReviewError(f"visit {visit_id} already has two readers")
                # slot 1 first: a single-reader review has its read in slot 1
                slot = free[0]
            else:
                if taken:
                    raise ReviewError(f"visit {visit_id} already has an adjudicator")
                slot = 0
            code = _new_code(c)
            cur = c.execute("INSERT INTO assignments (visit_id, user_id, kind, slot, code, "
                            "order_key, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (visit_id, user["id"], kind, slot, code, secrets.randbits(62),
                             utcnow()))
            self.audit(c, user=None, action="assign", visit_id=visit_id,
                       assignment_id=cur.lastrowid, target=f"user:{user['id']}",
                       new_value=canonical({"kind": kind, "slot": slot, "code": code}))
            return c.execute("SELECT * FROM assignments WHERE id=?", (cur.lastrowid,)).fetchone()

    def assignment_by_code(self, code: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM assignments WHERE code=?", (code,))

    def assignments_for_user(self, user_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM assignments WHERE user_id=? ORDER BY order_key",
                          (user_id,))

    def assignments_for_visit(self, visit_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM assignments WHERE visit_id=? ORDER BY kind DESC, slot",
                          (visit_id,))

    # --- read contents -------------------------------------------------------------------
    def decisions(self, assignment_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM decisions WHERE assignment_id=? ORDER BY id",
                          (assignment_id,))

    def added_lesions(self, assignment_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM added_lesions WHERE assignment_id=? ORDER BY id",
                          (assignment_id,))

    def comments(self, assignment_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM comments WHERE assignment_id=? ORDER BY id",
                          (assignment_id,))

    def signatures(self, assignment_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM signatures WHERE assignment_id=? ORDER BY id",
                          (assignment_id,))

    def last_content_audit(self, conn: sqlite3.Connection, assignment_id: int) -> int:
        row = conn.execute(
            "SELECT MAX(a) FROM (SELECT MAX(audit_id) a FROM decisions WHERE assignment_id=?1 "
            "UNION ALL SELECT MAX(audit_id) FROM added_lesions WHERE assignment_id=?1 "
            "UNION ALL SELECT MAX(audit_id) FROM comments WHERE assignment_id=?1)",
            (assignment_id,)).fetchone()
        return row[0] or 0

    def last_signature_audit(self, conn: sqlite3.Connection, assignment_id: int) -> int:
        row = conn.execute("SELECT MAX(audit_id) FROM signatures WHERE assignment_id=?",
                           (assignment_id,)).fetchone()
        return row[0] or 0

    def is_signed(self, assignment_id: int, conn: sqlite3.Connection | None = None) -> bool:
        """Signed = a signature exists that is newer than every decision, addition and comment."""
        conn = conn or self.conn
        sig = self.last_signature_audit(conn, assignment_id)
        return sig > 0 and sig > self.last_content_audit(conn, assignment_id)

    def add_decision(self, user, assignment, *, lesion_key: str, decision: str, reason: str,
                     note: str, correction_reason: str, check_locked) -> dict[str, Any]:
        """Append one decision and its audit record; ``check_locked(conn)`` raises if refused."""
        with self.write() as c:
            correction_reason = check_locked(c, correction_reason)
            old = c.execute("SELECT * FROM decisions WHERE assignment_id=? AND lesion_key=? "
                            "ORDER BY id DESC LIMIT 1", (assignment["id"], lesion_key)).fetchone()
            new_id = (c.execute("SELECT MAX(id) FROM decisions").fetchone()[0] or 0) + 1
            row = {"id": new_id, "assignment_id": assignment["id"], "lesion_key": lesion_key,
                   "decision": decision, "reason": reason, "note": note,
                   "correction_reason": correction_reason}
            aid = self.audit(c, user=user, action="decision", visit_id=assignment["visit_id"],
                             assignment_id=assignment["id"], target=lesion_key,
                             old_value=decision_value(dict(old)) if old else "",
                             new_value=decision_value(row), reason=correction_reason)
            c.execute("INSERT INTO decisions (id, assignment_id, lesion_key, decision, reason, "
                      "note, correction_reason, audit_id, created_utc) VALUES "
                      "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (new_id, assignment["id"], lesion_key, decision, reason, note,
                       correction_reason, aid, utcnow()))
        return {"decision_id": new_id, "audit_id": aid}

    def add_lesion(self, user, assignment, *, seed: list[int], voxels: list[list[int]],
                   centroid: list[float], correction_reason: str, check_locked) -> dict[str, Any]:
        """Append a reader-added lesion plus its 'confirm' decision (two audit records)."""
        with self.write() as c:
            correction_reason = check_locked(c, correction_reason)
            new_id = (c.execute("SELECT MAX(id) FROM added_lesions").fetchone()[0] or 0) + 1
            row = {"id": new_id, "assignment_id": assignment["id"], "seed": canonical(seed),
                   "n_voxels": len(voxels), "centroid": canonical([round(v, 3) for v in centroid]),
                   "voxels": canonical(voxels)}
            aid = self.audit(c, user=user, action="add_lesion", visit_id=assignment["visit_id"],
                             assignment_id=assignment["id"], target=f"added:{new_id}",
                             new_value=added_value(row), reason=correction_reason)
            c.execute("INSERT INTO added_lesions (id, assignment_id, seed, n_voxels, centroid, "
                      "voxels, audit_id, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (new_id, assignment["id"], row["seed"], row["n_voxels"], row["centroid"],
                       row["voxels"], aid, utcnow()))
            did = (c.execute("SELECT MAX(id) FROM decisions").fetchone()[0] or 0) + 1
            drow = {"id": did, "assignment_id": assignment["id"], "lesion_key": f"added:{new_id}",
                    "decision": "confirm", "reason": "", "note": "",
                    "correction_reason": correction_reason}
            daid = self.audit(c, user=user, action="decision", visit_id=assignment["visit_id"],
                              assignment_id=assignment["id"], target=drow["lesion_key"],
                              new_value=decision_value(drow), reason=correction_reason)
            c.execute("INSERT INTO decisions (id, assignment_id, lesion_key, decision, reason, "
                      "note, correction_reason, audit_id, created_utc) VALUES "
                      "(?, ?, ?, 'confirm', '', '', ?, ?, ?)",
                      (did, assignment["id"], drow["lesion_key"], correction_reason, daid,
                       utcnow()))
        return {"added_id": new_id, "audit_id": aid, "decision_id": did}

    def add_comment(self, user, assignment, *, text: str, correction_reason: str,
                    check_locked) -> dict[str, Any]:
        with self.write() as c:
            correction_reason = check_locked(c, correction_reason)
            new_id = (c.execute("SELECT MAX(id) FROM comments").fetchone()[0] or 0) + 1
            row = {"id": new_id, "text": text}
            aid = self.audit(c, user=user, action="comment", visit_id=assignment["visit_id"],
                             assignment_id=assignment["id"], target=f"comment:{new_id}",
                             new_value=comment_value(row), reason=correction_reason)
            c.execute("INSERT INTO comments (id, assignment_id, text, audit_id, created_utc) "
                      "VALUES (?, ?, ?, ?, ?)", (new_id, assignment["id"], text, aid, utcnow()))
        return {"comment_id": new_id, "audit_id": aid}

    def sign(self, user, assignment, *, meaning: str, content_hash_fn, check_ready) -> dict:
        """Append a signature (name, UTC time, meaning, hash of the signed content)."""
        with self.write() as c:
            check_ready(c)
            new_id = (c.execute("SELECT MAX(id) FROM signatures").fetchone()[0] or 0) + 1
            row = {"id": new_id, "signer_name": user["display_name"], "meaning": meaning,
                   "signed_utc": utcnow(), "content_hash": content_hash_fn(c)}
            previous = c.execute("SELECT COUNT(*) FROM signatures WHERE assignment_id=?",
                                 (assignment["id"],)).fetchone()[0]
            aid = self.audit(c, user=user, action="sign", visit_id=assignment["visit_id"],
                             assignment_id=assignment["id"], target=f"signature:{new_id}",
                             new_value=signature_value(row),
                             reason="re-signed after correction" if previous else "")
            c.execute("INSERT INTO signatures (id, assignment_id, user_id, signer_name, meaning, "
                      "signed_utc, content_hash, audit_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (new_id, assignment["id"], user["id"], row["signer_name"], meaning,
                       row["signed_utc"], row["content_hash"], aid))
        return {"signature_id": new_id, "audit_id": aid, "signed_utc": row["signed_utc"],
                "signer_name": row["signer_name"], "meaning": meaning}

    def audit_rows(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM audit ORDER BY id")


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _new_code(conn: sqlite3.Connection) -> str:
    while True:
        code = "".join(secrets.choice(_ALPHABET) for _ in range(8))
        code = f"{code[:4]}-{code[4:]}"
        if not conn.execute("SELECT 1 FROM assignments WHERE code=?", (code,)).fetchone():
            return code

