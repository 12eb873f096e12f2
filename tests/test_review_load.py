"""Load and fault tests against the real server (waitress in a subprocess).

* 20 concurrent readers x 500 decisions: every acknowledged decision and its audit record is in
  the database, no reader ever sees a database-busy error, the audit chain verifies.
* kill -9 of the server right after acknowledgements: nothing acknowledged is lost.
"""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import threading
import time

from lesionpipe.review.store import Store, decision_value
from review_fixtures import Client, password, start_server, write_review_outputs

N_READERS = 20
N_DECISIONS = 500


def _setup(tmp_path, n_readers):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    n_visits = (n_readers + 1) // 2
    write_review_outputs(out, extra_visits=max(0, n_visits - 3))
    store = Store(db)
    from lesionpipe.review.visitdata import reviewable_visits

    store.add_visits(reviewable_visits(out))
    visits = [v["id"] for v in store.visits()]
    users = [f"r{n:02d}" for n in range(n_readers)]
    for n, u in enumerate(users):
        store.add_user(u, f"Reader {n:02d}", "reader", password(u))
        store.assign(visits[n // 2], u, "read")
    store.close()
    return out, db, users


def _reader(url, user, n, acks, errors, stop=None):
    c = Client(url)
    try:
        if c.login(user) != 302:
            errors.append((user, "login failed"))
            return
        code = c.codes()[0]["code"]
        status, state = c.get_json(f"/api/read/{code}/state")
        keys = [l["key"] for l in state["lesions"]]
        for i in range(n):
            if stop is not None and stop.is_set():
                return
            body = ({"lesion": keys[i % len(keys)], "decision": "confirm"} if i % 3 else
                    {"lesion": keys[i % len(keys)], "decision": "reject", "reason": "artefact"})
            try:
                status, resp = c.post_json(f"/api/read/{code}/decision", body)
            except (OSError, http.client.HTTPException) as exc:   # ConnectionError is an OSError
                # a request cut by the test's own kill -9 (``stop`` is set just before it)
                if stop is not None and stop.is_set():
                    return
                errors.append((user, repr(exc)))
                return
            if status == 200:
                acks.append((user, code, body, resp["decision_id"], resp["audit_id"]))
            else:
                errors.append((user, status, resp))
    finally:
        c.close()


def _check_acks(db, acks):
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    for user, code, body, did, aid in acks:
        row = con.execute("SELECT d.*, a.code FROM decisions d JOIN assignments a ON "
                          "a.id = d.assignment_id WHERE d.id=?", (did,)).fetchone()
        assert row is not None, f"acknowledged decision {did} of {user} is missing"
        assert (row["code"], row["lesion_key"], row["decision"], row["audit_id"]) == \
            (code, body["lesion"], body["decision"], aid)
        audit = con.execute("SELECT * FROM audit WHERE id=?", (aid,)).fetchone()
        assert audit is not None and audit["action"] == "decision"
        assert audit["new_value"] == decision_value(dict(row))
    con.close()


def test_concurrent_readers(tmp_path):
    out, db, users = _setup(tmp_path, N_READERS)
    proc, url = start_server(out, db, threads=8)
    acks, errors = [], []
    try:
        threads = [threading.Thread(target=_reader, args=(url, u, N_DECISIONS, acks, errors))
                   for u in users]
        for t in threads:
            t.start()
        # meanwhile another process (this one) writes too, as the admin command would
        admin = Store(db)
        n_admin = 0
        while any(t.is_alive() for t in threads) and n_admin < 5:
            admin.add_user(f"late{n_admin}", "Late Reader", "reader", password("late"))
            n_admin += 1
            time.sleep(0.5)
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert errors == []
    assert len(acks) == N_READERS * N_DECISIONS
    _check_acks(db, acks)
    store = Store(db)
    assert store.one("SELECT COUNT(*) FROM decisions")[0] == len(acks)
    res = store.verify()
    assert res.ok, res.problems
    assert res.n_records >= len(acks) + N_READERS  # decisions + logins + setup


def test_kill_9_loses_nothing_acknowledged(tmp_path):
    out, db, users = _setup(tmp_path, 4)
    proc, url = start_server(out, db, threads=4)
    acks, errors = [], []
    stop = threading.Event()
    threads = [threading.Thread(target=_reader, args=(url, u, 10_000, acks, errors, stop))
               for u in users]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acks) < 300 and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    os.kill(proc.pid, signal.SIGKILL)          # no shutdown, no checkpoint
    n_at_kill = len(acks)
    for t in threads:
        t.join(timeout=60)
    proc.wait()
    assert n_at_kill >= 300 and errors == []
    # restart on the same database: every acknowledged decision is there and the chain holds
    proc2, url2 = start_server(out, db)
    try:
        _check_acks(db, acks)
        res = Store(db).verify()
        assert res.ok, res.problems
        c = Client(url2)
        assert c.login(users[0]) == 302
        code = c.codes()[0]["code"]
        _, state = c.get_json(f"/api/read/{code}/state")
        mine = [a for a in acks if a[0] == users[0]]
        assert len(state["history"]) >= len(mine)
        last = {}
        for _, _, body, did, _ in sorted(mine, key=lambda a: a[3]):
            last[body["lesion"]] = body["decision"]
        shown = {l["key"]: l["decision"] for l in state["lesions"]}
        # the server may have stored (not acknowledged) one more decision per reader
        assert len(state["history"]) - len(mine) <= 1
        if len(state["history"]) == len(mine):
            assert all(shown[k] == v for k, v in last.items())
        c.close()
    finally:
        proc2.kill()
        proc2.wait()


def test_reload_mid_read_keeps_everything(tmp_path):
    """A new session (page reload, new login) sees every earlier decision of the read."""
    out, db, users = _setup(tmp_path, 2)
    proc, url = start_server(out, db)
    try:
        c = Client(url)
        c.login(users[0])
        code = c.codes()[0]["code"]
        _, state = c.get_json(f"/api/read/{code}/state")
        keys = [l["key"] for l in state["lesions"]][:3]
        for k in keys:
            assert c.post_json(f"/api/read/{code}/decision",
                               {"lesion": k, "decision": "confirm"})[0] == 200
        c.close()
        c2 = Client(url)
        c2.login(users[0])
        _, state = c2.get_json(f"/api/read/{code}/state")
        assert {l["key"]: l["decision"] for l in state["lesions"] if l["key"] in keys} == \
            {k: "confirm" for k in keys}
        c2.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    # Benchmark (not a test): python tests/test_review_load.py  -> decisions per second
    import sys
    import tempfile
    from pathlib import Path

    n_readers = int(sys.argv[1]) if len(sys.argv) > 1 else N_READERS
    n_decisions = int(sys.argv[2]) if len(sys.argv) > 2 else N_DECISIONS
    with tempfile.TemporaryDirectory() as tmp:
        out, db, users = _setup(Path(tmp), n_readers)
        proc, url = start_server(out, db, threads=8)
        acks, errors = [], []
        threads = [threading.Thread(target=_reader, args=(url, u, n_decisions, acks, errors))
                   for u in users]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        proc.kill()
        proc.wait()
        print(f"{len(acks)} acknowledged decisions ({len(errors)} errors) by {n_readers} readers "
              f"in {elapsed:.1f} s = {len(acks) / elapsed:.0f} decisions/s (logins included)")
