"""Transaction queries (sharing area): shares, their studies and message threads."""

from __future__ import annotations

from collections.abc import Iterable

from storage.models import (
    AuditEvent,
    Patient,
    Recipient,
    Study,
    Transaction,
    TransactionMessage,
    TransactionStudy,
)


def public_id_taken(public_id: str) -> bool:
    """Whether a transaction has this public ID."""
    return Transaction.select().where(Transaction.public_id == public_id).exists()


def studies_with_patients(study_uids: Iterable[str]) -> list[Study]:
    """The stored studies among ``study_uids``, each with its patient joined."""
    return list(Study.select(Study, Patient).join(Patient)
                .where(Study.study_uid.in_(tuple(study_uids))))


def create_transaction(**fields: object) -> Transaction:
    """A new transaction row with ``fields`` (the model's column names)."""
    return Transaction.create(**fields)


def add_transaction_study(**fields: object) -> TransactionStudy:
    """A new row of a transaction's study list with ``fields``."""
    return TransactionStudy.create(**fields)


def add_transaction_message(**fields: object) -> TransactionMessage:
    """A new message in a transaction's thread with ``fields``."""
    return TransactionMessage.create(**fields)


def transaction_by_link_hash(link_token_hash: str) -> Transaction | None:
    """The transaction whose emailed link token hashes to ``link_token_hash``, or ``None``."""
    return Transaction.get_or_none(Transaction.link_token_hash == link_token_hash)


def transaction_of_recipient(public_id: str, recipient_id: int) -> Transaction | None:
    """The transaction ``public_id`` if it belongs to ``recipient_id``, else ``None``."""
    return Transaction.get_or_none(
        (Transaction.public_id == public_id) & (Transaction.recipient == recipient_id)
    )


def newest_transaction_of(recipient_id: int) -> Transaction | None:
    """The recipient's most recent transaction (any status), or ``None``."""
    return (Transaction.select().where(Transaction.recipient == recipient_id)
            .order_by(Transaction.created_at.desc(), Transaction.id.desc()).first())


def save_transaction(transaction: Transaction) -> None:
    """Save every field of ``transaction`` as it is now."""
    transaction.save()


def mark_expired(status: str, now: float) -> int:
    """Set ``status`` on transactions past their expiry at ``now`` not in it; how many."""
    return (
        Transaction.update(status=status)
        .where((Transaction.expires_at <= now) & (Transaction.status != status))
        .execute()
    )


def expired_unpurged(now: float) -> list[Transaction]:
    """Transactions past their expiry at ``now`` whose files are not purged yet."""
    return list(
        Transaction.select().where(
            (Transaction.expires_at <= now) & Transaction.purged_at.is_null()
        )
    )


def study_uids_of_transactions(transaction_ids: list[int]) -> set[str]:
    """The study UIDs held by the transactions ``transaction_ids``."""
    return {
        ts.study_uid
        for ts in TransactionStudy.select(TransactionStudy.study_uid).where(
            TransactionStudy.transaction.in_(transaction_ids)
        )
    }


def study_uids_still_shared(study_uids: set[str], now: float) -> set[str]:
    """Those of ``study_uids`` held by a transaction not yet expired at ``now``."""
    return {
        ts.study_uid
        for ts in TransactionStudy.select(TransactionStudy.study_uid)
        .join(Transaction)
        .where((Transaction.expires_at > now) & TransactionStudy.study_uid.in_(study_uids))
    }


def mark_purged(transaction_ids: list[int], now: float) -> None:
    """Record that the files of transactions ``transaction_ids`` were purged at ``now``."""
    Transaction.update(purged_at=now).where(Transaction.id.in_(transaction_ids)).execute()


def transaction_with_public_id(public_id: str) -> Transaction | None:
    """The transaction with this public ID, or ``None``."""
    return Transaction.get_or_none(Transaction.public_id == public_id)


def public_ids_created_by(recipient_id: int, username: str) -> dict[int, str]:
    """Row id -> public ID of the recipient's transactions whose contact is ``username``."""
    return {t.id: t.public_id for t in Transaction.select(
        Transaction.id, Transaction.public_id).where(
        (Transaction.recipient == recipient_id) & (Transaction.created_by == username))}


def first_transaction_id(recipient_id: int) -> int | None:
    """Row id of the recipient's oldest transaction (the one their account was made for)."""
    return (Transaction.select(Transaction.id).where(Transaction.recipient == recipient_id)
            .order_by(Transaction.created_at, Transaction.id).scalar())


def signed_in_through(email: str, public_ids: list[str]) -> bool:
    """Whether the recipient ``email`` has a ``login`` audit event in one of these transactions."""
    return AuditEvent.select().where(
        (AuditEvent.action == "login") & (AuditEvent.actor_kind == "recipient")
        & (AuditEvent.actor == email)
        & AuditEvent.transaction_public_id.in_(public_ids)).exists()


def transaction_with_recipient(public_id: str) -> Transaction | None:
    """The transaction with this public ID, its recipient joined, or ``None``."""
    return (Transaction.select(Transaction, Recipient).join(Recipient)
            .where(Transaction.public_id == public_id).first())


def recent_transactions(terms: list[str], limit: int) -> list[Transaction]:
    """The newest ``limit`` transactions (recipient joined) matching every one of ``terms``.

    A term matches when the transaction ID, patient name or ID, or the recipient's
    email or name contains it (case-insensitively).
    """
    query = Transaction.select(Transaction, Recipient).join(Recipient)
    for term in terms:
        query = query.where(
            Transaction.public_id.contains(term) | Transaction.patient_name.contains(term)
            | Transaction.patient_id.contains(term) | Recipient.email.contains(term)
            | Recipient.name.contains(term))
    return list(query.order_by(Transaction.created_at.desc(), Transaction.id.desc())
                .limit(limit))


def study_uids_of(transaction_id: int, *, ordered: bool = False) -> list[str]:
    """The study UIDs of a transaction (with ``ordered``, in the order they were shared)."""
    query = (TransactionStudy.select(TransactionStudy.study_uid)
             .where(TransactionStudy.transaction == transaction_id))
    if ordered:
        query = query.order_by(TransactionStudy.id)
    return [ts.study_uid for ts in query]


def transaction_by_id(transaction_id: int) -> Transaction:
    """The transaction with row id ``transaction_id`` (``DoesNotExist`` if none)."""
    return Transaction.get_by_id(transaction_id)


def transaction_by_public_id(public_id: str) -> Transaction:
    """The transaction with this public ID (``Transaction.DoesNotExist`` if none)."""
    return Transaction.get(Transaction.public_id == public_id)
