"""Attaching a file to a transaction: wrapped as DICOM, kept in the file store, recorded.

The file is wrapped (:mod:`iepnode.viewing.wrapping`) with the patient and study
attributes of the index and kept under a generated key; the row, the thread message
and the audit event are written in one database transaction, in which the count
against the transaction's limit is decided again (what an attachment is:
:mod:`iepnode.viewing.attachments`). Nothing is stored when the file is refused.
"""

from __future__ import annotations

import logging
import time

from iepnode.archive.ingest import (
    file_meta_bytes,
    is_disk_full,
    parse_header,
    record_from_header,
)
from iepnode.errors import Gone, InvalidRequest, NotFound, OutOfResources
from iepnode.people import audit
from iepnode.viewing import wrapped_object, wrapping
from iepnode.viewing.attachments import (
    DEFAULT_MAX_ATTACHMENTS,
    MAX_UPLOAD_BYTES,
    SOURCE_AE,
    _count,
    _too_many,
    study_choices,
)
from storage.db import is_sqlite, write_transaction
from storage.filestore import FileStore
from storage.models import (
    Attachment,
    Patient,
    Study,
    Transaction,
    TransactionMessage,
    database_proxy,
)

log = logging.getLogger("iepnode.attachments")


def _targets(transaction: Transaction, study_uid: str) -> tuple[wrapped_object.PatientInfo,
                                                              wrapped_object.StudyInfo]:
    """Patient and study attributes of the chosen study, from the index."""
    choices = study_choices(transaction)
    if not choices:
        raise Gone("The images of this transaction are no longer stored.")
    if not study_uid:
        if len(choices) > 1:
            raise InvalidRequest("This transaction has several studies: choose the study the "
                                 "file belongs to.")
        study_uid = choices[0].study_uid
    if study_uid not in {c.study_uid for c in choices}:
        raise NotFound("no such study in this transaction")
    study = Study.select(Study, Patient).join(Patient).where(Study.study_uid == study_uid).get()
    patient = study.patient
    return (
        wrapped_object.PatientInfo(patient.name, patient.patient_id, patient.issuer,
                             patient.birth_date, patient.sex),
        wrapped_object.StudyInfo(study.study_uid, study.study_date, study.study_time,
                           study.accession, study.study_id, study.description,
                           study.referring_physician),
    )


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    return f"{max(1, round(size / 1024))} KB"


def _put(store: FileStore, header: bytes, stream: bytes) -> str:
    try:
        key, _ = store.put((header, stream))
    except OSError as exc:
        reason = "disk full" if is_disk_full(exc) else f"write failed: {exc}"
        raise OutOfResources(reason) from exc
    return key


def _lock(transaction: Transaction) -> None:
    """Lock the transaction's row until the database transaction ends (PostgreSQL).

    SQLite needs nothing: its writers are serialised (``BEGIN IMMEDIATE``).
    """
    if not is_sqlite(database_proxy.obj):
        Transaction.select(Transaction.id).where(Transaction.id == transaction.id) \
            .for_update().get()


