"""Transfers and what their recipients see: share, dashboard, thread, decline, purge."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from config import Settings
from iepnode.errors import NotFound
from iepnode.outbound import notifications
from iepnode.outbound.messaging import Messenger
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing import recipients, transactions
from iepnode.sharing.download_service import DownloadService
from iepnode.sharing.transactions import Contact, NewTransfer, StudyRow
from iepnode.viewing import attachment_filing
from storage import hot_queries, index
from storage.filestore import FileStore
from storage.group_commit import GroupCommitter
from storage.models import (
    Recipient,
    StaffUser,
    Transaction,
    TransactionMessage,
    TransactionStudy,
)
from storage.queries import recipients as recipients_q

log = logging.getLogger("iepnode.sharing")



@dataclass(frozen=True)
class RecipientView:
    """One transaction as its recipient sees it (all rows loaded: safe to render anywhere)."""

    transaction: Transaction
    studies: list[StudyRow]
    messages: list[TransactionMessage]
    unread: int
    expired: bool
    can_decline: bool
    contact: Contact
    recipient: Recipient


@dataclass(frozen=True)
class RecipientDashboard:
    """A recipient's dashboard: the transactions of one tab and the counts of all tabs."""

    recipient: Recipient
    transactions: list[RecipientView]
    action_count: int
    all_count: int
    unread: int
    days: int


