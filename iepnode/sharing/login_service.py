"""Recipient logins: a link, a passcode or an authenticator-app code, a session."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from config import Settings
from iepnode.errors import InvalidRequest, LoginRefused, PasscodeRejected
from iepnode.outbound import notifications
from iepnode.outbound.messaging import DeliveryError, Messenger
from iepnode.people import audit
from iepnode.security import SecretKey
from iepnode.sharing import logins, recipients, transactions
from iepnode.sharing.logins import NewSession, PasscodeToSend
from iepnode.sharing.service import contact_of
from iepnode.sharing.transactions import Contact
from storage.group_commit import GroupCommitter
from storage.models import Recipient, Transaction, WebSession
from storage.queries import logins as logins_q
from storage.queries import recipients as recipients_q


@dataclass(frozen=True)
class LinkLogin:
    """The login page of an emailed link: the usable attempt and where its passcode went."""

    attempt_id: int | None
    channel: str
    destination: str
    contact: Contact
    #: The recipient has an authenticator app: the page asks for its code first.
    totp: bool = False
    locked: bool = False


class RecipientLogins:
    """How a recipient gets a session, and their authenticator app.

    Parameters
    ----------
    settings : Settings
        Passcode lifetime, institution (the TOTP issuer).
    secret_key : SecretKey
        The node's secret key (passcode hashes, signed enrolments), read on first use.
    messenger : Messenger
        Sends passcodes by SMS or email.
    group_commit : GroupCommitter
        A resumed session's activity is written through it.
    """

    def __init__(self, settings: Settings, secret_key: SecretKey, messenger: Messenger,
                 group_commit: GroupCommitter) -> None:
        self.settings = settings
        self.secret_key = secret_key
        self.messenger = messenger
        self.group_commit = group_commit

    @property
    def secret(self) -> bytes:
        """The node's secret key (``DATA_DIR/secret.key``), created on first use."""
        return self.secret_key.get()

    async def send_passcode(self, token: str, source_ip: str = "") -> PasscodeToSend:
        """Start a login from an emailed link: send a passcode to the second channel.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        RecipientLocked, RateLimited
            No passcode is sent.
        DeliveryError
            The SMS/email could not be sent: the attempt is discarded (so asking
            again is not rate-limited) and the failure audited.
        """
        transaction = await asyncio.to_thread(transactions.by_link_token, token)
        ttl = self.settings.passcode_ttl_minutes * 60.0
        sent = await asyncio.to_thread(logins.start_attempt, transaction, self.secret, ttl)
        text = notifications.passcode_text(sent.code, self.settings.institution,
                                           self.settings.passcode_ttl_minutes)
        try:
            if sent.channel == "sms":
                await self.messenger.send_sms(sent.destination, text)
            else:
                await self.messenger.send_email(sent.destination, "Your passcode", text,
                                                kind="passcode")
        except DeliveryError as exc:
            await asyncio.to_thread(self._passcode_not_sent, sent, transaction, source_ip, exc)
            raise
        return sent

    def _passcode_not_sent(self, sent: PasscodeToSend, transaction: Transaction,
                           source_ip: str, exc: Exception) -> None:
        logins.discard_attempt(sent)
        audit.record(audit.USER_AUTHENTICATION, "passcode-not-sent",
                     audit.Actor("recipient", transaction.recipient.email, source_ip),
                     outcome=audit.SERIOUS_FAILURE, transaction=transaction.public_id,
                     patient_id=transaction.patient_id, detail=f"{sent.channel}: {exc}"[:500])

    def resume_session(self, token: str) -> WebSession:
        """Return the live session for a cookie value (see :func:`logins.resume_session`)."""
        return logins.resume_session(token, run_write=self.group_commit.run)

    def log_in(self, token: str, attempt_id: int, code: str, source_ip: str = "") -> NewSession:
        """Check a passcode typed on the page a link opened; open a session.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        LoginRefused
            Wrong/expired/reused passcode, dead attempt or locked recipient (audited).
        """
        transaction = transactions.by_link_token(token)
        attempt = logins_q.attempt_or_none(attempt_id)
        actor = audit.Actor("recipient", transaction.recipient.email, source_ip)
        if attempt is None or attempt.transaction_id != transaction.id:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         detail="attempt does not belong to this link")
            raise PasscodeRejected("this login has expired: ask for a new passcode")
        try:
            recipient = logins.verify_passcode(attempt_id, code, self.secret)
        except LoginRefused as exc:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         patient_id=transaction.patient_id, detail=type(exc).__name__)
            raise
        audit.record(audit.USER_AUTHENTICATION, "login", actor,
                     transaction=transaction.public_id, patient_id=transaction.patient_id)
        return logins.open_session(recipient)

    def link_login(self, token: str) -> LinkLogin:
        """Where a link's passcode goes, its latest usable attempt, and the hospital contact.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        """
        transaction = transactions.by_link_token(token)
        recipient = recipients_q.recipient_by_id(transaction.recipient_id)
        attempt = logins_q.latest_usable_attempt(transaction.id, time.time())
        channel = recipients.channel_of(recipient)
        return LinkLogin(attempt.id if attempt else None, channel.kind, channel.destination,
                         contact_of(transaction), totp=bool(recipient.totp_secret),
                         locked=recipient.locked_at is not None)

    def end_session(self, token: str) -> None:
        """Log out: the session cookie value is dead from now on."""
        logins.end_session(token)

    @property
    def _totp_issuer(self) -> str:
        return self.settings.institution.replace(":", " ").strip() or "iepnode"

    def recipient_authenticator(self, recipient_id: int, session_id: int,
                                ) -> tuple[Recipient, logins.TotpEnrolment | None]:
        """The recipient and, unless an app is enrolled, a new secret to enrol."""
        recipient = recipients_q.recipient_by_id(recipient_id)
        if recipient.totp_secret:
            return recipient, None
        return recipient, logins.totp_enrolment(recipient, session_id, self.secret,
                                                 self._totp_issuer)

    def check_totp_enrolment(self, recipient_id: int, session_id: int, totp_secret: str,
                             signature: str) -> logins.TotpEnrolment:
        """The enrolment an enrolment form sent back, if made for this session.

        Raises
        ------
        InvalidRequest
            The secret or its signature was changed, or belongs to another session.
        """
        return logins.check_totp_enrolment(recipients_q.recipient_by_id(recipient_id), session_id,
                                           self.secret, self._totp_issuer, totp_secret,
                                           signature)

    def enrol_totp(self, recipient_id: int, enrolment: logins.TotpEnrolment, code: str,
                   source_ip: str = "") -> None:
        """Save the recipient's authenticator app once a code from it checks out (audited).

        Raises
        ------
        InvalidRequest
            A wrong code, or an app is enrolled already.
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        actor = audit.Actor("recipient", recipient.email, source_ip)
        try:
            logins.enrol_totp(recipient_id, enrolment, code)
        except InvalidRequest as exc:
            audit.record(audit.SECURITY_ALERT, "recipient-totp-enrol", actor,
                         outcome=audit.MINOR_FAILURE, detail=f"refused: {exc}"[:200])
            raise
        audit.record(audit.SECURITY_ALERT, "recipient-totp-enrol", actor)

    def remove_totp(self, recipient_id: int, code: str, source_ip: str = "") -> None:
        """Remove the recipient's authenticator app; needs a current code (audited).

        Raises
        ------
        PasscodeRejected, RecipientLocked
            A wrong or reused code (it counts towards the lockout), or a locked recipient.
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        actor = audit.Actor("recipient", recipient.email, source_ip)
        try:
            logins.remove_totp(recipient_id, code)
        except LoginRefused as exc:
            audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", actor,
                         outcome=audit.MINOR_FAILURE, detail=type(exc).__name__)
            raise
        audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", actor)

    def log_in_app(self, token: str, code: str, source_ip: str = "") -> NewSession:
        """Check a code from the link recipient's authenticator app; open a session.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        LoginRefused
            No app enrolled, a wrong or reused code, or a locked recipient (audited;
            wrong codes count towards the lockout).
        """
        transaction = transactions.by_link_token(token)
        actor = audit.Actor("recipient", transaction.recipient.email, source_ip)
        try:
            recipient = logins.verify_totp(transaction.recipient_id, code)
        except LoginRefused as exc:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         patient_id=transaction.patient_id,
                         detail=f"totp {type(exc).__name__}")
            raise
        audit.record(audit.USER_AUTHENTICATION, "login", actor, detail="totp",
                     transaction=transaction.public_id, patient_id=transaction.patient_id)
        return logins.open_session(recipient)
