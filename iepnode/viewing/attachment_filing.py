"""What staff do with an attachment: file it into the patient's study, or remove it.

An administrator or the transaction's hospital contact (:func:`may_file`) may file a
held attachment (it is then ingested through the node's ingest path, claimed by one
conditional ``UPDATE`` in the same database transaction) or remove it; both are
audited and told in the thread. :func:`purge_held` forgets the held attachments of
purged transactions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from iepnode.archive.ingest import (
    Ingester,
    parse_file_meta,
)
from iepnode.errors import Gone, InvalidRequest, NotAuthorized, NotFound
from iepnode.people import audit
from iepnode.viewing.attachments import FILED, SOURCE_AE, describe
from storage.db import write_transaction
from storage.filestore import FileStore
from storage.models import (
    Attachment,
    StaffUser,
    Study,
    Transaction,
    TransactionMessage,
)

log = logging.getLogger("iepnode.attachments")


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


__all__ = [
    "file_into_study",
    "may_file",
    "purge_held",
    "remove",
]
