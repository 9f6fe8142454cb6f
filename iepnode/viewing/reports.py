"""Reports of a transaction's studies: Encapsulated PDFs and Structured Reports.

Listing
    The index knows each instance's SOP Class (``Instance.sop_class``), so a
    transaction's reports are found without opening any file; only the few report
    files are read (headers, without their document bytes) for a title and a date.

PDF
    :func:`load_pdf` returns the encapsulated bytes (``Encapsulated Document Length``
    honoured, padding removed) only when they really are a PDF; the web edge serves
    them ``inline`` with a generated file name, ``nosniff`` and a CSP ``sandbox``.

Structured Reports
    :func:`render_sr` turns an SR into a plain tree of :class:`SrItem` (labels and
    values as text) that a template prints, escaped: nothing from the file reaches the
    page as markup. A TID 1500 Measurement Report is also read with highdicom into a
    table of measurements; every SR (Basic Text, Enhanced, Comprehensive, 3D, ...)
    gets the generic content-tree walk: containers become headings, then text, codes,
    numbers with units, dates, times, names, references. The walk is bounded in depth
    and number of items, so a hostile file cannot make the page unbounded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import EncapsulatedPDFStorage, UID_dictionary

from iepnode import dicomtext
from iepnode.archive.uids import is_uid_like
from iepnode.errors import BadDataset
from storage.models import Instance, Series, Study
from storage.queries import viewing as queries

#: SOP Classes of Structured Reports (every "... SR Storage" class pydicom knows).
SR_CLASSES = frozenset(
    uid for uid, (name, kind, *_rest) in UID_dictionary.items()
    if kind == "SOP Class" and name.endswith("SR Storage") and "Retired" not in name
)
PDF_CLASS = str(EncapsulatedPDFStorage)
REPORT_CLASSES = SR_CLASSES | {PDF_CLASS}

#: Bounds of the SR walk (depth of nested items, items shown).
MAX_DEPTH = 32
MAX_ITEMS = 5000
_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ReportEntry:
    """One report of a transaction, as a list shows it."""

    sop_uid: str
    kind: str  # "pdf" or "sr"
    title: str
    date: str  # DA value, or ""
    study_uid: str
    series_description: str
    #: The file-store path of the instance (never shown).
    path: Path
    #: Who added it, when it is an attachment (an ``iepnode.viewing.attachments.AttachmentEntry``:
    #: held by this transaction, or filed into the study); ``None`` for the hospital's own.
    attachment: Any = None


@dataclass
class SrItem:
    """A content item of an SR, as text: a heading (container) or ``label: value``."""

    kind: str  # "container", "text", "code", "num", "date", "time", "datetime", "pname", ...
    label: str
    value: str = ""
    relationship: str = ""
    children: list[SrItem] = field(default_factory=list)


@dataclass(frozen=True)
class Measurement:
    """One measurement of a TID 1500 report (read with highdicom)."""

    group: str
    finding: str
    name: str
    value: str
    unit: str


@dataclass(frozen=True)
class SrDocument:
    """A Structured Report ready to print: header facts, measurements, the content tree."""

    title: str
    facts: list[tuple[str, str]]
    measurements: list[Measurement]
    root: SrItem
    truncated: bool


def is_uid(value: str) -> bool:
    """Whether ``value`` looks like a UID (digits and dots, at most 64 characters)."""
    return is_uid_like(value or "")


def kind_of(sop_class: str) -> str | None:
    """``pdf``, ``sr`` or ``None`` for an instance's SOP Class UID."""
    if sop_class == PDF_CLASS:
        return "pdf"
    if sop_class in SR_CLASSES:
        return "sr"
    return None


def report_rows(study_uids: Iterable[str], sop_uid: str | None = None,
                ) -> list[tuple[Instance, Series, Study]]:
    """Index rows of the reports of ``study_uids`` (or the one with ``sop_uid``)."""
    uids = list(study_uids)
    if not uids:
        return []
    return queries.report_rows(uids, sorted(REPORT_CLASSES), sop_uid)


def list_reports(study_uids: Iterable[str], path_of: Callable[[str], Path],
                 sop_uid: str | None = None) -> list[ReportEntry]:
    """The reports (PDF and SR) of the given studies, with their titles and dates.

    Parameters
    ----------
    study_uids : iterable of str
        The transaction's studies.
    path_of : callable
        File-store key -> path (``FileStore.path``).
    sop_uid : str, optional
        Only this instance (when it is a report of those studies).
    """
    entries = []
    for instance, series, study in report_rows(study_uids, sop_uid):
        path = path_of(instance.key)
        title, date = _title_and_date(path, instance.sop_class)
        entries.append(ReportEntry(
            sop_uid=instance.sop_uid, kind=kind_of(instance.sop_class) or "",
            title=title or series.description or "Report", date=date,
            study_uid=study.study_uid, series_description=series.description, path=path))
    return entries


