"""Attachments: a PDF or picture added to a transaction by its recipient or by staff.

The file is wrapped as DICOM (:mod:`iepnode.wrapping`) with the patient and study
attributes *of the index* (those of the images it joins), stored through the node's
normal ingest path (:class:`iepnode.ingest.Ingester`, as a C-STORE is), and so it is
an ordinary instance of one of the transaction's studies: in the download package,
the file-set, the viewer and C-FIND/C-MOVE. An :class:`~storage.models.Attachment`
row says who attached what, and a message in the transaction's thread tells the other
side.

Nothing is stored when the file is refused (wrong type, too large, damaged): the
wrapping happens before the ingest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from iepnode import audit, wrapping
from iepnode.errors import Gone, InvalidRequest, NotFound
from iepnode.ingest import Ingester
from storage.db import write_transaction
from storage.models import (
    Attachment,
    Patient,
    Study,
    Transaction,
    TransactionMessage,
    TransactionStudy,
)

log = logging.getLogger("iepnode.attachments")

#: Largest file accepted through the web form (the HTTP body limit of these routes).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Source AE recorded in the index and File Meta for attached files.
SOURCE_AE = "IEPNODE-ATTACH"[:16]
#: Audit EventID (DCM 110110) as for other changes to a transaction's record.
PATIENT_RECORD = ("110110", "Patient Record")


@dataclass(frozen=True)
class StudyChoice:
    """A study of the transaction an attachment may join."""

    study_uid: str
    label: str


@dataclass(frozen=True)
class AttachmentsView:
    """What the attachments page shows."""

    transaction: Transaction
    attachments: list[Attachment]
    studies: list[StudyChoice]
    #: Why nothing can be attached now ("" when something can).
    closed_reason: str
    max_bytes: int


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


def attachments_of(transaction: Transaction) -> list[Attachment]:
    """The transaction's attachments, oldest first."""
    return list(Attachment.select().where(Attachment.transaction == transaction.id)
                .order_by(Attachment.created_at, Attachment.id))


def view(transaction: Transaction, closed_reason: str = "") -> AttachmentsView:
    """The attachments page of a transaction."""
    choices = study_choices(transaction)
    if not closed_reason and not choices:
        closed_reason = "The images of this transaction are no longer stored."
    return AttachmentsView(transaction, attachments_of(transaction), choices, closed_reason,
                           MAX_UPLOAD_BYTES)


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


def add(
    ingester: Ingester,
    transaction: Transaction,
    *,
    data: bytes,
    original_name: str,
    title: str,
    study_uid: str,
    actor: audit.Actor,
    author_label: str,
    now: float | None = None,
) -> Attachment:
    """Wrap, store and record one attached file.

    Parameters
    ----------
    ingester : Ingester
        The node's ingest path.
    transaction : Transaction
        The transaction it is attached to (access already checked by the caller).
    data : bytes
        The uploaded file.
    original_name, title : str
        The uploader's file name and an optional title.
    study_uid : str
        The study it joins ('' when the transaction has one study).
    actor : audit.Actor
        Who attaches it: ``staff`` (username) or ``recipient`` (email).
    author_label : str
        The name shown in the message thread.
    now : float, optional
        The time (default now).

    Returns
    -------
    Attachment
        The new row.

    Raises
    ------
    wrapping.AttachmentRefused
        Not a PDF/JPEG/PNG, too large or damaged (nothing stored).
    InvalidRequest
        No study chosen when there are several.
    NotFound
        The study is not one of the transaction's.
    Gone
        The transaction's images are no longer stored.
    """
    now = time.time() if now is None else now
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
    stored = ingester.ingest(stream, transfer_syntax, source_ae=SOURCE_AE)
    kind = wrapping.sniff(data) or ""
    shown_title = str(ds.get("DocumentTitle", "") or ds.get("SeriesDescription", ""))
    with write_transaction():
        row = Attachment.create(
            transaction=transaction.id, study_uid=study.study_uid, sop_uid=stored.sop_uid,
            sop_class=str(ds.SOPClassUID), title=shown_title[:64], original_name=name,
            media_type=wrapping.MEDIA_TYPES.get(kind, ""), size_bytes=len(data),
            author_kind=actor.kind, author=actor.name[:254], created_at=now)
        (TransactionStudy.update(images_expected=TransactionStudy.images_expected + 1)
         .where((TransactionStudy.transaction == transaction.id)
                & (TransactionStudy.study_uid == study.study_uid)).execute())
        TransactionMessage.create(
            transaction=transaction.id, author_kind=actor.kind, author=author_label[:128],
            body=(f"Attached {'a document' if kind == 'pdf' else 'an image'}: "
                  f"\u201c{shown_title}\u201d ({kind.upper()}, {_size(len(data))})."),
            created_at=now, read_by_recipient=actor.kind == "recipient")
        audit.record(audit.INSTANCES_TRANSFERRED, "attachment-add", actor,
                     patient_id=patient.patient_id, study_uid=study.study_uid,
                     transaction=transaction.public_id,
                     detail=(f"{kind} {len(data)} bytes as {ds.SOPClassUID.name} "
                             f"{stored.sop_uid}"), now=now)
    log.info("attachment %s (%s, %d bytes) added to %s by %s %s", stored.sop_uid, kind,
             len(data), transaction.public_id, actor.kind, actor.name)
    return row


def closed_for_recipient(transaction: Transaction, now: float | None = None) -> str:
    """Why the recipient cannot attach files now ('' if they can)."""
    from iepnode.downloads import unavailable_reason

    return unavailable_reason(transaction, time.time() if now is None else now) or ""


__all__ = [
    "MAX_UPLOAD_BYTES", "AttachmentsView", "StudyChoice", "add", "attachments_of",
    "closed_for_recipient", "study_choices", "view",
]