def add(
    store: FileStore,
    transaction: Transaction,
    *,
    data: bytes,
    original_name: str,
    title: str,
    study_uid: str,
    actor: audit.Actor,
    author_label: str,
    max_attachments: int = DEFAULT_MAX_ATTACHMENTS,
    now: float | None = None,
) -> Attachment:
    """Wrap one attached file, keep it in the file store for ``transaction``, record it.

    The wrapped object is not indexed: it is no instance of the study until staff file
    it (:func:`file_into_study`). The count against ``max_attachments`` is taken in
    the transaction that inserts the row, with the transaction's row locked
    (PostgreSQL ``FOR UPDATE``; SQLite writers are serialised), so simultaneous
    uploads cannot pass it.

    Parameters
    ----------
    store : FileStore
        Where the wrapped object is kept (under a generated key).
    transaction : Transaction
        The transaction it is attached to (access already checked by the caller).
    data : bytes
        The uploaded file.
    original_name, title : str
        The uploader's file name and an optional title.
    study_uid : str
        The study it is about ('' when the transaction has one study).
    actor : audit.Actor
        Who attaches it: ``staff`` (username) or ``recipient`` (email).
    author_label : str
        The name shown in the message thread.
    max_attachments : int, optional
        Most attachments the transaction may have (``[portal] max_attachments``).
    now : float, optional
        The time (default now).

    Returns
    -------
    Attachment
        The new row.

    Raises
    ------
    wrapped_object.AttachmentRefused
        Not a PDF/JPEG/PNG, too large or damaged, or the transaction has
        ``max_attachments`` already (nothing stored).
    InvalidRequest
        No study chosen when there are several.
    NotFound
        The study is not one of the transaction's.
    Gone
        The transaction's images are no longer stored.
    OutOfResources
        The file could not be written (nothing is left behind).
    """
    now = time.time() if now is None else now
    if max_attachments <= 0:
        raise wrapped_object.AttachmentRefused("Files cannot be attached on this server.")
    if _count(transaction) >= max_attachments:  # early answer; decided again below
        raise _too_many(max_attachments)
    if len(data) > MAX_UPLOAD_BYTES:
        raise wrapped_object.AttachmentRefused(
            f"The file is {_size(len(data))}; the largest accepted is "
            f"{_size(MAX_UPLOAD_BYTES)}.")
    if not data:
        raise wrapped_object.AttachmentRefused("The file is empty.")
    patient, study = _targets(transaction, study_uid)
    title = title.strip()[:64]
    name = "".join(c for c in original_name if c.isprintable()).strip()[:255]
    ds = wrapping.wrap_file(data, patient, study=study, title=title, original_name=name)
    stream, transfer_syntax = wrapping.encode_dataset(ds)
    # What filing will ingest later must be ingestible: check it now, not then.
    record = record_from_header(parse_header(stream, transfer_syntax), transfer_syntax,
                                SOURCE_AE)
    key = _put(store, file_meta_bytes(record.sop_class, record.sop_uid, transfer_syntax,
                                      SOURCE_AE), stream)
    kind = wrapped_object.sniff(data) or ""
    shown_title = str(ds.get("DocumentTitle", "") or ds.get("SeriesDescription", ""))
    try:
        with write_transaction():
            _lock(transaction)
            if _count(transaction) >= max_attachments:
                raise _too_many(max_attachments)
            row = Attachment.create(
                transaction=transaction.id, study_uid=study.study_uid, sop_uid=record.sop_uid,
                sop_class=record.sop_class, title=shown_title[:64], original_name=name,
                media_type=wrapped_object.MEDIA_TYPES.get(kind, ""), size_bytes=len(data),
                author_kind=actor.kind, author=actor.name[:254], created_at=now, key=key)
            TransactionMessage.create(
                transaction=transaction.id, author_kind=actor.kind, author=author_label[:128],
                body=(f"Attached {'a document' if kind == 'pdf' else 'an image'}: "
                      f"\u201c{shown_title}\u201d ({kind.upper()}, {_size(len(data))})."),
                created_at=now, read_by_recipient=actor.kind == "recipient")
            audit.record(audit.INSTANCES_TRANSFERRED, "attachment-add", actor,
                         patient_id=patient.patient_id, study_uid=study.study_uid,
                         transaction=transaction.public_id,
                         detail=(f"{kind} {len(data)} bytes as {ds.SOPClassUID.name} "
                                 f"{record.sop_uid}, held by the transaction (not filed)"),
                         now=now)
    except BaseException:
        store.remove(key)
        raise
    log.info("attachment %s (%s, %d bytes) added to %s by %s %s (held, not filed)",
             record.sop_uid, kind, len(data), transaction.public_id, actor.kind, actor.name)
    return row


def closed_for_recipient(transaction: Transaction, now: float | None = None) -> str:
    """Why the recipient cannot attach files now ('' if they can)."""
    from iepnode.sharing.downloads import unavailable_reason

    return unavailable_reason(transaction, time.time() if now is None else now) or ""


__all__ = [
    "add",
    "closed_for_recipient",
]
