"""A small synthetic OUTPUT_DIR that follows docs/outputs.md exactly, for the review app's tests.

Each visit is a 48x48x24 volume on an x-flipped, anisotropic grid (so that display reorientation is
really exercised) with:

* true enhancing lesions, all in the automated mask;
* one elongated "vessel" that the pipeline wrongly kept as a lesion (readers reject it);
* one faint lesion visible on the enhancement map but missing from the mask (readers add it).

One further row of ``gel_counts.tsv`` is a failed visit without images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

SHAPE = (48, 48, 24)
AFFINE = np.array([[-1.0, 0.0, 0.0, 24.0],
                   [0.0, 1.0, 0.0, -24.0],
                   [0.0, 0.0, 2.0, -24.0],
                   [0.0, 0.0, 0.0, 1.0]])


@dataclass
class FixtureVisit:
    participant_id: str
    session_id: str
    has_pre: bool
    #: lesion_id -> kind ('lesion' or 'vessel')
    lesions: dict[int, str] = field(default_factory=dict)
    #: voxel (original grid) at the centre of the lesion missing from the mask
    missed_seed: tuple[int, int, int] = (0, 0, 0)

    @property
    def vessel_id(self) -> int:
        return next(k for k, v in self.lesions.items() if v == "vessel")


def _sphere(shape, centre, radius):
    ii, jj, kk = np.indices(shape)
    # z voxels are 2 mm: radius in mm
    d2 = (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (2.0 * (kk - centre[2])) ** 2
    return d2 <= radius ** 2


def _save(data, path, dtype):
    img = nb.Nifti1Image(np.asarray(data).astype(dtype), AFFINE)
    img.set_qform(AFFINE, 1)
    img.set_sform(AFFINE, 1)
    img.header.set_xyzt_units("mm")
    nb.save(img, str(path))


def _visit_images(rng, has_pre, lesion_centres, vessel, missed):
    ii, jj, kk = np.indices(SHAPE)
    brain = (((ii - 24) / 20.0) ** 2 + ((jj - 24) / 21.0) ** 2 + ((kk - 12) / 10.5) ** 2) <= 1
    base = np.where(brain, 100.0, 5.0) + rng.normal(0, 2.0, SHAPE)
    enh = np.zeros(SHAPE, np.float32)
    labels = np.zeros(SHAPE, np.int16)
    for n, c in enumerate(lesion_centres, start=1):
        m = _sphere(SHAPE, c, 2.6)
        enh[m] = 60.0
        labels[m] = n
    vid = len(lesion_centres) + 1
    vmask = np.zeros(SHAPE, bool)
    vmask[vessel[0]:vessel[0] + 9, vessel[1], vessel[2]] = True
    vmask[vessel[0]:vessel[0] + 9, vessel[1] + 1, vessel[2]] = True
    enh[vmask] = 80.0
    labels[vmask] = vid
    miss = _sphere(SHAPE, missed, 2.2)
    enh[miss] = 35.0
    pre = base.copy()
    post = base * (1 + enh / 100.0)
    enh_map = (post - pre) if has_pre else (post - 100.0)
    enh_map = np.where(brain, enh_map, 0.0)
    return brain, pre, post, enh_map, labels


def _lesion_rows(labels, enh_map):
    rows = []
    vox_vol = float(abs(np.linalg.det(AFFINE[:3, :3])))
    for lid in range(1, int(labels.max()) + 1):
        idx = np.argwhere(labels == lid)
        c_ijk = idx.mean(axis=0)
        c_xyz = AFFINE[:3, :3] @ c_ijk + AFFINE[:3, 3]
        vals = enh_map[labels == lid]
        rows.append([lid, len(idx), len(idx) * vox_vol, *np.round(c_xyz, 2), *np.round(c_ijk, 2),
                     round(float(vals.mean()), 2), round(float(vals.max()), 2)])
    return rows


LESION_COLUMNS = ["lesion_id", "n_voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
                  "centroid_i", "centroid_j", "centroid_k", "mean_enhancement_pct",
                  "peak_enhancement_pct"]


def write_review_outputs(out_dir: str | Path, *, seed: int = 0,
                         extra_visits: int = 0) -> list[FixtureVisit]:
    """Write a pipeline OUTPUT_DIR with three reviewable visits and one failed visit.

    ``extra_visits`` adds that many more visits (participants sub-101 ...) drawn like the first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "lesionpipe outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionpipe", "Version": "0.1.0"}]}, indent=2))
    (out / "logs").mkdir(exist_ok=True)
    specs = [("sub-01", "ses-w00", True, [(16, 16, 8), (30, 20, 12)], (12, 30, 14), (32, 32, 8)),
             ("sub-01", "ses-w04", True, [(18, 28, 10)], (10, 14, 12), (30, 30, 14)),
             ("sub-02", "ses-w00", False, [(20, 20, 10), (28, 30, 13)], (14, 34, 10),
              (34, 16, 10))]
    for n in range(extra_visits):
        base = specs[n % 3]
        specs.append((f"sub-{101 + n}", base[1], *base[2:]))
    weeks = {"ses-w00": 0, "ses-w04": 4}
    visits, count_rows = [], []
    for sub, ses, has_pre, centres, vessel, missed in specs:
        anat = out / sub / ses / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        (out / sub / ses / "figures").mkdir(parents=True, exist_ok=True)
        brain, pre, post, enh_map, labels = _visit_images(rng, has_pre, centres, vessel, missed)
        stem = f"{sub}_{ses}_ce-gadolinium_space-orig"
        _save(labels > 0, anat / f"{stem}_label-GEL_mask.nii.gz", np.uint8)
        _save(labels, anat / f"{stem}_label-GEL_dseg.nii.gz", np.int16)
        _save(post, anat / f"{stem}_desc-preproc_T1w.nii.gz", np.float32)
        if has_pre:
            _save(pre, anat / f"{sub}_{ses}_space-orig_desc-preproc_T1w.nii.gz", np.float32)
        _save(enh_map, anat / f"{stem}_desc-enhancement_map.nii.gz", np.float32)
        _save(brain, anat / f"{stem}_desc-brain_mask.nii.gz", np.uint8)
        (anat / f"{stem}_label-GEL_mask.json").write_text(json.dumps({"Sources": []}))
        (anat / f"{sub}_{ses}_ce-gadolinium_settings.toml").write_text("connectivity = 26\n")
        (out / sub / ses / "figures" / f"{sub}_{ses}_ce-gadolinium_report.html").write_text(
            "<html><body>report</body></html>")
        rows = _lesion_rows(labels, enh_map)
        lines = ["\t".join(LESION_COLUMNS)] + ["\t".join(str(v) for v in r) for r in rows]
        (anat / f"{stem}_label-GEL_lesions.tsv").write_text("\n".join(lines) + "\n")
        total = sum(r[2] for r in rows)
        count_rows.append([sub, ses, str(weeks[ses]), str(len(rows)), f"{total:.1f}",
                           "1" if has_pre else "0", "ok", ""])
        kinds = {n: "lesion" for n in range(1, len(centres) + 1)}
        kinds[len(centres) + 1] = "vessel"
        visits.append(FixtureVisit(sub, ses, has_pre, kinds, missed))
    count_rows.append(["sub-02", "ses-w04", "4", "n/a", "n/a", "1", "failed",
                       "sub-02_ses-w04 ce-gadolinium T1w: file is empty (0 bytes)"])
    header = ["participant_id", "session_id", "week", "gel_count", "gel_volume_mm3", "has_pre",
              "status", "error"]
    (out / "gel_counts.tsv").write_text(
        "\n".join("\t".join(r) for r in [header] + count_rows) + "\n")
    return visits


