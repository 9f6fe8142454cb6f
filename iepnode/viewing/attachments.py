"""Attachments: a PDF or picture added to a transaction by its recipient or by staff.

Held by the transaction that added it (issue 13)
    The file is wrapped as DICOM (:mod:`iepnode.viewing.wrapping`) with the patient and study
    attributes *of the index* (those of the images it would join) and kept in the file
    store under a generated key recorded on its :class:`~storage.models.Attachment`
    row. It is **not** an instance of the hospital's study: other transactions sharing
    the study (the source of a forwarded copy, other shares, other copies), C-FIND /
    C-MOVE / C-GET, DICOMweb, the study's file-set, sends and routing never see it.
    The adding transaction shows it, labelled with who added it and when, apart from
    the hospital's own reports: in its reports and attachments lists, its report view
    and its download (``ATTACHED/``, outside the DICOMDIR).

Staff decide
    An administrator or the transaction's hospital contact (:func:`may_file`) may file
    it into the patient's study: only then is it ingested through the node's normal
    ingest path (:class:`iepnode.archive.ingest.Ingester`) and becomes an ordinary instance,
    everywhere. The claim is one conditional ``UPDATE`` inside the transaction that
    ingests, so filing twice (or twice at once) files it once. Staff may also remove an
    attachment that is not filed. Both are audited and told in the thread.

Nothing is stored when the file is refused (wrong type, too large, damaged): the
wrapping happens before anything is written. Rows from before issue 13 have no key:
those files were ingested into the study when added and are left as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from iepnode.archive.ingest import (
    Ingester,
    file_meta_bytes,
    is_disk_full,
    parse_file_meta,
    parse_header,
    record_from_header,
)
from iepnode.errors import Gone, InvalidRequest, NotAuthorized, NotFound, OutOfResources
from iepnode.people import audit
from iepnode.viewing import wrapping
from storage.db import is_sqlite, write_transaction
from storage.filestore import FileStore
from storage.models import (
    Attachment,
    Patient,
    StaffUser,
    Study,
    Transaction,
    TransactionMessage,
    TransactionStudy,
    database_proxy,
)

log = logging.getLogger("iepnode.attachments")

#: Largest file accepted through the web form (the HTTP body limit of these routes).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Attachments one transaction may have unless told (``[portal] max_attachments``).
DEFAULT_MAX_ATTACHMENTS = 20
#: Source AE recorded in the index and File Meta for attached files.
SOURCE_AE = "IEPNODE-ATTACH"[:16]

#: Where an attachment is: held by its transaction, filed into the study by staff, or
#: added before issue 13 (then ingested into the study at once).
HELD, FILED, LEGACY = "held", "filed", "legacy"


@dataclass(frozen=True)
class StudyChoice:
    """A study of the transaction an attachment may join."""

    study_uid: str
    label: str


@dataclass(frozen=True)
class AttachmentEntry:
    """An attachment as lists show it: the row, who added it, and where it is now.

    Attributes
    ----------
    row : Attachment
        The database row.
    added_by : str
        Who added it, for a sentence "Added by ...": ``the recipient jane@example.org``
        or ``staff Dr A. Smith``.
    filed_by : str
        Who filed it into the study (``staff Dr B. Jones``), or "".
    state : str
        :data:`HELD`, :data:`FILED` or :data:`LEGACY`.
    """

    row: Attachment
    added_by: str
    filed_by: str
    state: str

    @property
    def id(self) -> int:
        """The row's id (the staff forms name it)."""
        return int(self.row.id)

    @property
    def sop_uid(self) -> str:
        """SOP Instance UID of the wrapped object (its report URL)."""
        return str(self.row.sop_uid)

    @property
    def kind(self) -> str:
        """``pdf`` or ``image``."""
        return "pdf" if self.row.media_type == "application/pdf" else "image"

    @property
    def held(self) -> bool:
        """Whether only its transaction holds it (not part of the hospital's study)."""
        return self.state == HELD


@dataclass(frozen=True)
class AttachmentsView:
    """What the attachments page shows."""

    transaction: Transaction
    attachments: list[AttachmentEntry]
    studies: list[StudyChoice]
    #: Why nothing can be attached nor opened now ("" when the transaction is open).
    closed_reason: str
    max_bytes: int
    #: Why nothing more can be attached though the transaction is open ("" when it can).
    limit_reason: str = ""