class SharingService:
    """Transfers to recipients and the recipient's side of them.

    Parameters
    ----------
    settings : Settings
        Institution, public URL, time zone, dashboard period.
    store : FileStore
        Purged studies' files are removed from it.
    group_commit : GroupCommitter
        Page views' small writes (read marks, audit events) share commits.
    messenger : Messenger
        Sends the transfer link.
    downloads : DownloadService
        Its protected copies are swept with the purge.
    """

    def __init__(self, settings: Settings, store: FileStore, group_commit: GroupCommitter,
                 messenger: Messenger, downloads: DownloadService) -> None:
        self.settings = settings
        self.store = store
        self.group_commit = group_commit
        self.messenger = messenger
        self.downloads = downloads

    def contact_for(self, user: StaffUser | None) -> Contact:
        """The hospital contact shown with a transaction created by ``user``."""
        if user is None:
            return Contact(name=self.settings.institution)
        return Contact(user.display_name or user.username, user.department, user.email,
                       user.phone)

    async def share(self, request: NewTransfer, *, actor: Actor,
                    user: StaffUser | None = None) -> Transaction:
        """Create a transfer, email its link to the recipient, and audit both.

        Raises
        ------
        InvalidRequest
            The request breaks a rule (see :func:`iepnode.sharing.transactions.create_transfer`).
        DeliveryError
            The email could not be sent (the transaction stays; staff can resend).
        """
        transaction, token = await asyncio.to_thread(
            transactions.create_transfer, request, contact=self.contact_for(user),
            institution=self.settings.institution, created_by=actor.name,
        )
        await asyncio.to_thread(
            audit.record, audit.EXPORT, "transfer-create", actor,
            patient_id=transaction.patient_id, transaction=transaction.public_id,
            study_uid=",".join(request.study_uids)[:64],
            detail=f"to {transaction.recipient.email}"
                   f"{channel_note(transaction.recipient, request.otp_mobile, request.otp_email)}",
        )
        subject, text = notifications.transfer_email(
            transaction, f"{self.settings.public_url}/t/{token}", self.settings.zone)
        await self.messenger.send_email(transaction.recipient.email, subject, text,
                                        kind="transfer-link")
        return transaction

    def recipient_dashboard(self, recipient_id: int, tab: str,
                            source_ip: str = "") -> RecipientDashboard:
        """A recipient's dashboard: ``home`` (counts only), ``action`` or ``all``.

        Every transaction shown with its details is audited as viewed, and its
        messages are marked read (``unread`` still counts them for this page).
        """
        # Reads run outside any transaction; the page's writes (read marks, audit
        # events) commit together at the end in a short write transaction, so the
        # database's single write lock is held for those statements only.
        recipient = hot_queries.recipient(recipient_id)
        if recipient is None:
            raise NotFound("no such recipient")
        days = self.settings.dashboard_days
        everything = transactions.for_recipient(recipient, action_required=False, days=days)
        now = time.time()
        action = [t for t in everything if transactions.is_open(t, now)]
        unread = hot_queries.unread_messages([t.id for t in everything])
        shown = {"action": action, "all": everything}.get(tab, [])
        views = self._views(shown, recipient, source_ip, f"dashboard {tab}")
        return RecipientDashboard(recipient, views, len(action), len(everything), unread, days)

    def recipient_transaction(self, recipient_id: int, public_id: str,
                              source_ip: str = "") -> RecipientView:
        """One of the recipient's transactions with its studies and thread (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        return self._views([transaction], recipient, source_ip, "transaction page")[0]

    def decline(self, recipient_id: int, public_id: str, reason: str,
                source_ip: str = "") -> None:
        """Decline one of the recipient's transactions with a reason (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        InvalidRequest
            No reason, or the transaction can no longer be declined.
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        transactions.decline(transaction, reason)
        audit.record(audit.PATIENT_RECORD, "decline", audit.Actor("recipient", recipient.email,
                                                            source_ip),
                     patient_id=transaction.patient_id, transaction=transaction.public_id)

    def post_message(self, recipient_id: int, public_id: str, body: str,
                     source_ip: str = "") -> None:
        """Add the recipient's message to one of their transactions (audited, body not).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        InvalidRequest
            An empty or too long message.
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        transactions.add_message(transaction, "recipient", recipient.email, body)
        audit.record(audit.PATIENT_RECORD, "message", audit.Actor("recipient", recipient.email,
                                                            source_ip),
                     patient_id=transaction.patient_id, transaction=transaction.public_id)

    def recipient_contact(self, recipient_id: int) -> Contact:
        """Whom the recipient asks for help: the contact of their newest transaction."""
        newest = transactions.newest_for(recipient_id)
        return contact_of(newest) if newest else Contact(name=self.settings.institution)

    def _views(self, shown: list[Transaction], recipient: Recipient, source_ip: str,
               where: str) -> list[RecipientView]:
        """Load what the recipient sees of ``shown`` in a few batched queries (audited).

        One query each for the studies, the images held and the messages of all
        shown transactions, one update marking their messages read and one insert
        of their audit events: a dashboard costs the same handful of statements
        whatever the number of rows.
        """
        if not shown:
            return []
        ids = [t.id for t in shown]
        studies: dict[int, list[TransactionStudy]] = {i: [] for i in ids}
        for row in hot_queries.studies_of(ids):
            studies[row.transaction_id].append(row)
        held = hot_queries.images_held(sorted({r.study_uid for rows in studies.values()
                                               for r in rows}))
        messages: dict[int, list[TransactionMessage]] = {i: [] for i in ids}
        for message in hot_queries.messages_of(ids):
            messages[message.transaction_id].append(message)
        unread_ids = [m.id for ms in messages.values() for m in ms if not m.read_by_recipient]
        actor = audit.Actor("recipient", recipient.email, source_ip)
        viewed = [(t.patient_id, t.public_id, where) for t in shown]

        def note_viewed() -> None:
            hot_queries.mark_read(unread_ids)
            audit.record_many(audit.PATIENT_RECORD, "view-transaction", actor, viewed)

        self.group_commit.run(note_viewed)
        now = time.time()
        views = []
        for transaction in shown:
            expired = transactions.is_expired(transaction, now)
            rows = studies[transaction.id]
            views.append(RecipientView(
                transaction,
                [StudyRow(r, 0 if transaction.purged_at else held.get(r.study_uid, 0))
                 for r in rows],
                messages[transaction.id],
                sum(not m.read_by_recipient for m in messages[transaction.id]),
                expired, transactions.is_open(transaction, now),
                contact_of(transaction), recipient,
            ))
        return views

    def purge_expired(self) -> int:
        """Expire due transactions and delete studies no live transaction holds.

        Returns
        -------
        int
            The number of instances deleted.
        """
        transactions.expire_due()
        uids, expired = transactions.studies_to_purge()
        removed = 0
        for uid in uids:
            for key in index.delete_study(uid):
                self.store.remove(key)
                removed += 1
            log.info("purged study %s: every transaction holding it has expired", uid)
        transactions.mark_purged(expired)
        for key in attachment_filing.purge_held(t.id for t in expired):
            self.store.remove(key)
        self.downloads.sweep_protected_downloads()
        for transaction in expired:
            audit.record(audit.EXPORT, "purge", audit.Actor("system", "retention"),
                         outcome=audit.SUCCESS, transaction=transaction.public_id,
                         patient_id=transaction.patient_id, detail="expired package purged")
        return removed


def channel_note(recipient: Recipient, otp_mobile: str, otp_email: str) -> str:
    """For the audit trail: the passcode channel given was not used (an existing account)."""
    kept = recipients.kept_instead(recipient, otp_mobile, otp_email)
    return f"; existing passcode channel {kept.masked} kept (the one given was not used)" \
        if kept else ""


def contact_of(transaction: Transaction) -> Contact:
    """The hospital contact a transaction shows its recipient."""
    return Contact(transaction.contact_name, transaction.contact_department,
                   transaction.contact_email, transaction.contact_phone)