def _read(path: Path, *, whole: bool = False) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values in other people's files
            if whole:
                return dcmread(path)
            return dcmread(path, stop_before_pixels=True, defer_size=4096)
    except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError,
            AttributeError, NotImplementedError) as exc:
        raise BadDataset(f"cannot read the report: {exc}") from exc


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except (ValueError, TypeError, KeyError, LookupError, UnicodeError):
        return ""
    return "" if value is None else str(value).strip()


def _title_and_date(path: Path, sop_class: str) -> tuple[str, str]:
    try:
        ds = _read(path)
    except BadDataset:
        return "", ""
    title = _text(ds, "DocumentTitle") if sop_class == PDF_CLASS else _concept(ds)
    return title[:128], _text(ds, "ContentDate")[:8]


def load_pdf(path: Path) -> bytes:
    """The PDF bytes of a stored Encapsulated PDF instance.

    Raises
    ------
    BadDataset
        Unreadable, no document, or the document is not a PDF.
    """
    ds = _read(path, whole=True)
    data = ds.get("EncapsulatedDocument")
    if not isinstance(data, bytes) or not data:
        raise BadDataset("the report holds no document")
    length = ds.get("EncapsulatedDocumentLength")
    if isinstance(length, int) and 0 < length <= len(data):
        data = data[:length]
    if not data.startswith(b"%PDF-"):
        raise BadDataset("the encapsulated document is not a PDF")
    return data


def safe_filename(title: str, suffix: str = ".pdf") -> str:
    """A download name made from a title: ASCII letters, digits, ``_.-``; ``report`` if none."""
    stem = _FILENAME_CHARS.sub("_", title or "").strip("._-")[:60]
    return f"{stem or 'report'}{suffix}"


# -- Structured Reports ------------------------------------------------------------------


def _code_meaning(seq: object) -> str:
    try:
        item = seq[0]  # type: ignore[index]
        return str(item.get("CodeMeaning", "") or item.get("CodeValue", "")).strip()
    except (IndexError, TypeError, KeyError, AttributeError):
        return ""


def _concept(item: Dataset) -> str:
    return _code_meaning(item.get("ConceptNameCodeSequence"))


def _unit(seq: object) -> str:
    try:
        code = seq[0]  # type: ignore[index]
    except (IndexError, TypeError, KeyError):
        return ""
    value = str(code.get("CodeValue", "")).strip()
    scheme = str(code.get("CodingSchemeDesignator", "")).strip()
    if scheme == "UCUM" and value and value != "1":
        return value  # "mm", "cm2", "ml": what a reader expects to see
    meaning = str(code.get("CodeMeaning", "")).strip()
    return "" if meaning in ("no units", "unity") else meaning


def _format_time(value: str) -> str:
    text = value.strip()
    if re.fullmatch(r"\d{4,6}(\.\d+)?", text):
        return ":".join(text[i:i + 2] for i in range(0, min(len(text), 6), 2))
    return text


def _value(item: Dataset) -> tuple[str, str]:
    """The (kind, text) of one content item's value."""
    vt = str(item.get("ValueType", "")).strip().upper()
    if vt == "TEXT":
        return "text", _text(item, "TextValue")
    if vt == "CODE":
        return "code", _code_meaning(item.get("ConceptCodeSequence"))
    if vt == "NUM":
        try:
            measured = item.MeasuredValueSequence[0]
        except (AttributeError, IndexError, KeyError, TypeError):
            return "num", "(no value)"
        number = _text(measured, "NumericValue")
        unit = _unit(measured.get("MeasurementUnitsCodeSequence"))
        return "num", f"{number} {unit}".strip()
    if vt == "DATE":
        return "date", dicomtext.dicom_date(_text(item, "Date"), "")
    if vt == "TIME":
        return "time", _format_time(_text(item, "Time"))
    if vt == "DATETIME":
        text = _text(item, "DateTime")
        day = dicomtext.dicom_date(text[:8], "")
        return "datetime", f"{day} {_format_time(text[8:14])}".strip()
    if vt == "PNAME":
        return "pname", dicomtext.person_name(_text(item, "PersonName"), "")
    if vt == "UIDREF":
        return "uidref", _text(item, "UID")
    if vt in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        try:
            ref = item.ReferencedSOPSequence[0]
            uid = _text(ref, "ReferencedSOPInstanceUID")
        except (AttributeError, IndexError, KeyError, TypeError):
            uid = ""
        return "reference", f"{vt.lower()} {uid}".strip()
    if vt in ("SCOORD", "SCOORD3D"):
        return "coord", f"region ({_text(item, 'GraphicType').lower() or 'shape'})"
    if vt == "TCOORD":
        return "coord", f"time range ({_text(item, 'TemporalRangeType').lower()})"
    if vt == "CONTAINER":
        return "container", ""
    if "ReferencedContentItemIdentifier" in item:
        ids = item.get("ReferencedContentItemIdentifier")
        return "byref", "see item " + ".".join(str(i) for i in (ids or []))
    return "other", vt.lower()


