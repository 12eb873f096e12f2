"""Review app: coordinates, region growing, consensus rules, the full read -> export flow, admin
commands."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import sys

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from lesionpipe.cli import main
from lesionpipe.review.app import create_app
from lesionpipe.review.consensus import ReadSummary, compare_reads, final_keys
from lesionpipe.review.grow import grow_region
from lesionpipe.review.store import Store
from lesionpipe.review.visitdata import DisplayGrid, VisitData, VisitFiles
from lesionpipe.settings import ReviewSettings, Settings
from review_fixtures import (codes_of, flask_login, make_review_db, password,
                             write_review_outputs)

COUNT_COLUMNS = ["participant_id", "session_id", "week", "gel_count", "gel_volume_mm3", "has_pre",
                 "status", "error"]


# --- pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [
    np.diag([-1.0, 1.0, 2.0, 1.0]),
    np.array([[0, 0, -1.2, 40], [-0.9, 0, 0, 10], [0, 1.1, 0, -5], [0, 0, 0, 1]], float),
])
def test_display_grid_round_trip(affine):
    rng = np.random.default_rng(0)
    shape = (7, 9, 5)
    data = rng.normal(size=shape)
    grid = DisplayGrid(affine, shape)
    disp = grid.array(data)
    assert disp.shape == grid.display_shape
    for ijk in rng.integers(0, shape, size=(20, 3)):
        d = np.round(grid.to_display(ijk)).astype(int)
        assert disp[tuple(d)] == data[tuple(ijk)]
        assert np.allclose(grid.to_original(d), ijk)
        # display axes increase towards R, A, S
    disp_aff = affine @ grid.disp2orig
    assert (np.argmax(np.abs(disp_aff[:3, :3]), axis=0) == [0, 1, 2]).all()
    assert (np.diag(disp_aff[:3, :3][:, [0, 1, 2]][np.argmax(np.abs(disp_aff[:3, :3]), axis=0)])
            > 0).all()


def test_grow_region_recovers_missed_lesion(tmp_path):
    visits = write_review_outputs(tmp_path / "out")
    for v in visits:
        data = VisitData(VisitFiles(tmp_path / "out", v.participant_id, v.session_id))
        vox = grow_region(data.enh, np.array(v.missed_seed) + [1, 0, 0],
                          spacing=(1, 1, 2), fraction=0.5)
        ii, jj, kk = np.indices(data.shape)
        c = v.missed_seed
        truth = (ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (2.0 * (kk - c[2])) ** 2 <= 2.2 ** 2
        got = np.zeros(data.shape, bool)
        got[tuple(vox.T)] = True
        assert (got == truth).all(), (truth.sum(), got.sum())
        # a click in plain brain grows nothing
        assert len(grow_region(data.enh, (24, 24, 2), spacing=(1, 1, 2))) == 0


def test_grow_region_bounded():
    enh = np.full((30, 30, 30), 50.0)
    vox = grow_region(enh, (15, 15, 15), radius_mm=4.0, max_voxels=10_000)
    seed = vox[0]  # the click snaps to the brightest neighbour (here the first of equals)
    assert (np.abs(seed - 15) <= 1).all()
    inside = np.sqrt(((np.indices(enh.shape).reshape(3, -1).T - seed) ** 2).sum(1)) <= 4.0
    assert len(vox) == inside.sum() > 200
    assert len(grow_region(enh, (15, 15, 15), max_voxels=50)) == 50


def test_consensus_rules():
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    r1 = ReadSummary({"auto:1": "confirm", "auto:2": "reject", "added:7": "confirm"},
                     {7: [10, 10, 5]})
    r2 = ReadSummary({"auto:1": "confirm", "auto:2": "confirm", "added:9": "confirm"},
                     {9: [11, 10, 5]})
    c = compare_reads([1, 2], r1, r2, affine=aff, rule="lesions", match_distance_mm=3)
    assert c.disagree and c.counts == (2, 3)
    assert [(r["key"], r["agree"]) for r in c.rows] == [("auto:1", True), ("auto:2", False),
                                                         ("added:7", True)]
    assert final_keys(c, {"auto:2": "reject"}, own_added=[]) == ["auto:1", "added:7"]
    # the same added lesion 4 mm apart along z (2 voxels) is a different lesion at 3 mm
    r2.added[9] = [10, 10, 7]
    c = compare_reads([1, 2], r1, r2, affine=aff, rule="lesions", match_distance_mm=3)
    assert [r["key"] for r in c.rows if not r["agree"]] == ["auto:2", "added:7", "added:9"]
    # count rule: 2 vs 2 agree although the sets differ; the agreed read is Reader 1's
    r2.latest["auto:1"] = "reject"
    c = compare_reads([1, 2], r1, r2, affine=aff, rule="count", match_distance_mm=3)
    assert not c.disagree and c.counts == (2, 2)
    assert final_keys(c, None, own_added=[]) == ["auto:1", "added:7"]
    with pytest.raises(ValueError, match="disagreement_rule"):
        compare_reads([1], r1, r2, affine=aff, rule="majority", match_distance_mm=3)


def test_review_settings_section():
    s = Settings.from_toml_string("[review]\ndisagreement_rule = 'count'\ngrow_fraction = 0.4\n")
    assert s.review.disagreement_rule == "count" and s.review.grow_fraction == 0.4
    with pytest.raises(ValueError, match="disagreement_rule"):
        ReviewSettings(disagreement_rule="vote")
    assert Settings.from_toml_string(s.to_toml_string()) == s


# --- the whole flow through the app, then export -------------------------------------------------
def _tree_hash(root):
    h = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def _read_all(app, db, user, visit_index, *, reject=(), add_seed=None, sign=True):
    c = flask_login(app, user)
    code = codes_of(db, user)[visit_index]
    h = {"X-CSRF-Token": c.csrf}
    state = c.get(f"/api/read/{code}/state").json
    for l in state["lesions"]:
        body = ({"lesion": l["key"], "decision": "reject", "reason": "vessel"}
                if l["lesion_id"] in reject else {"lesion": l["key"], "decision": "confirm"})
        assert c.post(f"/api/read/{code}/decision", json=body, headers=h).status_code == 200
    if add_seed is not None:
        meta = c.get(f"/api/read/{code}/meta").json
        assert meta["shape"] == [48, 48, 24]
        r = c.post(f"/api/read/{code}/grow", json={"seed": add_seed}, headers=h)
        assert r.status_code == 200 and r.json["n_voxels"] > 5
        r = c.post(f"/api/read/{code}/add", json={"seed": add_seed}, headers=h)
        assert r.status_code == 200, r.json
    if sign:
        r = c.post(f"/api/read/{code}/sign", json={"password": password(user)}, headers=h)
        assert r.status_code == 200, r.json
    return c, code


def test_full_flow_and_export(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    visits = write_review_outputs(out)
    before = _tree_hash(out)
    make_review_db(out, db)
    app = create_app(out, db)
    v0, v1 = visits[0], visits[1]
    grid = DisplayGrid(nb.load(str(VisitFiles(out, v0.participant_id, v0.session_id).post)).affine,
                       (48, 48, 24))
    seed = np.round(grid.to_display(v0.missed_seed)).astype(int).tolist()
    # visit 0: readers disagree on the vessel and on the missed lesion -> adjudication
    _read_all(app, db, "ann", 0, reject=(v0.vessel_id,), add_seed=seed)
    _read_all(app, db, "bob", 0)
    # visit 1: both reject the vessel -> agreed
    _read_all(app, db, "ann", 1, reject=(v1.vessel_id,))
    _read_all(app, db, "bob", 1, reject=(v1.vessel_id,))
    # visit 2: only one reader signed
    _read_all(app, db, "ann", 2)
    cat = flask_login(app, "cat")
    items = cat.get("/api/worklist").json["items"]
    assert [i["kind"] for i in items] == ["adjudication"]
    code = items[0]["code"]
    h = {"X-CSRF-Token": cat.csrf}
    state = cat.get(f"/api/read/{code}/state").json
    assert state["reader_counts"] == [len(v0.lesions), len(v0.lesions)]
    assert sorted(state["unresolved"])[0] == f"added:1"
    assert cat.post(f"/api/read/{code}/sign", json={"password": password("cat")},
                    headers=h).status_code == 409
    for key, decision in ((f"auto:{v0.vessel_id}", "reject"), ("added:1", "confirm")):
        body = {"lesion": key, "decision": decision}
        if decision == "reject":
            body["reason"] = "vessel"
        assert cat.post(f"/api/read/{code}/decision", json=body, headers=h).status_code == 200
    assert cat.post(f"/api/read/{code}/sign", json={"password": password("cat")},
                    headers=h).status_code == 200
    # after adjudication the readers' reads are closed
    ann = flask_login(app, "ann")
    r = ann.post(f"/api/read/{codes_of(db, 'ann')[0]}/decision",
                 json={"lesion": "auto:1", "decision": "reject", "reason": "artefact",
                       "correction_reason": "second look"}, headers={"X-CSRF-Token": ann.csrf})
    assert r.status_code == 409

    export = tmp_path / "export"
    assert main(["review-export", str(out), "--db", str(db), "--out", str(export)]) == 0
    df = pd.read_csv(export / "gel_counts_reviewed.tsv", sep="\t", na_values=["n/a"],
                     keep_default_na=False)
    assert list(df.columns) == COUNT_COLUMNS + ["read_status", "automated_gel_count"]
    df = df.set_index(["participant_id", "session_id"])
    n_true = lambda v: sum(1 for k in v.lesions.values() if k == "lesion")  # noqa: E731
    row = df.loc[(v0.participant_id, v0.session_id)]
    assert (row.read_status, row.status, row.gel_count) == ("adjudicated", "ok", n_true(v0) + 1)
    row = df.loc[(v1.participant_id, v1.session_id)]
    assert (row.read_status, row.status, row.gel_count) == ("agreed", "ok", n_true(v1))
    assert row.automated_gel_count == len(v1.lesions)
    row = df.loc[(visits[2].participant_id, visits[2].session_id)]
    assert row.read_status == "reading" and row.status == "failed" and np.isnan(row.gel_count)
    row = df.loc[("sub-02", "ses-w04")]
    assert row.read_status == "not_reviewed" and row.status == "failed"
    # reviewed mask of the agreed visit = automated lesions minus the vessel, exact grid
    files = VisitFiles(out, v1.participant_id, v1.session_id)
    auto = np.asarray(nb.load(str(files.dseg)).dataobj)
    mask_img = nb.load(str(export / v1.participant_id / v1.session_id / "anat" /
                           f"{files.stem}_label-GEL_desc-reviewed_mask.nii.gz"))
    assert np.array_equal(mask_img.affine, nb.load(str(files.post)).affine)
    assert np.array_equal(np.asarray(mask_img.dataobj) > 0, (auto > 0) & (auto != v1.vessel_id))
    vol = float(df.loc[(v1.participant_id, v1.session_id)].gel_volume_mm3)
    assert vol == pytest.approx(((auto > 0) & (auto != v1.vessel_id)).sum() * 2.0, abs=0.1)
    lesions = pd.read_csv(export / v0.participant_id / v0.session_id / "anat" /
                          f"{VisitFiles(out, v0.participant_id, v0.session_id).stem}"
                          "_label-GEL_desc-reviewed_lesions.tsv", sep="\t")
    assert sorted(lesions.origin) == ["automated"] * n_true(v0) + ["reader-added"]
    audit = pd.read_csv(export / "audit_trail.csv")
    assert audit.id.tolist() == list(range(1, len(audit) + 1))
    assert (audit.prev_hash.iloc[1:].values == audit.hash.iloc[:-1].values).all()
    # the pipeline outputs were not touched
    assert _tree_hash(out) == before


def test_export_refuses_broken_chain_and_input_folder(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out)
    make_review_db(out, db)
    assert main(["review-export", str(out), "--db", str(db), "--out", str(out / "x")]) == 2
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER audit_no_update")
    con.execute("UPDATE audit SET username='mallory' WHERE id=2")
    con.commit()
    con.close()
    assert main(["review-export", str(out), "--db", str(db), "--out", str(tmp_path / "e")]) == 1
    assert not (tmp_path / "e" / "gel_counts_reviewed.tsv").exists()


# --- admin command line ----------------------------------------------------------------------
def _admin(db, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["review-admin", "--db", str(db), *args])


def test_admin_commands(tmp_path, monkeypatch, capsys):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    write_review_outputs(out, extra_visits=5)
    for u in ("r1", "r2", "r3", "r4"):
        assert _admin(db, "add-user", u, "--role", "reader", "--name", f"Dr {u}",
                      "--password-stdin", stdin=password(u) + "\n", monkeypatch=monkeypatch) == 0
    assert _admin(db, "add-user", "adj", "--role", "adjudicator", "--name", "Dr Adj",
                  "--password-stdin", stdin=password("adj") + "\n", monkeypatch=monkeypatch) == 0
    assert _admin(db, "add-user", "r1", "--role", "reader", "--name", "again",
                  "--password-stdin", stdin=password("r1") + "\n", monkeypatch=monkeypatch) == 2
    assert _admin(db, "add-user", "shorty", "--role", "reader", "--name", "x",
                  "--password-stdin", stdin="short\n", monkeypatch=monkeypatch) == 2
    assert _admin(db, "assign", str(out), "--readers", "r1") == 2
    assert _admin(db, "assign", str(out), "--readers", "r1", "adj") == 2
    capsys.readouterr()
    assert _admin(db, "assign", str(out), "--readers", "r1", "r2", "r3", "r4",
                  "--adjudicators", "adj") == 0
    store = Store(db)
    rows = store.query("SELECT visit_id, kind, user_id FROM assignments")
    per_visit = {}
    for r in rows:
        per_visit.setdefault(r["visit_id"], []).append(r["kind"])
    assert len(per_visit) == 8 and all(sorted(k) == ["adjudication", "read", "read"]
                                       for k in per_visit.values())
    loads = pd.Series([r["user_id"] for r in rows if r["kind"] == "read"]).value_counts()
    assert loads.max() - loads.min() <= 1
    # running it again assigns nothing new
    assert _admin(db, "assign", str(out), "--readers", "r1", "r2", "r3", "r4") == 0
    assert len(store.query("SELECT * FROM assignments")) == len(rows)
    assert _admin(db, "assign", str(out), "--readers", "r1", "r2", "--visits",
                  "sub-99/ses-w00") == 2
    capsys.readouterr()
    assert _admin(db, "status", str(out)) == 0
    text = capsys.readouterr().out
    assert "sub-01/ses-w00" in text and text.count(" reading ") == 8 and "unassigned" not in text
    assert _admin(db, "set-password", "r1", "--password-stdin", stdin="a-new-long-password\n",
                  monkeypatch=monkeypatch) == 0
    assert store.verify_password("r1", "a-new-long-password") is not None
    assert _admin(db, "deactivate", "r2") == 0
    assert store.verify_password("r2", password("r2")) is None
    assert _admin(db, "users") == 0
    assert _admin(db, "verify") == 0


def test_settings_are_pinned_to_the_database(tmp_path):
    from lesionpipe.review.cli import AdminError, _settings_for_db

    store = Store(tmp_path / "r.sqlite")
    assert _settings_for_db(store, ReviewSettings(disagreement_rule="count")).disagreement_rule \
        == "count"
    assert _settings_for_db(store, None).disagreement_rule == "count"
    with pytest.raises(AdminError, match="other \\[review\\] settings"):
        _settings_for_db(store, ReviewSettings())


def test_bad_output_dir(tmp_path):
    from lesionpipe.review.visitdata import OutputError

    with pytest.raises(OutputError, match="gel_counts.tsv"):
        create_app(tmp_path, tmp_path / "r.sqlite")
    out = tmp_path / "out"
    visits = write_review_outputs(out)
    v = visits[0]
    files = VisitFiles(out, v.participant_id, v.session_id)
    img = nb.load(str(files.enhancement))
    nb.save(nb.Nifti1Image(np.asarray(img.dataobj)[:, :, :20], img.affine), str(files.enhancement))
    with pytest.raises(OutputError, match="enhancement map is not on the post-contrast grid"):
        VisitData(files)


def test_single_reading_mode(tmp_path, monkeypatch):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    visits = write_review_outputs(out)
    toml = tmp_path / "s.toml"
    toml.write_text("[review]\nreaders_per_visit = 1\n")
    assert _admin(db, "--settings", str(toml), "add-user", "solo", "--role", "reader",
                  "--name", "Dr Solo", "--password-stdin", stdin=password("solo") + "\n",
                  monkeypatch=monkeypatch) == 0
    assert _admin(db, "assign", str(out), "--readers", "solo") == 0
    app = create_app(out, db, ReviewSettings(readers_per_visit=1))
    _read_all(app, db, "solo", 0, reject=(visits[0].vessel_id,))
    export = tmp_path / "export"
    assert main(["review-export", str(out), "--db", str(db), "--out", str(export)]) == 0
    df = pd.read_csv(export / "gel_counts_reviewed.tsv", sep="\t", na_values=["n/a"])
    row = df[df.participant_id.eq(visits[0].participant_id)
             & df.session_id.eq(visits[0].session_id)].iloc[0]
    assert row.read_status == "single_read" and row.gel_count == len(visits[0].lesions) - 1


def test_count_rule_and_correction_reopens_comparison(tmp_path):
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    visits = write_review_outputs(out)
    make_review_db(out, db)
    app = create_app(out, db, ReviewSettings(disagreement_rule="count"))
    v = visits[0]
    first_true = next(k for k, kind in v.lesions.items() if kind == "lesion")
    # same count (one rejection each), different lesions: agreed under the count rule
    _read_all(app, db, "ann", 0, reject=(v.vessel_id,))
    bob, bob_code = _read_all(app, db, "bob", 0, reject=(first_true,))
    service = app.extensions["lesionpipe_review"]
    vid = Store(db).visits()[0]["id"]
    assert service.visit_status(vid)["status"] == "agreed"
    final = service.final_read(vid)
    assert sorted(l["key"] for l in final["lesions"]) == sorted(
        f"auto:{k}" for k in v.lesions if k != v.vessel_id)          # Reader 1's set
    # Bob corrects his read: the visit waits for his new signature, then needs adjudication
    h = {"X-CSRF-Token": bob.csrf}
    r = bob.post(f"/api/read/{bob_code}/decision", json={
        "lesion": f"auto:{first_true}", "decision": "confirm",
        "correction_reason": "second look: enhancing"}, headers=h)
    assert r.status_code == 200
    assert service.visit_status(vid)["status"] == "reading"
    cat = flask_login(app, "cat")
    cat_code = codes_of(db, "cat")[0]
    assert cat.get(f"/api/read/{cat_code}/state").status_code == 409
    assert bob.post(f"/api/read/{bob_code}/sign", json={"password": password("bob")},
                    headers=h).status_code == 200
    assert service.visit_status(vid)["status"] == "needs_adjudication"
    state = cat.get(f"/api/read/{cat_code}/state").json
    assert state["reader_counts"] == [len(v.lesions) - 1, len(v.lesions)]
    assert state["unresolved"] == [f"auto:{v.vessel_id}"]
