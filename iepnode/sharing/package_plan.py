"""Planning a download package: the zip layout of its generated and stored members.

:func:`build_package` reads the members' headers for the DICOMDIR
(:func:`storage.fileset.plan_fileset`), decodes one frame per series for the previews,
finds the PDF of each Encapsulated PDF instance inside its stored file, renders the
transaction's attachments, and lays the zip out with the stored files' cached CRCs.
What a package holds, and why planning is deterministic, is told in
:mod:`iepnode.sharing.package` (with the types used here).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, EncapsulatedPDFStorage, generate_uid

from iepnode.sharing import pdi
from iepnode.sharing.package import (
    DICOM_FOLDER,
    AttachedFile,
    ChecksumSource,
    NothingReadable,
    Package,
    PackageSource,
    StoredFile,
    fingerprint,
)
from iepnode.sharing.previews import placeholder_jpeg, preview_jpeg
from iepnode.sharing.zipstream import FileSlice, Member, ZipLayout, file_crc32
from storage.fileset import NoUsableMember, PlannedFile, plan_fileset
from storage.models import Series, Study

log = logging.getLogger("iepnode.package")

#: Record types whose series get a "report" placeholder instead of an image preview.
_DOCUMENTS = {"SR DOCUMENT": "Report", "ENCAP DOC": "Document", "KEY OBJECT DOC": "Key images"}


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
