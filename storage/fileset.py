"""Per-study DICOM file-sets: a DICOMDIR plus its member files (PS3.10, PS3.3 Annex F).

:func:`write_fileset` turns Part-10 files kept in the file store under random names
into a General Purpose file-set that any DICOM viewer or CD/USB burner accepts::

    dest/DICOMDIR
    dest/PT000000/ST000000/SE000000/IM000000
    dest/PT000000/ST000000/SE000001/SR000000 ...

File IDs are generated, never taken from DICOM values: patient, study and series
folders and a file named by record type (``IM`` image, ``SR`` report, ``ED``
encapsulated document...) plus its 0-based position among its siblings; at most 8
characters from ``A-Z 0-9 _``, at most 4 levels. This is the layout pydicom's
``FileSet`` writes, so pydicom can load and modify the set without moving files. Member
files are hard links to the stored files (a copy when linking is impossible), so
they are byte-identical to what was received and cost no space. The file store
never rewrites a file in place (it writes a new file and renames it), so sharing
inodes with it is safe.

:func:`plan_fileset` works the same set out without writing anything: the DICOMDIR
as bytes and each member's File ID, optionally below a root folder (``DICOM/...``)
and with a DICOMDIR SOP Instance UID given by the caller, so the same members give
the same bytes (the download package streams it from memory).

One bad member does not break a set: each member's header is read once through
:func:`storage.stored_file.read_instance_header`, and a member that cannot be used
(missing, unreadable, empty, not DICOM, cut short, lacking its SOP/Study/Series
UIDs, a DICOMDIR) is left out of the DICOMDIR and the folder and listed in
:attr:`FilesetPlan.left_out` with the reason; the caller logs and audits it. Only
when no member at all can be used is the build refused (:class:`NoUsableMember`).

The set is built in a hidden sibling staging folder, flushed, then swapped into
``dest`` in one step (``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, two
renames otherwise), so readers see the old set or the new one, never half of one.
On failure the staging folder is removed and ``dest`` is left as it was.

Why the DICOMDIR is not written by ``pydicom.fileset.FileSet``
    ``FileSet.add_custom`` re-encodes each instance into a temporary folder and
    ``FileSet.write`` copies it into place: members would not be byte-identical
    and could not be links, and adding is quadratic (30 s for 2,000 instances).
    The records are therefore built here and encoded with pydicom's writer; the
    result is read back by ``FileSet`` in the tests.

Missing Type 1 record keys
    Real studies often lack values that PS3.3 Annex F requires in the directory
    records (Type 1), though the files are valid (they are Type 2 or optional in the
    IODs). PS3.3 F.5 lets a record carry a key whose value the file lacks, so
    :func:`write_fileset` fills them, only in the DICOMDIR, never in the files:

    - A value present in any other instance of the same patient, study or series
      (same character set) is used first.
    - PatientID: ``NOID0001``, ``NOID0002``... one per distinct (name, birth date).
    - StudyDate/StudyTime: the earliest Series, else Acquisition, else Content,
      else Instance Creation date of the study (with its time); otherwise
      ``19000101``/``000000``, an obvious placeholder.
    - StudyID: the Accession Number, else ``IEP0001``, ``IEP0002``...
    - SeriesNumber/InstanceNumber: the lowest positive numbers not already used in
      the study/series, in the order the files were given.
    - Modality ``OT``; SR CompletionFlag ``PARTIAL``, VerificationFlag ``UNVERIFIED``;
      ContentDate/Time (and Presentation/Instance Creation Date/Time) from the
      instance's other dates, else the study's; ContentLabel ``UNLABELED``; the MIME
      type of an encapsulated document from its SOP Class.

    Keys that have no neutral value (e.g. an SR's Concept Name, an RT Dose's Dose
    Summation Type) are left out and logged: the source object is itself invalid.

Each record carries the Specific Character Set of the file its values come from.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import glob
import io
import itertools
import logging
import os
import re
import secrets
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.uid as uids
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from storage.stored_file import UnreadableFile, read_instance_header

__all__ = [
    "FilesetError",
    "FilesetPlan",
    "LeftOut",
    "NoUsableMember",
    "PlannedFile",
    "fileset_file_ids",
    "leaf_record_type",
    "plan_fileset",
    "write_fileset",
]

logger = logging.getLogger(__name__)

#: File-set ID (0004,1130): CS, 1-16 characters (PS3.10 8.5 characters, no space).
_FILESET_ID = re.compile(r"^[A-Z0-9_]{1,16}$")
#: One File ID component (PS3.10 8.2, PS3.12 Annex V: 1-8 of A-Z 0-9 _).
_COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")
#: File ID components at most (PS3.10 8.2).
_MAX_DEPTH = 8
#: Encoded (tag, VR) headers the DICOMDIR encoder relies on (Explicit VR Little Endian).
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_NEXT_HEADER = b"\x04\x00\x00\x14UL"
_LOWER_HEADER = b"\x04\x00\x20\x14UL"
_SEQUENCE_HEADER = b"\x04\x00\x20\x12SQ\x00\x00"
#: Staging folders older than this (seconds) are leftovers of a crash.
_STALE_STAGING_AGE = 3600
#: Largest counter a 2-letter prefix leaves room for in an 8-character component.
_MAX_COUNTER = 999_999
#: File ID component prefixes by record type: the layout pydicom's ``FileSet`` writes
#: (``PT000000/ST000000/SE000000/IM000000``), so pydicom sees nothing to move.
_PREFIXES = {
    "PATIENT": "PT",
    "STUDY": "ST",
    "SERIES": "SE",
    "IMAGE": "IM",
    "RT DOSE": "RD",
    "RT STRUCTURE SET": "RS",
    "RT PLAN": "RP",
    "RT TREAT RECORD": "RX",
    "PRESENTATION": "PR",
    "WAVEFORM": "WV",
    "SR DOCUMENT": "SR",
    "KEY OBJECT DOC": "KY",
    "SPECTROSCOPY": "SP",
    "RAW DATA": "RW",
    "REGISTRATION": "RG",
    "FIDUCIAL": "FD",
    "HANGING PROTOCOL": "HG",
    "ENCAP DOC": "ED",
    "VALUE MAP": "VM",
    "STEREOMETRIC": "SX",
    "PALETTE": "PA",
    "IMPLANT": "IP",
    "IMPLANT ASSY": "IA",
    "IMPLANT GROUP": "IG",
    "MEASUREMENT": "MX",
    "SURFACE": "SF",
    "SURFACE SCAN": "SS",
    "TRACT": "TR",
    "ASSESSMENT": "AS",
    "RADIOTHERAPY": "RT",
}


class FilesetError(Exception):
    """A file-set could not be built; ``dest`` is unchanged."""


class NoUsableMember(FilesetError):
    """Members were given but none of them can be placed in a file-set.

    Attributes
    ----------
    left_out : list of LeftOut
        Every member and why it cannot be used.
    """

    def __init__(self, left_out: list[LeftOut]) -> None:
        shown = "; ".join(f"{m.path.name}: {m.reason}" for m in left_out[:3])
        more = f" (and {len(left_out) - 3} more)" if len(left_out) > 3 else ""
        super().__init__(f"none of the {len(left_out)} members can be used: {shown}{more}")
        self.left_out = left_out


# --------------------------------------------------------------------------------------
# Record types and keys (PS3.3 Annex F.5)

#: Record types with no PATIENT/STUDY/SERIES parents (top-level leaves).
_SINGLE_LEVEL: dict[str, str] = {
    uids.HangingProtocolStorage: "HANGING PROTOCOL",
    uids.ColorPaletteStorage: "PALETTE",
    uids.GenericImplantTemplateStorage: "IMPLANT",
    uids.ImplantAssemblyTemplateStorage: "IMPLANT ASSY",
    uids.ImplantTemplateGroupStorage: "IMPLANT GROUP",
}

_LEAF_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "RT DOSE": (uids.RTDoseStorage,),
    "RT STRUCTURE SET": (uids.RTStructureSetStorage,),
    "RT PLAN": (uids.RTPlanStorage, uids.RTIonPlanStorage),
    "RT TREAT RECORD": (
        uids.RTBeamsTreatmentRecordStorage,
        uids.RTBrachyTreatmentRecordStorage,
        uids.RTTreatmentSummaryRecordStorage,
        uids.RTIonBeamsTreatmentRecordStorage,
    ),
    "RADIOTHERAPY": (uids.RTPhysicianIntentStorage, uids.RTSegmentAnnotationStorage),
    "PRESENTATION": (
        uids.GrayscaleSoftcopyPresentationStateStorage,
        uids.ColorSoftcopyPresentationStateStorage,
        uids.PseudoColorSoftcopyPresentationStateStorage,
        uids.BlendingSoftcopyPresentationStateStorage,
        uids.XAXRFGrayscaleSoftcopyPresentationStateStorage,
        uids.AdvancedBlendingPresentationStateStorage,
        uids.VariableModalityLUTSoftcopyPresentationStateStorage,
        uids.GrayscalePlanarMPRVolumetricPresentationStateStorage,
        uids.CompositingPlanarMPRVolumetricPresentationStateStorage,
        uids.VolumeRenderingVolumetricPresentationStateStorage,
        uids.SegmentedVolumeRenderingVolumetricPresentationStateStorage,
        uids.MultipleVolumeRenderingVolumetricPresentationStateStorage,
        uids.BasicStructuredDisplayStorage,
    ),
    "WAVEFORM": (
        uids.TwelveLeadECGWaveformStorage,
        uids.GeneralECGWaveformStorage,
        uids.General32bitECGWaveformStorage,
        uids.AmbulatoryECGWaveformStorage,
        uids.HemodynamicWaveformStorage,
        uids.CardiacElectrophysiologyWaveformStorage,
        uids.BasicVoiceAudioWaveformStorage,
        uids.GeneralAudioWaveformStorage,
        uids.ArterialPulseWaveformStorage,
        uids.RespiratoryWaveformStorage,
        uids.MultichannelRespiratoryWaveformStorage,
        uids.RoutineScalpElectroencephalogramWaveformStorage,
        uids.ElectromyogramWaveformStorage,
        uids.ElectrooculogramWaveformStorage,
        uids.SleepElectroencephalogramWaveformStorage,
        uids.BodyPositionWaveformStorage,
    ),
    "SR DOCUMENT": (
        uids.BasicTextSRStorage,
        uids.EnhancedSRStorage,
        uids.ComprehensiveSRStorage,
        uids.Comprehensive3DSRStorage,
        uids.ExtensibleSRStorage,
        uids.ProcedureLogStorage,
        uids.MammographyCADSRStorage,
        uids.ChestCADSRStorage,
        uids.ColonCADSRStorage,
        uids.XRayRadiationDoseSRStorage,
        uids.EnhancedXRayRadiationDoseSRStorage,
        uids.RadiopharmaceuticalRadiationDoseSRStorage,
        uids.PatientRadiationDoseSRStorage,
        uids.AcquisitionContextSRStorage,
        uids.SimplifiedAdultEchoSRStorage,
        uids.PlannedImagingAgentAdministrationSRStorage,
        uids.PerformedImagingAgentAdministrationSRStorage,
        uids.WaveformAnnotationSRStorage,
        uids.ImplantationPlanSRStorage,
        uids.SpectaclePrescriptionReportStorage,
        uids.MacularGridThicknessAndVolumeReportStorage,
    ),
    "KEY OBJECT DOC": (uids.KeyObjectSelectionDocumentStorage,),
    "SPECTROSCOPY": (uids.MRSpectroscopyStorage,),
    "RAW DATA": (uids.RawDataStorage,),
    "REGISTRATION": (uids.SpatialRegistrationStorage, uids.DeformableSpatialRegistrationStorage),
    "FIDUCIAL": (uids.SpatialFiducialsStorage,),
    "VALUE MAP": (uids.RealWorldValueMappingStorage,),
    "STEREOMETRIC": (uids.StereometricRelationshipStorage,),
    "MEASUREMENT": (
        uids.LensometryMeasurementsStorage,
        uids.AutorefractionMeasurementsStorage,
        uids.KeratometryMeasurementsStorage,
        uids.SubjectiveRefractionMeasurementsStorage,
        uids.VisualAcuityMeasurementsStorage,
        uids.OphthalmicAxialMeasurementsStorage,
        uids.OphthalmicVisualFieldStaticPerimetryMeasurementsStorage,
    ),
    "SURFACE": (uids.SurfaceSegmentationStorage,),
    "SURFACE SCAN": (uids.SurfaceScanMeshStorage, uids.SurfaceScanPointCloudStorage),
    "TRACT": (uids.TractographyResultsStorage,),
    "ASSESSMENT": (uids.ContentAssessmentResultsStorage,),
    "ENCAP DOC": (
        uids.EncapsulatedPDFStorage,
        uids.EncapsulatedCDAStorage,
        uids.EncapsulatedSTLStorage,
        uids.EncapsulatedOBJStorage,
        uids.EncapsulatedMTLStorage,
    ),
}
_LEAF_BY_SOP_CLASS = {uid: rtype for rtype, group in _LEAF_SOP_CLASSES.items() for uid in group}

_MIME_TYPES = {
    uids.EncapsulatedPDFStorage: "application/pdf",
    uids.EncapsulatedCDAStorage: "text/XML",
    uids.EncapsulatedSTLStorage: "model/stl",
    uids.EncapsulatedOBJStorage: "model/obj",
    uids.EncapsulatedMTLStorage: "model/mtl",
}

# Record keys as (keyword, type): "1" must have a value (filled if the file lacks
# one), "2" present (empty if the file lacks it), "1C"/"3" copied when present.
_Keys = tuple[tuple[str, str], ...]
_PATIENT_KEYS: _Keys = (("PatientName", "2"), ("PatientID", "1"))
_STUDY_KEYS: _Keys = (
    ("StudyDate", "1"),
    ("StudyTime", "1"),
    ("StudyDescription", "2"),
    ("StudyInstanceUID", "1C"),
    ("StudyID", "1"),
    ("AccessionNumber", "2"),
)
_SERIES_KEYS: _Keys = (("Modality", "1"), ("SeriesInstanceUID", "1"), ("SeriesNumber", "1"))
_CONTENT_DATE_TIME: _Keys = (("ContentDate", "1"), ("ContentTime", "1"))
_CONTENT_ID: _Keys = (
    ("InstanceNumber", "1"),
    ("ContentLabel", "1"),
    ("ContentDescription", "2"),
    ("ContentCreatorName", "2"),
)
_LEAF_KEYS: dict[str, _Keys] = {
    "IMAGE": (("InstanceNumber", "1"),),
    "RT DOSE": (("InstanceNumber", "1"), ("DoseSummationType", "1"), ("DoseComment", "3")),
    "RT STRUCTURE SET": (
        ("InstanceNumber", "1"),
        ("StructureSetLabel", "1"),
        ("StructureSetDate", "2"),
        ("StructureSetTime", "2"),
    ),
    "RT PLAN": (
        ("InstanceNumber", "1"),
        ("RTPlanLabel", "1"),
        ("RTPlanDate", "2"),
        ("RTPlanTime", "2"),
    ),
    "RT TREAT RECORD": (
        ("InstanceNumber", "1"),
        ("TreatmentDate", "2"),
        ("TreatmentTime", "2"),
    ),
    "RADIOTHERAPY": (
        ("InstanceNumber", "1"),
        ("UserContentLabel", "1C"),
        ("UserContentLongLabel", "1C"),
        ("ContentDescription", "2"),
        ("ContentCreatorName", "2"),
    ),
    "PRESENTATION": (
        ("PresentationCreationDate", "1"),
        ("PresentationCreationTime", "1"),
        *_CONTENT_ID,
        ("ReferencedSeriesSequence", "1C"),
        ("BlendingSequence", "1C"),
    ),
    "WAVEFORM": (("InstanceNumber", "1"), *_CONTENT_DATE_TIME),
    "SR DOCUMENT": (
        ("InstanceNumber", "1"),
        ("CompletionFlag", "1"),
        ("VerificationFlag", "1"),
        *_CONTENT_DATE_TIME,
        ("VerificationDateTime", "1C"),
        ("ConceptNameCodeSequence", "1"),
        ("ContentSequence", "1C"),
    ),
    "KEY OBJECT DOC": (
        ("InstanceNumber", "1"),
        *_CONTENT_DATE_TIME,
        ("ConceptNameCodeSequence", "1"),
        ("ContentSequence", "1C"),
    ),
    "SPECTROSCOPY": (
        ("ImageType", "1"),
        *_CONTENT_DATE_TIME,
        ("InstanceNumber", "1"),
        ("ReferencedImageEvidenceSequence", "1C"),
        ("NumberOfFrames", "1"),
        ("Rows", "1"),
        ("Columns", "1"),
        ("DataPointRows", "1"),
        ("DataPointColumns", "1"),
    ),
    "RAW DATA": (*_CONTENT_DATE_TIME, ("InstanceNumber", "1")),
    "REGISTRATION": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "FIDUCIAL": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "VALUE MAP": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "MEASUREMENT": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "SURFACE": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "TRACT": (*_CONTENT_DATE_TIME, *_CONTENT_ID),
    "SURFACE SCAN": _CONTENT_DATE_TIME,
    "STEREOMETRIC": (),
    "ASSESSMENT": (
        ("InstanceNumber", "1"),
        ("InstanceCreationDate", "1"),
        ("InstanceCreationTime", "2"),
    ),
    "ENCAP DOC": (
        ("ContentDate", "2"),
        ("ContentTime", "2"),
        ("InstanceNumber", "1"),
        ("DocumentTitle", "2"),
        ("HL7InstanceIdentifier", "1C"),
        ("ConceptNameCodeSequence", "2"),
        ("MIMETypeOfEncapsulatedDocument", "1"),
    ),
    "HANGING PROTOCOL": (
        ("HangingProtocolCreator", "1"),
        ("HangingProtocolCreationDateTime", "1"),
        ("HangingProtocolDefinitionSequence", "1"),
        ("NumberOfPriorsReferenced", "1"),
        ("HangingProtocolUserIdentificationCodeSequence", "2"),
    ),
    "PALETTE": (("ContentLabel", "1"), ("ContentDescription", "2")),
    "IMPLANT": (
        ("Manufacturer", "1"),
        ("ImplantName", "1"),
        ("ImplantSize", "1C"),
        ("ImplantPartNumber", "1"),
    ),
    "IMPLANT ASSY": (
        ("ImplantAssemblyTemplateName", "1"),
        ("Manufacturer", "1"),
        ("ProcedureTypeCodeSequence", "1"),
    ),
    "IMPLANT GROUP": (("ImplantTemplateGroupName", "1"), ("ImplantTemplateGroupIssuer", "1")),
}

#: Date/time pairs tried, in order, when a date the directory needs is missing.
_DATE_SOURCES = ("Series", "Acquisition", "Content", "InstanceCreation")
_PLACEHOLDER_DATE = "19000101"
_PLACEHOLDER_TIME = "000000"


def leaf_record_type(ds: Dataset) -> str:
    """Return the Directory Record Type (PS3.3 F.4) of the record referencing ``ds``.

    Parameters
    ----------
    ds : Dataset
        The instance (its header is enough).

    Returns
    -------
    str
        e.g. ``"IMAGE"``, ``"SR DOCUMENT"``, ``"ENCAP DOC"``, ``"RT DOSE"``; ``IMAGE``
        for SOP Classes not listed (all image storage classes, and any unknown one).
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _SINGLE_LEVEL:
        return _SINGLE_LEVEL[sop_class]
    if sop_class in _LEAF_BY_SOP_CLASS:
        return _LEAF_BY_SOP_CLASS[sop_class]
    if ds.get("Modality") in ("RTINTENT", "RTSEGANN", "RTRAD"):
        return "RADIOTHERAPY"
    if "EncapsulatedDocument" in ds:
        return "ENCAP DOC"
    if "RTPlanLabel" in ds:
        return "RT PLAN"
    return "IMAGE"


