"""What a staged upload file holds: DICOM objects, a DICOMDIR, a zip, or a document.

A patient uploads files from a CD, a folder or a zip. Each file, once whole in the
staging area, is inspected (:func:`inspect_staged_file`) so the upload page can show
a check mark or why it is skipped, and so staff see which patients and studies an
upload holds. Release walks the same files with the same code (:func:`scan_file`
with a callback) and hands every object over for reconciliation and ingest.

What is accepted
----------------
* a DICOM object (any SOP class, any transfer syntax; Part-10 or a raw dataset as old
  CDs hold), proved whole by walking every element
  (:func:`iepnode.archive.object_check.check_complete`);
* a DICOMDIR (it lists the other files; it is no instance itself);
* a zip of those, folders nested (read entry by entry, never extracted: each entry is
  copied in 1 MiB blocks to an unnamed temporary file in the upload's staging folder
  and checked from there, so memory stays flat whatever its size; ``..``/absolute
  entries, links and encrypted entries are refused; the number of entries, the
  expanded total and each entry's compression ratio are limited, the bytes counted as
  they come out);
* a PDF, a JPEG or a PNG uploaded as a file of its own (wrapped as DICOM at release).
  Inside a zip only DICOM is taken: a CD's viewer software is full of images.

Everything else is skipped with a reason: an empty file, a file named ``.dcm`` that is
not DICOM, an unsupported type, a truncated or malformed object.
"""

from __future__ import annotations

import functools
import logging
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iepnode.archive import dicomdir_refs, import_sources, object_check
from iepnode.archive.ingest import parse_header, record_from_header
from iepnode.archive.limits import DEFAULT_LIMITS, ZipLimits, archive_problem
from iepnode.archive.reconciliation import PatientIdentity
from iepnode.errors import BadDataset, NodeError, OutOfResources
from storage.index import InstanceRecord

log = logging.getLogger("iepnode.upload")

#: Kinds of accepted files.
DICOM, DICOMDIR, ZIP, PDF, JPEG, PNG = "dicom", "dicomdir", "zip", "pdf", "jpeg", "png"
SKIPPED = "skipped"
DOCUMENT_KINDS = (PDF, JPEG, PNG)
_MAGIC = ((b"%PDF-", PDF), (b"\xff\xd8\xff", JPEG), (b"\x89PNG\r\n\x1a\n", PNG))
_MAX_REASON = 300


@dataclass(frozen=True)
class FoundObject:
    """One object found in a staged file (a DICOM instance or a document).

    Attributes
    ----------
    name : str
        Display name: the file's, or ``file > entry`` inside a zip.
    kind : str
        :data:`DICOM`, :data:`PDF`, :data:`JPEG` or :data:`PNG`.
    record : InstanceRecord or None
        The DICOM header values (``None`` for documents).
    """

    name: str
    kind: str
    record: InstanceRecord | None = None

    @property
    def patient(self) -> PatientIdentity | None:
        """The patient identity the object carries (``None`` for documents)."""
        r = self.record
        if r is None:
            return None
        return PatientIdentity(r.patient_id, r.issuer, r.patient_name, r.birth_date, r.sex)


@dataclass(frozen=True)
class StudyFound:
    """A study seen in a file: enough for staff to recognise it."""

    study_uid: str
    patient_key: str
    study_date: str = ""
    description: str = ""
    modalities: str = ""
    objects: int = 0


