"""Forwarding: a recipient passes a package on to another person (issue 6)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from config import Settings
from iepnode.outbound.messaging import DeliveryError, Messenger
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing import forward_mail, forwarding, transactions
from storage.models import Recipient, Transaction
from storage.queries import recipients as recipients_q


class ForwardService:
    """The forward dialog, its history, and the forward itself (audited, mailed).

    Parameters
    ----------
    settings : Settings
        Forward limit, default expiry, public URL.
    messenger : Messenger
        Mails the new recipient and the hospital contact.
    """

    def __init__(self, settings: Settings, messenger: Messenger) -> None:
        self.settings = settings
        self.messenger = messenger

    def forward_states(self, rows: list[Any]) -> dict[str, forwarding.ForwardState]:
        """Whether each transaction (model or dashboard row) may be forwarded now."""
        return forwarding.states(rows, max_forwards=self.settings.max_forwards,
                                 now=time.time())

    def _forwardable(self, recipient_id: int, public_id: str,
                     source_ip: str) -> tuple[Recipient, Transaction, forwarding.ForwardState]:
        """The recipient's package and its forward state; refusals are audited and raised."""
        forwarder = recipients_q.recipient_by_id(recipient_id)
        source = transactions.get_for_recipient(forwarder, public_id)
        state = self.forward_states([source])[public_id]
        if not state.allowed:
            audit.record(audit.EXPORT, "forward-refused",
                         audit.Actor("recipient", forwarder.email, source_ip),
                         outcome=audit.MINOR_FAILURE, patient_id=source.patient_id,
                         transaction=public_id, detail=state.reason)
            raise forwarding.ForwardRefused(state.reason)
        return forwarder, source, state

    def forward_dialog(self, recipient_id: int, public_id: str,
                       source_ip: str = "") -> forwarding.ForwardDialog:
        """What the forward dialog of one of the recipient's packages shows (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        ForwardRefused
            The rules do not allow forwarding it (audited).
        """
        forwarder, source, state = self._forwardable(recipient_id, public_id, source_ip)
        audit.record(audit.PATIENT_RECORD, "view-transaction",
                     audit.Actor("recipient", forwarder.email, source_ip),
                     patient_id=source.patient_id, transaction=public_id,
                     detail="forward dialog")
        return forwarding.ForwardDialog(
            source, forwarder, state, forwarding.known_recipients(forwarder.id),
            forwarding.periods(source.expires_at, time.time(),
                               default_days=self.settings.transaction_expiry_days))

    def forward_history(self, recipient_id: int, public_id: str) -> forwarding.ForwardHistory:
        """The forwarded copies of one of the recipient's packages.

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        """
        forwarder = recipients_q.recipient_by_id(recipient_id)
        source = transactions.get_for_recipient(forwarder, public_id)
        return forwarding.ForwardHistory(source, forwarder,
                                         self.forward_states([source])[public_id],
                                         forwarding.forwards_of(source.id))

    def _create_forward(self, recipient_id: int, public_id: str,
                        request: forwarding.ForwardRequest, source_ip: str,
                        ) -> tuple[forwarding.Forwarded, forwarding.CheckedForward, Recipient]:
        forwarder, source, _ = self._forwardable(recipient_id, public_id, source_ip)
        actor = audit.Actor("recipient", forwarder.email, source_ip)
        checked = forwarding.check_request(
            request, forwarder_email=forwarder.email,
            known=set(forwarding.known_recipients(forwarder.id)))
        try:
            forwarded = forwarding.create_copy(
                source.id, forwarder, checked, max_forwards=self.settings.max_forwards,
                default_days=self.settings.transaction_expiry_days, actor=actor)
        except forwarding.ForwardRefused as exc:
            audit.record(audit.EXPORT, "forward-refused", actor, outcome=audit.MINOR_FAILURE,
                         patient_id=source.patient_id, transaction=public_id,
                         detail=f"to {checked.email}: {exc}")
            raise
        return forwarded, checked, forwarder

    async def forward_to_person(self, recipient_id: int, public_id: str,
                                request: forwarding.ForwardRequest,
                                source_ip: str = "") -> forwarding.Forwarded:
        """Forward one of the recipient's packages to another person.

        The copy is created and audited, its link emailed to the new recipient (who
        logs in with a passcode like any recipient), and the hospital contact of the
        package is told (the notice is audited; failing to send it does not undo the
        forward).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        ForwardRefused
            The rules do not allow it (audited).
        ForwardInvalid
            Something typed in the dialog is wrong.
        DeliveryError
            The link email could not be sent: the copy is deleted again (it does not
            count) and the failure audited.
        """
        forwarded, checked, forwarder = await asyncio.to_thread(
            self._create_forward, recipient_id, public_id, request, source_ip)
        actor = audit.Actor("recipient", forwarder.email, source_ip)
        who = f"{forwarder.name} ({forwarder.email})" if forwarder.name else forwarder.email
        subject, text = forward_mail.forwarded_email(
            forwarded, who, f"{self.settings.public_url}/t/{forwarded.token}")
        try:
            await self.messenger.send_email(forwarded.recipient.email, subject, text,
                                            kind="forward-link")
        except DeliveryError as exc:
            await asyncio.to_thread(self._forward_not_sent, forwarded, actor, exc)
            raise
        await self._tell_hospital(forwarded, checked, forwarder.email)
        return forwarded

    def _forward_not_sent(self, forwarded: forwarding.Forwarded, actor: Actor,
                          exc: Exception) -> None:
        forwarding.undo(forwarded)
        audit.record(audit.EXPORT, "forward-not-sent", actor, outcome=audit.SERIOUS_FAILURE,
                     patient_id=forwarded.source.patient_id,
                     transaction=forwarded.source.public_id,
                     detail=f"link to {forwarded.recipient.email} not sent, copy "
                            f"{forwarded.copy.public_id} deleted: {exc}"[:500])

    async def _tell_hospital(self, forwarded: forwarding.Forwarded,
                             checked: forwarding.CheckedForward, forwarder_email: str) -> None:
        """Email the source package's hospital contact about a forward (audited)."""
        source = forwarded.source
        to = source.contact_email
        outcome, detail = audit.SUCCESS, f"hospital contact {to} told of {forwarded.copy.public_id}"
        if not to:
            outcome, detail = audit.MINOR_FAILURE, "no hospital contact email: not told"
        else:
            subject, text = forward_mail.hospital_notice(
                forwarded, checked, forwarder_email,
                f"{self.settings.public_url}/admin/transactions/{source.public_id}")
            try:
                await self.messenger.send_email(to, subject, text, kind="forward-notice")
            except DeliveryError as exc:
                outcome, detail = audit.MINOR_FAILURE, f"hospital contact {to} not told: {exc}"
        await asyncio.to_thread(
            audit.record, audit.EXPORT, "forward-notice", audit.Actor("system", "forwarding"),
            outcome=outcome, patient_id=source.patient_id, transaction=source.public_id,
            detail=detail[:500])
