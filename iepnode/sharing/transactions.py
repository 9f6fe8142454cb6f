"""Transactions: studies of one patient shared with one recipient.

Rules kept here as plain functions over the index: readable unique IDs, one
patient per transaction, expiry, what a recipient may see (only their own,
only the last ``dashboard_days``), decline, the message thread, and purging the
files of expired packages while a study still shared elsewhere stays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from iepnode.errors import InvalidRequest, NotFound
from iepnode.rules.identifiers import new_public_id
from iepnode.security import new_token, token_hash
from iepnode.sharing import recipients
from iepnode.sharing.recipients import normalize_email
from storage import hot_queries
from storage.db import write_transaction
from storage.models import Recipient, Transaction, TransactionMessage, TransactionStudy
from storage.queries import transactions as queries

TRANSFER, REQUEST = "TRANSFER", "REQUEST"
IN, OUT = "IN", "OUT"
NEW, COMPLETE, DECLINED, EXPIRED = "NEW", "COMPLETE", "DECLINED", "EXPIRED"
PRIORITIES = ("NORMAL", "URGENT")
DAY = 86400.0
MAX_MESSAGE = 4000


@dataclass(frozen=True)
class StudyRow:
    """A study of a transaction and how many of its images the node holds now."""

    study: TransactionStudy
    images_received: int


@dataclass(frozen=True)
class Contact:
    """The hospital contact shown with a transaction."""

    name: str = ""
    department: str = ""
    email: str = ""
    phone: str = ""


@dataclass(frozen=True)
class NewTransfer:
    """What staff (or the CLI) ask for when sharing studies."""

    study_uids: tuple[str, ...]
    recipient_email: str
    otp_mobile: str = ""
    otp_email: str = ""
    recipient_name: str = ""
    message: str = ""
    priority: str = "NORMAL"
    expiry_days: int = 14
    nhs_number: str = ""


def _new_public_id() -> str:
    for _ in range(20):
        candidate = new_public_id()
        if not queries.public_id_taken(candidate):
            return candidate
    raise RuntimeError("could not find a free transaction ID")


def _recipient(request: NewTransfer, now: float) -> recipients.Found:
    """The recipient of a share: found (their passcode channel kept) or created.

    The channel given is checked even when it is not used (bad input is an error).
    """
    email = normalize_email(request.recipient_email)
    channel = recipients.check_channel(email, request.otp_mobile, request.otp_email)
    return recipients.find_or_create(email, channel, name=request.recipient_name, now=now)


def create_transfer(
    request: NewTransfer, *, contact: Contact, institution: str, created_by: str,
    now: float | None = None,
) -> tuple[Transaction, str]:
    """Share stored studies of one patient with a recipient.

    Parameters
    ----------
    request : NewTransfer
        Studies, recipient, passcode channel, message, priority and expiry.
    contact : Contact
        The hospital contact shown to the recipient.
    institution : str
        The sending institution's name.
    created_by : str
        Staff username (or ``cli``) for the audit trail.
    now : float, optional
        The current time (tests control it).

    Returns
    -------
    tuple of (Transaction, str)
        The transaction and the link token for the email (stored only hashed).

    Raises
    ------
    InvalidRequest
        No studies, unknown studies, studies of different patients, a bad email,
        mobile number, priority or expiry.
    """
    now = time.time() if now is None else now
    uids = tuple(dict.fromkeys(u.strip() for u in request.study_uids if u.strip()))
    if not uids:
        raise InvalidRequest("choose at least one study")
    if request.priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}")
    if not 1 <= request.expiry_days <= 3650:
        raise InvalidRequest("expiry must be 1 to 3650 days")
    if len(request.message) > MAX_MESSAGE:
        raise InvalidRequest(f"messages are limited to {MAX_MESSAGE} characters")
    studies = queries.studies_with_patients(uids)
    missing = set(uids) - {s.study_uid for s in studies}
    if missing:
        raise InvalidRequest(f"unknown study {sorted(missing)[0]}")
    if len({s.patient_id for s in studies}) > 1:
        raise InvalidRequest("a transaction holds studies of one patient only")
    patient = studies[0].patient
    token = new_token()
    with write_transaction():
        recipient = _recipient(request, now).recipient
        transaction = queries.create_transaction(
            public_id=_new_public_id(), kind=TRANSFER, direction=IN, recipient=recipient,
            status=NEW, priority=request.priority, created_at=now,
            expires_at=now + request.expiry_days * DAY,
            patient_name=patient.name, patient_birth_date=patient.birth_date,
            patient_sex=patient.sex, patient_id=patient.patient_id,
            nhs_number=request.nhs_number.strip()[:16],
            institution=institution[:128], contact_name=contact.name[:128],
            contact_department=contact.department[:128], contact_email=contact.email[:254],
            contact_phone=contact.phone[:32], created_by=created_by[:64],
            link_token_hash=token_hash(token),
        )
        for study in sorted(studies, key=lambda s: (s.study_date, s.study_time)):
            queries.add_transaction_study(
                transaction=transaction, study_uid=study.study_uid,
                modality=study.modalities.replace("\\", ", "), exam_date=study.study_date,
                description=study.description, accession=study.accession,
                images_expected=study.num_instances,
            )
        if request.message.strip():
            queries.add_transaction_message(transaction=transaction, author_kind="staff",
                                            author=contact.name or created_by,
                                            body=request.message.strip(), created_at=now)
    return transaction, token


def by_link_token(token: str, now: float | None = None) -> Transaction:
    """Return the transaction an emailed link points to.

    Raises
    ------
    NotFound
        Unknown token, or the transaction is past its expiry (whether or not
        housekeeping has marked it expired yet) or purged.
    """
    now = time.time() if now is None else now
    transaction = queries.transaction_by_link_hash(token_hash(token))
    if transaction is None or transaction.purged_at or is_expired(transaction, now):
        raise NotFound("this link is not valid (any more)")
    return transaction


def is_expired(transaction: Transaction, now: float) -> bool:
    """Whether a transaction is past its expiry, whether or not housekeeping has marked it."""
    return transaction.status == EXPIRED or transaction.expires_at <= now


def is_open(transaction: Transaction, now: float) -> bool:
    """Whether a transaction still waits for its recipient (Action Required, declinable)."""
    return transaction.status == NEW and transaction.expires_at > now


def for_recipient(recipient: Recipient, *, action_required: bool, days: int,
                  now: float | None = None) -> list[Transaction]:
    """Return a recipient's transactions of the last ``days`` days, newest first.

    ``action_required`` keeps only those still waiting for the recipient
    (:func:`is_open`).
    """
    now = time.time() if now is None else now
    rows = hot_queries.recipient_transactions(recipient.id, now - days * DAY)
    return [t for t in rows if is_open(t, now)] if action_required else rows


def get_for_recipient(recipient: Recipient, public_id: str) -> Transaction:
    """Return one of the recipient's transactions.

    Raises
    ------
    NotFound
        No such transaction, or it belongs to someone else (indistinguishable).
    """
    transaction = queries.transaction_of_recipient(public_id, recipient.id)
    if transaction is None:
        raise NotFound(f"no transaction {public_id}")
    return transaction


def newest_for(recipient_id: int) -> Transaction | None:
    """The recipient's most recent transaction (any status), or ``None``."""
    return queries.newest_transaction_of(recipient_id)