# --------------------------------------------------------------------------------------
# Reading the members


@dataclass
class _Member:
    path: Path
    ds: Dataset
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    record_type: str
    order: int
    instance_number: int | None = None


@dataclass
class _Series:
    uid: str
    members: list[_Member] = field(default_factory=list)
    number: int | None = None


@dataclass
class _Study:
    uid: str
    series: dict[str, _Series] = field(default_factory=dict)

    def members(self) -> list[_Member]:
        return [m for s in self.series.values() for m in s.members]


@dataclass
class _Patient:
    key: tuple[str, ...]
    studies: dict[str, _Study] = field(default_factory=dict)
    patient_id: str | None = None

    def members(self) -> list[_Member]:
        return [m for st in self.studies.values() for m in st.members()]


def _has_value(ds: Dataset, keyword: str) -> bool:
    """True if ``keyword`` is present with a non-empty value."""
    if keyword not in ds:
        return False
    elem = ds[keyword]
    if elem.VR == "SQ":
        return len(elem.value) > 0
    if elem.VM == 0:
        return False
    return not isinstance(elem.value, str) or bool(elem.value.strip())


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds[keyword].value).strip() if _has_value(ds, keyword) else ""


def _read_member(path: Path, order: int) -> _Member:
    """Read a member's header; :class:`UnreadableFile` says why it cannot be used."""
    ds = read_instance_header(path)
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    sop_instance = _text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID")
    syntax = _text(meta, "TransferSyntaxUID")
    missing = [
        name
        for name, value in (
            ("SOP Class UID", sop_class),
            ("SOP Instance UID", sop_instance),
            ("Transfer Syntax UID", syntax),
        )
        if not value
    ]
    if missing:
        raise UnreadableFile(f"the file lacks its {' and '.join(missing)}")
    if sop_class == MediaStorageDirectoryStorage:
        raise UnreadableFile("the file is a DICOMDIR, not an instance")
    rtype = leaf_record_type(ds)
    if rtype not in _SINGLE_LEVEL.values():
        for keyword, name in (("StudyInstanceUID", "Study Instance UID"),
                              ("SeriesInstanceUID", "Series Instance UID")):
            if not _has_value(ds, keyword):
                raise UnreadableFile(f"the file lacks its {name}")
    return _Member(path, ds, sop_class, sop_instance, syntax, rtype, order)


