"""DICOM test data for test_dicom.py: copies of the public samples with chosen tags.

The public samples live in ``<repo>/../shared/dicom`` (read-only). Every test works on copies in a
temporary folder; the copies carry sentinel identifiers so a test can prove that none survives.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "dicom"
GE_DIR = SHARED / "ge_mprage_phantom" / "In" / "05_3D_Ax_T1_MP_RAGE_R22"
TS_DIR = SHARED / "transfer_syntaxes" / "In"
TS_REF = SHARED / "transfer_syntaxes" / "Ref"

SENTINEL_DATE = "19020202"
SENTINEL_BIRTH = "19010101"
PRE_TIME = "134217.654321"
POST_TIME = "141503.123456"
SENTINEL_TAGS = {
    "PatientName": "SENTINEL^NAME",
    "PatientID": "SENTINELID42",
    "PatientBirthDate": SENTINEL_BIRTH,
    "InstitutionName": "SENTINEL_HOSPITAL",
    "InstitutionAddress": "1 SENTINEL STREET",
    "InstitutionalDepartmentName": "SENTINEL_DEPT",
    "StationName": "SENTINELSTN",
    "DeviceSerialNumber": "SENTINELSERIAL",
    "ReferringPhysicianName": "SENTINELDOCTOR^ANNA",
    "PerformingPhysicianName": "SENTINELOPERATOR^BEN",
    "AccessionNumber": "SENTINELACC",
    "ImageComments": "SENTINELCOMMENT",
    "PerformedStationName": "SENTINELPSTN",
}
STUDY_UID = "1.2.826.0.1.3680043.8.498.424242424242"
# every string that must not appear anywhere in an output (compared case-insensitively)
SENTINELS = ["SENTINEL", SENTINEL_BIRTH, "1901-01-01", SENTINEL_DATE, "1902-02-02",
             PRE_TIME.split(".")[0], "13:42:17", POST_TIME.split(".")[0], "14:15:03", STUDY_UID]


def require_samples() -> None:
    if not GE_DIR.is_dir() or not TS_DIR.is_dir():
        pytest.skip(f"public DICOM samples not found at {SHARED} (expected next to the repository "
                    "as ../shared/dicom)")


def series_uid(tag: str) -> str:
    """A fixed, valid UID per test series (the UIDs are sentinels too)."""
    digits = "".join(str(ord(c) % 10) for c in tag)
    return f"{STUDY_UID}.{int(digits or '0') % 10**12}"


def write_series(src_files, dest: Path, *, number: int, tag: str, time: str,
                 description: str | None = None, agent: str | None = None,
                 ingredient: str | None = None, patient_id: str | None = None) -> list[Path]:
    """Copy DICOM files to ``dest`` as a new series with sentinel identifiers and chosen tags."""
    import pydicom
    from pydicom import config
    from pydicom.datadict import DicomDictionary, dictionary_VR

    dest.mkdir(parents=True, exist_ok=True)
    uid = series_uid(tag)
    out = []
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, f in enumerate(sorted(src_files)):
                ds = pydicom.dcmread(str(f))
                for tag in list(ds.keys()):
                    if tag.is_private:
                        continue
                    vr = dictionary_VR(tag) if tag in DicomDictionary else None
                    if vr == "DA":
                        ds[tag].value = SENTINEL_DATE
                    elif vr == "TM":
                        ds[tag].value = time
                for kw, val in SENTINEL_TAGS.items():
                    setattr(ds, kw, val)
                if patient_id:
                    ds.PatientID = patient_id
                ds.StudyInstanceUID = STUDY_UID
                ds.SeriesInstanceUID = uid
                ds.SOPInstanceUID = f"{uid}.{k + 1}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.SeriesNumber = number
                if description is not None:
                    ds.SeriesDescription = description
                if agent is not None:
                    ds.ContrastBolusAgent = agent
                if ingredient is not None:
                    ds.ContrastBolusIngredient = ingredient
                path = dest / f"IM{k + 1:04d}.dcm"
                ds.save_as(str(path), enforce_file_format=True)
                out.append(path)
    finally:
        config.settings.reading_validation_mode = old
    return out


@pytest.fixture(scope="session")
def dicom_library(tmp_path_factory):
    """Prepared series (built once): pre (no contrast tags), post (agent + ingredient), a second
    post, a pre tagged 'NONE', and the sentinel-tagged transfer-syntax EPI."""
    require_samples()
    root = tmp_path_factory.mktemp("dicom_library")
    ge = sorted(GE_DIR.iterdir())
    lib = {
        "pre": write_series(ge, root / "pre", number=5, tag="pre", time=PRE_TIME),
        "post": write_series(ge, root / "post", number=7, tag="post", time=POST_TIME,
                             description="3D Ax T1 MP-RAGE +C", agent="GADOVIST",
                             ingredient="GADOLINIUM"),
        "post2": write_series(ge, root / "post2", number=9, tag="post2", time=POST_TIME,
                              description="3D Ax T1 MP-RAGE post", agent="GADOVIST"),
        "pre_none": write_series(ge, root / "pre_none", number=3, tag="prenone", time=PRE_TIME,
                                 agent="NONE"),
    }
    lib["root"] = root
    return lib


def copy_series(files, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / Path(f).name
        shutil.copyfile(f, target)
        out.append(target)
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 and mtime of every file below ``folder`` (to prove it was not modified)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest()
                                                     + f"@{p.stat().st_mtime_ns}")
    return out