def study_choices(transaction: Transaction) -> list[StudyChoice]:
    """The transaction's studies that the node still holds, in the transaction's order."""
    rows = list(TransactionStudy.select().where(TransactionStudy.transaction == transaction.id)
                .order_by(TransactionStudy.id))
    held = {s.study_uid for s in Study.select(Study.study_uid)
            .where(Study.study_uid.in_([r.study_uid for r in rows]))} if rows else set()
    choices = []
    for row in rows:
        if row.study_uid not in held:
            continue
        parts = [row.modality.replace("\\", ",") if row.modality else "",
                 _date(row.exam_date), row.description, row.accession]
        choices.append(StudyChoice(row.study_uid, " · ".join(p for p in parts if p) or "Study"))
    return choices


def _date(value: str) -> str:
    from iepnode.dicomtext import dicom_date

    return dicom_date(value, "")


def state_of(row: Attachment) -> str:
    """:data:`HELD`, :data:`FILED` or :data:`LEGACY` for an attachment row."""
    if row.key:
        return HELD
    return FILED if row.filed_at is not None else LEGACY


def attachments_of(transaction: Transaction) -> list[Attachment]:
    """The transaction's attachments, oldest first."""
    return list(Attachment.select().where(Attachment.transaction == transaction.id)
                .order_by(Attachment.created_at, Attachment.id))


def held_by(transaction: Transaction) -> list[Attachment]:
    """The attachments only this transaction holds (not filed into a study), oldest first."""
    return [row for row in attachments_of(transaction) if row.key]


def describe(rows: Iterable[Attachment]) -> list[AttachmentEntry]:
    """Label attachment rows with who added and filed them (staff by display name)."""
    rows = list(rows)
    usernames = {r.author for r in rows if r.author_kind == "staff"}
    usernames |= {r.filed_by for r in rows if r.filed_by}
    names = {u.username: u.display_name or u.username for u in StaffUser.select(
        StaffUser.username, StaffUser.display_name).where(
        StaffUser.username.in_(sorted(usernames)))} if usernames else {}
    entries = []
    for row in rows:
        if row.author_kind == "recipient":
            added_by = f"the recipient {row.author}"
        else:
            added_by = f"staff {names.get(row.author, row.author)}"
        filed_by = f"staff {names.get(row.filed_by, row.filed_by)}" if row.filed_by else ""
        entries.append(AttachmentEntry(row, added_by, filed_by, state_of(row)))
    return entries


def entries_of(transaction: Transaction) -> list[AttachmentEntry]:
    """:func:`describe` of the transaction's attachments, oldest first."""
    return describe(attachments_of(transaction))


def provenance(sop_uids: Iterable[str]) -> dict[str, AttachmentEntry]:
    """Attachments among indexed instances (filed, or added before issue 13), by SOP UID.

    A report list labels those: they are in the study, but someone other than the
    hospital's modality or PACS made them.
    """
    uids = sorted(set(sop_uids))
    if not uids:
        return {}
    rows = Attachment.select().where(Attachment.sop_uid.in_(uids) & Attachment.key.is_null())
    return {entry.sop_uid: entry for entry in describe(rows)}


def held_entry(transaction: Transaction, sop_uid: str) -> AttachmentEntry:
    """The attachment with ``sop_uid`` that only ``transaction`` holds.

    Raises
    ------
    NotFound
        No such attachment held by this transaction.
    """
    row = Attachment.get_or_none((Attachment.transaction == transaction.id)
                                 & (Attachment.sop_uid == sop_uid)
                                 & Attachment.key.is_null(False))
    if row is None:
        raise NotFound("no such attachment")
    return describe([row])[0]


def view(transaction: Transaction, closed_reason: str = "",
         max_attachments: int = DEFAULT_MAX_ATTACHMENTS) -> AttachmentsView:
    """The attachments page of a transaction (``closed_reason``: why nothing can be added)."""
    choices = study_choices(transaction)
    if not closed_reason and not choices:
        closed_reason = "The images of this transaction are no longer stored."
    limit_reason = ""
    if max_attachments <= 0:
        limit_reason = "Files cannot be attached on this server."
    elif _count(transaction) >= max_attachments:
        limit_reason = str(_too_many(max_attachments))
    return AttachmentsView(transaction, entries_of(transaction), choices, closed_reason,
                           MAX_UPLOAD_BYTES, limit_reason)


