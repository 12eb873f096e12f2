"""Security of the review app: authentication everywhere, reader isolation, blinding, CSRF,
path traversal, append-only storage and tamper detection."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from lesionpipe.review.app import create_app
from lesionpipe.review.store import Store
from review_fixtures import (Client, codes_of, flask_login, make_review_db, password,
                             start_server, write_review_outputs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    out, db = tmp / "out", tmp / "review.sqlite"
    visits = write_review_outputs(out)
    make_review_db(out, db)
    app = create_app(out, db)
    return out, db, app, visits


login = flask_login


def _url(rule, code):
    args = {"code": code, "kind": "post", "filename": "viewer.js"}
    return rule.rule.replace("<code>", args["code"]).replace("<kind>", args["kind"]) \
        .replace("<path:filename>", args["filename"])


def test_every_endpoint_needs_a_session(env):
    out, db, app, _ = env
    code = codes_of(db, "ann")[0]
    c = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("login_form", "login_post"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            r = c.open(_url(rule, code), method=method, json={} if method == "POST" else None)
            assert r.status_code in (401, 302), (rule.rule, method, r.status_code)
            if r.status_code == 302:
                assert r.headers["Location"].endswith("/login")
            checked += 1
    assert checked >= 12
    # unknown URLs and a forged session cookie are treated the same way
    assert c.get("/api/nothing").status_code == 401
    c.set_cookie("lp_session", "forged-token-value")
    assert c.get(f"/api/read/{code}/state").status_code == 401
    # the only public file is the style sheet of the login page
    assert c.get("/static/app.css").status_code == 200
    assert c.get("/static/viewer.js").status_code == 302


def test_wrong_password_and_login_csrf(env):
    _, _, app, _ = env
    c = app.test_client()
    page = c.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"username": "ann", "password": "wrong-password",
                               "csrf_token": token})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = c.post("/login", data={"username": "nobody", "password": "x", "csrf_token": token})
    assert r.status_code == 401
    fresh = app.test_client()
    r = fresh.post("/login", data={"username": "ann", "password": password("ann")})
    assert r.status_code == 403 and "lp_session" not in r.headers.get("Set-Cookie", "")


def test_posts_without_csrf_token_are_refused(env):
    _, db, app, visits = env
    c = login(app, "ann")
    code = codes_of(db, "ann")[0]
    bodies = {"decision": {"lesion": "auto:1", "decision": "confirm"},
              "grow": {"seed": [1, 1, 1]}, "add": {"seed": [1, 1, 1]},
              "comment": {"text": "x"}, "sign": {"password": password("ann")}}
    for action, body in bodies.items():
        for headers in ({}, {"X-CSRF-Token": "wrong"}):
            r = c.post(f"/api/read/{code}/{action}", json=body, headers=headers)
            assert r.status_code == 403, (action, r.status_code)
    assert c.post("/logout").status_code == 403
    # nothing was written by the refused posts
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0
    con.close()
    r = c.post(f"/api/read/{code}/decision", json=bodies["decision"],
               headers={"X-CSRF-Token": c.csrf})
    assert r.status_code == 200


def test_reader_cannot_reach_other_reads(env):
    _, db, app, _ = env
    ann, bob = login(app, "ann"), login(app, "bob")
    bob_code = codes_of(db, "bob")[1]
    r = bob.post(f"/api/read/{bob_code}/decision", json={"lesion": "auto:1", "decision": "reject",
                                                         "reason": "artefact"},
                 headers={"X-CSRF-Token": bob.csrf})
    assert r.status_code == 200
    foreign = codes_of(db, "bob") + codes_of(db, "cat")
    for code in foreign:
        for path in ("meta", "state", "volume/post", "volume/labels"):
            assert ann.get(f"/api/read/{code}/{path}").status_code == 404
        assert ann.get(f"/read/{code}").status_code == 404
        for action, body in (("decision", {"lesion": "auto:1", "decision": "confirm"}),
                             ("grow", {"seed": [20, 20, 10]}), ("comment", {"text": "x"}),
                             ("sign", {"password": password("ann")})):
            r = ann.post(f"/api/read/{code}/{action}", json=body,
                         headers={"X-CSRF-Token": ann.csrf})
            assert r.status_code == 404, (code, action)
    # Ann's own read shows nothing of Bob's decision on the same visit
    ann_code = codes_of(db, "ann")[1]
    state = ann.get(f"/api/read/{ann_code}/state").json
    assert all(l["decision"] is None or l["reason"] != "artefact" for l in state["lesions"])
    assert state["history"] == [] or all(h["reason"] != "artefact" for h in state["history"])
    # a session cookie of one user never acts for another: Bob's CSRF token fails in Ann's session
    r = ann.post(f"/api/read/{ann_code}/decision", json={"lesion": "auto:1", "decision": "confirm"},
                 headers={"X-CSRF-Token": bob.csrf})
    assert r.status_code == 403


def test_adjudicator_waits_and_is_blinded(env):
    _, db, app, visits = env
    cat = login(app, "cat")
    cat_code = codes_of(db, "cat")[2]
    assert cat.get(f"/api/read/{cat_code}/state").status_code == 409
    assert cat.get("/api/worklist").json["items"] == []
    # both readers sign different reads of visit 3
    for user, vessel_decision in (("ann", "reject"), ("bob", "confirm")):
        c = login(app, user)
        code = codes_of(db, user)[2]
        for l in c.get(f"/api/read/{code}/state").json["lesions"]:
            body = {"lesion": l["key"], "decision": "confirm"}
            if l["lesion_id"] == visits[2].vessel_id and vessel_decision == "reject":
                body = {"lesion": l["key"], "decision": "reject", "reason": "vessel"}
            assert c.post(f"/api/read/{code}/decision", json=body,
                          headers={"X-CSRF-Token": c.csrf}).status_code == 200
        r = c.post(f"/api/read/{code}/sign", json={"password": password(user)},
                   headers={"X-CSRF-Token": c.csrf})
        assert r.status_code == 200, r.json
    items = cat.get("/api/worklist").json["items"]
    assert [i["code"] for i in items] == [cat_code]
    state = cat.get(f"/api/read/{cat_code}/state").json
    text = json.dumps(state)
    for secret in ("Dr Ann", "Dr Bob", '"ann"', '"bob"', "sub-0", "ses-w", "week"):
        assert secret not in text
    disputed = [r for r in state["rows"] if not r["agree"]]
    assert [r["key"] for r in disputed] == [f"auto:{visits[2].vessel_id}"]
    assert disputed[0]["r1"] in ("reject", "confirm") and disputed[0]["r2"] != disputed[0]["r1"]
    # readers cannot use the adjudication code, the adjudicator cannot write into the reads
    ann = login(app, "ann")
    assert ann.get(f"/api/read/{cat_code}/state").status_code == 404
    for code in codes_of(db, "ann")[2:3] + codes_of(db, "bob")[2:3]:
        r = cat.post(f"/api/read/{code}/decision", json={"lesion": "auto:1", "decision": "confirm"},
                     headers={"X-CSRF-Token": cat.csrf})
        assert r.status_code == 404


def test_worklist_and_pages_are_blinded(env):
    out, db, app, _ = env
    c = login(app, "ann")
    page = c.get("/").text
    api = json.dumps(c.get("/api/worklist").json)
    for code in codes_of(db, "ann"):
        state = json.dumps(c.get(f"/api/read/{code}/state").json)
        meta = json.dumps(c.get(f"/api/read/{code}/meta").json)
        for text in (page, api, state, meta):
            for secret in ("sub-0", "ses-w", "week", "Dr Bob", str(out)):
                assert secret not in text
    # per-reader codes: the two readers of a visit see different codes
    assert not set(codes_of(db, "ann")) & set(codes_of(db, "bob"))


def test_path_traversal_is_refused(env, tmp_path):
    out, db, _, _ = env
    proc, url = start_server(out, db)
    try:
        c = Client(url)
        assert c.login("ann") == 302
        code = codes_of(db, "ann")[0]
        attempts = ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                    "/static/..%2f..%2f..%2fetc%2fpasswd", "/static//etc/passwd",
                    "/static/%2Fetc%2Fpasswd", f"/api/read/{code}/volume/..%2F..%2Fgel_counts.tsv",
                    f"/api/read/{code}/volume/%2Fetc%2Fpasswd",
                    f"/api/read/{code}/volume/../../../gel_counts.tsv",
                    "/api/read/..%2F..%2Fetc%2Fpasswd/meta", f"/api/read/{code}/volume/post%00",
                    "/read/..%2f..%2fetc%2fpasswd", "/static/..\\..\\etc\\passwd"]
        for path in attempts:
            status, _, body = c.request("GET", path)
            assert 400 <= status < 500, (path, status)
            assert b"root:" not in body and b"participant_id" not in body
        status, _, body = c.request("GET", f"/api/read/{code}/volume/post")
        assert status == 200 and len(body) == 48 * 48 * 24 * 2
        c.close()
    finally:
        proc.kill()
        proc.wait()


def test_safe_path_and_bad_labels(tmp_path):
    from lesionpipe.review.visitdata import OutputError, VisitFiles, reviewable_visits

    out = tmp_path / "out"
    write_review_outputs(out)
    outside = tmp_path / "secret"
    outside.mkdir()
    (out / "sub-09").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PermissionError):
        VisitFiles(out, "sub-09", "ses-w00").post
    with pytest.raises(PermissionError):
        VisitFiles(out, "sub-01/../../..", "ses-w00").post
    tsv = out / "gel_counts.tsv"
    tsv.write_text(tsv.read_text().replace("sub-01\tses-w04", "../sub-01\tses-w04"))
    with pytest.raises(OutputError, match="invalid BIDS labels"):
        reviewable_visits(out)


def test_append_only_and_tamper_detection(tmp_path):
    from lesionpipe.cli import main

    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out)
    make_review_db(out, db)
    app = create_app(out, db)
    c = login(app, "ann")
    code = codes_of(db, "ann")[0]
    for decision in ("confirm", "confirm", "confirm"):
        assert c.post(f"/api/read/{code}/decision", json={"lesion": "auto:1",
                                                          "decision": decision},
                      headers={"X-CSRF-Token": c.csrf}).status_code == 200
    assert main(["review-admin", "--db", str(db), "verify"]) == 0
    con = sqlite3.connect(db)
    for sql in ("UPDATE decisions SET decision='reject'", "DELETE FROM decisions",
                "UPDATE audit SET reason='x'", "DELETE FROM audit WHERE id=3",
                "UPDATE assignments SET slot=3", "DELETE FROM assignments"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    # a hand edit behind the triggers' back is caught
    con.execute("DROP TRIGGER decisions_no_update")
    con.execute("UPDATE decisions SET decision='reject', reason='vessel' WHERE id=2")
    con.commit()
    res = Store(db).verify()
    assert not res.ok
    assert any("decisions row 2" in p for p in res.problems)
    assert any("decisions_no_update" in p for p in res.problems)
    assert main(["review-admin", "--db", str(db), "verify"]) == 1
    con.close()


def test_audit_edit_and_deletion_detected(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out)
    make_review_db(out, db)
    assert Store(db).verify().ok
    for edit, expect in (("UPDATE audit SET new_value='{}' WHERE id=4", "record 4: contents"),
                         ("DELETE FROM audit WHERE id=5", "record 5 is missing")):
        work = tmp_path / f"copy{len(expect)}.sqlite"
        src = sqlite3.connect(db)
        dst = sqlite3.connect(work)
        src.backup(dst)
        src.close()
        trig = "audit_no_update" if edit.startswith("UPDATE") else "audit_no_delete"
        dst.execute(f"DROP TRIGGER {trig}")
        dst.execute(edit)
        dst.commit()
        dst.close()
        res = Store(work).verify()
        assert not res.ok and any(expect in p for p in res.problems), res.problems


def test_sign_requires_password_and_locks(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out)
    make_review_db(out, db)
    app = create_app(out, db)
    c = login(app, "ann")
    code = codes_of(db, "ann")[0]
    h = {"X-CSRF-Token": c.csrf}
    r = c.post(f"/api/read/{code}/sign", json={"password": password("ann")}, headers=h)
    assert r.status_code == 409 and "need a decision" in r.json["error"]
    for l in c.get(f"/api/read/{code}/state").json["lesions"]:
        c.post(f"/api/read/{code}/decision", json={"lesion": l["key"], "decision": "confirm"},
               headers=h)
    r = c.post(f"/api/read/{code}/sign", json={"password": "not-my-password"}, headers=h)
    assert r.status_code == 403
    r = c.post(f"/api/read/{code}/sign", json={"password": password("ann")}, headers=h)
    assert r.status_code == 200 and r.json["signer_name"] == "Dr Ann Reader"
    assert r.json["signed_utc"].endswith("Z") and "independently" in r.json["meaning"]
    body = {"lesion": "auto:1", "decision": "reject", "reason": "vessel"}
    assert c.post(f"/api/read/{code}/decision", json=body, headers=h).status_code == 409
    r = c.post(f"/api/read/{code}/decision", json={**body, "correction_reason": "re-checked: "
                                                   "flow void on pre"}, headers=h)
    assert r.status_code == 200
    state = c.get(f"/api/read/{code}/state").json
    assert not state["signed"] and len(state["signatures"]) == 1
    assert [h_["decision"] for h_ in state["history"] if h_["lesion"] == "auto:1"] == \
        ["confirm", "reject"]
    assert state["history"][-1]["correction_reason"].startswith("re-checked")
    r = c.post(f"/api/read/{code}/sign", json={"password": password("ann")}, headers=h)
    assert r.status_code == 200
    assert c.post(f"/api/read/{code}/sign", json={"password": password("ann")},
                  headers=h).status_code == 409
    assert len(c.get(f"/api/read/{code}/state").json["signatures"]) == 2
    assert Store(db).verify().ok


def test_bad_requests_are_clear(env):
    _, db, app, _ = env
    c = login(app, "ann")
    code = codes_of(db, "ann")[0]
    h = {"X-CSRF-Token": c.csrf}
    cases = [({"lesion": "auto:99", "decision": "confirm"}, "unknown lesion"),
             ({"lesion": "auto:1", "decision": "maybe"}, "decision must be"),
             ({"lesion": "auto:1", "decision": "reject"}, "needs a reason"),
             ({"lesion": "auto:1", "decision": "reject", "reason": "other"}, "needs a note"),
             ({"lesion": "added:999", "decision": "confirm"}, "unknown lesion"),
             ({"lesion": "x", "decision": "confirm"}, "unknown lesion")]
    for body, msg in cases:
        r = c.post(f"/api/read/{code}/decision", json=body, headers=h)
        assert r.status_code == 400 and msg in r.json["error"], (body, r.json)
    r = c.post(f"/api/read/{code}/grow", json={"seed": [1, 1, 1]}, headers=h)
    assert r.status_code == 422
    r = c.post(f"/api/read/{code}/grow", json={"seed": [1000, 1, 1]}, headers=h)
    assert r.status_code == 400
    r = c.post(f"/api/read/{code}/decision", data="not json", headers=h)
    assert r.status_code == 400


def test_login_locked_after_repeated_failures(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out)
    make_review_db(out, db)
    app = create_app(out, db)
    c = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    for _ in range(5):
        r = c.post("/login", data={"username": "bob", "password": "guess-guess",
                                   "csrf_token": token})
        assert r.status_code == 401
    r = c.post("/login", data={"username": "bob", "password": password("bob"),
                               "csrf_token": token})
    assert r.status_code == 429 and "lp_session" not in r.headers.get("Set-Cookie", "")
    flask_login(app, "ann")  # other users are not affected
    actions = [r["action"] for r in Store(db).audit_rows()]
    assert actions.count("login_failed") == 5 and "login_refused" in actions


def test_added_lesion_cannot_double_an_existing_one(env):
    _, db, app, visits = env
    from lesionpipe.review.visitdata import VisitData, VisitFiles

    out = env[0]
    v = visits[1]
    data = VisitData(VisitFiles(out, v.participant_id, v.session_id))
    c = login(app, "ann")
    code = codes_of(db, "ann")[1]
    h = {"X-CSRF-Token": c.csrf}
    row = data.lesions.iloc[0]
    on_auto = data.grid.to_display([row.centroid_i, row.centroid_j, row.centroid_k]).round()
    r = c.post(f"/api/read/{code}/grow", json={"seed": on_auto.tolist()}, headers=h)
    assert r.status_code == 422 and "automated lesion 1" in r.json["error"]
    seed = data.grid.to_display(v.missed_seed).round().tolist()
    assert c.post(f"/api/read/{code}/add", json={"seed": seed}, headers=h).status_code == 200
    r = c.post(f"/api/read/{code}/add", json={"seed": seed}, headers=h)
    assert r.status_code == 422 and "already been added" in r.json["error"]


def test_broken_outputs_do_not_leak_identities(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    visits = write_review_outputs(out)
    make_review_db(out, db)
    assert (db.stat().st_mode & 0o777) == 0o600
    v = visits[0]
    (out / v.participant_id / v.session_id / "anat" /
     f"{v.participant_id}_{v.session_id}_ce-gadolinium_space-orig_desc-enhancement_map.nii.gz"
     ).write_bytes(b"not a nifti")
    app = create_app(out, db)
    c = login(app, "ann")
    r = c.get(f"/api/read/{codes_of(db, 'ann')[0]}/meta")
    assert r.status_code == 500 and "reference" in r.json["error"]
    assert v.participant_id not in r.text and v.session_id not in r.text