def decline(transaction: Transaction, reason: str, now: float | None = None) -> None:
    """Decline a transaction with a reason (kept in its thread)."""
    now = time.time() if now is None else now
    if transaction.status == DECLINED or is_expired(transaction, now):
        raise InvalidRequest(f"transaction {transaction.public_id} can no longer be declined")
    reason = reason.strip()
    if not reason:
        raise InvalidRequest("give a reason for declining")
    with write_transaction():
        transaction.status = DECLINED
        transaction.decline_reason = reason[:MAX_MESSAGE]
        queries.save_transaction(transaction)
        queries.add_transaction_message(transaction=transaction, author_kind="recipient",
                                        author=transaction.recipient.email,
                                        body=f"Declined: {reason[:MAX_MESSAGE]}",
                                        created_at=now, read_by_recipient=True)


def add_message(transaction: Transaction, author_kind: str, author: str, body: str,
                now: float | None = None) -> TransactionMessage:
    """Append a message to a transaction's thread."""
    body = body.strip()
    if not body or len(body) > MAX_MESSAGE:
        raise InvalidRequest(f"a message has 1 to {MAX_MESSAGE} characters")
    return queries.add_transaction_message(
        transaction=transaction, author_kind=author_kind, author=author[:128], body=body,
        created_at=time.time() if now is None else now,
        read_by_recipient=author_kind == "recipient",
    )


def expire_due(now: float | None = None) -> int:
    """Mark transactions past their expiry as EXPIRED; return how many."""
    now = time.time() if now is None else now
    return queries.mark_expired(EXPIRED, now)


def studies_to_purge(now: float | None = None) -> tuple[list[str], list[Transaction]]:
    """Return study UIDs no live transaction needs, and the expired transactions to mark.

    A study is purged when every transaction that holds it has expired: a study
    shared in another, still live, transaction stays.
    """
    now = time.time() if now is None else now
    expired = queries.expired_unpurged(now)
    if not expired:
        return [], []
    candidate_uids = queries.study_uids_of_transactions([t.id for t in expired])
    live = queries.study_uids_still_shared(candidate_uids, now)
    return sorted(candidate_uids - live), expired


def mark_purged(transactions: list[Transaction], now: float | None = None) -> None:
    """Record that expired transactions' files are gone."""
    now = time.time() if now is None else now
    if transactions:
        queries.mark_purged([t.id for t in transactions], now)



