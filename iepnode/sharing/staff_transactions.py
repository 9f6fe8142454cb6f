"""Transactions as staff see them: list, details, replies, and help for their recipients.

Everything the staff transaction pages do, audited (PS3.15 A.5 EventIDs)::

    110110 Patient Record   view-transaction, message (staff reply; body not kept),
                            message-notify (the email telling the recipient of it)
    110113 Security Alert   recipient-unlock, recipient-totp-remove

Changing a recipient's passcode channel is :mod:`iepnode.sharing.passcode_channels`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iepnode.dicomtext import typed_text
from iepnode.errors import InvalidRequest, NotFound
from iepnode.outbound import notifications
from iepnode.outbound.messaging import DeliveryError
from iepnode.people import audit
from iepnode.people.audit import PATIENT_RECORD, Actor, actor_of
from iepnode.sharing import logins, transactions
from iepnode.sharing.passcode_channels import PasscodeChannels
from iepnode.sharing.transactions import StudyRow
from iepnode.viewing import attachments
from iepnode.viewing.attachment_filing import may_file
from iepnode.viewing.attachments import AttachmentEntry
from storage import hot_queries
from storage.models import (
    AuditEvent,
    Recipient,
    StaffUser,
    Transaction,
    TransactionMessage,
    TransactionStudy,
)
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q

if TYPE_CHECKING:
    from config import Settings
    from iepnode.outbound.messaging import Messenger

log = logging.getLogger("iepnode.admin")

#: The most transactions the staff list shows.
TRANSACTION_LIMIT = 100


@dataclass(frozen=True)
class StaffTransactionView:
    """One transaction as staff see it: details, studies, thread and audit trail."""

    transaction: Transaction
    recipient: Recipient
    studies: list[StudyRow]
    messages: list[TransactionMessage]
    events: list[AuditEvent]
    expired: bool
    #: The transaction's attachments, who added them, and whether they are filed (issue 13).
    attachments: tuple[AttachmentEntry, ...] = ()
    #: Whether this staff user may file them into the study or remove them.
    may_file: bool = False
    #: The staff user viewing it may change the recipient's passcode channel.
    can_change_channel: bool = False

    @property
    def locked(self) -> bool:
        """Whether the recipient is locked out after failed passcodes."""
        return self.recipient.locked_at is not None

    @property
    def authenticator(self) -> bool:
        """Whether the recipient signs in with an authenticator app."""
        return bool(self.recipient.totp_secret)


@dataclass(frozen=True)
class ReplyOutcome:
    """A stored staff reply and what became of the email telling the recipient.

    ``reason`` says why no email went: ``expired`` (the transaction's link signs
    in no more) or ``failed`` (the mail could not be sent; logged and audited).
    """

    emailed: bool
    reason: str = ""



def _get_transaction(public_id: str) -> Transaction:
    transaction = transactions_q.transaction_with_recipient(public_id)
    if transaction is None:
        raise NotFound(f"no transaction {public_id}")
    return transaction


def _unlock(recipient: Recipient, actor: Actor, *, patient_id: str = "",
            transaction: str = "") -> str:
    """Unlock a locked recipient (audited); return their email."""
    if recipient.locked_at is None:
        raise InvalidRequest(f"{recipient.email} is not locked")
    logins.unlock(recipient)
    audit.record(audit.SECURITY_ALERT, "recipient-unlock", actor, patient_id=patient_id,
                 transaction=transaction, detail=recipient.email)
    return recipient.email


class StaffTransactions:
    """The staff side of transactions: list, view, reply, and recipients' sign-in help.

    Blocking methods: the web views call them in a worker thread; :meth:`reply` is a
    coroutine (it sends mail).

    Parameters
    ----------
    settings : Settings
        The node's settings (its public URL, for the link in a reply's email).
    messenger : Messenger
        Sends the email telling a recipient of a reply.
    """

    def __init__(self, settings: Settings, messenger: Messenger) -> None:
        self.settings = settings
        self.messenger = messenger

    def recent_transactions(self, search: str = "",
                            limit: int = TRANSACTION_LIMIT) -> list[Transaction]:
        """Newest transactions first (recipient loaded), optionally filtered.

        Every word of ``search`` must occur (case-insensitively) in the transaction
        ID, patient name or ID, or the recipient's email or name.
        """
        terms = [term for term in re.split(r"[\s,^]+", typed_text(search, 200)) if term]
        return transactions_q.recent_transactions(terms, limit)

    def transaction_view(self, public_id: str, user: StaffUser,
                         source_ip: str = "") -> StaffTransactionView:
        """One transaction with studies, thread and audit trail (the view is audited).

        Raises
        ------
        NotFound
            No such transaction.
        """
        transaction = _get_transaction(public_id)
        audit.record(PATIENT_RECORD, "view-transaction", actor_of(user, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail="staff transaction page")
        rows = list(transaction.studies.order_by(TransactionStudy.id))
        held = {} if transaction.purged_at else hot_queries.images_held(
            [r.study_uid for r in rows])
        messages = list(transaction.messages.order_by(TransactionMessage.created_at,
                                                      TransactionMessage.id))
        expired = transactions.is_expired(transaction, time.time())
        return StaffTransactionView(
            transaction, transaction.recipient,
            [StudyRow(r, held.get(r.study_uid, 0)) for r in rows], messages,
            audit.events_for_transaction(public_id), expired,
            tuple(attachments.entries_of(transaction)), may_file(user, transaction),
            PasscodeChannels.may_change_channel(transaction.recipient, user),
        )

    async def reply(self, public_id: str, user: StaffUser, body: str,
                    source_ip: str = "") -> ReplyOutcome:
        """Add a staff message to a transaction's thread and email the recipient about it.

        The email says only that there is a new message and how to sign in (see
        :func:`iepnode.outbound.notifications.message_email`). The message is stored first:
        a mail failure is logged, audited and reported in the outcome, never raised.
        Both are audited (the body is not kept in the audit trail).

        Raises
        ------
        NotFound
            No such transaction.
        InvalidRequest
            An empty or too long message.
        """
        transaction = await asyncio.to_thread(self._add_reply, public_id, user, body,
                                              source_ip)
        actor = actor_of(user, source_ip)
        if transaction.purged_at or transactions.is_expired(transaction, time.time()):
            await asyncio.to_thread(
                audit.record, PATIENT_RECORD, "message-notify", actor,
                outcome=audit.MINOR_FAILURE, patient_id=transaction.patient_id,
                transaction=public_id, detail="not emailed: the transaction has expired")
            return ReplyOutcome(False, "expired")
        email = transaction.recipient.email
        subject, text = notifications.message_email(
            transaction, f"{self.settings.public_url}/transactions/{public_id}")
        try:
            await self.messenger.send_email(email, subject, text, kind="message-notice")
        except (DeliveryError, ValueError) as exc:
            log.warning("staff reply on %s stored, but the email to %s failed: %s",
                        public_id, email, exc)
            await asyncio.to_thread(
                audit.record, PATIENT_RECORD, "message-notify", actor,
                outcome=audit.SERIOUS_FAILURE, patient_id=transaction.patient_id,
                transaction=public_id, detail=f"email to {email} failed: {exc}"[:500])
            return ReplyOutcome(False, "failed")
        await asyncio.to_thread(
            audit.record, PATIENT_RECORD, "message-notify", actor,
            patient_id=transaction.patient_id, transaction=public_id,
            detail=f"email to {email}")
        return ReplyOutcome(True)

    def _add_reply(self, public_id: str, user: StaffUser, body: str,
                   source_ip: str) -> Transaction:
        transaction = _get_transaction(public_id)
        transactions.add_message(transaction, "staff", user.display_name or user.username, body)
        audit.record(PATIENT_RECORD, "message", actor_of(user, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail="staff reply")
        return transaction

    def unlock_recipient(self, public_id: str, user: StaffUser, source_ip: str = "") -> str:
        """Unlock the recipient of a transaction; return their email.

        Raises
        ------
        NotFound
            No such transaction.
        InvalidRequest
            The recipient is not locked.
        """
        transaction = _get_transaction(public_id)
        return _unlock(transaction.recipient, actor_of(user, source_ip),
                       patient_id=transaction.patient_id, transaction=public_id)

    def unlock_recipient_email(self, email: str, user: StaffUser | Actor,
                               source_ip: str = "") -> str:
        """Unlock a recipient named by email (the command line); return their email.

        ``user`` is a staff user (from ``source_ip``) or the command line's actor.

        Raises
        ------
        NotFound
            No such recipient.
        InvalidRequest
            The recipient is not locked.
        """
        recipient = recipients_q.recipient_with_email(email.strip().lower())
        if recipient is None:
            raise NotFound(f"no recipient {email}")
        return _unlock(recipient, actor_of(user, source_ip))

    def remove_recipient_authenticator(self, public_id: str, user: StaffUser,
                                       source_ip: str = "") -> str:
        """Remove the authenticator app of a transaction's recipient (lost phone); audited.

        The recipient gets passcodes by SMS/email again and their open sessions end.
        Returns their email.

        Raises
        ------
        NotFound
            No such transaction.
        InvalidRequest
            The recipient has no authenticator app.
        """
        transaction = _get_transaction(public_id)
        recipient = transaction.recipient
        if not logins.clear_totp(recipient.id):
            raise InvalidRequest(f"{recipient.email} has no authenticator app")
        audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", actor_of(user, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=f"{recipient.email}: removed by staff; recipient sessions ended")
        return recipient.email

    @staticmethod
    def recipient_email_of(public_id: str) -> str:
        """The email of a transaction's recipient.

        Raises
        ------
        NotFound
            No such transaction.
        """
        return _get_transaction(public_id).recipient.email

