"""DICOM intake: a site's DICOM export in, a de-identified BIDS session out.

The steps, each a function that can be called on its own:

1. :func:`scan_folder` reads every file's header with pydicom, groups the images into series and
   records what is wrong with the input (non-DICOM files, truncated files, missing slices, images of
   different scans mixed in one series). Nothing in the folder is written.
2. :func:`classify_series` decides, from DICOM tags first and the series text as a fallback, what a
   series is (``T1w``, ``FLAIR``, ``T2w`` ... or skipped) and whether it was acquired after contrast
   injection, and records how each decision was made. :func:`resolve_session` then looks at the
   whole session: an untagged T1w acquired before a tagged post-contrast T1w is pre-contrast, and
   two candidates for the same role are reported as ambiguous instead of being guessed.
3. :func:`convert_series` runs ``dcm2niix`` (the PyPI ``dcm2niix`` package) on one series in a
   temporary folder; :func:`deidentified_nifti_bytes` clears every free-text NIfTI header field and
   :func:`clean_sidecar` keeps only whitelisted sidecar keys.
4. :func:`import_session` writes the BIDS files atomically, merges ``sub-<s>_sessions.tsv`` and a
   de-identified import log.

De-identification is layered: dcm2niix runs with ``-ba y`` (anonymised sidecar) and an empty ``-c``
comment; the sidecar is then rebuilt from a whitelist; the NIfTI text fields and extensions are
cleared; pydicom reads without value validation and its log records are held back (both quote tag
values); and every piece of DICOM-derived text that leaves this module (series descriptions, agent
names, file paths, dcm2niix output) is checked against the identifying values read from the DICOM
headers themselves (:class:`Scrubber`), so a patient name typed into a series description is
removed as well.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lesionpipe import __version__
from lesionpipe.imageio import atomic_write_bytes, atomic_write_json, atomic_write_text

LOG = logging.getLogger("lesionpipe.dicom")

POST_ENTITY = "_ce-gadolinium"
LOG_DIR = Path("logs") / "import-dicom"

# BIDS sidecar keys that are kept (everything else dcm2niix writes is dropped). Acquisition
# parameters, field strength, scanner make/model and software: what analysis and QA need. Left out
# on purpose: institution, department, address, station, device serial number, every date, time and
# UID, study / procedure descriptions, image comments and dcm2niix's own BIDS guess.
SIDECAR_KEEP = (
    "Modality", "MagneticFieldStrength", "ImagingFrequency", "Manufacturer",
    "ManufacturersModelName", "SoftwareVersions", "BodyPart", "PatientPosition",
    "MRAcquisitionType", "SeriesDescription", "ProtocolName", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "SequenceName", "PulseSequenceType", "PulseSequenceName",
    "PulseSequenceDetails", "ImageType", "SeriesNumber", "AcquisitionNumber", "SliceThickness",
    "SpacingBetweenSlices", "SAR", "EchoNumber", "EchoTime", "RepetitionTime", "InversionTime",
    "FlipAngle", "EchoTrainLength", "PartialFourier", "BaseResolution", "PhaseResolution",
    "ReceiveCoilName", "ReceiveCoilActiveElements", "CoilString", "TransmitCoilName",
    "CoilCombinationMethod", "MatrixCoilMode", "PercentPhaseFOV", "PercentSampling",
    "PhaseEncodingSteps", "FrequencyEncodingSteps", "AcquisitionMatrixPE", "ReconMatrixPE",
    "ParallelReductionFactorInPlane", "ParallelReductionFactorOutOfPlane",
    "ParallelAcquisitionTechnique", "PixelBandwidth", "BandwidthPerPixelPhaseEncode", "DwellTime",
    "EffectiveEchoSpacing", "TotalReadoutTime", "PhaseEncodingDirection",
    "InPlanePhaseEncodingDirectionDICOM", "ImageOrientationPatientDICOM", "ImageOrientationText",
    "NonlinearGradientCorrection", "MTState", "SpoilingState", "AcquisitionDuration",
    "VariableFlipAngleFlag", "RefLinesPE", "PhilipsRescaleSlope", "PhilipsRescaleIntercept",
    "PhilipsScaleSlope", "UsePhilipsFloatNotDisplayScaling", "ConversionSoftware",
    "ConversionSoftwareVersion",
)
# Sidecar keys holding free text typed at the scanner: dropped if they contain an identifier.
_FREE_TEXT = {"SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName",
              "PulseSequenceDetails", "ReceiveCoilName", "CoilString", "TransmitCoilName",
              "BodyPart", "ImageOrientationText", "ContrastBolusAgent"}

# Text-valued DICOM attributes that identify a patient, a site or a scanner. Together with every
# PN (person name), DA/DT/TM (date/time) and UI (UID) element they feed the Scrubber.
_IDENTIFYING_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "PerformedStationName",
    "PerformedLocation", "AccessionNumber", "StudyID", "RequestedProcedureID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "AdmissionID", "ImageComments",
    "PatientComments", "AdditionalPatientHistory", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
)
_IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")

_NULL_AGENT = {"", "none", "no", "n/a", "na", "-", "0", "nil", "null", "without", "keine", "ohne",
               "nein", "not applicable"}
# Gadolinium-based agents by generic and brand name (lower case, matched as substrings).
_GADOLINIUM_NAMES = (
    "gado", "gadavist", "gadovist", "dotarem", "clariscan", "prohance", "multihance",
    "magnevist", "omniscan", "eovist", "primovist", "elucirem", "vueway", "optimark", "ablavar",
    "vasovist", "artirem", "cyclolux", "gd-dtpa", "gd-dota", "gd-bt-do3a", "gd ", "gd-",
)


class DicomImportError(RuntimeError):
    """The import cannot start (dcm2niix missing, unusable folder); message says what to do."""


class SeriesNotUsable(RuntimeError):
    """dcm2niix made several volumes of one series; fatal for a T1w, a skip for other series."""


# ============================================================================================
# identifying values
# ============================================================================================
class Scrubber:
    """Identifying strings read from DICOM headers; removes them from any outgoing text.

    >>> s = Scrubber(); s.add_person('DOE^JANE'); s.add_date('19800707'); s.add_text('Big Clinic')
    >>> s.scrub('series of Jane Doe, born 1980-07-07, at BIG CLINIC')
    'series of [removed] [removed], born [removed], at [removed]'
    >>> s.contains('T1 post'), s.contains('doe t1')
    (False, True)
    """

    MIN_LEN = 3

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern | None = None

    def add_text(self, value: Any) -> None:
        for v in _as_strings(value):
            v = v.strip()
            if len(v) >= self.MIN_LEN:
                self._values.add(v.lower())
                self._pattern = None

    def add_person(self, value: Any) -> None:
        for v in _as_strings(value):
            self.add_text(v)
            self.add_text(v.replace("^", " ").strip())
            for part in re.split(r"[\^=\s,]+", v):
                self.add_text(part)

    def add_date(self, value: Any) -> None:
        for v in _as_strings(value):
            digits = re.sub(r"\D", "", v)
            if len(digits) >= 8:
                d = digits[:8]
                for form in (d, f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[:4]}/{d[4:6]}/{d[6:]}",
                             f"{d[:4]}.{d[4:6]}.{d[6:]}", f"{d[6:]}.{d[4:6]}.{d[:4]}"):
                    self.add_text(form)
            if len(digits) >= 14:  # DT: the time part too
                self.add_time(digits[8:])

    def add_time(self, value: Any) -> None:
        for v in _as_strings(value):
            digits = re.sub(r"\D", "", v.split(".")[0])
            if len(digits) >= 6:
                t = digits[:6]
                self.add_text(t)
                self.add_text(f"{t[:2]}:{t[2:4]}:{t[4:6]}")

    def update(self, other: "Scrubber") -> None:
        self._values |= other._values
        self._pattern = None

    def __len__(self) -> int:
        return len(self._values)

    def _regex(self) -> re.Pattern | None:
        if self._pattern is None and self._values:
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(a) for a in alts), re.IGNORECASE)
        return self._pattern

    def contains(self, text: str) -> bool:
        rx = self._regex()
        return bool(rx and rx.search(str(text)))

    def scrub(self, text: str) -> str:
        rx = self._regex()
        return rx.sub("[removed]", str(text)) if rx else str(text)


def _as_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        out: list[str] = []
        for v in value:
            out.extend(_as_strings(v))
        return out
    return [str(value)]


def identifiers_of(ds, scrubber: Scrubber | None = None) -> Scrubber:
    """Collect the identifying values of one pydicom dataset (nested sequences included).

    Public person names, dates, times, the study/series UIDs and the attributes listed in
    ``_IDENTIFYING_KEYWORDS``; only those elements are decoded, so this stays fast on vendor
    headers with hundreds of private elements.
    """
    from pydicom.datadict import dictionary_keyword, dictionary_VR

    s = scrubber if scrubber is not None else Scrubber()
    for tag in list(ds.keys()):
        if tag.is_private or tag.group == 0x0002 or tag.element == 0:
            continue
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        try:
            vr = vr or dictionary_VR(tag)
            keyword = dictionary_keyword(tag)
        except KeyError:
            continue
        wanted = vr in ("PN", "DA", "DT", "TM", "SQ") or keyword in _IDENTIFYING_UIDS \
            or keyword in _IDENTIFYING_KEYWORDS
        if not wanted:
            continue
        try:
            value = ds[tag].value
        except Exception:  # undecodable value: nothing to collect
            continue
        if vr == "SQ":
            for item in value or []:
                identifiers_of(item, s)
        elif isinstance(value, bytes):
            continue
        elif vr == "PN":
            s.add_person(value)
        elif vr in ("DA", "DT"):
            s.add_date(value)
        elif vr == "TM":
            s.add_time(value)
        else:
            s.add_text(_plain(value))
    return s


# ============================================================================================
# reading a folder
# ============================================================================================
@dataclass
class FileProblem:
    """A file that is not part of any usable series."""

    path: str          # relative to DICOM_DIR
    problem: str
    fatal: bool        # True: a DICOM file that cannot be read (a series may be incomplete)


@dataclass
class ImageInfo:
    path: Path
    rel: str
    rows: int | None
    cols: int | None
    frames: int
    iop: tuple | None
    ipp: tuple | None
    instance: int | None
    echo: Any
    temporal: Any
    spacing: tuple | None
    images_in_acquisition: int | None
    problem: str | None = None


@dataclass
class Series:
    """Images of one series (same SeriesInstanceUID and SeriesNumber) and its header summary."""

    key: tuple
    number: int | None
    tags: dict[str, Any]
    images: list[ImageInfo] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)
    patient_key: tuple = ()
    study_uid: str = ""
    order_key: tuple = ()
    scrubber: Scrubber = field(default_factory=Scrubber)

    @property
    def label(self) -> str:
        return f"series {self.number}" if self.number is not None else "series (no number)"


@dataclass
class FolderScan:
    series: list[Series]
    problems: list[FileProblem]
    scrubber: Scrubber
    n_files: int


_CLASSIFY_TAGS = (
    "Modality", "ImageType", "SeriesDescription", "ProtocolName", "SequenceName",
    "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "RepetitionTime", "EchoTime",
    "InversionTime", "FlipAngle", "ContrastBolusAgent", "ContrastBolusIngredient",
    "ContrastBolusRoute", "ContrastBolusVolume", "ContrastBolusTotalDose",
    "MagneticFieldStrength", "Manufacturer", "ManufacturerModelName", "SeriesNumber",
)
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                 "1.2.840.10008.1.2.1.99"}


def _plain(value: Any) -> Any:
    """pydicom value -> plain JSON-able Python value."""
    if value is None:
        return None
    name = type(value).__name__
    if name == "MultiValue" or isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if name in ("DSfloat", "DSdecimal"):
        return float(value)
    if name == "IS":
        return int(value)
    if name == "PersonName":
        return str(value)
    if isinstance(value, bytes):
        return None
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def _num(value: Any) -> float | None:
    try:
        if isinstance(value, (list, tuple)):
            value = value[0]
        f = float(value)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError, IndexError):
        return None


def _read_header(path: Path, rel: str):
    """Return (dataset, None) or (None, FileProblem)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, FileProblem(rel, f"cannot be read ({type(exc).__name__})", True)
    if size == 0:
        return None, FileProblem(rel, "empty file (0 bytes)", False)
    with open(path, "rb") as fh:
        head = fh.read(132)
    has_preamble = head[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(str(path), force=not has_preamble)
    except InvalidDicomError:
        return None, FileProblem(rel, "not a DICOM file (ignored)", False)
    except Exception as exc:  # truncated or corrupt: pydicom raises many types
        if has_preamble:
            return None, FileProblem(rel, "DICOM file cannot be parsed; it is probably truncated "
                                          f"or corrupt ({type(exc).__name__})", True)
        return None, FileProblem(rel, "not a DICOM file (ignored)", False)
    if not has_preamble and ("SOPClassUID" not in ds or "Modality" not in ds):
        return None, FileProblem(rel, "not a DICOM file (ignored)", False)
    return ds, None


def _pixel_problem(ds) -> str | None:
    """Why the pixel data of a dataset is unusable, or None."""
    if "PixelData" not in ds:
        return "no pixel data (file truncated before the image, or not an image)"
    rows, cols = ds.get("Rows"), ds.get("Columns")
    bits = ds.get("BitsAllocated")
    if not rows or not cols or not bits:
        return "image size tags (Rows, Columns, BitsAllocated) missing"
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or
                  "1.2.840.10008.1.2")
    data = ds.PixelData
    if tsyntax in _UNCOMPRESSED:
        frames = int(_num(ds.get("NumberOfFrames")) or 1)
        expected = int(rows) * int(cols) * int(bits) // 8 * int(ds.get("SamplesPerPixel") or 1) \
            * frames
        if len(data) < expected:
            return (f"truncated: pixel data holds {len(data)} bytes, {expected} expected for "
                    f"{rows}x{cols}x{frames} at {bits} bits")
    else:
        from pydicom.encaps import generate_fragments

        try:
            n = sum(1 for frag in generate_fragments(data) if frag)
        except Exception:
            n = 0
        if n == 0:
            return "truncated or corrupt compressed pixel data (no complete image fragment)"
    return None