def _as_int(ds: Dataset, keyword: str) -> int | None:
    if not _has_value(ds, keyword):
        return None
    try:
        return int(str(ds[keyword].value).strip())
    except ValueError:
        return None


def _number(existing: Sequence[int | None]) -> list[int]:
    """Keep given numbers; give the others the lowest positive numbers not used."""
    used = {n for n in existing if n is not None}
    out: list[int] = []
    candidate = 1
    for n in existing:
        if n is None:
            while candidate in used:
                candidate += 1
            used.add(candidate)
            n = candidate
        out.append(n)
    return out


def _group(members: Sequence[_Member]) -> tuple[list[_Patient], list[_Member]]:
    """Group members into patients/studies/series; assign missing numbers and IDs."""
    patients: dict[tuple[str, ...], _Patient] = {}
    top_level: list[_Member] = []
    for m in members:
        if m.record_type in _SINGLE_LEVEL.values():
            top_level.append(m)
            continue
        pid = _text(m.ds, "PatientID")
        key = (
            ("id", pid)
            if pid
            else (
                "noid",
                _text(m.ds, "PatientName"),
                _text(m.ds, "PatientBirthDate"),
            )
        )
        patient = patients.setdefault(key, _Patient(key))
        study_uid = _text(m.ds, "StudyInstanceUID")
        study = patient.studies.setdefault(study_uid, _Study(study_uid))
        series_uid = _text(m.ds, "SeriesInstanceUID")
        study.series.setdefault(series_uid, _Series(series_uid)).members.append(m)

    anonymous = 0
    for patient in patients.values():
        if patient.key[0] == "id":
            patient.patient_id = patient.key[1]
        else:
            anonymous += 1
            patient.patient_id = f"NOID{anonymous:04d}"
            logger.info("file-set: no PatientID, using %s", patient.patient_id)
        for study in patient.studies.values():
            all_series = list(study.series.values())
            given = [_first_int(s.members, "SeriesNumber") for s in all_series]
            for s, n in zip(all_series, _number(given), strict=True):
                s.number = n
                numbers = _number([_as_int(m.ds, "InstanceNumber") for m in s.members])
                for m, i in zip(s.members, numbers, strict=True):
                    m.instance_number = i
                s.members.sort(key=lambda m: (m.instance_number, m.order))
            study.series = dict(sorted(study.series.items(), key=lambda kv: kv[1].number or 0))
    return list(patients.values()), top_level


