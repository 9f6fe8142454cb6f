"""The download package: one zip a viewer, a PACS or a CD burner takes as it is.

Layout (IHE RAD TF PDI; DICOM PS3.10 and PS3.12 Annex V, General Purpose media)::

    DICOMDIR                       one file-set for all studies of the transaction
    README.TXT                     what is inside, who sent it, how to open it
    INDEX.HTM                      offline overview: patient, studies, reports
    IHE_PDI/STUDY001.HTM           a study's series, one JPEG preview each
    IHE_PDI/IMG00001.JPG
    REPORTS/RPT00001.PDF           the PDF of each Encapsulated PDF instance
    DICOM/PT000000/ST000000/SE000000/IM000000 ...   the stored files, byte for byte
    ATTACHED/ATT00001.PDF          files added to the transaction by its recipient or
    ATTACHED/ATT00002.PNG          staff and not filed into the study (issue 13): the
                                   document, or the picture as PNG; no DICOM, not in the
                                   DICOMDIR, README.TXT says who added each

Every name is generated (8.3 upper case, DICOM File IDs of 1-8 characters, no
extensions); none comes from a DICOM value. There are no executables.

A package is *planned*, not written: :func:`build_package` reads the members'
headers for the DICOMDIR, decodes one frame per series for the previews, and lays
the zip out (:class:`~iepnode.sharing.zipstream.ZipLayout`) with the stored files' cached
CRCs; the small generated members live in memory, the instances are read from the
store while streaming. Planning is deterministic: the same stored files give the
same bytes (the DICOMDIR's SOP Instance UID is derived from the inputs, times come
from the transaction), so a resumed download matches the first one even when it
is served by another process or after a restart. :class:`PackageCache` keeps
recent plans so a resume does not plan again.

One bad stored file does not break a package: the plan leaves out every instance
whose file :func:`storage.stored_file.read_instance_header` finds unusable
(missing, unreadable, empty, not DICOM, cut short), logs a warning for each,
lists them in README.TXT (series, image number, SOP Instance UID, the reason in
plain words) and says so on INDEX.HTM; :attr:`Package.left_out` carries them to
the download's audit event. The files' sizes, modification times and readability
are part of the plan's fingerprint, so a file damaged after a plan was cached is
planned again at the next request. A file damaged after the plan, while its
bytes are being streamed, ends the stream with an error (the reader sees a broken
download, never wrong bytes: its size no longer matches, and a changed content
no longer matches the CRC-32 in the zip).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, EncapsulatedPDFStorage, generate_uid

from iepnode import __version__
from iepnode.sharing import pdi
from iepnode.sharing.previews import placeholder_jpeg, preview_jpeg
from iepnode.sharing.zipstream import FileSlice, Member, ZipLayout, file_crc32
from storage.fileset import NoUsableMember, PlannedFile, plan_fileset
from storage.models import Instance, Patient, Series, Study

log = logging.getLogger("iepnode.package")

#: Bumped whenever the package's layout or generated content changes.
FORMAT = "iepnode-pdi-zip-1"
#: Folder of the DICOM files (a File ID component).
DICOM_FOLDER = "DICOM"
#: Record types whose series get a "report" placeholder instead of an image preview.
_DOCUMENTS = {"SR DOCUMENT": "Report", "ENCAP DOC": "Document", "KEY OBJECT DOC": "Key images"}
#: Left-out instances named one by one in the audit detail (the rest are counted).
AUDIT_LEFT_OUT = 20

#: ``crcs_of(files)``: the CRC-32 of each ``(key, path)`` by key
#: (:func:`iepnode.sharing.checksums.crcs_for`).
ChecksumSource = Callable[[Sequence[tuple[str, Path]]], Mapping[str, int]]


class NothingReadable(Exception):
    """None of a package's stored files can be read: there is nothing to download.

    Attributes
    ----------
    left_out : list of LeftOutEntry
        Every instance, and why it cannot be read.
    """

    def __init__(self, left_out: list[pdi.LeftOutEntry]) -> None:
        super().__init__(f"none of the {len(left_out)} stored files can be read")
        self.left_out = left_out


@dataclass(frozen=True)
class PackageSource:
    """What a package is made of and says about itself.

    Attributes
    ----------
    reference : str
        The transaction's public ID (``IEP...``), or ``""`` for a study export.
    study_uids : tuple of str
        Studies to include, in the transaction's order.
    institution : str
        The sending institution (``settings.institution``).
    created_at : float
        Time written into the zip and the pages (the transaction's creation time):
        fixed, so every copy of the package has the same bytes.
    patient_name, patient_id, birth_date, sex : str
        The patient, as the transaction recorded it.
    contact : tuple of str
        Lines telling whom to ask (README.TXT).
    filename : str
        Download name, e.g. ``IEP12345678.zip`` (generated, never from DICOM values).
    """

    reference: str
    study_uids: tuple[str, ...]
    institution: str
    created_at: float
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    contact: tuple[str, ...]
    filename: str
    #: Files only this transaction holds (not part of the hospital's record).
    attachments: tuple[AttachedFile, ...] = ()


@dataclass(frozen=True)
class AttachedFile:
    """A file added to a transaction and not filed into the study (``ATTACHED/``).

    Attributes
    ----------
    key : str
        File-store key of the wrapped DICOM object (never shipped as DICOM: a PACS
        importing the unzipped folder must not take it into the study).
    title : str
        The title the person who added it gave.
    media_type : str
        ``application/pdf``, ``image/jpeg`` or ``image/png``.
    added_by : str
        ``the recipient jane@example.org`` or ``staff Dr A. Smith``.
    added_at : float
        When (Unix time).
    """

    key: str
    title: str
    media_type: str
    added_by: str
    added_at: float


@dataclass(frozen=True)
class StoredFile:
    """A stored instance file to package, as the index and the file system see it now.

    Attributes
    ----------
    key, path : str, Path
        File-store key and path.
    size : int
        Current size in bytes; ``-1`` when the file cannot be found.
    study_uid, sop_uid : str
        The instance's study and SOP Instance UID.
    series_number, modality, instance_number : str
        As indexed (to name the instance when it is left out).
    mtime_ns : int
        Modification time (changes only if the file is damaged or replaced).
    readable : bool
        Whether this process may open the file for reading.
    """

    key: str
    path: Path
    size: int
    study_uid: str
    sop_uid: str = ""
    series_number: str = ""
    modality: str = ""
    instance_number: str = ""
    mtime_ns: int = 0
    readable: bool = True

    def left_out(self, reason: str) -> pdi.LeftOutEntry:
        """This instance as README.TXT lists it when it is left out for ``reason``."""
        return pdi.LeftOutEntry(self.series_number, self.modality, self.instance_number,
                                self.sop_uid, reason)


@dataclass(frozen=True)
class Package:
    """A planned package: the zip layout and what the web and audit need to know.

    Attributes
    ----------
    layout : ZipLayout
        The archive; stream it with :meth:`ZipLayout.pieces`.
    etag : str
        Strong validator of the archive's bytes (hex digest of its content).
    filename : str
        Download name.
    instances : int
        DICOM files inside.
    study_uids : tuple of str
        Studies that are inside.
    patient_id : str
        For the audit trail.
    left_out : tuple of LeftOutEntry
        Instances left out because their stored files cannot be read.
    """

    layout: ZipLayout
    etag: str
    filename: str
    instances: int
    study_uids: tuple[str, ...]
    patient_id: str
    left_out: tuple[pdi.LeftOutEntry, ...] = ()

    def left_out_text(self, limit: int = AUDIT_LEFT_OUT) -> str:
        """The left-out instances for an audit detail (``""`` when none)."""
        if not self.left_out:
            return ""
        named = ", ".join(f"{e.sop_uid} ({e.reason})" for e in self.left_out[:limit])
        more = f" and {len(self.left_out) - limit} more" if len(self.left_out) > limit else ""
        return f"left out {len(self.left_out)} unreadable instances: {named}{more}"

    @property
    def size(self) -> int:
        """Size of the zip in bytes."""
        return self.layout.size


def stored_files(study_uids: Sequence[str], path_of: Callable[[str], Path]) -> list[StoredFile]:
    """Return the stored files of the studies that are still indexed, in index order.

    A file that is missing or cannot be read is returned too (``size`` ``-1``,
    ``readable`` ``False``): the plan leaves it out and says why.

    Parameters
    ----------
    study_uids : sequence of str
        The studies.
    path_of : callable
        The file store's key -> path function.
    """
    rows = (Instance.select(Instance.key, Study.study_uid, Instance.sop_uid,
                            Series.series_number, Series.modality, Instance.instance_number)
            .join(Series).join(Study)
            .where(Study.study_uid.in_(list(study_uids)))
            .order_by(Study.id, Series.id, Instance.id).tuples())
    order = {uid: i for i, uid in enumerate(study_uids)}
    files = []
    for key, study_uid, sop_uid, series_number, modality, instance_number in rows:
        path = path_of(key)
        try:
            st = os.stat(path)
            size, mtime_ns, readable = st.st_size, st.st_mtime_ns, os.access(path, os.R_OK)
        except OSError:
            size, mtime_ns, readable = -1, 0, False
        files.append(StoredFile(key, path, size, study_uid, sop_uid, series_number, modality,
                                instance_number, mtime_ns, readable))
    files.sort(key=lambda f: order.get(f.study_uid, len(order)))  # stable: keeps index order
    return files


def fingerprint(source: PackageSource, files: Sequence[StoredFile]) -> str:
    """Digest of everything a package is built from (the cache key of its plan).

    Store keys name immutable files, so keys, sizes and modification times stand
    for the content (a damaged file changes them); whether each file can be read
    is part of it too, as are the versions of the code that renders the package.
    """
    import PIL
    import pydicom

    digest = hashlib.sha256()
    for part in (FORMAT, __version__, pydicom.__version__, PIL.__version__, repr(source)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    for f in files:
        digest.update(f"{f.key}:{f.size}:{f.mtime_ns}:{int(f.readable)}:{f.study_uid}\0"
                      .encode())
    return digest.hexdigest()


# -- building ---------------------------------------------------------------------------


def _document_slice(path: Path, key: str) -> tuple[bytes | FileSlice, str] | None:
    """Where the PDF of an Encapsulated PDF instance lies in its file, and its title.

    The document is not copied: the package reads it from the stored file (``key``,
    at ``path``). Only a deflated file (whose offsets are those of the inflated
    stream) is read into memory.
    """
    ds = dcmread(path, defer_size=1024)
    title = str(ds.get("DocumentTitle", "") or "")
    if "EncapsulatedDocument" not in ds:
        return None
    raw = ds.get_item(0x00420011)
    declared = ds.get("EncapsulatedDocumentLength")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax == DeflatedExplicitVRLittleEndian or getattr(raw, "value", None) is not None:
        data = bytes(ds.EncapsulatedDocument)
        length = int(declared) if declared and int(declared) <= len(data) else len(data)
        if not declared and data.endswith(b"\0"):
            length -= 1
        return data[:length], title
    length = int(raw.length)
    if declared and int(declared) <= length:
        length = int(declared)
    elif length:
        with open(path, "rb") as fh:
            fh.seek(raw.value_tell + length - 1)
            if fh.read(1) == b"\0":
                length -= 1
    return FileSlice(path, raw.value_tell, length, key), title


def _series_rows(uids: set[str]) -> dict[str, Series]:
    return {s.series_uid: s for s in Series.select().where(Series.series_uid.in_(list(uids)))}


def _study_rows(uids: Sequence[str]) -> dict[str, Study]:
    return {s.study_uid: s for s in Study.select().where(Study.study_uid.in_(list(uids)))}


def _attached_members(attached: Sequence[AttachedFile], path_of: Callable[[str], Path],
                      ) -> tuple[list[Member], list[pdi.AttachedEntry]]:
    """The ``ATTACHED/`` members: each PDF as it was, each picture as a PNG.

    A file that cannot be read is left out (logged), the rest of the package is not.
    """
    from iepnode.viewing.rendering import RenderError, render_bytes

    members: list[Member] = []
    entries: list[pdi.AttachedEntry] = []
    for item in attached:
        number = len(members) + 1
        try:
            path = path_of(item.key)
            if item.media_type == "application/pdf":
                found = _document_slice(path, item.key)
                if found is None:
                    raise ValueError("no encapsulated document")
                doc = found[0]
                name = f"ATTACHED/ATT{number:05d}.PDF"
                crc = (file_crc32(doc.path, doc.offset, doc.size) if isinstance(doc, FileSlice)
                       else Member.of_bytes(name, doc).crc32)
                members.append(Member(name, doc, crc))
            else:
                name = f"ATTACHED/ATT{number:05d}.PNG"
                members.append(Member.of_bytes(name, render_bytes(path,
                                                                  media_type="image/png")))
        except (OSError, ValueError, RenderError, AttributeError, KeyError) as exc:
            log.warning("attachment %s left out of the package: %s", item.key, exc)
            continue
        entries.append(pdi.AttachedEntry(name, item.title, item.added_by, item.added_at))
    return members, entries


def build_package(source: PackageSource, files: Sequence[StoredFile], crcs_of: ChecksumSource,
                  key: str | None = None, path_of: Callable[[str], Path] | None = None,
                  ) -> Package:
    """Plan the package of ``files`` (see the module docstring for the layout).

    Parameters
    ----------
    source : PackageSource
        What the package is and says.
    files : sequence of StoredFile
        The instances (:func:`stored_files`).
    crcs_of : callable
        Gives the CRC-32 of ``(key, path)`` pairs by key
        (:func:`iepnode.sharing.checksums.crcs_for`); asked only for the files the package
        holds, after their headers were checked.
    key : str, optional
        :func:`fingerprint` of the inputs, if already computed.
    path_of : callable, optional
        The file store's key -> path function; needed when ``source.attachments``
        is not empty.

    Raises
    ------
    NothingReadable
        If there are files and none of them can be read.
    OSError
        If a file checked a moment ago cannot be read for its CRC-32.
    """
    key = key or fingerprint(source, files)
    by_path = {f.path: f for f in files}
    try:
        plan = plan_fileset([f.path for f in files],
                            fileset_id=(source.reference or "IEPNODE")[:16],
                            root=(DICOM_FOLDER,),
                            instance_uid=generate_uid(entropy_srcs=[key]))
    except NoUsableMember as exc:
        raise NothingReadable([by_path[m.path].left_out(m.reason) for m in exc.left_out]
                              ) from None
    left_out = [by_path[m.path].left_out(m.reason) for m in plan.left_out]
    for m in plan.left_out:
        stored = by_path[m.path]
        log.warning("package %s: left out instance %s of study %s (file %s): %s",
                    source.reference or source.study_uids[0], stored.sop_uid,
                    stored.study_uid, stored.key, m.reason)
    crcs = crcs_of([(by_path[p.path].key, p.path) for p in plan.files])
    series_rows = _series_rows({p.series_uid for p in plan.files if p.series_uid})
    study_rows = _study_rows(list(dict.fromkeys(p.study_uid for p in plan.files if p.study_uid)))

    generated: list[Member] = []
    reports: list[pdi.ReportEntry] = []
    report_members: list[Member] = []
    studies: list[pdi.StudyEntry] = []
    by_series: dict[str, list[PlannedFile]] = {}
    for planned in plan.files:
        by_series.setdefault(planned.series_uid, []).append(planned)
        if planned.sop_class == EncapsulatedPDFStorage:
            found = _document_slice(planned.path, by_path[planned.path].key)
            if found is not None:
                doc, title = found
                name = f"REPORTS/RPT{len(reports) + 1:05d}.PDF"
                crc = (file_crc32(doc.path, doc.offset, doc.size) if isinstance(doc, FileSlice)
                       else Member.of_bytes(name, doc).crc32)
                report_members.append(Member(name, doc, crc))
                reports.append(pdi.ReportEntry(name, title, planned.study_uid))

    previews: list[Member] = []
    study_index: dict[str, pdi.StudyEntry] = {}
    for series_uid, members in by_series.items():
        study_uid = members[0].study_uid
        if not series_uid or study_uid not in study_rows:
            continue  # top-level records (palettes...) have no series to show
        study = study_index.get(study_uid)
        if study is None:
            row = study_rows[study_uid]
            study = pdi.StudyEntry(row.study_date, row.study_time, row.description,
                                   row.accession, row.modalities.replace("\\", ", "),
                                   study_uid, f"IHE_PDI/STUDY{len(study_index) + 1:03d}.HTM")
            study_index[study_uid] = study
            studies.append(study)
        images = [m for m in members if m.record_type == "IMAGE"]
        name = f"IHE_PDI/IMG{len(previews) + 1:05d}.JPG"
        if images:
            jpeg = preview_jpeg(images[len(images) // 2].path)
        else:
            kind = _DOCUMENTS.get(members[0].record_type, members[0].record_type.title())
            jpeg = placeholder_jpeg(kind, "No picture: open it in a DICOM viewer"
                                    + (" or read the PDF in REPORTS" if reports else ""))
        previews.append(Member.of_bytes(name, jpeg))
        row = series_rows.get(series_uid)
        study.series.append(pdi.SeriesEntry(
            row.series_number if row else "", row.modality if row else "",
            row.description if row else "", len(members), name))

    attached_members: list[Member] = []
    attached: list[pdi.AttachedEntry] = []
    if source.attachments:
        if path_of is None:
            raise ValueError("path_of is needed to package attachments")
        attached_members, attached = _attached_members(source.attachments, path_of)
    contents = pdi.Contents(
        institution=source.institution, reference=source.reference,
        created_at=source.created_at, patient_name=source.patient_name,
        patient_id=source.patient_id, birth_date=source.birth_date, sex=source.sex,
        contact=source.contact, studies=studies, reports=reports,
        instances=len(plan.files), dicom_bytes=sum(by_path[p.path].size for p in plan.files),
        left_out=left_out,
        attached=attached,
    )
    generated.append(Member.of_bytes("DICOMDIR", plan.dicomdir))
    generated.append(Member.of_bytes("README.TXT", pdi.readme_txt(contents)))
    generated.append(Member.of_bytes("INDEX.HTM", pdi.index_htm(contents)))
    generated += [Member.of_bytes(s.page, pdi.study_htm(contents, s)) for s in studies]
    generated += previews
    dicom = [
        Member("/".join(p.file_id), FileSlice(p.path, 0, by_path[p.path].size,
                                              by_path[p.path].key),
               crcs[by_path[p.path].key])
        for p in plan.files
    ]
    layout = ZipLayout([*generated, *report_members, *dicom, *attached_members],
                       source.created_at)
    etag = _content_digest(layout, generated)
    log.info("package %s planned: %d instances, %d studies, %d bytes%s",
             source.reference or source.study_uids[0], len(dicom), len(studies), layout.size,
             f", {len(left_out)} unreadable left out" if left_out else "")
    return Package(layout, etag, source.filename, len(dicom),
                   tuple(dict.fromkeys(p.study_uid for p in plan.files if p.study_uid)),
                   source.patient_id, tuple(left_out))


def _content_digest(layout: ZipLayout, generated: Sequence[Member]) -> str:
    """A strong validator: the central directory (names, sizes, CRCs, offsets) plus the
    generated members' bytes in full (the stored files' keys are immutable)."""
    digest = hashlib.sha256()
    for piece in layout.pieces(layout.central_directory_offset):
        digest.update(piece if isinstance(piece, bytes) else b"")
    for member in generated:
        digest.update(hashlib.sha256(member.source if isinstance(member.source, bytes)
                                     else b"").digest())
    for member in layout.members:
        if isinstance(member.source, FileSlice):
            digest.update(os.fsencode(member.source.path) + b"\0")
    return digest.hexdigest()[:40]


class PackageCache:
    """Recently planned packages by :func:`fingerprint` (a resume does not plan again).

    Parameters
    ----------
    capacity : int
        Packages kept; a plan holds the generated members (DICOMDIR, pages,
        previews: well under a megabyte per hundred instances), never instance data.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Package] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get_or_build(self, key: str, build: Callable[[], Package]) -> Package:
        """Return the cached package for ``key`` or build it (once, if asked concurrently)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            package = build()
            with self._lock:
                self._items[key] = package
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._building.pop(key, None)
        return package


def source_for_study(study_uid: str, institution: str) -> PackageSource:
    """A :class:`PackageSource` for one stored study (``iepnode export UID``).

    Raises
    ------
    KeyError
        If no such study is indexed.
    """
    study = Study.select(Study, Patient).join(Patient).where(
        Study.study_uid == study_uid).first()
    if study is None:
        raise KeyError(study_uid)
    patient = study.patient
    return PackageSource(
        reference="", study_uids=(study_uid,), institution=institution,
        created_at=study.last_received, patient_name=patient.name,
        patient_id=patient.patient_id, birth_date=patient.birth_date, sex=patient.sex,
        contact=(institution,) if institution else (), filename=f"STUDY_{study.key}.zip",
    )
