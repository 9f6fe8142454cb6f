"""Recipient queries (sharing area): the people shares go to, and their passcode channel."""

from __future__ import annotations

from storage.db import is_sqlite
from storage.models import LoginAttempt, Recipient, WebSession, database_proxy


def recipient_by_id(recipient_id: int) -> Recipient:
    """The recipient with id ``recipient_id`` (``Recipient.DoesNotExist`` if none)."""
    return Recipient.get_by_id(recipient_id)


def recipient_with_email(email: str) -> Recipient | None:
    """The recipient with exactly this (normalised) email, or ``None``."""
    return Recipient.get_or_none(Recipient.email == email)


def insert_recipient_if_new(**fields: object) -> bool:
    """Insert a recipient with ``fields`` unless its email exists (``ON CONFLICT DO NOTHING``).

    Returns
    -------
    bool
        Whether this call inserted the row (of simultaneous callers, one does).
    """
    query = Recipient.insert(**fields).on_conflict_ignore()
    return database_proxy.obj.execute(query).rowcount == 1


def recipient_by_email(email: str) -> Recipient:
    """The recipient with this email (``Recipient.DoesNotExist`` if none)."""
    return Recipient.get(Recipient.email == email)


def rename_recipient(recipient_id: int, name: str) -> None:
    """Set the recipient's name."""
    Recipient.update(name=name).where(Recipient.id == recipient_id).execute()


def kill_unused_attempts(recipient_id: int) -> None:
    """Mark the recipient's unused, live login attempts dead."""
    LoginAttempt.update(dead=True).where(
        (LoginAttempt.recipient == recipient_id) & LoginAttempt.used_at.is_null()
        & (LoginAttempt.dead == False)).execute()  # noqa: E712


def recipient_for_update(recipient_id: int) -> Recipient:
    """The recipient, its row locked until the transaction ends (``FOR UPDATE``; SQLite:
    the write transaction holds the database lock already)."""
    query = Recipient.select().where(Recipient.id == recipient_id)
    return (query if is_sqlite(database_proxy.obj) else query.for_update()).get()


def set_channel(recipient_id: int, otp_mobile: str, otp_email: str) -> None:
    """Store the recipient's passcode channel; the next passcode may be sent at once."""
    Recipient.update(otp_mobile=otp_mobile, otp_email=otp_email,
                     last_passcode_at=0.0).where(Recipient.id == recipient_id).execute()


def end_recipient_sessions(recipient_id: int) -> None:
    """End every open session of the recipient."""
    WebSession.update(ended=True).where(
        (WebSession.recipient == recipient_id) & (WebSession.ended == False)  # noqa: E712
    ).execute()