def _first_int(members: Iterable[_Member], keyword: str) -> int | None:
    for m in members:
        value = _as_int(m.ds, keyword)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------------------
# Building the records


def _charset(ds: Dataset) -> Any:
    return ds["SpecificCharacterSet"].value if "SpecificCharacterSet" in ds else None


def _borrow(rep: Dataset, others: Iterable[_Member], keyword: str) -> Any:
    """An element for ``keyword`` from ``rep`` or, failing that, a sibling instance."""
    if _has_value(rep, keyword):
        return rep[keyword]
    for m in others:
        if _has_value(m.ds, keyword) and _charset(m.ds) == _charset(rep):
            return m.ds[keyword]
    return None


def _date_time_fallback(members: Iterable[_Member]) -> tuple[str, str] | None:
    """Earliest (date, time) among the members, from the first source that has one."""
    for source in _DATE_SOURCES:
        found = [
            (_text(m.ds, f"{source}Date")[:8], _text(m.ds, f"{source}Time"))
            for m in members
            if len(_text(m.ds, f"{source}Date")) >= 8
        ]
        if found:
            date, time = min(found)
            return date, time or _PLACEHOLDER_TIME
    return None


def _new_record(rtype: str, rep: Dataset) -> Dataset:
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = rtype
    if "SpecificCharacterSet" in rep:
        record.add(copy.deepcopy(rep["SpecificCharacterSet"]))
    return record