# --- review database, server process and HTTP client helpers --------------------------------
READERS = {"ann": "Dr Ann Reader", "bob": "Dr Bob Reader"}
ADJUDICATORS = {"cat": "Dr Cat Adjudicator"}


def password(username: str) -> str:
    return f"pw-{username}-correct-horse"


def make_review_db(out_dir, db, *, readers=READERS, adjudicators=ADJUDICATORS,
                   extra_readers: int = 0):
    """Users (password = :func:`password`) and assignments: every visit read by the first two
    readers; ``extra_readers`` more readers r00, r01 ... spread over the visits."""
    from lesionpipe.review.store import Store
    from lesionpipe.review.visitdata import reviewable_visits

    store = Store(db)
    for u, name in readers.items():
        store.add_user(u, name, "reader", password(u))
    for u, name in adjudicators.items():
        store.add_user(u, name, "adjudicator", password(u))
    visits = reviewable_visits(out_dir)
    store.add_visits(visits)
    ids = [v["id"] for v in store.visits()]
    names = list(readers)
    for vid in ids:
        for u in names[:2]:
            store.assign(vid, u, "read")
        if adjudicators:
            store.assign(vid, next(iter(adjudicators)), "adjudication")
    store.close()
    return store


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out_dir, db, *, port: int | None = None, threads: int = 8, timeout: float = 30):
    """Run ``lesionpipe review`` in a subprocess; returns (Popen, base_url) once it answers."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    port = port or free_port()
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), NIPYPE_NO_ET="1")
    # the server's log goes to a file: an unread pipe would fill up and stall the server
    log = open(Path(db).with_suffix(f".{port}.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lesionpipe.cli", "review", str(out_dir),
                             "--db", str(db), "--port", str(port), "--threads", str(threads)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = Path(db).with_suffix(f".{port}.log").read_text(errors="replace")
            raise RuntimeError(f"server exited: {text[-2000:]}")
        try:
            urllib.request.urlopen(url + "/login", timeout=2).read()
            return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


class Client:
    """A minimal keep-alive HTTP client with the session cookie and CSRF token of one user."""

    def __init__(self, base_url: str):
        import http.client
        from urllib.parse import urlparse

        u = urlparse(base_url)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None):
        import http.client

        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=h)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                # only a GET may be repeated: a POST might have been stored already
                if attempt or method != "GET":
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        for k, v in resp.getheaders():
            if k.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                value = rest.split(";", 1)[0]
                if "Max-Age=0" in v or "expires=Thu, 01 Jan 1970" in v:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
        return resp.status, dict(resp.getheaders()), data

    def login(self, username: str, pw: str | None = None) -> int:
        import re
        from urllib.parse import urlencode

        _, _, page = self.request("GET", "/login")
        token = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
        status, _, _ = self.request(
            "POST", "/login", urlencode({"username": username, "password": pw or password(username),
                                         "csrf_token": token}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})
        if status == 302:
            _, _, page = self.request("GET", "/")
            found = re.search(rb'name="csrf_token" value="([^"]+)"', page)
            self.csrf = found.group(1).decode() if found else ""
        return status

    def get_json(self, path: str):
        import json as _json

        status, _, data = self.request("GET", path)
        return status, (_json.loads(data) if data[:1] in (b"{", b"[") else None)

    def post_json(self, path: str, obj, *, csrf: bool = True):
        import json as _json

        headers = {"Content-Type": "application/json"}
        if csrf:
            headers["X-CSRF-Token"] = self.csrf
        status, _, data = self.request("POST", path, _json.dumps(obj).encode(), headers)
        return status, (_json.loads(data) if data[:1] in (b"{", b"[") else None)

    def codes(self) -> list[dict]:
        status, body = self.get_json("/api/worklist")
        assert status == 200, status
        return body["items"]

    def close(self) -> None:
        self.conn.close()


def flask_login(app, user: str, pw: str | None = None):
    """A Flask test client logged in as ``user``; its CSRF token is ``client.csrf``."""
    import re

    c = app.test_client()
    page = c.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"username": user, "password": pw or password(user),
                               "csrf_token": token})
    assert r.status_code == 302, r.text
    c.csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/").text).group(1)
    return c


def codes_of(db, user: str) -> list[str]:
    """Assignment codes of one user, in visit order (tests only: the app never shows this)."""
    import sqlite3

    con = sqlite3.connect(db)
    rows = con.execute("SELECT a.code FROM assignments a JOIN users u ON u.id = a.user_id "
                       "WHERE u.username=? ORDER BY a.visit_id", (user,)).fetchall()
    con.close()
    return [r[0] for r in rows]