@dataclass
class FileVerdict:
    """What one staged file holds, as shown to the uploader and to staff.

    Attributes
    ----------
    kind : str
        :data:`DICOM`, :data:`DICOMDIR`, :data:`ZIP`, a document kind, or :data:`SKIPPED`.
    reason : str
        Why the file is skipped (empty when accepted); for a DICOMDIR what it is.
    objects : int
        DICOM objects (or documents) found.
    patients : list of PatientIdentity
        Distinct patient identities found in the objects (the originals).
    studies : list of StudyFound
        Studies found.
    skipped : list of (str, str)
        Entries of a zip that are skipped or refused, with the reason.
    """

    kind: str
    reason: str = ""
    objects: int = 0
    patients: list[PatientIdentity] = field(default_factory=list)
    studies: list[StudyFound] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """Whether anything in the file will be imported (or, a DICOMDIR, used)."""
        return self.kind != SKIPPED

    @property
    def label(self) -> str:
        """One line for the upload page: ``"12 DICOM objects"`` or ``"skipped: ..."``."""
        if not self.accepted:
            return f"skipped: {self.reason}"
        if self.kind == DICOMDIR:
            return "DICOMDIR (index of the other files)"
        if self.kind in DOCUMENT_KINDS:
            return f"{self.kind.upper()} document"
        noun = "DICOM object" if self.objects == 1 else "DICOM objects"
        more = f", {len(self.skipped)} entries skipped" if self.skipped else ""
        return f"{self.objects} {noun}{more}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (store it with the upload file)."""
        return {"kind": self.kind, "reason": self.reason, "objects": self.objects,
                "patients": [asdict(p) for p in self.patients],
                "studies": [asdict(s) for s in self.studies],
                "skipped": [list(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileVerdict:
        """Read back :meth:`to_dict`."""
        return cls(data["kind"], data.get("reason", ""), int(data.get("objects", 0)),
                   [PatientIdentity(**p) for p in data.get("patients", [])],
                   [StudyFound(**s) for s in data.get("studies", [])],
                   [(str(a), str(b)) for a, b in data.get("skipped", [])])


def patient_key(patient: PatientIdentity | None) -> str:
    """A stable key of an original patient identity (ID, issuer, name, birth date).

    Documents (no identity) have the key ``""``.
    """
    if patient is None:
        return ""
    name = " ".join(patient.name.upper().replace("^", " ").split())
    return "|".join((patient.patient_id, patient.issuer, name, patient.birth_date))


#: ``on_object(found, payload, transfer_syntax)``: the encoded dataset (no File Meta)
#: and its transfer syntax, or a document's bytes and ``""``.
ObjectCallback = Callable[[FoundObject, memoryview, str], None]


def _reason(text: str) -> str:
    return " ".join(str(text).split())[:_MAX_REASON]


def _document_kind(head: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _zip_problem(path: Path, archive: zipfile.ZipFile, limits: ZipLimits) -> str | None:
    """Why a whole zip is refused before any entry is read, or ``None``."""
    return archive_problem(archive.infolist(), path.stat().st_size, limits)


class _Scan:
    """Accumulates a verdict while objects are found."""

    def __init__(self, on_object: ObjectCallback | None) -> None:
        self.on_object = on_object
        self.objects = 0
        self.patients: dict[str, PatientIdentity] = {}
        self.studies: dict[str, dict[str, Any]] = {}

    def found(self, obj: FoundObject, payload: memoryview, syntax: str) -> None:
        self.objects += 1
        rec = obj.record
        if rec is not None:
            patient = obj.patient
            assert patient is not None
            key = patient_key(patient)
            self.patients.setdefault(key, patient)
            study = self.studies.setdefault(rec.study_uid, {
                "study_uid": rec.study_uid, "patient_key": key, "study_date": rec.study_date,
                "description": rec.study_description, "modalities": set(), "objects": 0})
            study["objects"] += 1
            if rec.modality:
                study["modalities"].add(rec.modality)
        if self.on_object is not None:
            self.on_object(obj, payload, syntax)

    def verdict(self, kind: str, skipped: list[tuple[str, str]]) -> FileVerdict:
        studies = [StudyFound(**{**s, "modalities": "\\".join(sorted(s["modalities"]))})
                   for s in self.studies.values()]
        return FileVerdict(kind, "", self.objects, list(self.patients.values()), studies,
                           skipped)


#: The header values of an object (its elements up to group 0020) are read from its
#: first MiB, else from its first :data:`MAX_HEADER` bytes; a longer header is refused.
MAX_HEADER = 16 << 20


def _dicom_object(name: str, stream: memoryview, syntax: str) -> FoundObject:
    """Read the header values of a validated object (the first MiB is normally enough).

    Only a bounded head is copied (a deflated dataset is inflated by the parser only
    as far as it reads). A head cut inside the header parses short (the values are
    missing) or not at all: then a longer head, up to :data:`MAX_HEADER`.
    """
    for size in (1 << 20, MAX_HEADER):
        head = stream[:size]
        whole = len(head) == len(stream)
        try:
            header = parse_header(bytes(head), syntax)
            return FoundObject(name, DICOM, record_from_header(header, syntax, "UPLOAD"))
        except BadDataset as exc:
            if whole:
                raise
            if size == MAX_HEADER:
                raise BadDataset(f"no readable header in its first {MAX_HEADER} bytes "
                                 f"({exc})") from exc
        finally:
            head.release()
    raise AssertionError("unreachable")


def _scan_sources(sources: list[import_sources.Source], scan: _Scan,
                  report: import_sources.ImportReport, spool_dir: Path) -> None:
    for source in sources:
        try:
            with object_check.open_object(source, report, spool_dir) as loaded:
                if loaded is not None:
                    stream, syntax = loaded
                    scan.found(_dicom_object(source.name, stream, syntax), stream, syntax)
        except OutOfResources:
            raise
        except NodeError as exc:
            report.refuse(source.name, str(exc))
            continue
        except zipfile.BadZipFile as exc:
            report.refuse(source.name, f"corrupt zip entry: {exc}")
            continue
        except OSError as exc:
            report.refuse(source.name, f"cannot read: {exc.strerror or exc}")
            continue
        except (ValueError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
            report.refuse(source.name, f"unreadable: {exc}")


def _scan_zip(path: Path, display_name: str, scan: _Scan, limits: ZipLimits) -> FileVerdict:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return FileVerdict(SKIPPED, _reason(f"corrupt zip: {exc}"))
    with archive:
        problem = _zip_problem(path, archive, limits)
        if problem is not None:
            return FileVerdict(SKIPPED, problem)
        report = import_sources.ImportReport()
        try:
            sources = import_sources._zip_sources(archive, report)
        except BadDataset as exc:
            return FileVerdict(SKIPPED, _reason(str(exc)))
        for source in sources:
            if source.name.lower().endswith(".zip"):
                report.skip(source.name, "a zip inside a zip is not opened")
        sources = [s for s in sources if not s.name.lower().endswith(".zip")]
        _scan_sources(sources, scan, report, path.parent)
    skipped = [(f"{display_name} > {n}", _reason(r))
               for n, r in [*report.rejected, *report.skipped]
               if not r.startswith("DICOMDIR (file-set directory)")]
    if scan.objects == 0:
        verdict = FileVerdict(SKIPPED, "no DICOM objects in the zip")
        verdict.skipped = skipped
        return verdict
    return scan.verdict(ZIP, skipped)


def _scan_single(path: Path, display_name: str, size: int, scan: _Scan) -> FileVerdict:
    with open(path, "rb") as fh:
        head = fh.read(132)
        kind = _document_kind(head)
        if kind is not None:
            return _scan_document(fh, display_name, kind, size, scan)
    source = import_sources.Source(display_name, size, functools.partial(path.open, "rb"),
                                   path=path)
    report = import_sources.ImportReport()
    _scan_sources([source], scan, report, path.parent)
    if scan.objects:
        return scan.verdict(DICOM, [])
    for _, reason in report.skipped:
        if reason.startswith("DICOMDIR"):
            return _dicomdir_verdict(path)
    reasons = [r for _, r in [*report.rejected, *report.skipped]]
    reason = reasons[0] if reasons else "not DICOM"
    if reason.startswith("not DICOM"):
        reason = "not DICOM, a zip, a PDF, a JPEG or a PNG (unsupported type)"
    return FileVerdict(SKIPPED, _reason(reason))


def _dicomdir_verdict(path: Path) -> FileVerdict:
    try:
        refs = dicomdir_refs.read_dicomdir(str(path))
    except BadDataset as exc:
        return FileVerdict(SKIPPED, _reason(str(exc)))
    return FileVerdict(DICOMDIR, f"directory of {len(refs)} files")


def _scan_document(fh: Any, display_name: str, kind: str, size: int,
                   scan: _Scan) -> FileVerdict:
    from iepnode.viewing import image_wrapping, wrapping  # the limits of what release can wrap

    limit = wrapping.MAX_PDF_BYTES if kind == PDF else image_wrapping.MAX_IMAGE_BYTES
    if size > limit:
        return FileVerdict(SKIPPED, f"{kind.upper()} of {size} bytes is larger than the "
                                    f"{limit}-byte limit for documents")
    if kind == PDF:
        fh.seek(max(size - 2048, 0))
        if b"%%EOF" not in fh.read():
            return FileVerdict(SKIPPED, "PDF is truncated (no %%EOF marker)")
    else:
        fh.seek(0)
        problem = _image_problem(fh, image_wrapping.MAX_IMAGE_PIXELS)
        if problem:
            return FileVerdict(SKIPPED, f"{kind.upper()} cannot be read: {problem}")
    # Only a release needs the bytes (to wrap them): an inspection reads the tail of a
    # PDF, and an image's header, never the whole file.
    payload = memoryview(b"")
    if scan.on_object is not None:
        fh.seek(0)
        payload = memoryview(fh.read())
    scan.found(FoundObject(display_name, kind), payload, "")
    return FileVerdict(kind, "", 1)


def _image_problem(source: Any, max_pixels: int) -> str:
    """Why an image file cannot be used, or ``""`` (header and structure checked by
    Pillow from the open file, no pixels decoded)."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > max_pixels:
                return f"{width} x {height} pixels, more than {max_pixels} (decompression bomb?)"
            image.verify()
    except Exception as exc:  # Pillow raises many kinds on broken images
        return _reason(str(exc)) or type(exc).__name__
    return ""


def scan_file(
    path: Path,
    display_name: str,
    *,
    on_object: ObjectCallback | None = None,
    limits: ZipLimits = DEFAULT_LIMITS,
) -> FileVerdict:
    """Inspect one staged file and hand each object it holds to ``on_object``.

    Parameters
    ----------
    path : Path
        The staged file (server-chosen name).
    display_name : str
        What the uploader called it (shown, never used on disk).
    on_object : callable, optional
        Called for every object found, in order (see :data:`ObjectCallback`).
        Exceptions it raises propagate (an :class:`OutOfResources` stops a release).
    limits : ZipLimits, optional
        Zip limits.

    Returns
    -------
    FileVerdict
        What the file holds, or why it is skipped.
    """
    scan = _Scan(on_object)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            size = path.stat().st_size
            if size == 0:
                return FileVerdict(SKIPPED, "empty file (0 bytes)")
            with open(path, "rb") as fh:
                head = fh.read(132)
            if head[128:132] != b"DICM" and head.startswith(b"PK") and zipfile.is_zipfile(path):
                return _scan_zip(path, display_name, scan, limits)
            if head.startswith(b"PK\x03\x04") or display_name.lower().endswith(".zip"):
                return FileVerdict(SKIPPED, "looks like a zip but cannot be read (truncated "
                                            "or corrupt)")
            return _scan_single(path, display_name, size, scan)
        except OSError as exc:
            return FileVerdict(SKIPPED, _reason(f"cannot read: {exc.strerror or exc}"))
        finally:
            for warning in caught:
                log.info("upload: %s: %s", display_name, warning.message)


def inspect_staged_file(path: Path, display_name: str, relpath: str = "",
                        *, limits: ZipLimits = DEFAULT_LIMITS) -> FileVerdict:
    """Tell what a staged upload file holds (called when the file is whole).

    Parameters
    ----------
    path : Path
        The staged file, ``DATA_DIR/staging/<key>/<server name>``.
    display_name : str
        The uploader's file name (display only).
    relpath : str, optional
        The uploader's folder path of the file (display only; a DICOMDIR's references
        are matched against these at intake).
    limits : ZipLimits, optional
        Zip limits (tests lower them).

    Returns
    -------
    FileVerdict
        ``accepted``, ``kind``, ``label`` for the page; ``patients`` and ``studies``
        found; ``reason`` when skipped. Never raises for bad content.
    """
    verdict = scan_file(path, display_name, limits=limits)
    log.info("upload file %s (%s): %s", display_name, relpath, verdict.label)
    return verdict
