"""Statements every portal page load runs, as fixed SQL (see :mod:`storage.rawsql`).

The recipient dashboard runs these on every load and audits what it showed;
building them with peewee cost more than running them. Each returns model
instances or plain values, so callers see the same objects as with peewee.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storage.models import (
    Recipient,
    Transaction,
    TransactionMessage,
    TransactionStudy,
    WebSession,
)
from storage.rawsql import (
    columns,
    execute,
    execute_many,
    placeholders,
    row_type,
    select_models,
    select_rows,
)

#: Read-only rows (named tuples by column name) for what a page only displays.
TransactionRow = row_type(Transaction)
TransactionStudyRow = row_type(TransactionStudy)
TransactionMessageRow = row_type(TransactionMessage)


_SESSION = f'SELECT {columns(WebSession)} FROM "websession" WHERE "token_hash" = ?'
_SEEN = 'UPDATE "websession" SET "last_seen" = ? WHERE "id" = ?'
_RECIPIENT = f'SELECT {columns(Recipient)} FROM "recipient" WHERE "id" = ?'
_TRANSACTIONS = (
    f'SELECT {columns(Transaction)} FROM "transaction" '
    'WHERE "recipient_id" = ? AND "created_at" >= ? ORDER BY "created_at" DESC'
)
_UNREAD = ('SELECT COUNT(*) FROM "transactionmessage" WHERE "read_by_recipient" = ? '
           'AND "transaction_id" IN ({})')
_STUDIES = (f'SELECT {columns(TransactionStudy)} FROM "transactionstudy" '
            'WHERE "transaction_id" IN ({}) ORDER BY "id"')
_HELD = 'SELECT "study_uid", "num_instances" FROM "study" WHERE "study_uid" IN ({})'
_MESSAGES = (f'SELECT {columns(TransactionMessage)} FROM "transactionmessage" '
             'WHERE "transaction_id" IN ({}) ORDER BY "created_at", "id"')
_MARK_READ = 'UPDATE "transactionmessage" SET "read_by_recipient" = ? WHERE "id" IN ({})'
_AUDIT = (
    'INSERT INTO "auditevent" ("at", "event_code", "event_name", "action", "outcome", '
    '"actor_kind", "actor", "source_ip", "patient_id", "study_uid", '
    '"transaction_public_id", "detail") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'
)


def session_by_token_hash(token_hash: str) -> WebSession | None:
    """The web session whose cookie hashes to ``token_hash`` (live or not)."""
    rows = select_models(WebSession, _SESSION, (token_hash,))
    return rows[0] if rows else None


def note_session_seen(session_id: int, now: float) -> None:
    """Record a session's latest activity (call inside a write transaction)."""
    execute(_SEEN, (now, session_id))


def recipient(recipient_id: int) -> Recipient | None:
    """One recipient by row ID."""
    rows = select_models(Recipient, _RECIPIENT, (recipient_id,))
    return rows[0] if rows else None


def recipient_transactions(recipient_id: int, since: float) -> list[Any]:
    """A recipient's transactions created at or after ``since``, newest first
    (:data:`TransactionRow`)."""
    return select_rows(TransactionRow, _TRANSACTIONS, (recipient_id, since))


def unread_messages(transaction_ids: Sequence[int]) -> int:
    """How many messages of these transactions the recipient has not read."""
    if not transaction_ids:
        return 0
    sql = _UNREAD.format(placeholders(len(transaction_ids)))
    return int(execute(sql, (False, *transaction_ids)).fetchone()[0])


def studies_of(transaction_ids: Sequence[int]) -> list[Any]:
    """The studies of these transactions in the order they were added
    (:data:`TransactionStudyRow`)."""
    if not transaction_ids:
        return []
    return select_rows(TransactionStudyRow,
                       _STUDIES.format(placeholders(len(transaction_ids))), transaction_ids)


def images_held(study_uids: Sequence[str]) -> dict[str, int]:
    """Instances the node holds, by Study Instance UID (studies not held are left out)."""
    if not study_uids:
        return {}
    rows = execute(_HELD.format(placeholders(len(study_uids))), study_uids).fetchall()
    return {uid: count for uid, count in rows}


def messages_of(transaction_ids: Sequence[int]) -> list[Any]:
    """The messages of these transactions, oldest first (:data:`TransactionMessageRow`)."""
    if not transaction_ids:
        return []
    return select_rows(TransactionMessageRow,
                       _MESSAGES.format(placeholders(len(transaction_ids))), transaction_ids)


def mark_read(message_ids: Sequence[int]) -> None:
    """Mark messages as read by the recipient (call inside a write transaction)."""
    if message_ids:
        execute(_MARK_READ.format(placeholders(len(message_ids))), (True, *message_ids))


def insert_audit_events(rows: Sequence[Sequence[object]]) -> None:
    """Insert audit events: each row is (at, event_code, event_name, action, outcome,
    actor_kind, actor, source_ip, patient_id, study_uid, transaction_public_id, detail).
    """
    if rows:
        execute_many(_AUDIT, rows)