def _fill_keys(
    record: Dataset,
    keys: _Keys,
    rep: Dataset,
    others: Sequence[_Member],
    fill: Callable[[str], Any],
    where: str,
) -> None:
    """Copy ``keys`` from ``rep`` (or siblings) into ``record``, filling Type 1 gaps."""
    for keyword, kind in keys:
        elem = _borrow(rep, others, keyword) if kind == "1" else None
        if elem is None and _has_value(rep, keyword):
            elem = rep[keyword]
        if elem is not None:
            if keyword == "ContentSequence":
                elem = _concept_modifiers(elem)
                if elem is None:
                    continue
            record.add(copy.deepcopy(elem))
            continue
        if kind == "1":
            value = fill(keyword)
            if value is None:
                logger.warning("file-set: %s lacks Type 1 key %s; left out", where, keyword)
                continue
            logger.debug("file-set: %s: filled %s = %r", where, keyword, value)
            setattr(record, keyword, value)
        elif kind == "1C" and (value := fill(keyword)) is not None:
            setattr(record, keyword, value)
        elif kind == "2":
            if keyword in rep:
                record.add(copy.deepcopy(rep[keyword]))
            else:
                setattr(record, keyword, DicomSequence() if keyword.endswith("Sequence") else None)


def _latest_verification(ds: Dataset) -> str | None:
    """Verification DateTime of a VERIFIED SR: its latest Verifying Observer's."""
    if _text(ds, "VerificationFlag") != "VERIFIED":
        return None
    times = [
        _text(item, "VerificationDateTime")
        for item in ds.get("VerifyingObserverSequence", [])
        if _has_value(item, "VerificationDateTime")
    ]
    return max(times) if times else None


def _concept_modifiers(elem: Any) -> Any:
    """Content Sequence for an SR/KO record: only the root's HAS CONCEPT MOD items."""
    items = [it for it in elem.value if it.get("RelationshipType") == "HAS CONCEPT MOD"]
    if not items:
        return None
    out = copy.deepcopy(elem)
    out.value = DicomSequence([copy.deepcopy(it) for it in items])
    return out


def _patient_record(patient: _Patient) -> Dataset:
    members = patient.members()
    rep = members[0].ds
    record = _new_record("PATIENT", rep)

    def fill(keyword: str) -> Any:
        return patient.patient_id if keyword == "PatientID" else None

    if patient.key[0] == "noid":
        # Synthetic ID: don't borrow a value from another instance.
        record.PatientID = patient.patient_id
        keys = tuple(k for k in _PATIENT_KEYS if k[0] != "PatientID")
    else:
        keys = _PATIENT_KEYS
    _fill_keys(record, keys, rep, members, fill, f"patient {patient.patient_id}")
    return record