def _walk(items: object, depth: int, budget: list[int]) -> list[SrItem]:
    out: list[SrItem] = []
    if depth > MAX_DEPTH or not isinstance(items, Iterable):
        return out
    for item in items:
        if budget[0] <= 0:
            break
        budget[0] -= 1
        if not isinstance(item, Dataset):
            continue
        kind, value = _value(item)
        node = SrItem(kind=kind, label=_concept(item) or kind.title(), value=value,
                      relationship=str(item.get("RelationshipType", "")).strip())
        node.children = _walk(item.get("ContentSequence", []), depth + 1, budget)
        out.append(node)
    return out


def _measurements(ds: Dataset) -> list[Measurement]:
    """TID 1500 measurement groups read with highdicom (empty for other templates)."""
    if _concept(ds) != "Imaging Measurement Report" and not any(
            str(t.get("TemplateIdentifier", "")) == "1500"
            for t in ds.get("ContentTemplateSequence", [])):
        return []
    from highdicom.sr import MeasurementReport

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = MeasurementReport.from_sequence([ds])
            groups = [*report.get_planar_roi_measurement_groups(),
                      *report.get_volumetric_roi_measurement_groups(),
                      *report.get_image_measurement_groups()]
            rows = []
            for number, group in enumerate(groups, 1):
                tracking = _group_name(group) or f"Group {number}"
                finding = ""
                if getattr(group, "finding_type", None) is not None:
                    finding = str(group.finding_type.meaning)
                for m in group.get_measurements():
                    unit = m.unit.value if m.unit.scheme_designator == "UCUM" else m.unit.meaning
                    rows.append(Measurement(tracking, finding, str(m.name.meaning),
                                            f"{m.value:g}", "" if unit == "1" else str(unit)))
            return rows
    except Exception:  # a malformed TID 1500 still gets the generic walk
        return []


def _group_name(group: object) -> str:
    try:
        for item in group[0].ContentSequence:  # type: ignore[index]
            if _code_meaning(item.get("ConceptNameCodeSequence")) == "Tracking Identifier":
                return _text(item, "TextValue")
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return ""


def render_sr(path: Path) -> SrDocument:
    """Read a stored SR into an :class:`SrDocument` (text only; the template escapes it).

    Raises
    ------
    BadDataset
        The file cannot be read or is not an SR document.
    """
    ds = _read(path, whole=True)
    if str(ds.get("ValueType", "")).upper() != "CONTAINER":
        raise BadDataset("this SR has no document content")
    budget = [MAX_ITEMS]
    root = SrItem(kind="container", label=_concept(ds) or "Report")
    root.children = _walk(ds.get("ContentSequence", []), 1, budget)
    facts = [
        ("Patient", dicomtext.person_name(_text(ds, "PatientName"))),
        ("Patient ID", _text(ds, "PatientID") or "—"),
        ("Date", dicomtext.dicom_date(_text(ds, "ContentDate"))),
        ("Completion", _text(ds, "CompletionFlag").title() or "—"),
        ("Verification", _text(ds, "VerificationFlag").title() or "—"),
    ]
    for observer in ds.get("VerifyingObserverSequence", [])[:5]:
        name = dicomtext.person_name(_text(observer, "VerifyingObserverName"))
        org = _text(observer, "VerifyingOrganization")
        facts.append(("Verified by", f"{name}, {org}" if org else name))
    return SrDocument(title=root.label, facts=facts, measurements=_measurements(ds),
                      root=root, truncated=budget[0] <= 0)
