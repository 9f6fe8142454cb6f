"""Forward queries (sharing area): copies of a package a recipient sends on.

The forward limit is decided in one write transaction with the source row locked
(:func:`source_for_update`, then :func:`count_copies`); see
:func:`iepnode.sharing.forwarding.create_copy`.
"""

from __future__ import annotations

from storage import rawsql
from storage.db import is_sqlite
from storage.models import (
    Recipient,
    Transaction,
    TransactionMessage,
    TransactionStudy,
    database_proxy,
)

_COUNTS = ('SELECT "forwarded_from_id", COUNT(*) FROM "transaction" '
           'WHERE "forwarded_from_id" IN ({}) GROUP BY "forwarded_from_id"')


def forward_counts(transaction_ids: list[int]) -> dict[int, int]:
    """How many forwarded copies each of these transactions has (missing: none)."""
    if not transaction_ids:
        return {}
    sql = _COUNTS.format(rawsql.placeholders(len(transaction_ids)))
    return {source: count for source, count in rawsql.execute(sql, transaction_ids).fetchall()}


def forwarded_to_emails(forwarder_id: int) -> list[str]:
    """Emails of the recipients of copies forwarded by ``forwarder_id``, sorted, distinct."""
    source = Transaction.alias()
    query = (Recipient.select(Recipient.email).distinct()
             .join(Transaction, on=Transaction.recipient == Recipient.id)
             .join(source, on=Transaction.forwarded_from == source.id)
             .where(source.recipient == forwarder_id)
             .order_by(Recipient.email))
    return [r.email for r in query]


def copies_of(source_id: int) -> list[Transaction]:
    """The forwarded copies of a transaction (recipient joined), oldest first."""
    return list(Transaction.select(Transaction, Recipient).join(Recipient)
                .where(Transaction.forwarded_from == source_id)
                .order_by(Transaction.created_at, Transaction.id))


def source_for_update(source_id: int) -> Transaction:
    """The transaction ``source_id``, its row locked until the transaction ends.

    ``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write transaction holds the
    database lock already. ``Transaction.DoesNotExist`` if there is none.
    """
    query = Transaction.select().where(Transaction.id == source_id)
    if not is_sqlite(database_proxy.obj):
        query = query.for_update()
    return query.get()


def count_copies(source_id: int) -> int:
    """How many forwarded copies the transaction ``source_id`` has."""
    return Transaction.select().where(Transaction.forwarded_from == source_id).count()


def studies_of(transaction: Transaction) -> list[TransactionStudy]:
    """The study rows of a transaction, in the order they were added."""
    return list(transaction.studies.order_by(TransactionStudy.id))


def create_copy(**fields: object) -> Transaction:
    """A new (copy) transaction row with ``fields`` (the model's column names)."""
    return Transaction.create(**fields)


def copy_studies(copy_id: int, studies: list[TransactionStudy]) -> None:
    """Give the transaction ``copy_id`` a study row like each of ``studies`` (one insert)."""
    TransactionStudy.insert_many([
        {"transaction": copy_id, "study_uid": s.study_uid, "modality": s.modality,
         "exam_date": s.exam_date, "description": s.description, "accession": s.accession,
         "images_expected": s.images_expected}
        for s in studies
    ]).execute()


def add_message(**fields: object) -> TransactionMessage:
    """A new message in a transaction's thread with ``fields``."""
    return TransactionMessage.create(**fields)


def delete_copy(copy_id: int, recipient_id: int, *, recipient_too: bool) -> None:
    """Delete a copy; with ``recipient_too``, its recipient if left with no transaction.

    Call inside a write transaction.
    """
    Transaction.delete().where(Transaction.id == copy_id).execute()
    if recipient_too and not Transaction.select().where(
            Transaction.recipient == recipient_id).exists():
        Recipient.delete().where(Recipient.id == recipient_id).execute()