def _study_record(study: _Study, ordinal: Callable[[], int]) -> tuple[Dataset, tuple[str, str]]:
    members = study.members()
    rep = members[0].ds
    record = _new_record("STUDY", rep)
    fallback = _date_time_fallback(members) or (_PLACEHOLDER_DATE, _PLACEHOLDER_TIME)

    def fill(keyword: str) -> Any:
        if keyword == "StudyDate":
            return fallback[0]
        if keyword == "StudyTime":
            date = record.get("StudyDate")
            return fallback[1] if not date or str(date) == fallback[0] else _PLACEHOLDER_TIME
        if keyword == "StudyID":
            accession = _text(rep, "AccessionNumber")
            return accession[:16] if accession else f"IEP{ordinal():04d}"
        return None

    _fill_keys(record, _STUDY_KEYS, rep, members, fill, f"study {study.uid}")
    return record, (str(record.StudyDate), str(record.StudyTime))


def _series_record(series: _Series) -> Dataset:
    rep = series.members[0].ds
    record = _new_record("SERIES", rep)

    def fill(keyword: str) -> Any:
        if keyword == "SeriesNumber":
            return series.number
        if keyword == "Modality":
            return "OT"
        return None

    _fill_keys(record, _SERIES_KEYS, rep, series.members, fill, f"series {series.uid}")
    return record


def _leaf_record(m: _Member, file_id: list[str], study_dt: tuple[str, str] | None) -> Dataset:
    record = _new_record(m.record_type, m.ds)

    def fill(keyword: str) -> Any:
        if keyword == "InstanceNumber":
            return m.instance_number
        if keyword == "VerificationDateTime":
            return _latest_verification(m.ds)
        if keyword.endswith(("Date", "Time")) and not keyword.endswith("DateTime"):
            source = keyword.removesuffix("Date").removesuffix("Time")
            date = _text(m.ds, f"{source}Date")[:8]
            if date and keyword.endswith("Time"):
                return _text(m.ds, f"{source}Time") or _PLACEHOLDER_TIME
            pair = _date_time_fallback([m]) or study_dt or (_PLACEHOLDER_DATE, _PLACEHOLDER_TIME)
            return pair[0] if keyword.endswith("Date") else pair[1]
        return {
            "CompletionFlag": "PARTIAL",
            "VerificationFlag": "UNVERIFIED",
            "ContentLabel": "UNLABELED",
            "MIMETypeOfEncapsulatedDocument": _MIME_TYPES.get(m.sop_class),
        }.get(keyword)

    keys = _LEAF_KEYS.get(m.record_type, (("InstanceNumber", "1"),))
    _fill_keys(record, keys, m.ds, (), fill, f"instance {m.sop_instance}")
    record.ReferencedFileID = file_id
    record.ReferencedSOPClassUIDInFile = m.sop_class
    record.ReferencedSOPInstanceUIDInFile = m.sop_instance
    record.ReferencedTransferSyntaxUIDInFile = m.transfer_syntax
    return record


@dataclass
class _Node:
    record: Dataset
    children: list[_Node] = field(default_factory=list)


def _component(record_type: str, index: int) -> str:
    """File ID component for the ``index``-th (0-based) record among its siblings."""
    if index > _MAX_COUNTER:
        raise FilesetError(f"more than {_MAX_COUNTER + 1} entries in one file-set folder")
    return f"{_PREFIXES.get(record_type, 'XX')}{index:06d}"


def _build_tree(
    patients: Sequence[_Patient], top_level: Sequence[_Member], root: Sequence[str] = ()
) -> tuple[list[_Node], list[tuple[_Member, list[str]]]]:
    """Return the root records and (member, File ID components) placements.

    ``root`` is prepended to every File ID (e.g. ``("DICOM",)``).
    """
    roots: list[_Node] = []
    placements: list[tuple[_Member, list[str]]] = []
    study_ordinals = itertools.count(1)

    for p_index, patient in enumerate(patients):
        p_id = _component("PATIENT", p_index)
        p_node = _Node(_patient_record(patient))
        roots.append(p_node)
        studies = []
        for study in patient.studies.values():
            record, date_time = _study_record(study, lambda: next(study_ordinals))
            studies.append((date_time, study.uid, study, record))
        studies.sort(key=lambda t: (t[0], t[1]))
        for s_index, (date_time, _uid, study, record) in enumerate(studies):
            st_id = _component("STUDY", s_index)
            st_node = _Node(record)
            p_node.children.append(st_node)
            for se_index, series in enumerate(study.series.values()):
                se_id = _component("SERIES", se_index)
                se_node = _Node(_series_record(series))
                st_node.children.append(se_node)
                for i_index, m in enumerate(series.members):
                    file_id = [*root, p_id, st_id, se_id, _component(m.record_type, i_index)]
                    se_node.children.append(_Node(_leaf_record(m, file_id, date_time)))
                    placements.append((m, file_id))
    for index, m in enumerate(top_level, start=len(roots)):
        file_id = [*root, _component(m.record_type, index)]
        roots.append(_Node(_leaf_record(m, file_id, None)))
        placements.append((m, file_id))
    return roots, placements


# --------------------------------------------------------------------------------------
# Encoding the DICOMDIR


def _flatten(nodes: Sequence[_Node], out: list[_Node]) -> list[_Node]:
    for node in nodes:
        out.append(node)
        _flatten(node.children, out)
    return out


