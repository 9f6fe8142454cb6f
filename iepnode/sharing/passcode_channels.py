"""Where a recipient's passcodes go, changed by staff (issue 13); the old channel is told.

Administrators may change it, and so may the recipient's established hospital
contacts (:meth:`PasscodeChannels.may_change_channel`). Audited (110113 Security
Alert): ``recipient-channel-change`` and ``recipient-channel-notice`` (channels masked).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iepnode import timefmt
from iepnode.errors import NotAuthorized, NotFound
from iepnode.outbound import notifications
from iepnode.outbound.messaging import DeliveryError
from iepnode.people import audit
from iepnode.people.audit import actor_of
from iepnode.sharing import recipients, transactions
from storage.models import Recipient, StaffUser
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q

if TYPE_CHECKING:
    from config import Settings
    from iepnode.outbound.messaging import Messenger

log = logging.getLogger("iepnode.admin")


@dataclass(frozen=True)
class ChannelChanged:
    """A recipient's passcode channel changed by staff, and whether the old one was told."""

    email: str
    new: recipients.Channel
    notified: bool


class PasscodeChannels:
    """Change where a recipient's passcodes go, and tell them on the old channel.

    Parameters
    ----------
    settings : Settings
        The node's settings (institution, time zone: the notice's wording).
    messenger : Messenger
        Sends the notice by SMS or email.
    """

    def __init__(self, settings: Settings, messenger: Messenger) -> None:
        self.settings = settings
        self.messenger = messenger

    @staticmethod
    def may_change_channel(recipient: Recipient, user: StaffUser) -> bool:
        """Whether ``user`` may change where a recipient's passcodes go.

        Administrators may, and so may the hospital contact (``Transaction.created_by``)
        of one of the recipient's transactions that the recipient's account was made
        for (their first) or that the recipient has signed in through. Being the
        contact of any transaction is not enough: anyone may share with anyone, so
        a new share would otherwise let its author move the passcodes right after.
        """
        if user.is_admin:
            return True
        mine = transactions_q.public_ids_created_by(recipient.id, user.username)
        if not mine:
            return False
        first = transactions_q.first_transaction_id(recipient.id)
        return first in mine or transactions_q.signed_in_through(recipient.email,
                                                                 list(mine.values()))

    async def change_passcode_channel(self, email: str, otp_mobile: str, otp_email: str,
                                      user: StaffUser, source_ip: str = "", *,
                                      public_id: str = "") -> ChannelChanged:
        """Send a recipient's passcodes somewhere else; tell them on the old channel.

        Their open sessions and unused passcodes end (:func:`recipients.change_channel`).
        The change and the notice are audited (channels masked); a notice that cannot
        be sent is logged and audited, and reported in the outcome, never raised.

        Parameters
        ----------
        email : str
            The recipient's email.
        otp_mobile, otp_email : str
            The new channel: exactly one of them.
        public_id : str, optional
            The transaction page the change was made from (for its audit trail).

        Raises
        ------
        NotFound
            No such recipient.
        NotAuthorized
            ``user`` may not (see :meth:`may_change_channel`).
        InvalidRequest
            No channel, both, a bad one, or the one they have already.
        """
        change, contact, patient_id = await asyncio.to_thread(
            self._change_channel, email, otp_mobile, otp_email, user, source_ip, public_id)
        settings = self.settings
        subject, text = notifications.channel_changed_text(
            settings.institution, timefmt.day_time(time.time(), settings.zone),
            change.new.masked, contact)
        actor = actor_of(user, source_ip)
        try:
            if change.old.kind == recipients.SMS:
                await self.messenger.send_sms(change.old.destination, text)
            else:
                await self.messenger.send_email(change.old.destination, subject, text,
                                                     kind="channel-change")
        except (DeliveryError, ValueError) as exc:
            log.warning("passcode channel of %s changed, but the notice to the old channel "
                        "failed: %s", change.recipient.email, exc)
            await asyncio.to_thread(
                audit.record, audit.SECURITY_ALERT, "recipient-channel-notice", actor,
                outcome=audit.SERIOUS_FAILURE, transaction=public_id, patient_id=patient_id,
                detail=f"{change.recipient.email}: notice to the old {change.old.masked} "
                       f"failed: {exc}"[:500])
            return ChannelChanged(change.recipient.email, change.new, False)
        await asyncio.to_thread(
            audit.record, audit.SECURITY_ALERT, "recipient-channel-notice", actor,
            transaction=public_id, patient_id=patient_id,
            detail=f"{change.recipient.email}: told on the old {change.old.masked}")
        return ChannelChanged(change.recipient.email, change.new, True)

    def _change_channel(self, email: str, otp_mobile: str, otp_email: str, user: StaffUser,
                        source_ip: str, public_id: str,
                        ) -> tuple[recipients.ChannelChange, str, str]:
        recipient = recipients_q.recipient_with_email(email.strip().lower())
        if recipient is None:
            raise NotFound(f"no recipient {email}")
        if not self.may_change_channel(recipient, user):
            raise NotAuthorized("only administrators, and the hospital contact of the "
                                "transaction this recipient's account was made for or of one "
                                "they have signed in through, may change where their "
                                "passcodes go")
        channel = recipients.check_channel(recipient.email, otp_mobile, otp_email)
        change = recipients.change_channel(recipient.id, channel)
        transaction = transactions_q.transaction_with_public_id(public_id) \
            if public_id else None
        patient_id = transaction.patient_id if transaction is not None else ""
        audit.record(audit.SECURITY_ALERT, "recipient-channel-change", actor_of(user, source_ip),
                     transaction=public_id, patient_id=patient_id,
                     detail=f"{recipient.email}: passcode channel {change.old.masked} -> "
                            f"{change.new.masked}; sessions and unused passcodes ended")
        return change, self._contact_line(user, recipient.id), patient_id

    def _contact_line(self, user: StaffUser, recipient_id: int) -> str:
        """Whom the notice tells the recipient to call: the staff user, else their contact."""
        name = user.display_name or user.username
        if user.phone or user.email:
            return f"{name}, {self.settings.institution} ({user.phone or user.email})"
        newest = transactions.newest_for(recipient_id)
        reach = newest and (newest.contact_phone or newest.contact_email)
        if reach:
            return f"{newest.contact_name or self.settings.institution} ({reach})"
        return self.settings.institution
