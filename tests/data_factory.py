"""Generators of DICOM test data: Part-10 files written under random names.

Every generator writes into a folder the caller owns (normally ``tmp_path``) and
returns the paths it wrote. File names are random hex strings, like the file
store's keys, so nothing can depend on them.

Keyword overrides set any DICOM attribute by keyword; ``None`` removes it::

    make_ct_series(tmp_path, 3, PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100")
    make_ct_series(tmp_path, 2, StudyID=None, StudyDate=None)   # lacking Type 2 values
    make_pdf(tmp_path, like=ct[0])                               # same patient and study

Only pydicom is needed (no numpy); pixel data is a small synthetic ramp.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import DATA_ROOT, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: Attributes of the Patient and General Study modules, copied by ``like=``.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def minimal_pdf(text: str = "iepnode test report") -> bytes:
    """Return a one-page PDF showing ``text`` (ASCII), with a correct xref table."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode("ascii")
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]/Contents 4 0 R"
        b"/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length %d>>stream\n%s\nendstream" % (len(stream), stream),
        b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def random_name() -> str:
    """Return a random file name (32 lower-case hex digits), like a store key."""
    return uuid.uuid4().hex


def apply_overrides(ds: Dataset, overrides: Mapping[str, Any]) -> Dataset:
    """Set attributes by keyword on ``ds``; a ``None`` value deletes the attribute."""
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def save(
    ds: Dataset,
    directory: Path,
    *,
    name: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write ``ds`` as a Part-10 file in ``directory`` (random name unless given)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    path = directory / (name or random_name())
    ds.save_as(path, enforce_file_format=True)
    return path


def _patient_study(like: Path | Dataset | None) -> dict[str, Any]:
    """Default Patient/Study attributes, or those of an existing instance."""
    if like is not None:
        src = like if isinstance(like, Dataset) else dcmread(like, stop_before_pixels=True)
        return {kw: src[kw].value for kw in PATIENT_STUDY_KEYWORDS if kw in src}
    return {
        "PatientName": "Test^Patient",
        "PatientID": "IEP-TEST-0001",
        "PatientBirthDate": "19700101",
        "PatientSex": "O",
        "StudyInstanceUID": generate_uid(),
        "StudyDate": "20240102",
        "StudyTime": "093000",
        "StudyID": "1",
        "AccessionNumber": "ACC0001",
        "ReferringPhysicianName": "Referrer^Rita",
        "StudyDescription": "Synthetic study",
    }


def _instance(sop_class: str, like: Path | Dataset | dict[str, Any] | None) -> Dataset:
    ds = Dataset()
    common = like if isinstance(like, dict) else _patient_study(like)
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = "20240102"
    ds.InstanceCreationTime = "093500"
    ds.Manufacturer = "iepnode tests"
    return ds


def make_ct_series(
    directory: Path,
    n: int = 3,
    *,
    rows: int = 16,
    columns: int = 16,
    like: Path | Dataset | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> list[Path]:
    """Write a CT series of ``n`` axial slices (16-bit, uncompressed).

    Parameters
    ----------
    directory : Path
        Folder to write into (created if missing).
    n : int
        Number of slices; InstanceNumber 1..n, 2.5 mm apart.
    rows, columns : int
        Image size.
    like : Path or Dataset, optional
        Take Patient and Study attributes from this instance (same patient/study).
    transfer_syntax : str
        Only uncompressed syntaxes (pixel data is written native).
    **overrides
        Attributes set on every slice (``None`` removes one), applied last.

    Returns
    -------
    list of Path
        The slice files, in InstanceNumber order.
    """
    series_uid, frame_uid = generate_uid(), generate_uid()
    common = _patient_study(like)
    ramp = b"".join((i % 4096).to_bytes(2, "little") for i in range(rows * columns))
    paths = []
    for i in range(n):
        ds = _instance(CTImageStorage, common)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = ds.get("StudyDate") or "20240102"
        ds.SeriesTime = "093100"
        ds.SeriesDescription = "Axial"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = ds.SeriesDate
        ds.ContentTime = "093200"
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = "093200"
        ds.KVP = 120
        ds.SliceThickness = 2.5
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = 2.5 * i
        ds.PixelSpacing = [0.5, 0.5]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = ramp
        apply_overrides(ds, overrides)
        paths.append(save(ds, directory, transfer_syntax=transfer_syntax))
    return paths


def make_pdf(
    directory: Path,
    *,
    pdf: bytes | None = None,
    like: Path | Dataset | None = None,
    **overrides: Any,
) -> Path:
    """Write an Encapsulated PDF instance (its own series, Modality DOC).

    Parameters
    ----------
    directory : Path
        Folder to write into.
    pdf : bytes, optional
        The document (default :func:`minimal_pdf`); padded to even length.
    like : Path or Dataset, optional
        Take Patient and Study attributes from this instance.
    **overrides
        Attributes to set (``None`` removes one), applied last.
    """
    pdf = minimal_pdf() if pdf is None else pdf
    ds = _instance(EncapsulatedPDFStorage, like)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.ContentDate = "20240102"
    ds.ContentTime = "094000"
    ds.AcquisitionDateTime = "20240102094000"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Report"
    ds.ConceptNameCodeSequence = Sequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    apply_overrides(ds, overrides)
    return save(ds, directory)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_sr(
    directory: Path,
    *,
    text: str = "No acute findings.",
    like: Path | Dataset | None = None,
    **overrides: Any,
) -> Path:
    """Write a Basic Text SR report: a title, a language concept modifier and one text.

    Parameters
    ----------
    directory : Path
        Folder to write into.
    text : str
        The finding (a TEXT content item).
    like : Path or Dataset, optional
        Take Patient and Study attributes from this instance.
    **overrides
        Attributes to set (``None`` removes one), applied last.
    """
    ds = _instance(BasicTextSRStorage, like)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 901
    ds.InstanceNumber = 1
    ds.ContentDate = "20240102"
    ds.ContentTime = "095000"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])

    language = Dataset()
    language.RelationshipType = "HAS CONCEPT MOD"
    language.ValueType = "CODE"
    language.ConceptNameCodeSequence = Sequence(
        [_code("121049", "DCM", "Language of Content Item and Descendants")]
    )
    language.ConceptCodeSequence = Sequence([_code("en", "RFC5646", "English")])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = text
    ds.ContentSequence = Sequence([language, finding])
    apply_overrides(ds, overrides)
    return save(ds, directory)


