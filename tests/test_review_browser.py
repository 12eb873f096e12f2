"""End-to-end double reading in a real browser (Debian's Chromium driven by Playwright).

Reader 1 rejects a vessel and adds a missed lesion; Reader 2 confirms the vessel and misses the
lesion; the adjudicator resolves both; the export must then carry the adjudicated count and mask.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from lesionpipe.review.visitdata import DisplayGrid
from review_fixtures import make_review_db, password, start_server, write_review_outputs

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


def _need_browser():
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} not installed (apt-get install chromium, or `make sysdeps`)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def served(tmp_path):
    _need_browser()
    out, db = tmp_path / "out", tmp_path / "review.sqlite"
    visits = write_review_outputs(out)
    make_review_db(out, db)
    proc, url = start_server(out, db)
    yield out, db, url, visits
    proc.kill()
    proc.wait()


def _codes(db, participant, session):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT u.username, a.code FROM assignments a JOIN users u ON "
                       "u.id = a.user_id JOIN visits v ON v.id = a.visit_id WHERE "
                       "v.participant_id=? AND v.session_id=?", (participant, session)).fetchall()
    con.close()
    return dict(rows)


def _shot(page, name, tmp_path):
    target = Path(os.environ.get("LP_SCREENSHOT_DIR", tmp_path))
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / f"{name}.png"))


def _login(page, url, user):
    page.goto(url + "/")
    page.fill("#username", user)
    page.fill("#password", password(user))
    page.click("#login")
    page.wait_for_selector("table.worklist, main p")


def _open(page, url, code):
    page.goto(f"{url}/read/{code}")
    page.wait_for_selector("body.ready", timeout=20000)


def _decide(page, key, decision, reason=""):
    row = f"#row-{key.replace(':', '-')}"
    if decision == "confirm":
        page.click(f"{row} button.confirm")
    else:
        page.select_option(f"{row} select.reason", reason)
        page.click(f"{row} button.reject")
    page.wait_for_selector(f"{row} .badge.{decision}")


def _sign(page, user):
    page.fill("#signpassword", password(user))
    page.click("#sign")
    page.wait_for_selector("#status.signed")


def _click_voxel(page, out, visit, orig_ijk):
    """Click the post-contrast canvas on an original-grid voxel (mirrors viewer.js geometry)."""
    img = nb.load(str(out / visit.participant_id / visit.session_id / "anat" /
                      f"{visit.participant_id}_{visit.session_id}_ce-gadolinium_space-orig_"
                      "desc-preproc_T1w.nii.gz"))
    grid = DisplayGrid(img.affine, img.shape)
    i, j, k = np.round(grid.to_display(orig_ijk)).astype(int)
    nx, ny, _ = grid.display_shape
    sx, sy = grid.display_spacing[:2]
    page.click("#zoomreset")
    page.evaluate("(k) => { const s = document.getElementById('slice'); s.value = k; "
                  "s.dispatchEvent(new Event('input')); }", int(k))
    size = page.evaluate("() => document.getElementById('canvas-post').width")
    s0 = min(size / (nx * sx), size / (ny * sy))
    px, py = s0 * sx, s0 * sy
    dx, dy = size / 2 - (nx / 2) * px, size / 2 - (ny / 2) * py
    x = dx + (nx - 1 - i + 0.5) * px
    y = dy + (ny - 1 - j + 0.5) * py
    page.check("#addmode")
    page.click("#canvas-post", position={"x": x, "y": y})


_COUNT_ORANGE = """() => {
  const c = document.getElementById('canvas-post');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i + 1] === 140 && d[i + 2] === 0) n++;
  return n;
}"""


def _settle(page, fn, expect, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(fn)
        if expect(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _viewer_controls(page, out, visit):
    """Jump to lesion 1, see its outline, hide outlines, scroll and zoom."""
    files_anat = out / visit.participant_id / visit.session_id / "anat"
    stem = f"{visit.participant_id}_{visit.session_id}_ce-gadolinium_space-orig"
    table = pd.read_csv(files_anat / f"{stem}_label-GEL_lesions.tsv", sep="\t")
    img = nb.load(str(files_anat / f"{stem}_desc-preproc_T1w.nii.gz"))
    grid = DisplayGrid(img.affine, img.shape)
    k = int(round(grid.to_display(table.loc[0, ["centroid_i", "centroid_j", "centroid_k"]]
                                  .to_numpy(float))[2]))
    label = "() => document.getElementById('slicelabel').textContent"
    page.click("#nextlesion")
    assert _settle(page, label, lambda t: t.startswith(f"{k + 1} /")).startswith(f"{k + 1} /")
    assert "selected" in page.get_attribute("#row-auto-1", "class")
    assert _settle(page, _COUNT_ORANGE, lambda n: n > 0) > 0      # outline of the selected lesion
    page.keyboard.press("o")
    assert _settle(page, _COUNT_ORANGE, lambda n: n == 0) == 0    # outlines hidden
    page.keyboard.press("o")
    page.keyboard.press("ArrowUp")
    assert _settle(page, label, lambda t: t.startswith(f"{k + 2} /")).startswith(f"{k + 2} /")
    page.keyboard.press("ArrowDown")
    page.click("#zoomin")
    page.click("#zoomreset")


def test_double_read_adjudicate_export(served, tmp_path):
    from playwright.sync_api import sync_playwright

    out, db, url, visits = served
    v = visits[0]
    codes = _codes(db, v.participant_id, v.session_id)
    vessel = f"auto:{v.vessel_id}"
    true_lesions = [f"auto:{k}" for k, kind in v.lesions.items() if kind == "lesion"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        # ---- Reader 1: confirm, reject the vessel, reload, add the missed lesion, sign
        page = browser.new_context(viewport={"width": 1700, "height": 1000}).new_page()
        _login(page, url, "ann")
        assert page.locator(f"text={codes['ann']}").count() == 1
        assert v.participant_id not in page.content() and "week" not in page.content()
        _open(page, url, codes["ann"])
        _viewer_controls(page, out, v)
        for key in true_lesions:
            _decide(page, key, "confirm")
        _decide(page, vessel, "reject", "vessel")
        page.reload()
        page.wait_for_selector("body.ready")
        assert "vessel" in page.inner_text(f"#row-{vessel.replace(':', '-')}")
        _click_voxel(page, out, v, v.missed_seed)
        page.wait_for_selector("#addbox:not([hidden])")
        _shot(page, "reader1_add_preview", tmp_path)
        page.click("#addaccept")
        page.wait_for_selector("tr[id^='row-added-'] .badge.confirm")
        page.fill("#commenttext", "Motion at the vertex; read carefully.")
        page.click("#commentsave")
        page.wait_for_selector("#comments li")
        _sign(page, "ann")
        _shot(page, "reader1_signed", tmp_path)
        # a signed read is locked: a change without a correction reason is refused
        page.click(f"#row-{vessel.replace(':', '-')} button.confirm")
        page.wait_for_selector("#message.error")
        page.context.close()

        # ---- Reader 2: confirms everything, misses the lesion
        page = browser.new_context(viewport={"width": 1700, "height": 1000}).new_page()
        _login(page, url, "bob")
        _open(page, url, codes["bob"])
        assert page.locator("tr[id^='row-added-']").count() == 0  # nothing of Reader 1's
        for key in true_lesions + [vessel]:
            _decide(page, key, "confirm")
        _sign(page, "bob")
        page.context.close()

        # ---- Adjudicator: sees Reader 1 / Reader 2, resolves lesion by lesion
        page = browser.new_context(viewport={"width": 1700, "height": 1000}).new_page()
        _login(page, url, "cat")
        assert page.locator(f"text={codes['cat']}").count() == 1
        _open(page, url, codes["cat"])
        text = page.content()
        assert "Dr Ann" not in text and "Dr Bob" not in text
        disputed = page.locator("tr.disputed")
        assert disputed.count() == 2
        _decide(page, vessel, "reject", "vessel")
        added_row = page.locator("tr.disputed[id^='row-added-']").get_attribute("id")
        page.click(f"#{added_row} button.confirm")
        page.wait_for_selector(f"#{added_row} .badge.confirm")
        page.click(f"#{added_row}")
        _shot(page, "adjudicator", tmp_path)
        _sign(page, "cat")
        page.context.close()
        browser.close()

    from lesionpipe.cli import main

    export = tmp_path / "export"
    assert main(["review-export", str(out), "--db", str(db), "--out", str(export)]) == 0
    df = pd.read_csv(export / "gel_counts_reviewed.tsv", sep="\t", na_values=["n/a"])
    row = df[(df.participant_id == v.participant_id) & (df.session_id == v.session_id)].iloc[0]
    assert row.read_status == "adjudicated" and row.status == "ok"
    assert int(row.gel_count) == len(true_lesions) + 1
    stem = f"{v.participant_id}_{v.session_id}_ce-gadolinium_space-orig"
    anat = export / v.participant_id / v.session_id / "anat"
    mask = nb.load(str(anat / f"{stem}_label-GEL_desc-reviewed_mask.nii.gz"))
    dseg = np.asarray(nb.load(str(anat / f"{stem}_label-GEL_desc-reviewed_dseg.nii.gz")).dataobj)
    post = nb.load(str(out / v.participant_id / v.session_id / "anat" /
                       f"{stem}_desc-preproc_T1w.nii.gz"))
    assert mask.shape == post.shape and np.allclose(mask.affine, post.affine)
    auto = np.asarray(nb.load(str(out / v.participant_id / v.session_id / "anat" /
                                  f"{stem}_label-GEL_dseg.nii.gz")).dataobj)
    assert not (np.asarray(mask.dataobj)[auto == v.vessel_id]).any()
    assert dseg[tuple(v.missed_seed)] > 0
    assert len(np.unique(dseg[dseg > 0])) == int(row.gel_count)
    audit = pd.read_csv(export / "audit_trail.csv")
    assert {"decision", "add_lesion", "sign", "comment"} <= set(audit.action)
    assert main(["review-admin", "--db", str(db), "verify"]) == 0
    shutil.rmtree(export)
