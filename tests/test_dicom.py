"""import-dicom: classification, conversion, de-identification and bad input.

Uses the public samples in ../shared/dicom (copied; never written) and copies with tags set by
tests/dicom_fixtures.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dicom_fixtures import (GE_DIR, SENTINELS, TS_DIR, TS_REF, copy_series,  # noqa: F401
                            dicom_library, require_samples, tree_digest, write_series)
from lesionpipe import cli
from lesionpipe.dicom import (SeriesResult, check_series, classify_series, convert_series,
                              deidentified_nifti_bytes, find_dcm2niix, merge_sessions_tsv,
                              read_batch, resolve_session, scan_folder)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def run_cli(argv, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="lesionpipe")
    code = cli.main(["import-dicom", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err, caplog.text


def assert_no_sentinel(bids_dir: Path, *texts: str) -> None:
    """Every byte of every output (gz decompressed), every path and every text: no sentinel."""
    needles = [s.lower().encode() for s in SENTINELS]
    checked = 0
    for p in sorted(bids_dir.rglob("*")):
        rel = p.relative_to(bids_dir).as_posix().lower().encode()
        for n in needles:
            assert n not in rel, f"sentinel {n!r} in file name {p}"
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        data = data.lower()
        for n in needles:
            assert n not in data, f"sentinel {n!r} found in {p.relative_to(bids_dir)}"
        checked += 1
    for t in texts:
        for n in needles:
            assert n.decode() not in t.lower(), f"sentinel {n!r} in output text: {t[:300]}"
    assert checked > 0


def anat(bids: Path, sub="01", ses="w04") -> Path:
    return bids / f"sub-{sub}" / f"ses-{ses}" / "anat"


def tags(**kw):
    base = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M"]}
    base.update(kw)
    return base


T1_GRE = dict(ScanningSequence="GR", RepetitionTime=8.0, EchoTime=3.0, FlipAngle=12)


# ---------------------------------------------------------------------------------------------
# classification (pure)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, suffix, contrast", [
    (dict(T1_GRE, ContrastBolusAgent="Dotarem 15 ml"), "T1w", "post"),
    (dict(T1_GRE, ContrastBolusIngredient="GADOLINIUM"), "T1w", "post"),
    (dict(T1_GRE, ContrastBolusAgent="NONE"), "T1w", "pre"),
    (dict(T1_GRE, SeriesDescription="AX T1 +C"), "T1w", "post"),
    (dict(T1_GRE, SeriesDescription="ax t1 pre"), "T1w", "pre"),
    (dict(T1_GRE, SeriesDescription="AX T1"), "T1w", "unknown"),
    (dict(ScanningSequence="SE", RepetitionTime=550, EchoTime=10), "T1w", "unknown"),
    (dict(ScanningSequence="IR", RepetitionTime=9000, EchoTime=90, InversionTime=2500,
          SeriesDescription="AX FLAIR"), "FLAIR", "unknown"),
    (dict(ScanningSequence="SE", RepetitionTime=4000, EchoTime=95, SeriesDescription="ax t2"),
     "T2w", "unknown"),
    (dict(ScanningSequence="SE", RepetitionTime=3000, EchoTime=15), "PDw", "unknown"),
])
def test_classify_series(kw, suffix, contrast):
    c = classify_series(tags(**kw))
    assert c.skip_reason is None and c.ambiguous is None
    assert (c.suffix, c.contrast) == (suffix, contrast)
    assert c.how, "every decision records how it was made"
    if contrast == "post":
        assert c.ingredient == "GADOLINIUM"


def test_classify_tags_beat_text_and_say_so():
    c = classify_series(tags(**T1_GRE, SeriesDescription="T1 pre", ContrastBolusAgent="Gadovist"))
    assert c.contrast == "post"
    assert any("ContrastBolusAgent" in h for h in c.how)
    assert any("take precedence" in n for n in c.notes)


@pytest.mark.parametrize("kw, reason", [
    (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "localizer"),
    (dict(T1_GRE, SeriesDescription="3-plane loc"), "localizer"),
    (dict(T1_GRE, ImageType=["DERIVED", "PRIMARY", "MPR"]), "derived"),
    (dict(ScanningSequence="EP", RepetitionTime=3000, EchoTime=30), "echo-planar"),
    (dict(T1_GRE, SeriesDescription="DWI b1000"), "diffusion"),
    (dict(Modality="CT"), "modality CT"),
    (dict(ScanningSequence="GR", RepetitionTime=300, EchoTime=5, FlipAngle=20), "not recognised"),
])
def test_classify_skips_with_reason(kw, reason):
    c = classify_series(tags(**kw))
    assert c.skip_reason and reason in c.skip_reason


def test_classify_reports_ambiguity():
    c = classify_series(tags(**T1_GRE, ContrastBolusIngredient="IODINE"))
    assert c.ambiguous and "not gadolinium" in c.ambiguous
    c = classify_series(tags(ScanningSequence="SE", RepetitionTime=500, EchoTime=10,
                             SeriesDescription="ax flair"))
    assert c.ambiguous and "FLAIR" in c.ambiguous and "T1w" in c.ambiguous


def _items(*specs):
    out = []
    for number, kw in specs:
        res = SeriesResult(label=f"series {number}", number=number, description="", n_files=1)
        out.append((res, classify_series(tags(**kw))))
    return out


def test_resolve_untagged_t1_before_tagged_post_is_pre():
    items = _items((3, T1_GRE), (5, dict(T1_GRE, ContrastBolusAgent="Gadovist")), (8, T1_GRE))
    resolve_session(items, prefix="sub-01_ses-w04")
    (pre, _), (post, _), (late, _) = items
    assert pre.contrast == "pre" and pre.target == "sub-01_ses-w04_T1w"
    assert any("acquired before" in h for h in pre.how)
    assert post.target == "sub-01_ses-w04_ce-gadolinium_T1w"
    assert late.status == "ambiguous"


def test_resolve_refuses_two_post_candidates_unless_chosen():
    specs = ((5, dict(T1_GRE, ContrastBolusAgent="Gadovist")),
             (7, dict(T1_GRE, ContrastBolusAgent="Gadovist")))
    items = _items(*specs)
    resolve_session(items, prefix="sub-01_ses-w04")
    assert [r.status for r, _ in items] == ["ambiguous", "ambiguous"]
    assert all("--post-series" in r.messages[-1] for r, _ in items)
    items = _items(*specs)
    resolve_session(items, prefix="sub-01_ses-w04", post_series=7)
    assert [r.status for r, _ in items] == ["skipped", "pending"]
    assert items[1][0].target == "sub-01_ses-w04_ce-gadolinium_T1w"


def test_resolve_numbers_runs_of_other_suffixes():
    flair = dict(ScanningSequence="IR", RepetitionTime=9000, EchoTime=90, InversionTime=2500)
    items = _items((2, flair), (4, flair))
    resolve_session(items, prefix="sub-01_ses-w04")
    assert [r.target for r, _ in items] == ["sub-01_ses-w04_run-1_FLAIR",
                                            "sub-01_ses-w04_run-2_FLAIR"]


def test_merge_sessions_tsv_keeps_rows_and_columns(tmp_path):
    tsv = tmp_path / "sub-01_sessions.tsv"
    tsv.write_text("session_id\tweek\tsite\nses-w00\t0\tA\n")
    assert merge_sessions_tsv(tsv, "w04", 4.0, overwrite=False) is None
    assert tsv.read_text() == "session_id\tweek\tsite\nses-w00\t0\tA\nses-w04\t4\tn/a\n"
    err = merge_sessions_tsv(tsv, "w00", 2.0, overwrite=False)
    assert err and "already gives week 0" in err
    assert "ses-w00\t0\tA" in tsv.read_text()
    assert merge_sessions_tsv(tsv, "w00", 2.0, overwrite=True) is None
    assert "ses-w00\t2\tA" in tsv.read_text()


# ---------------------------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------------------------
def test_find_dcm2niix_next_to_python():
    exe = find_dcm2niix()
    assert exe.name.startswith("dcm2niix") and os.access(exe, os.X_OK)


def test_transfer_syntaxes_convert_identically_and_headers_are_scrubbed(tmp_path):
    require_samples()
    exe = find_dcm2niix()
    ref = None
    for k, f in enumerate(sorted(TS_DIR.glob("*.dcm"))):
        niftis, _ = convert_series([f], tmp_path / f"w{k}", dcm2niix=exe)
        assert len(niftis) == 1, f.name
        raw = nb.load(str(niftis[0]))
        assert b"Time=" in raw.header["descrip"].tobytes()  # dcm2niix puts the time here
        out = tmp_path / f"{f.stem}.nii.gz"
        out.write_bytes(deidentified_nifti_bytes(niftis[0]))
        img = nb.load(str(out))
        hdr = img.header
        for key in ("descrip", "aux_file", "intent_name", "db_name"):
            assert hdr[key].tobytes().strip(b"\0") == b"", (f.name, key)
        assert len(hdr.extensions) == 0
        data = np.asanyarray(img.dataobj)
        assert img.shape == (64, 64, 35)
        assert np.array_equal(data, np.asanyarray(raw.dataobj).reshape(data.shape))
        np.testing.assert_allclose(img.affine, raw.affine, atol=1e-4)
        upstream = nb.load(str(TS_REF / f"{f.stem}.nii"))
        np.testing.assert_array_equal(data, np.asanyarray(upstream.dataobj).reshape(data.shape))
        if ref is None:
            ref = data
        assert np.array_equal(data, ref), f"{f.name} differs from 1.dcm"
        assert gzip.decompress(out.read_bytes())[:4] == (348).to_bytes(4, "little")


def test_epi_samples_are_skipped_and_reported(tmp_path, capsys, caplog):
    require_samples()
    src = tmp_path / "site"
    copy_series(sorted(TS_DIR.glob("*.dcm")), src)
    code, out, err, log = run_cli([src, tmp_path / "bids", "--participant-label", "01",
                                   "--session-label", "w04"], capsys, caplog)
    assert code == 1
    scan = scan_folder(src)  # every transfer syntax reads as a complete image
    assert len(scan.series) == 9 and not scan.problems
    assert all(im.problem is None for s in scan.series for im in s.images)
    assert out.count("SKIPPED") == 9 and "echo-planar" in out
    assert "mixes 9 series" in out
    assert "no post-contrast T1w" in out


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_import_pre_post_deidentified(dicom_library, tmp_path, capsys, caplog):
    src = tmp_path / "site"
    copy_series(dicom_library["pre"], src / "a")
    copy_series(dicom_library["post"], src / "b")
    (src / "README.txt").write_text("exported by the site viewer\n")
    before = tree_digest(src)
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([src, bids, "--participant-label", "sub-01",
                                   "--session-label", "ses-w04", "--week", "4"], capsys, caplog)
    assert code == 0, out + err
    assert tree_digest(src) == before, "source folder modified"
    a = anat(bids)
    assert sorted(p.name for p in a.iterdir()) == [
        "sub-01_ses-w04_T1w.json", "sub-01_ses-w04_T1w.nii.gz",
        "sub-01_ses-w04_ce-gadolinium_T1w.json", "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz"]
    post = json.loads((a / "sub-01_ses-w04_ce-gadolinium_T1w.json").read_text())
    pre = json.loads((a / "sub-01_ses-w04_T1w.json").read_text())
    assert post["ContrastBolusIngredient"] == "GADOLINIUM"
    assert post["ContrastBolusAgent"] == "GADOVIST"
    assert "ContrastBolusIngredient" not in pre
    assert any("ContrastBolusAgent" in h for h in post["ImportClassification"]["How"])
    assert any("acquired before" in h for h in pre["ImportClassification"]["How"])
    for sc in (pre, post):
        assert sc["MagneticFieldStrength"] == 3 and sc["EchoTime"] == pytest.approx(0.003172)
        assert sc["Manufacturer"] == "GE" and sc["ManufacturersModelName"] == "SIGNA Pioneer"
        for banned in ("InstitutionName", "StationName", "DeviceSerialNumber", "AcquisitionTime",
                       "AcquisitionDateTime", "StudyInstanceUID", "SeriesInstanceUID"):
            assert banned not in sc
    img = nb.load(str(a / "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz"))
    assert img.shape == (256, 256, 130)
    np.testing.assert_allclose(img.header.get_zooms(), (0.9375, 0.9375, 1.2), atol=1e-4)
    assert (bids / "sub-01" / "sub-01_sessions.tsv").read_text() == "session_id\tweek\nses-w04\t4\n"
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["GeneratedBy"][0]["Name"] == "lesionpipe"
    assert "README.txt: not a DICOM file (ignored)" in out
    assert (bids / "logs" / "import-dicom" / "sub-01_ses-w04_import.json").is_file()
    assert_no_sentinel(bids, out, err, log)
    assert "SENTINEL" not in json.dumps(post) + json.dumps(pre)


def test_mixed_series_in_one_folder_and_reimport(dicom_library, tmp_path, capsys, caplog):
    src = tmp_path / "flat"
    copy_series(dicom_library["pre_none"], src)
    for f in dicom_library["post"]:  # same file names: rename into the same folder
        (src / f"P{f.name}").write_bytes(f.read_bytes())
    bids = tmp_path / "bids"
    args = [src, bids, "--participant-label", "01", "--session-label", "w04", "--week", "4"]
    code, out, err, log = run_cli(args, capsys, caplog)
    assert code == 0, out + err
    assert "mixes 2 series" in out
    assert "ContrastBolusAgent (0018,0010) = 'NONE'" in out
    code, out, err, log = run_cli(args, capsys, caplog)
    assert code == 1 and out.count("already exists; pass --overwrite") == 2
    code, out, err, log = run_cli([*args, "--overwrite"], capsys, caplog)
    assert code == 0
    code, out, err, log = run_cli([src, bids, "--participant-label", "01", "--session-label",
                                   "w12", "--week", "12"], capsys, caplog)
    assert code == 0
    assert (bids / "sub-01" / "sub-01_sessions.tsv").read_text() == \
        "session_id\tweek\nses-w04\t4\nses-w12\t12\n"
    code, out, err, log = run_cli([*args[:-1], "6"], capsys, caplog)
    assert code == 1 and "already gives week 4" in out
    assert_no_sentinel(bids, out, err, log)


def test_two_post_contrast_candidates_are_not_guessed(dicom_library, tmp_path, capsys, caplog):
    src = tmp_path / "site"
    copy_series(dicom_library["pre"], src / "a")
    copy_series(dicom_library["post"], src / "b")
    copy_series(dicom_library["post2"], src / "c")
    bids = tmp_path / "bids"
    args = [src, bids, "--participant-label", "01", "--session-label", "w04"]
    code, out, err, log = run_cli(args, capsys, caplog)
    assert code == 1
    assert out.count("2 candidate post-contrast T1w series (7, 9)") == 2
    assert not list(anat(bids).glob("*ce-gadolinium*"))
    assert (anat(bids) / "sub-01_ses-w04_T1w.nii.gz").is_file()
    code, out, err, log = run_cli([*args, "--post-series", "9", "--overwrite"], capsys, caplog)
    assert code == 0, out
    sc = json.loads((anat(bids) / "sub-01_ses-w04_ce-gadolinium_T1w.json").read_text())
    assert sc["SeriesNumber"] == 9
    assert "chosen with --post-series" in out
    assert_no_sentinel(bids, out, err, log)


def test_missing_slice_fails_that_series_only(dicom_library, tmp_path, capsys, caplog):
    src = tmp_path / "site"
    copy_series(dicom_library["pre_none"], src / "pre")
    post = copy_series(dicom_library["post"], src / "post")
    post[60].unlink()  # a slice from the middle
    before = tree_digest(src)
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([src, bids, "--participant-label", "01", "--session-label",
                                   "w04"], capsys, caplog)
    assert code == 1
    assert tree_digest(src) == before
    assert "series 7" in out and "missing slices" in out
    assert (anat(bids) / "sub-01_ses-w04_T1w.nii.gz").is_file()
    assert not (anat(bids) / "sub-01_ses-w04_ce-gadolinium_T1w.nii.gz").exists()
    assert "need attention: sub-01_ses-w04" in err
    assert "gap(s) in the slice positions" in out
    assert_no_sentinel(bids, out, err, log)


def test_missing_edge_slice_is_found(dicom_library, tmp_path):
    edge = tmp_path / "edge"
    copy_series(dicom_library["post"], edge)
    images = scan_folder(edge).series[0].images
    assert check_series(scan_folder(edge).series[0]) == []
    last = max(images, key=lambda im: im.instance)  # the last slice: no gap is left behind
    last.path.unlink()
    msgs = check_series(scan_folder(edge).series[0])
    assert msgs == ["missing slices: 129 images present, 130 expected (ImagesInAcquisition)"]


def test_truncated_empty_and_foreign_files(dicom_library, tmp_path, capsys, caplog):
    src = tmp_path / "site"
    copy_series(dicom_library["pre_none"], src / "pre")
    post = copy_series(dicom_library["post"], src / "post")
    data = post[10].read_bytes()
    post[10].write_bytes(data[: int(len(data) * 0.6)])
    (src / "empty.dcm").write_bytes(b"")
    (src / "viewer.exe").write_bytes(b"MZ" + bytes(3000))
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([src, bids, "--participant-label", "01", "--session-label",
                                   "w04"], capsys, caplog)
    assert code == 1
    assert f"post/{post[10].name}: truncated: pixel data holds" in out
    assert "empty.dcm: empty file (0 bytes)" in out
    assert "viewer.exe: not a DICOM file (ignored)" in out
    assert (anat(bids) / "sub-01_ses-w04_T1w.nii.gz").is_file()
    assert_no_sentinel(bids, out, err, log)


def test_mixed_geometry_within_one_series(dicom_library, tmp_path):
    require_samples()
    src = tmp_path / "site"
    copy_series(dicom_library["pre"], src)
    write_series([TS_DIR / "1.dcm"], tmp_path / "epi", number=5, tag="pre", time="134217")
    (src / "extra.dcm").write_bytes((tmp_path / "epi" / "IM0001.dcm").read_bytes())
    scan = scan_folder(src)
    assert len(scan.series) == 1
    msgs = check_series(scan.series[0])
    assert any("mixed image sizes" in m for m in msgs)


def test_empty_folder_and_usage_errors(tmp_path, capsys, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    bids = tmp_path / "bids"
    code, out, err, _ = run_cli([empty, bids, "--participant-label", "01", "--session-label",
                                 "w04"], capsys, caplog)
    assert code == 1 and "DICOM folder is empty" in out
    for argv, msg in [
        ([empty, bids, "--session-label", "w04"], "--participant-label"),
        ([empty, bids, "--participant-label", "0_1", "--session-label", "w04"], "letters"),
        ([tmp_path / "nope", bids, "--participant-label", "01", "--session-label", "w04"],
         "not a directory"),
        ([empty, empty / "bids", "--participant-label", "01", "--session-label", "w04"],
         "inside the DICOM folder"),
        ([empty, bids, "--participant-label", "01", "--session-label", "w04", "--dcm2niix",
          tmp_path / "missing"], "dcm2niix"),
        ([bids, "--batch", tmp_path / "none.tsv"], "not a file"),
    ]:
        code, out, err, _ = run_cli(argv, capsys, caplog)
        assert code == 2 and msg in err, (argv, err)
    assert not (empty / "bids").exists()


def test_batch_tsv(dicom_library, tmp_path, capsys, caplog):
    site = tmp_path / "site"
    copy_series(dicom_library["pre"], site / "v1" / "pre")
    copy_series(dicom_library["post"], site / "v1" / "post")
    (site / "v2").mkdir()
    tsv = site / "batch.tsv"
    tsv.write_text("dicom_dir\tparticipant_id\tsession_id\tweek\tpost_series\n"
                   "v1\tsub-07\tses-w00\t0\tn/a\n"
                   "v2\t07\tw04\t4\t\n")
    jobs = read_batch(tsv)
    assert [(j.participant, j.session, j.week) for j in jobs] == [("07", "w00", 0.0),
                                                                  ("07", "w04", 4.0)]
    assert jobs[0].dicom_dir == site / "v1"
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([bids, "--batch", tsv], capsys, caplog)
    assert code == 1  # v2 is empty
    assert "sub-07_ses-w00 (week 0): 2 imported" in out
    assert "need attention: sub-07_ses-w04" in err
    assert (anat(bids, "07", "w00") / "sub-07_ses-w00_ce-gadolinium_T1w.nii.gz").is_file()
    assert_no_sentinel(bids, out, err, log)
    bad = tmp_path / "bad.tsv"
    bad.write_text("dicom_dir\tparticipant_id\tsession_id\tweek\nv1\t01\tw00\tfour\n")
    code, out, err, _ = run_cli([bids, "--batch", bad], capsys, caplog)
    assert code == 2 and "line 2: week 'four' is not a number" in err


def test_identifier_in_series_description_is_removed(dicom_library, tmp_path, capsys, caplog):
    require_samples()
    src = tmp_path / "site"
    write_series(sorted(GE_DIR.iterdir()), src, number=11, tag="named", time="134217",
                 description="T1 post Sentinel Name", agent="Gadovist")
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([src, bids, "--participant-label", "01", "--session-label",
                                   "w04"], capsys, caplog)
    assert code == 0, out
    sc = json.loads((anat(bids) / "sub-01_ses-w04_ce-gadolinium_T1w.json").read_text())
    assert "SeriesDescription" not in sc
    assert "[removed]" in out
    assert_no_sentinel(bids, out, err, log)


@pytest.mark.parametrize("name", ["1.dcm", "5.dcm", "9.dcm"])
def test_truncated_file_in_any_transfer_syntax_is_reported(tmp_path, name):
    require_samples()
    data = (TS_DIR / name).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * 0.7)])
    scan = scan_folder(tmp_path)
    problems = [p.problem for p in scan.problems if p.fatal]
    problems += [im.problem for s in scan.series for im in s.images if im.problem]
    assert len(problems) == 1 and ("truncated" in problems[0] or "pixel data" in problems[0])


def test_two_patients_in_one_folder_are_refused(dicom_library, tmp_path, capsys, caplog):
    require_samples()
    src = tmp_path / "site"
    copy_series(dicom_library["pre"], src / "a")
    write_series(sorted(GE_DIR.iterdir()), src / "b", number=7, tag="other", time="141503",
                 agent="Gadovist", patient_id="OTHERPATIENT77")
    bids = tmp_path / "bids"
    code, out, err, log = run_cli([src, bids, "--participant-label", "01", "--session-label",
                                   "w04"], capsys, caplog)
    assert code == 1 and "2 different patients" in out
    assert not (bids / "sub-01").exists()
    assert "otherpatient77" not in (out + err + log).lower()
    assert_no_sentinel(bids, out, err, log)