def bundled(name: str) -> Path:
    """Path of a file shipped inside pydicom: ``test_files/`` or ``charset_files/``.

    Never downloads (pydicom's pattern helpers may try to, which hangs offline).
    """
    charset = Path(DATA_ROOT) / "charset_files" / name
    if charset.is_file():
        return charset
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(f"{name} is not bundled with pydicom")
    return Path(found)


def copy_bundled(name: str, directory: Path, **overrides: Any) -> Path:
    """Copy a file bundled with pydicom (see :func:`bundled`) under a random name.

    Without overrides the copy is byte-identical; with overrides the file is read,
    changed and written again in its own transfer syntax.
    """
    source = bundled(name)
    if not overrides:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / random_name()
        shutil.copyfile(source, target)
        return target
    return rewrite(source, directory, **overrides)


def rewrite(path: Path, directory: Path, **overrides: Any) -> Path:
    """Write a changed copy of ``path`` (same transfer syntax) under a random name.

    The SOP Instance UID is kept unless overridden: the copy stands for the same
    instance as it might arrive from a different sender.
    """
    ds = dcmread(path)
    apply_overrides(ds, overrides)
    return save(ds, directory, transfer_syntax=ds.file_meta.TransferSyntaxUID)


def read_header(path: Path) -> Dataset:
    """Read a file's header only (no pixel data)."""
    return dcmread(path, stop_before_pixels=True)