class _PydicomRecords(logging.Filter):
    """Holds back pydicom's log records while a folder is read (they quote tag values and full
    file paths); the reader turns them into its own de-identified messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


@contextlib.contextmanager
def _pydicom_reading():
    """Read without pydicom's value validation (its warnings quote tag values such as dates and
    names) and with pydicom's log records held back. Both are restored afterwards."""
    import warnings

    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    records = _PydicomRecords()
    pd_log = logging.getLogger("pydicom")
    pd_log.addFilter(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            yield records
    finally:
        pd_log.removeFilter(records)
        config.settings.reading_validation_mode = old


def scan_folder(dicom_dir: str | Path) -> FolderScan:
    """Read every file below ``dicom_dir`` (read-only) and group the images into series."""
    with _pydicom_reading() as records:
        return _scan_folder(Path(dicom_dir), records)


def _scan_folder(dicom_dir: Path, records: _PydicomRecords) -> FolderScan:
    problems: list[FileProblem] = []
    groups: dict[tuple, Series] = {}
    all_ids = Scrubber()
    files = []
    for root, dirs, names in os.walk(dicom_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            p = Path(root) / n
            if p.is_file():
                files.append(p)
    for path in files:
        rel = path.relative_to(dicom_dir).as_posix()
        records.messages.clear()
        ds, prob = _read_header(path, rel)
        if ds is not None and any("end of file" in m.lower() for m in records.messages):
            all_ids.update(identifiers_of(ds))
            prob, ds = FileProblem(rel, "truncated: the file ends before its last element "
                                        "(pixel data incomplete)", True), None
        if prob:
            problems.append(prob)
            continue
        ids = identifiers_of(ds)
        all_ids.update(ids)
        meta = getattr(ds, "file_meta", None)
        media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
        if "1.2.840.10008.1.3.10" in (str(ds.get("SOPClassUID", "")), media_class):
            problems.append(FileProblem(rel, "DICOMDIR index file (ignored)", False))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        number = ds.get("SeriesNumber")
        number = int(number) if number not in (None, "") else None
        if not uid and number is None:
            problems.append(FileProblem(rel, "DICOM file without SeriesInstanceUID or SeriesNumber "
                                             "(cannot be assigned to a series)", True))
            continue
        key = (uid, number)
        ser = groups.get(key)
        if ser is None:
            tags = {kw: _plain(ds.get(kw)) for kw in _CLASSIFY_TAGS}
            ser = Series(key=key, number=number, tags=tags,
                         patient_key=(str(ds.get("PatientID", "")), str(ds.get("PatientName", "")),
                                      str(ds.get("PatientBirthDate", ""))),
                         study_uid=str(ds.get("StudyInstanceUID", "")),
                         order_key=(str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or ""),
                                    str(ds.get("AcquisitionTime") or ds.get("SeriesTime") or ""),
                                    number if number is not None else 0))
            groups[key] = ser
        ser.scrubber.update(ids)
        ser.folders.add(Path(rel).parent.as_posix())
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        spacing = ds.get("PixelSpacing")
        info = ImageInfo(
            path=path, rel=rel, rows=_int(ds.get("Rows")), cols=_int(ds.get("Columns")),
            frames=int(_num(ds.get("NumberOfFrames")) or 1),
            iop=tuple(round(float(v), 3) for v in iop) if iop and len(iop) == 6 else None,
            ipp=tuple(float(v) for v in ipp) if ipp and len(ipp) == 3 else None,
            instance=_int(ds.get("InstanceNumber")), echo=_plain(ds.get("EchoNumbers")),
            temporal=_plain(ds.get("TemporalPositionIdentifier")),
            spacing=tuple(round(float(v), 4) for v in spacing) if spacing else None,
            images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
            problem=_pixel_problem(ds))
        ser.images.append(info)
    series = sorted(groups.values(), key=lambda s: s.order_key)
    return FolderScan(series=series, problems=problems, scrubber=all_ids, n_files=len(files))


def _int(value: Any) -> int | None:
    f = _num(value)
    return int(f) if f is not None else None


def check_series(series: Series, scrubber: Scrubber | None = None) -> list[str]:
    """Problems that make a series unusable as one volume: truncated files, missing slices,
    images of different scans in one series. Empty list = fine. File paths in the messages go
    through ``scrubber``."""
    out: list[str] = []
    bad = [im for im in series.images if im.problem]
    for im in bad[:5]:
        out.append(f"{scrubber.scrub(im.rel) if scrubber else im.rel}: {im.problem}")
    if len(bad) > 5:
        out.append(f"... and {len(bad) - 5} more damaged files")
    images = [im for im in series.images if not im.problem]
    if not images:
        return out or ["no readable image"]
    sizes = Counter((im.rows, im.cols) for im in images)
    if len(sizes) > 1:
        desc = ", ".join(f"{n} of {r}x{c}" for (r, c), n in sizes.most_common())
        out.append(f"mixed image sizes in one series ({desc}): the folder mixes images of "
                   "different scans")
    orients = Counter(im.iop for im in images)
    if len(orients) > 1:
        out.append(f"mixed slice orientations in one series ({len(orients)} different): the folder "
                   "mixes images of different scans")
    if len(sizes) > 1 or len(orients) > 1 or images[0].frames > 1 or len(images) < 2:
        return out
    iop = images[0].iop
    if iop is None or any(im.ipp is None for im in images):
        return out
    normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    by_group: dict[tuple, list[ImageInfo]] = defaultdict(list)
    for im in images:
        by_group[(str(im.echo), str(im.temporal))].append(im)
    for group in by_group.values():
        dist = np.array([float(np.dot(normal, im.ipp)) for im in group])
        rounded = Counter(np.round(dist, 2).tolist())
        dups = sum(n - 1 for n in rounded.values() if n > 1)
        if dups and len(by_group) == 1:
            out.append(f"{dups} image(s) repeat a slice position already present: duplicate files "
                       "or images of different scans in one series")
            continue
        uniq = np.unique(np.round(dist, 2))
        if len(uniq) >= 3:
            steps = np.diff(uniq)
            step = float(np.median(steps))
            if step > 0:
                gaps = steps[steps > 1.5 * step]
                if gaps.size:
                    missing = int(sum(round(g / step) - 1 for g in gaps))
                    out.append(f"missing slices: {gaps.size} gap(s) in the slice positions, about "
                               f"{missing} slice(s) of {step:.3g} mm missing")
        instances = sorted(im.instance for im in group if im.instance is not None)
        if len(by_group) == 1 and len(instances) == len(group) and len(set(instances)) == \
                len(instances) and not gaps_reported(out):
            holes = (instances[-1] - instances[0] + 1) - len(instances)
            if 0 < holes <= len(instances):
                out.append(f"missing slices: {holes} instance number(s) absent between "
                           f"{instances[0]} and {instances[-1]}")
        expected = {im.images_in_acquisition for im in group}
        if len(by_group) == 1 and len(expected) == 1:
            n_exp = expected.pop()
            if n_exp and n_exp > len(group) and not gaps_reported(out):
                out.append(f"missing slices: {len(group)} images present, {n_exp} expected "
                           "(ImagesInAcquisition)")
    return out


def gaps_reported(messages: Sequence[str]) -> bool:
    return any(m.startswith("missing slices") for m in messages)


# ============================================================================================
# classification (pure)
# ============================================================================================
@dataclass
class Classification:
    """What one series is and how that was decided."""

    suffix: str | None            # BIDS suffix ('T1w', 'FLAIR', 'T2w', 'PDw', 'T2starw') or None
    contrast: str                 # 'post', 'pre' or 'unknown'
    skip_reason: str | None = None
    ambiguous: str | None = None  # set when a decision could not be made
    how: list[str] = field(default_factory=list)
    ingredient: str | None = None  # 'GADOLINIUM' for gadolinium-based agents
    notes: list[str] = field(default_factory=list)


def _text(tags: Mapping[str, Any]) -> str:
    parts = []
    for kw in ("SeriesDescription", "ProtocolName", "SequenceName"):
        v = tags.get(kw)
        if v:
            parts.append(" ".join(_as_strings(v)))
    return " | ".join(parts).lower()


_B = r"(?<![a-z0-9])"
_E = r"(?![a-z0-9])"
_PRE_RX = re.compile(
    _B + r"(?:pre|precontrast|pre-contrast|pre_contrast|pregad|pre-gad|pregd|native|nativ|"
    r"unenhanced|non-?enhanced|non-?contrast|plain)" + _E
    + r"|" + _B + r"(?:ohne|without|w/o|wo|no|non|sans|senza)[\s_-]*(?:km|contrast|kontrast|gad|"
    r"gado|gd|mdc|c)" + _E
    + r"|" + _B + r"-\s*c" + _E)
_POST_RX = re.compile(
    _B + r"(?:post|postgad|post-gad|postgd|postcontrast|post-contrast|gad|gado|gd|contrast|ce|km|"
    r"mdc|kontrast|enhanced)" + _E
    + r"|\+\s*(?:c|gd|gad|km|ce|kontrast|contrast|mdc)" + _E
    + r"|" + _B + r"c\s*\+")


def contrast_from_text(text: str) -> str | None:
    """'post', 'pre', 'conflict' or None from series text (description, protocol, sequence name).

    >>> [contrast_from_text(t) for t in ('ax t1 se +c', 't1_mprage_post', '3d t1 pre',
    ...     't1 ohne km', 't1 mit km', 'sag t1 flair', 'pre and post')]
    ['post', 'post', 'pre', 'pre', 'post', None, 'conflict']
    """
    text = text.lower()
    pre = bool(_PRE_RX.search(text))
    post = bool(_POST_RX.search(_PRE_RX.sub(" ", text)))
    if pre and post:
        return "conflict"
    return "post" if post else "pre" if pre else None


_KIND_RX = [
    ("localizer", re.compile(_B + r"(?:localizer|localiser|loc|scout|survey|3-?plane|tri-?plane|"
                                  r"aahead|aascout|calibration|asset cal|ref ?scan)" + _E)),
    ("diffusion", re.compile(_B + r"(?:dwi|dti|diff|diffusion|tensor|adc|trace|ep_b\d*|dwi\w*)"
                                  + _E)),
    ("functional", re.compile(_B + r"(?:bold|fmri|rest|resting|ep2d_bold)" + _E)),
    ("perfusion", re.compile(_B + r"(?:perf|perfusion|dsc|dce|asl|pcasl|pasl)" + _E)),
    ("angiography", re.compile(_B + r"(?:tof|angio|mra|pc3d|phase contrast)" + _E)),
    ("susceptibility", re.compile(_B + r"(?:swi|swan|swip|qsm)" + _E)),
]
_SUFFIX_RX = [
    ("FLAIR", re.compile(_B + r"(?:t2[\s_-]*flair|flair|dark[\s_-]*fluid|tirm|spcir\w*)" + _E
                         + r"|flair")),
    ("T2starw", re.compile(_B + r"(?:t2\*|t2star|t2_star|t2-star|t2 star|hemo|medic|merge)"
                           r"(?![a-z0-9])|t2\*")),
    ("T1w", re.compile(_B + r"(?:t1w?|t1[\s_-]*\w*|mprage|mp-rage|mp_rage|mp rage|spgr|fspgr|bravo|"
                       r"tfe|t1tfe|vibe|flash|fl3d\w*|tfl\w*|mpr|ir-fspgr|efgre3d|3d t1)" + _E)),
    ("PDw", re.compile(_B + r"(?:pd|pdw|pd-w|proton[\s_-]*density)" + _E)),
    ("T2w", re.compile(_B + r"(?:t2w?|t2[\s_-]*\w*)" + _E)),
]


def suffix_from_text(text: str) -> str | None:
    """BIDS suffix suggested by series text, or None.

    >>> [suffix_from_text(t) for t in ('3d ax t1 mp-rage_r22', 'ax t2 flair', 'ax t2 tse',
    ...     'sag 3d flair', 'axial pd', '*tfl3d1_16ns', 'ax swan', 'ax t2*')]
    ['T1w', 'FLAIR', 'T2w', 'FLAIR', 'PDw', 'T1w', None, 'T2starw']
    """
    text = text.lower()
    for suffix, rx in _SUFFIX_RX:
        if rx.search(text):
            return suffix
    return None


def suffix_from_parameters(tags: Mapping[str, Any]) -> tuple[str | None, str]:
    """BIDS suffix implied by the sequence tags (ScanningSequence, TR, TE, TI, flip angle).

    >>> suffix_from_parameters({'ScanningSequence': ['RM', 'IR'], 'RepetitionTime': 2217.66,
    ...     'EchoTime': 3.172, 'InversionTime': 1000, 'FlipAngle': 8})[0]
    'T1w'
    >>> suffix_from_parameters({'ScanningSequence': 'SE', 'RepetitionTime': 500, 'EchoTime': 12})[0]
    'T1w'
    >>> suffix_from_parameters({'ScanningSequence': 'IR', 'RepetitionTime': 9000, 'EchoTime': 90,
    ...     'InversionTime': 2500})[0]
    'FLAIR'
    >>> suffix_from_parameters({'ScanningSequence': 'EP', 'RepetitionTime': 3000, 'EchoTime': 30})
    ('epi', 'ScanningSequence EP (echo-planar)')
    """
    seq = {s.upper() for s in _as_strings(tags.get("ScanningSequence"))}
    tr, te, ti = (_num(tags.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    flip = _num(tags.get("FlipAngle"))
    desc = (f"ScanningSequence {'/'.join(sorted(seq)) or '?'}, TR {tr:g} ms, TE {te:g} ms"
            if tr is not None and te is not None else "")
    if ti:
        desc += f", TI {ti:g} ms"
    if "EP" in seq:
        return "epi", "ScanningSequence EP (echo-planar)"
    if tr is None or te is None:
        return None, "TR/TE missing"
    if "IR" in seq and ti:
        if ti >= 1500 and te >= 60:
            return "FLAIR", desc
        if 300 <= ti <= 1300 and te < 20:
            return "T1w", desc
        return None, desc
    if "GR" in seq:
        if te > 15:
            return "T2starw", desc
        if tr < 50 or (flip is not None and flip >= 50 and tr < 1000):
            return "T1w", desc
        return None, desc
    if "SE" in seq:
        if tr <= 1000 and te <= 30:
            return "T1w", desc
        if tr >= 2000 and te >= 70:
            return "T2w", desc
        if tr >= 2000 and te <= 40:
            return "PDw", desc
    return None, desc


def classify_series(tags: Mapping[str, Any], *, scrubber: Scrubber | None = None) -> Classification:
    """Classify one series from its DICOM tags (keyword -> value).

    Tag values quoted in the record of how a decision was made go through ``scrubber``.

    >>> c = classify_series({'Modality': 'MR', 'ImageType': ['ORIGINAL', 'PRIMARY'],
    ...     'SeriesDescription': '3D T1', 'ScanningSequence': 'GR', 'RepetitionTime': 8,
    ...     'EchoTime': 3, 'ContrastBolusAgent': 'Gadovist'})
    >>> c.suffix, c.contrast, c.ingredient, c.how[-1]
    ('T1w', 'post', 'GADOLINIUM', "ContrastBolusAgent (0018,0010) = 'Gadovist'")
    >>> classify_series({'Modality': 'CT'}).skip_reason
    'modality CT, not MR'
    """
    c = Classification(suffix=None, contrast="unknown")
    modality = str(tags.get("Modality") or "")
    if modality and modality != "MR":
        c.skip_reason = f"modality {modality}, not MR"
        return c
    image_type = [s.upper() for s in _as_strings(tags.get("ImageType"))]
    text = _text(tags)
    if "LOCALIZER" in image_type:
        c.skip_reason = "localizer (ImageType LOCALIZER)"
        return c
    for kind, rx in _KIND_RX:
        if rx.search(text):
            c.skip_reason = f"{kind} series (series description / protocol name)"
            return c
    if image_type and image_type[0] == "DERIVED":
        c.skip_reason = ("derived images (ImageType DERIVED: a reformat, map or subtraction), "
                         "not an acquired volume")
        return c
    by_param, param_desc = suffix_from_parameters(tags)
    by_text = suffix_from_text(text)
    if by_param == "epi":
        c.skip_reason = "echo-planar series (functional or diffusion), not an anatomical scan"
        return c
    if by_param and by_text and by_param != by_text:
        msg = (f"series text suggests {by_text} but the sequence tags suggest {by_param} "
               f"({param_desc})")
        if "T1w" not in (by_text, by_param):
            c.skip_reason = msg
            return c
        c.suffix, c.ambiguous = "T1w", msg
    elif by_param:
        c.suffix = by_param
        c.how.append(f"{by_param} from sequence tags ({param_desc})"
                     + (" and series text" if by_text == by_param else ""))
    elif by_text:
        c.suffix = by_text
        c.how.append(f"{by_text} from series text (sequence tags inconclusive: {param_desc})")
    else:
        c.skip_reason = (f"sequence weighting not recognised from tags ({param_desc}) or series "
                         "text")
        return c
    _classify_contrast(tags, text, c, scrubber)
    return c


def _classify_contrast(tags: Mapping[str, Any], text: str, c: Classification,
                       scrubber: Scrubber | None) -> None:
    def q(value: str) -> str:
        return repr(scrubber.scrub(value) if scrubber else value)

    agent = " ".join(_as_strings(tags.get("ContrastBolusAgent"))).strip()
    ingredient = " ".join(_as_strings(tags.get("ContrastBolusIngredient"))).strip()
    by_text = contrast_from_text(text)
    tag_post = tag_pre = False
    if ingredient and ingredient.lower() not in _NULL_AGENT:
        tag_post = True
        c.how.append(f"ContrastBolusIngredient (0018,1048) = {q(ingredient)}")
        if "GADOLINIUM" in ingredient.upper():
            c.ingredient = "GADOLINIUM"
        else:
            c.ambiguous = (f"contrast ingredient {q(ingredient)} is not gadolinium; the pipeline "
                           "expects gadolinium enhancement")
    if "ContrastBolusAgent" in tags and tags.get("ContrastBolusAgent") is not None:
        if agent.lower() in _NULL_AGENT:
            if not tag_post:
                tag_pre = True
                c.how.append(f"ContrastBolusAgent (0018,0010) = {q(agent)} (no agent)")
        else:
            tag_post = True
            c.how.append(f"ContrastBolusAgent (0018,0010) = {q(agent)}")
            if c.ingredient is None and not ingredient:
                c.ingredient = "GADOLINIUM"
                if not any(n in agent.lower() for n in _GADOLINIUM_NAMES):
                    c.notes.append(f"agent name {q(agent)} not recognised; an MRI contrast agent "
                                   "is taken to be gadolinium-based")
    if tag_post:
        c.contrast = "post"
        if by_text == "pre":
            c.notes.append("series text says pre-contrast but the DICOM contrast tags say "
                           "post-contrast; the tags take precedence")
        return
    if tag_pre:
        c.contrast = "pre"
        if by_text == "post":
            c.notes.append("series text says post-contrast but ContrastBolusAgent says no agent; "
                           "the tag takes precedence")
        return
    if by_text in ("post", "pre"):
        c.contrast = by_text
        c.how.append(f"{by_text}-contrast from series text (no DICOM contrast tags)")
        if by_text == "post":
            c.ingredient = "GADOLINIUM"
            c.notes.append("no contrast tags; gadolinium assumed from the series text")
        return
    if by_text == "conflict":
        c.how.append("series text mentions both pre- and post-contrast")
    c.contrast = "unknown"


# ============================================================================================
# session-level decisions
# ============================================================================================
@dataclass
class SeriesResult:
    """Outcome of one series (everything in it is de-identified)."""

    label: str
    number: int | None
    description: str
    n_files: int
    status: str = "pending"       # imported / skipped / failed / ambiguous
    target: str | None = None     # BIDS file name (without extension)
    suffix: str | None = None
    contrast: str = "unknown"
    how: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"series": self.number, "description": self.description, "files": self.n_files,
                "status": self.status, "file": f"{self.target}.nii.gz" if self.target else None,
                "suffix": self.suffix, "contrast": self.contrast, "how": self.how,
                "messages": self.messages}


@dataclass
class SessionReport:
    participant: str
    session: str
    week: float | None
    series: list[SeriesResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # session- and file-level messages
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not any(s.status in ("failed", "ambiguous")
                                           for s in self.series)

    @property
    def name(self) -> str:
        return f"sub-{self.participant}_ses-{self.session}"

    def as_dict(self) -> dict:
        return {"participant_id": f"sub-{self.participant}", "session_id": f"ses-{self.session}",
                "week": self.week, "ok": self.ok, "problems": self.problems, "notes": self.notes,
                "series": [s.as_dict() for s in self.series],
                "GeneratedBy": {"Name": "lesionpipe import-dicom", "Version": __version__}}


def resolve_session(items: list[tuple[SeriesResult, Classification]], *,
                    post_series: int | None = None, pre_series: int | None = None,
                    prefix: str) -> None:
    """Decide the role and BIDS name of each classified series of one session, in place.

    ``items`` are in acquisition order. A T1w without contrast information that was acquired
    before a series whose tags say post-contrast is pre-contrast. Two candidates for the
    post-contrast (or pre-contrast) T1w are never guessed between: all are marked ambiguous unless
    ``post_series`` / ``pre_series`` names one by series number.
    """
    first_tagged_post = next((i for i, (r, c) in enumerate(items)
                              if c.suffix == "T1w" and c.contrast == "post" and not c.ambiguous
                              and any(h.startswith("Contrast") for h in c.how)), None)
    for i, (res, cls) in enumerate(items):
        res.suffix, res.contrast = cls.suffix, cls.contrast
        res.how = list(cls.how)
        res.messages.extend(cls.notes)
        if res.status != "pending":
            continue
        if cls.skip_reason:
            res.status = "skipped"
            res.messages.append(cls.skip_reason)
            continue
        if res.number is not None and res.number == post_series:
            res.contrast = "post"
            res.how.append("post-contrast by --post-series")
        elif res.number is not None and res.number == pre_series:
            res.contrast = "pre"
            res.how.append("pre-contrast by --pre-series")
        elif cls.ambiguous:
            res.status = "ambiguous"
            res.messages.append(cls.ambiguous)
            continue
        elif cls.suffix == "T1w" and res.contrast == "unknown":
            if first_tagged_post is not None and i < first_tagged_post:
                res.contrast = "pre"
                ref = items[first_tagged_post][0].label
                res.how.append(f"pre-contrast: no contrast tag or text, acquired before the "
                               f"tagged post-contrast {ref}")
            else:
                res.status = "ambiguous"
                res.messages.append(
                    "T1-weighted, but neither the DICOM contrast tags (0018,0010)/(0018,1048) nor "
                    "the series text say whether it is pre- or post-contrast; name it with "
                    "--post-series/--pre-series")
    for role, chosen, opt in (("post", post_series, "--post-series"),
                              ("pre", pre_series, "--pre-series")):
        cands = [r for r, c in items if r.status == "pending" and r.suffix == "T1w"
                 and r.contrast == role]
        if chosen is not None and not any(r.number == chosen for r in cands):
            for r in cands:
                r.status = "ambiguous"
                r.messages.append(f"{opt} {chosen} does not name a usable T1w series here")
            continue
        if chosen is not None:
            for r in cands:
                if r.number != chosen:
                    r.status = "skipped"
                    r.messages.append(f"another {role}-contrast T1w was chosen with {opt}")
            continue
        if len(cands) > 1:
            nums = ", ".join(str(r.number) for r in cands)
            for r in cands:
                r.status = "ambiguous"
                r.messages.append(f"{len(cands)} candidate {role}-contrast T1w series ({nums}); "
                                  f"none imported as {role}-contrast, choose one with {opt}")
    # names
    planned: dict[str, list[SeriesResult]] = defaultdict(list)
    for res, _ in items:
        if res.status != "pending":
            continue
        ce = POST_ENTITY if res.contrast == "post" else ""
        planned[f"{prefix}{ce}|{res.suffix}"].append(res)
    for base, group in planned.items():
        stem, suffix = base.split("|")
        for k, res in enumerate(group, start=1):
            run = f"_run-{k}" if len(group) > 1 else ""
            res.target = f"{stem}{run}_{suffix}"


# ============================================================================================
# conversion and de-identification
# ============================================================================================
def find_dcm2niix(explicit: str | Path | None = None) -> Path:
    """The dcm2niix executable: ``explicit``, else next to the Python executable (the PyPI
    ``dcm2niix`` package installs it in the environment's bin folder), else on PATH."""
    if explicit:
        p = Path(explicit)
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise DicomImportError(f"dcm2niix executable {p} not found or not executable")
    names = ("dcm2niix.exe", "dcm2niix") if os.name == "nt" else ("dcm2niix",)
    for name in names:
        cand = Path(sys.executable).parent / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("dcm2niix")
    if found:
        return Path(found)
    raise DicomImportError("dcm2niix not found next to the Python executable or on PATH; install "
                           "it with `pip install dcm2niix` (it is a lesionpipe dependency)")


def convert_series(files: Sequence[Path], work: Path, *, dcm2niix: Path,
                   scrubber: Scrubber | None = None) -> tuple[list[Path], str]:
    """Convert the given DICOM files (one series) with dcm2niix inside ``work``.

    The files are linked (or copied) into ``work/in`` so dcm2niix sees only this series and never
    writes near the source. Returns the NIfTI files written to ``work/out`` and dcm2niix's output
    (with identifying values removed).
    """
    src, out = work / "in", work / "out"
    src.mkdir(parents=True)
    out.mkdir()
    for k, f in enumerate(files):
        link = src / f"im{k:05d}.dcm"
        try:
            link.symlink_to(Path(f).resolve())
        except OSError:
            shutil.copyfile(f, link)
    env = dict(os.environ, HOME=str(work))  # no user defaults file (~/.dcm2nii.ini) is read
    cmd = [str(dcm2niix), "-b", "y", "-ba", "y", "-c", "", "-z", "n", "-f", "series", "-d", "0",
           "-i", "n", "-x", "n", "-v", "0", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                          timeout=600, check=False)
    text = (proc.stdout + proc.stderr).replace(str(work), "<tmp>")
    if scrubber is not None:
        text = scrubber.scrub(text)
    niftis = sorted(out.glob("*.nii"))
    if proc.returncode != 0 and not niftis:
        last = " | ".join(line.strip() for line in text.splitlines()[-3:] if line.strip())
        raise RuntimeError(f"dcm2niix failed (exit {proc.returncode}): {last}")
    return niftis, text


def deidentified_nifti_bytes(path: str | Path) -> bytes:
    """Gzipped NIfTI-1 bytes of ``path`` with descrip, aux_file, intent_name, db_name, data_type
    cleared and all header extensions removed; the gzip header carries no name and no time."""
    import nibabel as nb

    img = nb.load(str(path))
    hdr = img.header.copy()
    for key in ("descrip", "aux_file", "intent_name", "db_name", "data_type"):
        hdr[key] = b""
    hdr.extensions.clear()
    hdr["glmax"] = 0
    hdr["glmin"] = 0
    hdr["session_error"] = 0
    hdr["extents"] = 0
    # nibabel moves the scaling into the proxy on load; write the stored integers with the same
    # slope/intercept so the voxel values are unchanged
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    unscaled = np.asanyarray(img.dataobj.get_unscaled())
    out = nb.Nifti1Image(unscaled, None, hdr)
    out.header.set_slope_inter(slope, inter)
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    if qform is not None:
        out.set_qform(qform, int(qcode))
    if sform is not None:
        out.set_sform(sform, int(scode))
    raw = out.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=4) as gz:
        gz.write(raw)
    return buf.getvalue()


def clean_sidecar(raw: Mapping[str, Any], *, scrubber: Scrubber,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whitelisted copy of a dcm2niix sidecar; free text holding an identifier is dropped.

    >>> s = Scrubber(); s.add_person('DOE^JANE')
    >>> clean_sidecar({'EchoTime': 0.003, 'InstitutionName': 'X', 'AcquisitionTime': '10:00:00',
    ...     'SeriesDescription': 'T1 Doe'}, scrubber=s)
    {'EchoTime': 0.003}
    """
    out: dict[str, Any] = {}
    merged = dict(raw)
    merged.update(extra or {})
    keep = list(SIDECAR_KEEP) + [k for k in (extra or {}) if k not in SIDECAR_KEEP]
    for key in keep:
        if key not in merged:
            continue
        value = merged[key]
        if _has_identifier(value, scrubber):
            continue
        out[key] = value
    return out


def _has_identifier(value: Any, scrubber: Scrubber) -> bool:
    if isinstance(value, str):
        return scrubber.contains(value)
    if isinstance(value, (list, tuple)):
        return any(_has_identifier(v, scrubber) for v in value)
    if isinstance(value, dict):
        return any(_has_identifier(v, scrubber) for v in value.values())
    return False


# ============================================================================================
# BIDS bookkeeping
# ============================================================================================
_LABEL_RX = re.compile(r"^[A-Za-z0-9]+$")


def bids_label(label: str, prefix: str) -> str:
    """``'sub-01'`` or ``'01'`` -> ``'01'``; raises ValueError for a label BIDS does not allow.

    >>> bids_label('sub-01', 'sub'), bids_label('w04', 'ses')
    ('01', 'w04')
    >>> bids_label('01_a', 'sub')
    Traceback (most recent call last):
    ...
    ValueError: sub label '01_a' must be letters and digits only
    """
    label = str(label).strip()
    if label.startswith(f"{prefix}-"):
        label = label[len(prefix) + 1:]
    if not _LABEL_RX.match(label):
        raise ValueError(f"{prefix} label {label!r} must be letters and digits only")
    return label


def format_week(week: float | None) -> str:
    """Week as written to sessions.tsv.

    >>> format_week(4.0), format_week(2.5), format_week(None)
    ('4', '2.5', 'n/a')
    """
    return "n/a" if week is None else f"{week:g}"


def merge_sessions_tsv(path: Path, session: str, week: float | None, *,
                       overwrite: bool) -> str | None:
    """Add or update ``ses-<session>`` in a ``sub-<s>_sessions.tsv``; never drop a row or column.

    Returns an error message instead of writing when an existing different week would be replaced
    without ``overwrite``.
    """
    rows: list[dict[str, str]] = []
    columns = ["session_id", "week"]
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            columns = list(reader.fieldnames or columns)
            rows = [dict(r) for r in reader]
        for c in ("session_id", "week"):
            if c not in columns:
                columns.append(c)
    sid = f"ses-{session}"
    row = next((r for r in rows if (r.get("session_id") or "").strip() in (sid, session)), None)
    if row is None:
        rows.append({c: "n/a" for c in columns} | {"session_id": sid, "week": format_week(week)})
    elif week is not None:
        old = (row.get("week") or "").strip()
        try:
            same = old not in ("", "n/a") and float(old) == float(week)
        except ValueError:
            same = False
        if not same:
            if old not in ("", "n/a") and not overwrite:
                return (f"{path.name} already gives week {old} for {sid}, not "
                        f"{format_week(week)}; pass --overwrite to change it")
            row["week"] = format_week(week)
    else:
        return None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", lineterminator="\n",
                            restval="n/a", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return None


def check_week_conflict(path: Path, session: str, week: float | None,
                        overwrite: bool) -> str | None:
    """The message :func:`merge_sessions_tsv` would return, without writing."""
    if week is None or overwrite or not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            if (r.get("session_id") or "").strip() in (f"ses-{session}", session):
                old = (r.get("week") or "").strip()
                try:
                    if old in ("", "n/a") or float(old) == float(week):
                        return None
                except ValueError:
                    pass
                return (f"{path.name} already gives week {old} for ses-{session}, not "
                        f"{format_week(week)}; pass --overwrite to change it")
    return None


def ensure_dataset(bids_dir: Path, dcm2niix_version: str | None) -> None:
    """Write ``dataset_description.json`` and ``.bidsignore`` (for the logs) when missing."""
    desc = bids_dir / "dataset_description.json"
    if not desc.exists():
        generated = [{"Name": "lesionpipe", "Version": __version__,
                      "Description": "import-dicom: DICOM to de-identified BIDS"}]
        if dcm2niix_version:
            generated.append({"Name": "dcm2niix", "Version": dcm2niix_version})
        atomic_write_json(desc, {"Name": "lesionpipe DICOM import", "BIDSVersion": "1.9.0",
                                 "DatasetType": "raw", "GeneratedBy": generated})
    ignore = bids_dir / ".bidsignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
    if "logs/" not in lines:
        atomic_write_text(ignore, "\n".join(lines + ["logs/"]) + "\n")


# ============================================================================================
# one session
# ============================================================================================
def _describe(series: Series, scrubber: Scrubber) -> str:
    desc = " ".join(_as_strings(series.tags.get("SeriesDescription"))).strip()
    return scrubber.scrub(desc)


def import_session(dicom_dir: str | Path, bids_dir: str | Path, *, participant: str,
                   session: str, week: float | None = None, overwrite: bool = False,
                   post_series: int | None = None, pre_series: int | None = None,
                   dcm2niix: Path | None = None) -> SessionReport:
    """Convert one session's DICOM folder into ``bids_dir``; return a de-identified report.

    Every series is handled on its own: a damaged or ambiguous series is reported and the others
    still convert. ``dicom_dir`` is only read.
    """
    dicom_dir, bids_dir = Path(dicom_dir), Path(bids_dir)
    report = SessionReport(participant=participant, session=session, week=week)
    prefix = f"sub-{participant}_ses-{session}"
    sub_dir = bids_dir / f"sub-{participant}"
    anat = sub_dir / f"ses-{session}" / "anat"
    sessions_tsv = sub_dir / f"sub-{participant}_sessions.tsv"

    scan = scan_folder(dicom_dir)
    scrub = scan.scrubber
    for p in scan.problems:
        msg = f"{scrub.scrub(p.path)}: {p.problem}"
        (report.problems if p.fatal else report.notes).append(msg)
    if p_fatal := [p for p in scan.problems if p.fatal]:
        report.failed = True
        LOG.warning("%s: %d unreadable DICOM file(s)", prefix, len(p_fatal))
    if not scan.series:
        report.failed = True
        what = "is empty" if scan.n_files == 0 else (
            f"holds {scan.n_files} file(s) but no readable DICOM image")
        report.problems.append(f"DICOM folder {what}")
        _finish(report, bids_dir)
        return report
    patients = {s.patient_key for s in scan.series}
    if len(patients) > 1:
        report.failed = True
        report.problems.append(f"the DICOM folder holds images of {len(patients)} different "
                               "patients (patient name/ID/birth date differ); nothing imported. "
                               "Give each patient's session its own folder")
        _finish(report, bids_dir)
        return report
    if len({s.study_uid for s in scan.series}) > 1:
        report.notes.append(f"series come from {len({s.study_uid for s in scan.series})} "
                            "different studies (examinations) of the same patient")
    conflict = check_week_conflict(sessions_tsv, session, week, overwrite)
    if conflict:
        report.failed = True
        report.problems.append(conflict)
        _finish(report, bids_dir)
        return report

    folders = defaultdict(set)
    for s in scan.series:
        for f in s.folders:
            folders[f].add(s.key)
    for f, keys in sorted(folders.items()):
        if len(keys) > 1:
            report.notes.append(f"folder '{scrub.scrub(f)}' mixes {len(keys)} series; each is "
                                "converted on its own")

    items: list[tuple[SeriesResult, Classification]] = []
    by_result: dict[int, Series] = {}
    for s in scan.series:
        res = SeriesResult(label=s.label, number=s.number, description=_describe(s, scrub),
                           n_files=len(s.images))
        cls = classify_series(s.tags, scrubber=scrub)
        problems = check_series(s, scrub) if not cls.skip_reason else []
        if problems:
            res.status = "failed"
            res.messages.extend(problems)
        items.append((res, cls))
        by_result[id(res)] = s
    resolve_session(items, post_series=post_series, pre_series=pre_series, prefix=prefix)

    todo = [(r, c) for r, c in items if r.status == "pending"]
    for res, _ in todo:
        if not overwrite and any((anat / f"{res.target}{ext}").exists()
                                 for ext in (".nii.gz", ".nii", ".json")):
            res.status = "failed"
            res.messages.append(f"{res.target}.nii.gz already exists; pass --overwrite to "
                                "replace it")
    todo = [(r, c) for r, c in items if r.status == "pending"]
    exe = None
    if todo:
        try:
            exe = dcm2niix or find_dcm2niix()
        except DicomImportError as exc:
            for res, _ in todo:
                res.status = "failed"
                res.messages.append(str(exc))
            todo = []
    dcm_version = None
    with tempfile.TemporaryDirectory(prefix="lesionpipe-dicom-") as tmp:
        for k, (res, cls) in enumerate(todo):
            series = by_result[id(res)]
            try:
                version = _convert_one(series, res, cls, Path(tmp) / f"s{k}", anat, exe, scrub)
                dcm_version = dcm_version or version
                res.status = "imported"
            except SeriesNotUsable as exc:
                res.status = "failed" if res.suffix == "T1w" else "skipped"
                res.messages.append(str(exc))
            except Exception as exc:  # one series failing must not stop the others
                res.status = "failed"
                # our own RuntimeErrors carry no identifiers (dcm2niix output is scrubbed);
                # anything else is reported by type only
                res.messages.append(str(exc) if type(exc) is RuntimeError
                                    else f"conversion error ({type(exc).__name__})")
    imported = [r for r, _ in items if r.status == "imported"]
    if imported:
        ensure_dataset(bids_dir, dcm_version)
        err = merge_sessions_tsv(sessions_tsv, session, week, overwrite=overwrite)
        if err:
            report.failed = True
            report.problems.append(err)
    if not any(r.status == "imported" and r.suffix == "T1w" and r.contrast == "post"
               for r, _ in items) and not (anat.exists() and list(anat.glob(
                   f"{prefix}{POST_ENTITY}*_T1w.nii*"))):
        report.failed = True
        report.problems.append("no post-contrast T1w imported for this session; the pipeline "
                               "will not process it")
    report.series = [r for r, _ in items]
    _finish(report, bids_dir)
    return report


def _convert_one(series: Series, res: SeriesResult, cls: Classification, work: Path, anat: Path,
                 exe: Path, scrub: Scrubber) -> str | None:
    files = [im.path for im in series.images]
    niftis, text = convert_series(files, work, dcm2niix=exe, scrubber=scrub)
    LOG.debug("%s: dcm2niix said: %s", res.label, " | ".join(text.split("\n")))
    if not niftis:
        raise RuntimeError("dcm2niix wrote no image for this series")
    if len(niftis) > 1:
        raise SeriesNotUsable(f"dcm2niix split this series into {len(niftis)} volumes (several "
                              "echoes, phases or orientations); cannot tell which one to keep")
    import nibabel as nb

    img = nb.load(str(niftis[0]))
    shape = img.shape
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise SeriesNotUsable(f"converted image is {len(shape)}-D {tuple(shape)}; expected one 3-D "
                           "volume")
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise RuntimeError(f"converted image has shape {tuple(shape)}; expected a 3-D volume")
    sidecar_path = niftis[0].with_suffix(".json")
    raw = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.exists() else {}
    extra: dict[str, Any] = {}
    if res.contrast == "post":
        extra["ContrastBolusIngredient"] = cls.ingredient or "GADOLINIUM"
        agent = " ".join(_as_strings(series.tags.get("ContrastBolusAgent"))).strip()
        if agent and agent.lower() not in _NULL_AGENT:
            extra["ContrastBolusAgent"] = agent
    extra["DeidentificationMethod"] = ("lesionpipe import-dicom: dcm2niix -ba y; sidecar keys "
                                       "whitelisted; NIfTI text fields and extensions cleared")
    extra["ImportClassification"] = {"Suffix": res.suffix, "Contrast": res.contrast,
                                     "How": res.how}
    sidecar = clean_sidecar(raw, scrubber=scrub, extra=extra)
    data = deidentified_nifti_bytes(niftis[0])
    anat.mkdir(parents=True, exist_ok=True)
    for stale in (anat / f"{res.target}.nii",):
        if stale.exists():
            stale.unlink()
    atomic_write_bytes(anat / f"{res.target}.nii.gz", data)
    atomic_write_json(anat / f"{res.target}.json", sidecar)
    LOG.info("%s: %s -> %s.nii.gz (%s)", res.label, res.description or "-", res.target,
             "; ".join(res.how))
    return raw.get("ConversionSoftwareVersion")


def _finish(report: SessionReport, bids_dir: Path) -> None:
    """Write the de-identified import log (only into an existing or newly made BIDS folder)."""
    try:
        atomic_write_json(bids_dir / LOG_DIR / f"{report.name}_import.json", report.as_dict())
    except OSError as exc:
        LOG.warning("cannot write the import log (%s)", type(exc).__name__)


def format_report(report: SessionReport) -> str:
    """Human-readable summary of one session (no identifying values)."""
    counts = Counter(s.status for s in report.series)
    head = (f"{report.name} (week {format_week(report.week)}): "
            + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("imported", "skipped", "ambiguous",
                                                             "failed")))
    lines = [head]
    for s in report.series:
        what = (f"-> {s.target}.nii.gz" if s.status == "imported" else s.status.upper())
        desc = f" '{s.description}'" if s.description else ""
        lines.append(f"  {s.label}{desc} ({s.n_files} files): {what}")
        for h in s.how:
            lines.append(f"      how: {h}")
        for m in s.messages:
            lines.append(f"      {m}")
    for p in report.problems:
        lines.append(f"  PROBLEM: {p}")
    for n in report.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


# ============================================================================================
# batch
# ============================================================================================
@dataclass(frozen=True)
class ImportJob:
    dicom_dir: Path
    participant: str
    session: str
    week: float | None = None
    post_series: int | None = None
    pre_series: int | None = None


def read_batch(tsv: str | Path) -> list[ImportJob]:
    """Jobs from a TSV with columns ``dicom_dir``, ``participant_id``, ``session_id`` and optional
    ``week``, ``post_series``, ``pre_series``. Relative folders are relative to the TSV.

    Raises ValueError naming every bad line.
    """
    tsv = Path(tsv)
    try:
        with open(tsv, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            cols = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{tsv.name}: cannot be read ({type(exc).__name__})") from None
    missing = [c for c in ("dicom_dir", "participant_id", "session_id") if c not in cols]
    if missing:
        raise ValueError(f"{tsv.name}: missing column(s) {', '.join(missing)} "
                         "(need dicom_dir, participant_id, session_id; optional week, "
                         "post_series, pre_series)")
    jobs, errors = [], []
    for line, row in enumerate(rows, start=2):
        try:
            folder = (row.get("dicom_dir") or "").strip()
            if not folder:
                raise ValueError("dicom_dir is empty")
            path = Path(folder)
            if not path.is_absolute():
                path = tsv.resolve().parent / path
            jobs.append(ImportJob(
                dicom_dir=path, participant=bids_label(row.get("participant_id") or "", "sub"),
                session=bids_label(row.get("session_id") or "", "ses"),
                week=_opt_number(row.get("week"), "week", float),
                post_series=_opt_number(row.get("post_series"), "post_series", int),
                pre_series=_opt_number(row.get("pre_series"), "pre_series", int)))
        except ValueError as exc:
            errors.append(f"line {line}: {exc}")
    if errors:
        raise ValueError(f"{tsv.name}: " + "; ".join(errors))
    if not jobs:
        raise ValueError(f"{tsv.name}: no rows")
    seen = Counter((j.participant, j.session) for j in jobs)
    dup = [f"sub-{p}/ses-{s}" for (p, s), n in seen.items() if n > 1]
    if dup:
        raise ValueError(f"{tsv.name}: session(s) listed twice: {', '.join(dup)}")
    return jobs


def _opt_number(raw: str | None, name: str, kind):
    raw = (raw or "").strip()
    if raw in ("", "n/a", "NA"):
        return None
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise ValueError(f"{name} {raw!r} is not a number") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} {raw!r} is not a finite number")
    return value


def import_many(jobs: Iterable[ImportJob], bids_dir: str | Path, *, overwrite: bool = False,
                dcm2niix: Path | None = None) -> list[SessionReport]:
    """Run :func:`import_session` for each job; one bad session never stops the others."""
    reports = []
    for job in jobs:
        reports.append(import_session(job.dicom_dir, bids_dir, participant=job.participant,
                                      session=job.session, week=job.week, overwrite=overwrite,
                                      post_series=job.post_series, pre_series=job.pre_series,
                                      dcm2niix=dcm2niix))
    return reports