def _targets(transaction: Transaction, study_uid: str) -> tuple[wrapping.PatientInfo,
                                                              wrapping.StudyInfo]:
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
        wrapping.PatientInfo(patient.name, patient.patient_id, patient.issuer,
                             patient.birth_date, patient.sex),
        wrapping.StudyInfo(study.study_uid, study.study_date, study.study_time,
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


def _count(transaction: Transaction) -> int:
    return Attachment.select().where(Attachment.transaction == transaction.id).count()


def _lock(transaction: Transaction) -> None:
    """Lock the transaction's row until the database transaction ends (PostgreSQL).

    SQLite needs nothing: its writers are serialised (``BEGIN IMMEDIATE``).
    """
    if not is_sqlite(database_proxy.obj):
        Transaction.select(Transaction.id).where(Transaction.id == transaction.id) \
            .for_update().get()


def _too_many(limit: int) -> wrapping.AttachmentRefused:
    return wrapping.AttachmentRefused(
        f"This transaction has {limit} attachments already, the most allowed: nothing "
        "more can be attached.")


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
    wrapping.AttachmentRefused
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
        raise wrapping.AttachmentRefused("Files cannot be attached on this server.")
    if _count(transaction) >= max_attachments:  # early answer; decided again below
        raise _too_many(max_attachments)
    if len(data) > MAX_UPLOAD_BYTES:
        raise wrapping.AttachmentRefused(
            f"The file is {_size(len(data))}; the largest accepted is "
            f"{_size(MAX_UPLOAD_BYTES)}.")
    if not data:
        raise wrapping.AttachmentRefused("The file is empty.")
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
    kind = wrapping.sniff(data) or ""
    shown_title = str(ds.get("DocumentTitle", "") or ds.get("SeriesDescription", ""))
    try:
        with write_transaction():
            _lock(transaction)
            if _count(transaction) >= max_attachments:
                raise _too_many(max_attachments)
            row = Attachment.create(
                transaction=transaction.id, study_uid=study.study_uid, sop_uid=record.sop_uid,
                sop_class=record.sop_class, title=shown_title[:64], original_name=name,
                media_type=wrapping.MEDIA_TYPES.get(kind, ""), size_bytes=len(data),
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


# -- staff: file into the study, or remove -----------------------------------------------


def may_file(user: StaffUser, transaction: Transaction) -> bool:
    """Whether ``user`` may file the transaction's attachments into the study (or remove them).

    Administrators may; so may the hospital contact of the transaction: the staff user
    who created it (``created_by``) or whose email is its contact email. For a
    forwarded copy that is the contact of the package it was forwarded from (a copy's
    ``created_by`` is the forwarder's email, not a staff user).
    """
    if user.is_admin:
        return True
    source = transaction.forwarded_from if transaction.forwarded_from_id else transaction
    if source.created_by and source.created_by == user.username:
        return True
    email = (user.email or "").strip().lower()
    return bool(email) and email == (source.contact_email or "").strip().lower()


def _own_attachment(transaction: Transaction, attachment_id: int) -> Attachment:
    row = Attachment.get_or_none((Attachment.id == attachment_id)
                                 & (Attachment.transaction == transaction.id))
    if row is None:
        raise NotFound("no such attachment")
    return row


def _check_may_file(user: StaffUser, transaction: Transaction) -> None:
    if not may_file(user, transaction):
        raise NotAuthorized(
            "Only an administrator or the hospital contact of this transaction "
            f"({transaction.contact_name or 'not recorded'}) can file or remove attachments.")


def _already(row: Attachment) -> InvalidRequest:
    entry = describe([row])[0]
    if entry.state == FILED:
        return InvalidRequest(f"\u201c{row.title}\u201d is already filed into the patient's "
                              f"study (by {entry.filed_by}): nothing was changed.")
    return InvalidRequest(f"\u201c{row.title}\u201d is already part of the patient's study "
                          "(it was added before attachments needed filing): nothing was "
                          "changed.")


def file_into_study(
    ingester: Ingester,
    transaction: Transaction,
    attachment_id: int,
    *,
    user: StaffUser,
    actor: audit.Actor,
    now: float | None = None,
) -> Attachment:
    """Ingest a held attachment into the patient's study, once; audited (DCM 110104).

    The claim (``UPDATE ... WHERE key IS NOT NULL``) and the ingest are one database
    transaction: a failed ingest leaves it held, and a second request (even at the same
    moment, from another process) finds it claimed and is refused.

    Returns
    -------
    Attachment
        The row, now filed.

    Raises
    ------
    NotFound
        No such attachment on this transaction.
    NotAuthorized
        ``user`` may not file (see :func:`may_file`).
    InvalidRequest
        It is already part of the study.
    Gone
        The study is no longer stored.
    OutOfResources, BadDataset
        The ingest failed (it stays held).
    """
    now = time.time() if now is None else now
    row = _own_attachment(transaction, attachment_id)
    _check_may_file(user, transaction)
    if not row.key:
        raise _already(row)
    if not Study.select().where(Study.study_uid == row.study_uid).exists():
        raise Gone("The study this attachment is about is no longer stored: it cannot be "
                   "filed.")
    key = row.key
    store = ingester.store
    with write_transaction():
        claimed = (Attachment.update(key=None, filed_at=now, filed_by=user.username[:64])
                   .where((Attachment.id == row.id) & Attachment.key.is_null(False))
                   .execute())
        if claimed != 1:
            raise _already(Attachment.get_by_id(row.id))
        data = store.path(key).read_bytes()
        meta, offset = parse_file_meta(data)
        stored = ingester.ingest(data[offset:], meta.transfer_syntax, source_ae=SOURCE_AE,
                                 expected_sop_uid=row.sop_uid)
        label = user.display_name or user.username
        TransactionMessage.create(
            transaction=transaction.id, author_kind="staff", author=label[:128],
            body=(f"Filed \u201c{row.title}\u201d into the patient's study: it is now part of "
                  "the hospital's record."), created_at=now)
        audit.record(audit.INSTANCES_TRANSFERRED, "attachment-file", actor,
                     patient_id=transaction.patient_id, study_uid=row.study_uid,
                     transaction=transaction.public_id,
                     detail=(f"{row.sop_uid} ({row.media_type}) added by {row.author_kind} "
                             f"{row.author}, filed into the study "
                             f"({stored.outcome.name.lower()})")[:500], now=now)
    store.remove(key)  # the study's instance has its own copy now
    log.info("attachment %s of %s filed into study %s by %s", row.sop_uid,
             transaction.public_id, row.study_uid, user.username)
    return Attachment.get_by_id(row.id)


def remove(
    store: FileStore,
    transaction: Transaction,
    attachment_id: int,
    *,
    user: StaffUser,
    actor: audit.Actor,
    now: float | None = None,
) -> Attachment:
    """Delete a held attachment (row and file); audited (DCM 110110). Filed ones stay.

    Raises
    ------
    NotFound, NotAuthorized
        As :func:`file_into_study`.
    InvalidRequest
        It is part of the study (filing cannot be undone here).
    """
    now = time.time() if now is None else now
    row = _own_attachment(transaction, attachment_id)
    _check_may_file(user, transaction)
    if not row.key:
        raise _already(row)
    with write_transaction():
        deleted = (Attachment.delete()
                   .where((Attachment.id == row.id) & Attachment.key.is_null(False))
                   .execute())
        if deleted != 1:
            raise _already(Attachment.get_by_id(row.id))
        TransactionMessage.create(
            transaction=transaction.id, author_kind="staff",
            author=(user.display_name or user.username)[:128],
            body=f"Removed the attachment \u201c{row.title}\u201d.", created_at=now)
        audit.record(audit.PATIENT_RECORD, "attachment-remove", actor,
                     patient_id=transaction.patient_id, study_uid=row.study_uid,
                     transaction=transaction.public_id,
                     detail=(f"{row.sop_uid} ({row.media_type}) added by {row.author_kind} "
                             f"{row.author}, removed unfiled")[:500], now=now)
    store.remove(row.key)
    log.info("attachment %s of %s removed by %s", row.sop_uid, transaction.public_id,
             user.username)
    return row


def purge_held(transaction_ids: Iterable[int]) -> list[str]:
    """Forget the held attachments of purged transactions; return their file-store keys.

    The caller removes the files (after this commits). Filed ones are the study's.
    """
    ids = sorted(set(transaction_ids))
    if not ids:
        return []
    with write_transaction():
        rows = list(Attachment.select(Attachment.id, Attachment.key).where(
            Attachment.transaction.in_(ids) & Attachment.key.is_null(False)))
        if rows:
            Attachment.delete().where(Attachment.id.in_([r.id for r in rows])).execute()
    return [r.key for r in rows]


def path_of(store: FileStore, entry: AttachmentEntry) -> Path:
    """Where the held attachment's wrapped object is."""
    return store.path(entry.row.key)


__all__ = [
    "FILED", "HELD", "LEGACY", "MAX_UPLOAD_BYTES", "AttachmentEntry", "AttachmentsView",
    "StudyChoice", "add", "attachments_of", "closed_for_recipient", "describe", "entries_of",
    "file_into_study", "held_by", "held_entry", "may_file", "path_of", "provenance",
    "purge_held", "remove", "state_of", "study_choices", "view",
]
