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

The parts: this module says what an attachment is and lists them;
:mod:`iepnode.viewing.attaching` adds one (wrapped, kept, counted against the limit);
:mod:`iepnode.viewing.attachment_filing` is what staff do with one (file it into the
study, remove it) and forgets those of purged transactions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from iepnode.errors import NotFound
from iepnode.viewing.wrapped_object import AttachmentRefused
from storage.filestore import FileStore
from storage.models import (
    Attachment,
    StaffUser,
    Study,
    Transaction,
    TransactionStudy,
)

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


def _count(transaction: Transaction) -> int:
    return Attachment.select().where(Attachment.transaction == transaction.id).count()


def _too_many(limit: int) -> AttachmentRefused:
    return AttachmentRefused(
        f"This transaction has {limit} attachments already, the most allowed: nothing "
        "more can be attached.")


def path_of(store: FileStore, entry: AttachmentEntry) -> Path:
    """Where the held attachment's wrapped object is."""
    return store.path(entry.row.key)


__all__ = [
    "FILED",
    "HELD",
    "LEGACY",
    "MAX_UPLOAD_BYTES",
    "AttachmentEntry",
    "AttachmentsView",
    "StudyChoice",
    "attachments_of",
    "describe",
    "entries_of",
    "held_by",
    "held_entry",
    "path_of",
    "provenance",
    "state_of",
    "study_choices",
    "view",
]
