"""What every attachment wrapped as DICOM is made of, whatever the file was.

The patient and study it belongs to (:class:`PatientInfo`, :class:`StudyInfo`), what the
file is from its signature (:func:`sniff`), the Patient and General Study attributes
(checked, not trusted), the series number and manufacturer of attachment series, and
the private block keeping the uploaded file's original name (:func:`original_name_of`).
A file that cannot be wrapped is :class:`AttachmentRefused`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import PurePath

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from iepnode.errors import InvalidRequest

#: Media types the node wraps, by the kind :func:`sniff` returns.
MEDIA_TYPES = {"pdf": "application/pdf", "jpeg": "image/jpeg", "png": "image/png"}

#: Series number given to attachment series (an existing study's series keep theirs).
ATTACHMENT_SERIES_NUMBER = 9001
MANUFACTURER = "iepnode"
#: Private block holding the uploaded file's original name (not a standard attribute).
PRIVATE_CREATOR = "IEPNODE 1.0"
PRIVATE_GROUP = 0x0009
_ORIGINAL_NAME = 0x01

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_SEX = {"M", "F", "O"}


class AttachmentRefused(InvalidRequest):
    """The file cannot be wrapped: wrong type, too large, damaged. The message says
    which, in words fit for the person who uploaded it."""


@dataclass(frozen=True)
class PatientInfo:
    """The patient an attachment belongs to, as in the study's images.

    Attributes
    ----------
    name : str
        DICOM PN value, e.g. ``Doe^Jane``.
    patient_id : str
        Patient ID.
    issuer : str
        Issuer of Patient ID (may be empty).
    birth_date : str
        DA value ``YYYYMMDD`` (anything else is left empty).
    sex : str
        ``M``, ``F``, ``O`` (anything else is left empty).
    """

    name: str
    patient_id: str
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class StudyInfo:
    """An existing study the attachment joins (as a new series).

    Attributes
    ----------
    study_uid : str
        Study Instance UID.
    study_date, study_time : str
        DA / TM values (malformed values are left empty).
    accession : str
        Accession Number.
    study_id : str
        Study ID.
    description : str
        Study Description.
    referring_physician : str
        Referring Physician's Name (PN).
    """

    study_uid: str
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    study_id: str = ""
    description: str = ""
    referring_physician: str = ""


def sniff(data: bytes) -> str | None:
    """Return what the bytes are, from their signature: ``pdf``, ``jpeg``, ``png`` or ``None``.

    Parameters
    ----------
    data : bytes
        The file's content (only the first bytes are looked at).
    """
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def original_name_of(ds: Dataset) -> str:
    """Return the original file name kept in the private block ('' when absent)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return str(block[_ORIGINAL_NAME].value)
    except KeyError:
        return ""


# --- helpers ---------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _lo(text: str) -> str:
    """A LO value: at most 64 characters, no backslash or control characters."""
    clean = "".join(c for c in text if c.isprintable() and c != "\\").strip()
    return clean[:64]


def _title_from(original_name: str) -> str:
    stem = PurePath(original_name.replace("\\", "/")).stem if original_name else ""
    return _lo(stem) or "Attached document"


def _file_meta(sop_class: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_and_study(ds: Dataset, patient: PatientInfo, study: StudyInfo | None, title: str,
                       now: dt.datetime) -> None:
    """Patient and General Study modules, from the given values (checked, not trusted)."""
    ds.PatientName = _pn(patient.name)
    ds.PatientID = _lo(patient.patient_id)
    if patient.issuer.strip():
        ds.IssuerOfPatientID = _lo(patient.issuer)
    ds.PatientBirthDate = patient.birth_date if _DATE.match(patient.birth_date or "") else ""
    ds.PatientSex = patient.sex if patient.sex in _SEX else ""
    if study is None:
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.StudyID = now.strftime("%y%m%d%H%M%S")  # DICOMDIR readers want one
        ds.StudyDescription = _lo(title)
        ds.ReferringPhysicianName = ""
        return
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date if _DATE.match(study.study_date or "") else ""
    ds.StudyTime = study.study_time if _TIME.match(study.study_time or "") else ""
    ds.AccessionNumber = _lo(study.accession)[:16]
    ds.StudyID = _lo(study.study_id)[:16]
    if study.description.strip():
        ds.StudyDescription = _lo(study.description)
    ds.ReferringPhysicianName = _pn(study.referring_physician)


def _pn(value: str) -> str:
    """A PN value: printable, no backslash, each component group at most 64 characters."""
    clean = "".join(c for c in (value or "") if c.isprintable() and c != "\\").strip()
    return "=".join(group[:64] for group in clean.split("=")[:3])


def _original_name(ds: Dataset, original_name: str) -> None:
    name = "".join(c for c in original_name if c.isprintable()).strip()[:1024]
    if name:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(_ORIGINAL_NAME, "LT", name)