def _encode_file(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _encode_item(record: Dataset) -> bytes:
    """One Directory Record Sequence item, Explicit VR Little Endian, defined length."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, record)
    body = fp.getvalue()
    # Every record starts (0004,1400) UL, (0004,1410) US, (0004,1420) UL: see _new_record.
    if body[0:6] != _NEXT_HEADER or body[22:28] != _LOWER_HEADER:  # pragma: no cover
        raise FilesetError("unexpected directory record layout")
    return _ITEM_TAG + struct.pack("<I", len(body)) + body


def _encode_dicomdir(roots: Sequence[_Node], fileset_id: str, instance_uid: str) -> bytes:
    """Encode the Basic Directory IOD (PS3.3 F.3) with its record offsets.

    Each record is encoded once; as the Directory Record Sequence is the last
    element and all offsets are fixed-size UL values, item positions follow from
    the encoded lengths and the offsets are written into the bytes afterwards.
    """
    ordered = _flatten(roots, [])
    items = [_encode_item(node.record) for node in ordered]

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = fileset_id
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence()
    head_length = len(_encode_file(ds))

    offsets: dict[int, int] = {}
    position = head_length
    for node, item in zip(ordered, items, strict=True):
        offsets[id(node)] = position
        position += len(item)
    if roots:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = offsets[id(roots[0])]
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = offsets[id(roots[-1])]
    head = bytearray(_encode_file(ds))
    if len(head) != head_length or head[-12:-4] != _SEQUENCE_HEADER:  # pragma: no cover
        raise FilesetError("unexpected DICOMDIR header layout")
    struct.pack_into("<I", head, len(head) - 4, position - head_length)

    body = bytearray(b"".join(items))

    def chain(siblings: Sequence[_Node]) -> None:
        for index, node in enumerate(siblings):
            following = siblings[index + 1] if index + 1 < len(siblings) else None
            at = offsets[id(node)] - head_length + 8  # the record, after the item header
            struct.pack_into("<I", body, at + 8, offsets[id(following)] if following else 0)
            lower = offsets[id(node.children[0])] if node.children else 0
            struct.pack_into("<I", body, at + 30, lower)
            chain(node.children)

    chain(roots)
    return bytes(head + body)


# --------------------------------------------------------------------------------------
# Files, staging and the swap


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _check_replaceable(dest: Path) -> None:
    if dest.is_symlink():
        raise FilesetError(f"refusing to replace symbolic link {dest}")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise FilesetError(f"{dest} exists and is not a directory")
    if (dest / "DICOMDIR").is_file() or not any(dest.iterdir()):
        return
    raise FilesetError(f"refusing to replace {dest}: not empty and holds no DICOMDIR")


def _make_staging(dest: Path) -> Path:
    """Create an empty hidden sibling of ``dest`` (mode from the umask, unlike mkdtemp)."""
    while True:
        staging = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.staging")
        try:
            staging.mkdir()
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        return staging


def _sweep_stale_staging(dest: Path) -> None:
    """Remove staging folders of ``dest`` that a crash left behind (older than an hour)."""
    if not dest.parent.is_dir():
        return
    cutoff = time.time() - _STALE_STAGING_AGE
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*.staging*"):
        with contextlib.suppress(OSError):
            if path.lstat().st_mtime < cutoff:
                logger.warning("file-set: removing stale staging folder %s", path)
                shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(staging: Path, dest: Path) -> None:
    """Make ``staging`` become ``dest``; an older ``dest`` is removed."""
    if dest.exists():
        if _rename_exchange(staging, dest):
            retired = staging
        else:
            retired = staging.with_name(staging.name + ".old")
            os.rename(dest, retired)
            try:
                os.rename(staging, dest)
            except BaseException:
                os.rename(retired, dest)
                raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, dest)
    with contextlib.suppress(OSError):
        _fsync_path(dest.parent, directory=True)


def _populate(staging: Path, files: Sequence[PlannedFile], dicomdir: bytes) -> None:
    folders: set[Path] = {staging}
    for planned in files:
        target = staging.joinpath(*planned.file_id)
        if target.parent not in folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            folders.update(staging / p for p in Path(*planned.file_id).parents)
        try:
            _link_or_copy(planned.path, target)
        except FileNotFoundError as exc:
            raise FilesetError(f"member file vanished while building: {planned.path}") from exc
    path = staging / "DICOMDIR"
    with open(path, "wb") as fp:
        fp.write(dicomdir)
        fp.flush()
        os.fsync(fp.fileno())
    for folder in sorted(folders, reverse=True):
        _fsync_path(folder, directory=True)


# --------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class PlannedFile:
    """A member of a planned file-set and where the DICOMDIR places it.

    Attributes
    ----------
    file_id : tuple of str
        Referenced File ID components, e.g. ``("PT000000", "ST000000", "SE000000",
        "IM000000")``.
    path : Path
        The source file.
    sop_class, sop_instance, transfer_syntax : str
        From the file (its File Meta when the dataset lacks them).
    record_type : str
        The leaf Directory Record Type (``IMAGE``, ``SR DOCUMENT``, ``ENCAP DOC``...).
    study_uid, series_uid : str
        Empty for top-level records (hanging protocols, palettes, implants).
    """

    file_id: tuple[str, ...]
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    record_type: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class LeftOut:
    """A member left out of a file-set because it cannot be used.

    Attributes
    ----------
    path : Path
        The member as given.
    reason : str
        Why, in plain words and without paths (e.g. ``"the stored file is cut short
        (truncated)"``): fit for a log line, the audit trail or a recipient.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class FilesetPlan:
    """A file-set worked out but not written: the DICOMDIR's bytes and its members.

    ``files`` are in DICOMDIR record order: patient, study (by date), series (by
    number), instance (by number). ``left_out`` are the members that cannot be
    used (missing, unreadable, truncated, not an instance...), in the order given.
    """

    dicomdir: bytes
    files: list[PlannedFile]
    left_out: list[LeftOut] = field(default_factory=list)


def plan_fileset(
    members: Sequence[Path],
    *,
    fileset_id: str = "IEPNODE",
    root: Sequence[str] = (),
    instance_uid: str | None = None,
) -> FilesetPlan:
    """Work out a file-set's DICOMDIR and File IDs without writing anything.

    Parameters
    ----------
    members : sequence of Path
        Part-10 files, as for :func:`write_fileset` (a SOP Instance given twice is
        placed once). A member that cannot be used (see
        :func:`storage.stored_file.read_instance_header`; or one lacking its SOP,
        Study or Series UIDs, or a DICOMDIR) is left out and listed in
        ``left_out``: one bad file does not stop the others.
    fileset_id : str, optional
        File-set ID (0004,1130): 1-16 characters from ``A-Z 0-9 _``.
    root : sequence of str, optional
        Folder components put before every File ID (e.g. ``("DICOM",)``); each 1-8 of
        ``A-Z 0-9 _``, leaving room for the at most 8 components of a File ID.
    instance_uid : str, optional
        Media Storage SOP Instance UID of the DICOMDIR (default: a new UID). Give a
        UID derived from the content to get the same bytes for the same members.

    Returns
    -------
    FilesetPlan
        The DICOMDIR bytes, per member its File ID, and the members left out.

    Raises
    ------
    ValueError
        If ``fileset_id`` or ``root`` is malformed.
    NoUsableMember
        If members were given and none of them can be used (a
        :class:`FilesetError`).
    """
    if not _FILESET_ID.match(fileset_id):
        raise ValueError(f"malformed File-set ID {fileset_id!r}: 1-16 of A-Z 0-9 _")
    root = tuple(root)
    if len(root) > _MAX_DEPTH - 4 or not all(_COMPONENT.match(part) for part in root):
        raise ValueError(f"malformed File ID root {root!r}: at most 4 components of 1-8 "
                         "of A-Z 0-9 _")
    unique: dict[str, _Member] = {}
    left_out: list[LeftOut] = []
    for order, path in enumerate(members):
        try:
            member = _read_member(Path(path), order)
        except UnreadableFile as exc:
            left_out.append(LeftOut(Path(path), exc.reason))
            continue
        if member.sop_instance in unique:
            logger.info("file-set: %s repeats SOP Instance %s", path, member.sop_instance)
            continue
        unique[member.sop_instance] = member
    if left_out and not unique:
        raise NoUsableMember(left_out)
    patients, top_level = _group(list(unique.values()))
    roots, placements = _build_tree(patients, top_level, root)
    dicomdir = _encode_dicomdir(roots, fileset_id, instance_uid or generate_uid())
    files = [
        PlannedFile(tuple(file_id), m.path, m.sop_class, m.sop_instance, m.transfer_syntax,
                    m.record_type, _text(m.ds, "StudyInstanceUID"),
                    _text(m.ds, "SeriesInstanceUID"))
        for m, file_id in placements
    ]
    return FilesetPlan(dicomdir, files, left_out)


def write_fileset(dest: Path, members: Sequence[Path], *,
                  fileset_id: str = "IEPNODE") -> FilesetPlan:
    """Build a DICOM file-set (DICOMDIR + member files) in ``dest``.

    Parameters
    ----------
    dest : Path
        Folder of the file-set. Created if missing; an earlier file-set there (a
        folder holding a ``DICOMDIR``, or an empty folder) is replaced atomically.
    members : sequence of Path
        Part-10 files of any storage SOP Class and transfer syntax, normally one
        study; several studies and patients are allowed. A SOP Instance given twice
        is written once. Members that cannot be used are left out (see
        :func:`plan_fileset`); the caller reports them.
    fileset_id : str, optional
        File-set ID (0004,1130): 1-16 characters from ``A-Z 0-9 _``.

    Returns
    -------
    FilesetPlan
        What was written: the members placed (``files``) and those left out.

    Raises
    ------
    ValueError
        If ``fileset_id`` is malformed.
    FilesetError
        If no member can be used (:class:`NoUsableMember`), a member vanishes while
        the set is written, or ``dest`` is something other than a file-set folder.
        ``dest`` is unchanged and no staging folder is left behind.
    OSError
        If the file system fails (e.g. ``ENOSPC``); same guarantees.

    Notes
    -----
    Staging folders (``.<dest name>.*.staging``) left by a crash are removed by the
    next build once they are an hour old. Builds of one ``dest`` should be
    serialised by the caller; where ``renameat2`` works, concurrent builds are
    still safe (the last swap wins).
    """
    if not _FILESET_ID.match(fileset_id):
        raise ValueError(f"malformed File-set ID {fileset_id!r}: 1-16 of A-Z 0-9 _")
    dest = Path(dest)
    _check_replaceable(dest)
    plan = plan_fileset(members, fileset_id=fileset_id)

    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(dest)
    staging = _make_staging(dest)
    try:
        _populate(staging, plan.files, plan.dicomdir)
        _swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("file-set %s: %d instances%s", dest, len(plan.files),
                f", {len(plan.left_out)} left out" if plan.left_out else "")
    return plan


def fileset_file_ids(dest: Path) -> list[str]:
    """Return the File IDs a file-set's DICOMDIR references, in record order.

    Parameters
    ----------
    dest : Path
        The file-set folder (holding ``DICOMDIR``).

    Returns
    -------
    list of str
        Paths relative to ``dest`` with ``/`` separators, e.g.
        ``"PT000000/ST000000/SE000000/IM000000"``.
    """
    ds = dcmread(Path(dest) / "DICOMDIR")
    out: list[str] = []
    for record in ds.get("DirectoryRecordSequence", []):
        if "ReferencedFileID" not in record or record["ReferencedFileID"].VM == 0:
            continue
        value = record.ReferencedFileID
        parts = [value] if isinstance(value, str) else list(value)
        out.append("/".join(str(p) for p in parts))
    return out
