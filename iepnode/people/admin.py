"""Staff-side services: login, studies, transfers, audit trail, remote AEs and users.

Everything the ``/admin`` pages do goes through :class:`AdminService`
(``node.admin``), so the views stay thin and every change is audited in one
place. The audit events written here (PS3.15 A.5 EventIDs)::

    110114 User Authentication  login, login-failed, logout
    110112 Query                study-search (with the criteria)
    110110 Patient Record       view-transaction, message (staff reply; body not kept),
                                message-notify (the email telling the recipient of it)
    110106 Export               transfer-create (written by Node.share)
    110113 Security Alert       recipient-unlock, recipient-totp-remove, login-locked,
                                recipient-channel-change, recipient-channel-notice,
                                admin-change (remote AEs, staff users, own TOTP/password,
                                an admin resetting another user's password or TOTP)

Resets: an admin may reset another staff user's password (to a temporary one that
must be changed at the next login) or TOTP secret (cleared: the next login, with the
password alone, may only enrol a new authenticator). Until then
:meth:`AdminService.pending_step` names the one page that user's sessions may open.

Brute force: password checks are counted per username (known or not, so a
lock reveals nothing), each claimed in the database before it is made
(:class:`LoginThrottle`): at most :data:`MAX_FAILURES` per :data:`FAILURE_WINDOW`
seconds however many logins arrive at once, and when they all fail the username is
locked for :data:`LOCKOUT` seconds, during which even the right password is
refused without being checked. The web view also answers
every failure after :data:`FAILURE_DELAY` seconds. A TOTP code is accepted once
per user (RFC 6238 section 5.2). Both live in the database, so every HTTP
process sees the same counts and used codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import peewee
import pyotp
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from iepnode import timefmt
from iepnode.archive.query import Root, parse_identifier, select_rows
from iepnode.errors import Busy, InvalidRequest, LoginRefused, NotAuthorized, NotFound
from iepnode.outbound import notifications
from iepnode.outbound.messaging import DeliveryError
from iepnode.people import audit, passwords, staff
from iepnode.people.audit import Actor
from iepnode.sharing import logins, recipients, transactions
from iepnode.sharing.transactions import NewTransfer, StudyRow
from iepnode.viewing import attachments
from iepnode.viewing.attachments import AttachmentEntry
from storage import hot_queries, registry
from storage.db import write_transaction
from storage.models import (
    AuditEvent,
    Patient,
    Recipient,
    RemoteAE,
    StaffLoginFailures,
    StaffUser,
    Study,
    Transaction,
    TransactionMessage,
    TransactionStudy,
    UsedStaffCode,
    WebSession,
)

if TYPE_CHECKING:
    from iepnode.node import Node
    from iepnode.sharing.logins import NewSession

log = logging.getLogger("iepnode.admin")

#: Failed logins per username within :data:`FAILURE_WINDOW` that start a lockout.
MAX_FAILURES = 5
FAILURE_WINDOW = 15 * 60.0
LOCKOUT = 15 * 60.0
#: Seconds the web view waits before answering a failed login.
FAILURE_DELAY = 1.0
#: The one message every refused login gets (unknown user, disabled, password, code).
LOGIN_REFUSED = "Wrong username, password or code."
#: A used TOTP code is refused for this long (it is valid for 30 s either side).
TOTP_REPLAY_WINDOW = 120.0

#: What a session of a user with a pending step may do, in order (see ``pending_step``).
STEP_TOTP = "totp"
STEP_PASSWORD = "password"

#: EventID codes (DCM) used only by the staff side.
QUERY = ("110112", "Query")
PATIENT_RECORD = ("110110", "Patient Record")
ADMIN_CHANGE = "admin-change"

AUDIT_PAGE_SIZE = 50
STUDY_LIMIT = 200
TRANSACTION_LIMIT = 100

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_HOST = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9.:-]{0,254})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


class LoginThrottled(LoginRefused):
    """Too many failed logins for this username: refused without checking."""


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaffLogin:
    """A successful staff login: the new session (cookie token) and the user."""

    session: NewSession
    user: StaffUser


@dataclass(frozen=True)
class StudyHit:
    """One received study found by a staff search."""

    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    description: str
    modalities: str
    num_series: int
    num_instances: int


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
class PasswordReset:
    """A reset password: the user, and the generated password to show once ('' if typed)."""

    user: StaffUser
    generated: str


@dataclass(frozen=True)
class ReplyOutcome:
    """A stored staff reply and what became of the email telling the recipient.

    ``reason`` says why no email went: ``expired`` (the transaction's link signs
    in no more) or ``failed`` (the mail could not be sent; logged and audited).
    """

    emailed: bool
    reason: str = ""


@dataclass(frozen=True)
class ChannelChanged:
    """A recipient's passcode channel changed by staff, and whether the old one was told."""

    email: str
    new: recipients.Channel
    notified: bool


@dataclass(frozen=True)
class AuditPage:
    """One page of the audit log, newest first."""

    events: list[AuditEvent]
    page: int
    pages: int
    total: int
    actions: list[str]


@dataclass(frozen=True)
class TotpEnrolment:
    """A new TOTP secret waiting for confirmation, signed for this session."""

    secret: str
    uri: str
    signature: str


# -- brute-force protection --------------------------------------------------------------


class LoginThrottle:
    """Count password checks per username; lock a username after too many failures.

    The counts live in the database, so every web process sees the same ones, and
    each check is claimed there before it is made: :meth:`begin` is one conditional
    ``UPDATE`` that takes one of the window's ``max_failures`` checks only while the
    username is not locked and checks are left (on PostgreSQL it waits for the row's
    lock and re-checks the condition on the committed row; SQLite's writers queue for
    one lock). However many logins arrive at once, at most ``max_failures`` passwords
    of a username are checked per window; the failure that uses the last check starts
    the lockout (:meth:`failed`), and a success forgets the count (:meth:`succeeded`).

    Parameters
    ----------
    max_failures : int
        Checks within ``window`` seconds; when they all fail, a lockout starts.
    window, lockout : float
        Seconds over which checks count, and how long a lockout lasts.
    """

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 lockout: float = LOCKOUT) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout

    def locked_for(self, username: str, now: float) -> float:
        """Seconds ``username`` stays locked (0 when it is not)."""
        row = StaffLoginFailures.get_or_none(StaffLoginFailures.username == username)
        return max(0.0, row.locked_until - now) if row is not None else 0.0

    def begin(self, username: str, now: float) -> bool:
        """Claim one password check for ``username``; ``False``: locked, check nothing.

        A window that is over, or a lockout that has ended, starts a new count.
        """
        rows = StaffLoginFailures
        over = (rows.window_start < now - self.window) | (
            (rows.locked_until > 0) & (rows.locked_until <= now))
        with write_transaction():
            rows.insert(username=username, failures=0, window_start=now,
                        locked_until=0.0).on_conflict_ignore().execute()
            won = rows.update(
                failures=peewee.Case(None, [(over, 1)], rows.failures + 1),
                window_start=peewee.Case(None, [(over, now)], rows.window_start),
                locked_until=peewee.Case(None, [(over, 0.0)], rows.locked_until),
            ).where((rows.username == username) & (rows.locked_until <= now)
                    & (over | (rows.failures < self.max_failures))).execute()
        return bool(won)

    def give_back(self, username: str) -> None:
        """Return a claimed check that was never made (the server was too busy)."""
        rows = StaffLoginFailures
        with write_transaction():
            rows.update(failures=rows.failures - 1).where(
                (rows.username == username) & (rows.failures > 0)).execute()

    def failed(self, username: str, now: float) -> bool:
        """Note that a claimed check failed; return ``True`` when it starts a lockout."""
        rows = StaffLoginFailures
        with write_transaction():
            locked = rows.update(locked_until=now + self.lockout).where(
                (rows.username == username) & (rows.failures >= self.max_failures)
                & (rows.locked_until <= now)).execute()
            # Keep the table small: rows of usernames with nothing left to remember.
            rows.delete().where((rows.window_start < now - self.window)
                                & (rows.locked_until < now)).execute()
        return bool(locked)

    def succeeded(self, username: str) -> None:
        """Forget the failures of a username that has just logged in."""
        with write_transaction():
            StaffLoginFailures.delete().where(
                StaffLoginFailures.username == username).execute()


# -- helpers -----------------------------------------------------------------------------


def _clean(value: str, limit: int = 64) -> str:
    """Strip, drop control characters and backslashes, and cut to ``limit`` characters."""
    return _CONTROL.sub("", value).strip()[:limit]


def _username_key(username: str) -> str:
    return _clean(username).lower()


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def name_pattern(text: str) -> str:
    """Turn what staff type into a C-FIND PatientName value.

    ``Doe, Jane`` becomes ``Doe^Jane*``; text without ``*`` or ``?`` matches as a
    prefix; matching is case-insensitive (the index keeps upper-cased names).
    """
    text = _clean(text)
    if "^" not in text and "," in text:
        family, _, given = text.partition(",")
        text = f"{family.strip()}^{given.strip()}"
    return text if _has_wildcard(text) else f"{text}*"


def parse_date(value: str, label: str) -> str:
    """Return ``YYYYMMDD`` for ``YYYY-MM-DD`` / ``YYYYMMDD`` input ('' stays '').

    Raises
    ------
    InvalidRequest
        Anything else.
    """
    value = value.strip()
    if not value:
        return ""
    match = _DATE.match(value)
    if match is None:
        raise InvalidRequest(f"{label}: give a date as YYYY-MM-DD")
    year, month, day = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and year >= 1900):
        raise InvalidRequest(f"{label}: {value} is not a date")
    return "".join(match.groups())


def date_range(date_from: str, date_to: str) -> str:
    """Return a C-FIND date range (``A-B``, ``A-``, ``-B``) or '' for no range.

    Raises
    ------
    InvalidRequest
        A malformed date, or a range that ends before it starts.
    """
    low, high = parse_date(date_from, "From"), parse_date(date_to, "To")
    if low and high and low > high:
        raise InvalidRequest("the date range ends before it starts")
    if not (low or high):
        return ""
    return low if low == high else f"{low}-{high}"


def _identifier(values: dict[str, str]) -> Dataset:
    """A STUDY level identifier with ``values`` (no pydicom value validation)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), value,
                           validation_mode=dicom_config.IGNORE))
    return ds


def _verify_password(user: StaffUser, password: str) -> bool:
    return passwords.verify_password(user.password_hash, password)


def _actor(user: StaffUser, source_ip: str) -> Actor:
    return Actor("staff", user.username, source_ip)


def _get_transaction(public_id: str) -> Transaction:
    transaction = (Transaction.select(Transaction, Recipient).join(Recipient)
                   .where(Transaction.public_id == public_id).first())
    if transaction is None:
        raise NotFound(f"no transaction {public_id}")
    return transaction


_STUDY_COLUMNS = (
    Study.study_uid, Patient.name, Patient.patient_id, Patient.birth_date, Patient.sex,
    Study.study_date, Study.study_time, Study.accession, Study.description, Study.modalities,
    Study.num_series, Study.num_instances,
)


class AdminService:
    """What the /admin pages do, behind the Node façade (``node.admin``).

    Blocking methods: the web views call them in a worker thread, and those that hash
    or check a password (log in, add a user, change, reset or confirm a password)
    through :attr:`password_work`, never in the threads page views share.

    Parameters
    ----------
    node : Node
        The node whose index, store and messenger are used.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.throttle = LoginThrottle()
        #: Seconds the web view waits before answering a failed login.
        self.failure_delay = FAILURE_DELAY
        #: Where the web views run the methods that hash or check a password (bounded).
        self.password_work = passwords.PasswordWork(node.settings.password_hash_concurrency,
                                                    node.settings.password_hash_queue)

    # -- login -------------------------------------------------------------------------

    def log_in(self, username: str, password: str, code: str, source_ip: str = "",
               now: float | None = None) -> StaffLogin:
        """Check password and TOTP code; open a staff session. Audited either way.

        Blocking, hash included (the CLI and tests); the web view runs the same steps
        with the hash on :attr:`password_work` (:meth:`log_in_bounded`).

        Raises
        ------
        LoginThrottled
            The username is locked after too many failures (nothing is checked).
        LoginRefused
            Unknown user, disabled, wrong password, wrong or reused code
            (:data:`LOGIN_REFUSED` for all).
        """
        now = time.time() if now is None else now
        key, user = self._begin_login(username, source_ip, now)
        return self._finish_login(key, user, staff.check_password(user, password), code,
                                  source_ip, now)

    async def log_in_bounded(self, username: str, password: str, code: str,
                             source_ip: str = "") -> StaffLogin:
        """:meth:`log_in` for the web: database steps in a thread, the hash on the bounded pool.

        Raises
        ------
        Busy
            This process has as many password checks running and waiting as it allows
            (the username's count of checks is given back).
        LoginThrottled, LoginRefused
            As :meth:`log_in`.
        """
        now = time.time()
        key, user = await asyncio.to_thread(self._begin_login, username, source_ip, now)
        try:
            kept = await self.password_work.run(staff.check_password, user, password)
        except Busy:
            await asyncio.to_thread(self.throttle.give_back, key)
            raise
        return await asyncio.to_thread(self._finish_login, key, user, kept, code, source_ip,
                                       now)

    def _begin_login(self, username: str, source_ip: str,
                     now: float) -> tuple[str, StaffUser | None]:
        """Claim a password check for the username (or refuse, audited); find its user."""
        key = _username_key(username)
        if not self.throttle.begin(key, now):
            audit.record(audit.USER_AUTHENTICATION, "login-failed",
                         Actor("staff", key, source_ip), outcome=audit.MINOR_FAILURE,
                         detail="username locked out", now=now)
            minutes = max(1, math.ceil(self.throttle.locked_for(key, now) / 60))
            raise LoginThrottled(f"Too many failed logins: try again in {minutes} minute"
                                 f"{'s' if minutes != 1 else ''}.")
        return key, staff.find_user(key)

    def _finish_login(self, key: str, user: StaffUser | None, kept_hash: str | None,
                      code: str, source_ip: str, now: float) -> StaffLogin:
        """After the password check: TOTP code, lockout count, session, audit."""
        actor = Actor("staff", key, source_ip)
        try:
            user = staff.admit(user, kept_hash, code, now, allow_enrolment=True)
            if user.totp_secret:
                self._use_code(user.id, code.strip(), now)
        except LoginRefused:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, detail=self._failure_reason(key), now=now)
            if self.throttle.failed(key, now):
                audit.record(audit.SECURITY_ALERT, "login-locked", actor,
                             outcome=audit.MINOR_FAILURE, now=now,
                             detail=f"{self.throttle.max_failures} failed logins: username "
                                    f"locked for {self.throttle.lockout / 60:.0f} minutes")
            raise LoginRefused(LOGIN_REFUSED) from None
        self.throttle.succeeded(key)
        opened = logins.open_session(staff_id=user.id, now=now)
        audit.record(audit.USER_AUTHENTICATION, "login", _actor(user, source_ip), now=now,
                     detail="" if user.totp_secret else
                     "password only: may enrol an authenticator, nothing else")
        return StaffLogin(opened, user)

    @staticmethod
    def pending_step(user: StaffUser) -> str | None:
        """What ``user`` must do before anything else: enrol TOTP, set a password, or None.

        :data:`STEP_TOTP` while the user has no TOTP secret (their session was opened
        with the password alone), then :data:`STEP_PASSWORD` while a temporary
        password set by an admin is in use.
        """
        if not user.totp_secret:
            return STEP_TOTP
        if user.must_change_password:
            return STEP_PASSWORD
        return None

    @staticmethod
    def _failure_reason(username: str) -> str:
        user = StaffUser.get_or_none(StaffUser.username == username)
        if user is None:
            return "unknown user"
        if user.disabled:
            return "account disabled"
        return "wrong password or code"

    def _use_code(self, user_id: int, code: str, now: float) -> None:
        """Accept each TOTP code once per user (RFC 6238 section 5.2), in every process."""
        try:
            with write_transaction():
                UsedStaffCode.delete().where(UsedStaffCode.expires_at <= now).execute()
                UsedStaffCode.create(staff=user_id, code=code,
                                     expires_at=now + TOTP_REPLAY_WINDOW)
        except peewee.IntegrityError:
            raise LoginRefused("code used already") from None

    def staff_for_session(self, session: WebSession | None) -> StaffUser | None:
        """The enabled staff user of a session, or ``None`` (none, recipient, disabled)."""
        if session is None or session.staff_id is None:
            return None
        user = StaffUser.get_or_none(StaffUser.id == session.staff_id)
        if user is None or user.disabled:
            return None
        return user

    def log_out(self, token: str, user: StaffUser | None, source_ip: str = "") -> None:
        """End the session of a cookie value (audited when it was a staff session)."""
        logins.end_session(token)
        if user is not None:
            audit.record(audit.USER_AUTHENTICATION, "logout", _actor(user, source_ip))

    # -- transactions ------------------------------------------------------------------

    def recent_transactions(self, search: str = "",
                            limit: int = TRANSACTION_LIMIT) -> list[Transaction]:
        """Newest transactions first (recipient loaded), optionally filtered.

        Every word of ``search`` must occur (case-insensitively) in the transaction
        ID, patient name or ID, or the recipient's email or name.
        """
        query = Transaction.select(Transaction, Recipient).join(Recipient)
        for term in re.split(r"[\s,^]+", _clean(search, 200)):
            if term:
                query = query.where(
                    Transaction.public_id.contains(term) | Transaction.patient_name.contains(term)
                    | Transaction.patient_id.contains(term) | Recipient.email.contains(term)
                    | Recipient.name.contains(term))
        return list(query.order_by(Transaction.created_at.desc(), Transaction.id.desc())
                    .limit(limit))

    def transaction_view(self, public_id: str, user: StaffUser,
                         source_ip: str = "") -> StaffTransactionView:
        """One transaction with studies, thread and audit trail (the view is audited).

        Raises
        ------
        NotFound
            No such transaction.
        """
        transaction = _get_transaction(public_id)
        audit.record(PATIENT_RECORD, "view-transaction", _actor(user, source_ip),
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
            tuple(attachments.entries_of(transaction)), attachments.may_file(user, transaction),
            self.may_change_channel(transaction.recipient, user),
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
        actor = _actor(user, source_ip)
        if transaction.purged_at or transactions.is_expired(transaction, time.time()):
            await asyncio.to_thread(
                audit.record, PATIENT_RECORD, "message-notify", actor,
                outcome=audit.MINOR_FAILURE, patient_id=transaction.patient_id,
                transaction=public_id, detail="not emailed: the transaction has expired")
            return ReplyOutcome(False, "expired")
        email = transaction.recipient.email
        subject, text = notifications.message_email(
            transaction, f"{self.node.settings.public_url}/transactions/{public_id}")
        try:
            await self.node.messenger.send_email(email, subject, text, kind="message-notice")
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
        audit.record(PATIENT_RECORD, "message", _actor(user, source_ip),
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
        recipient = transaction.recipient
        if recipient.locked_at is None:
            raise InvalidRequest(f"{recipient.email} is not locked")
        logins.unlock(recipient)
        audit.record(audit.SECURITY_ALERT, "recipient-unlock", _actor(user, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=recipient.email)
        return recipient.email

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
        audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", _actor(user, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=f"{recipient.email}: removed by staff; recipient sessions ended")
        return recipient.email

    # -- a recipient's passcode channel (issue 13) ---------------------------------------

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
        mine = {t.id: t.public_id for t in Transaction.select(
            Transaction.id, Transaction.public_id).where(
            (Transaction.recipient == recipient.id)
            & (Transaction.created_by == user.username))}
        if not mine:
            return False
        first = (Transaction.select(Transaction.id).where(Transaction.recipient == recipient.id)
                 .order_by(Transaction.created_at, Transaction.id).scalar())
        return first in mine or AuditEvent.select().where(
            (AuditEvent.action == "login") & (AuditEvent.actor_kind == "recipient")
            & (AuditEvent.actor == recipient.email)
            & AuditEvent.transaction_public_id.in_(list(mine.values()))).exists()

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
        settings = self.node.settings
        subject, text = notifications.channel_changed_text(
            settings.institution, timefmt.day_time(time.time(), settings.zone),
            change.new.masked, contact)
        actor = _actor(user, source_ip)
        try:
            if change.old.kind == recipients.SMS:
                await self.node.messenger.send_sms(change.old.destination, text)
            else:
                await self.node.messenger.send_email(change.old.destination, subject, text,
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

    @staticmethod
    def recipient_email_of(public_id: str) -> str:
        """The email of a transaction's recipient.

        Raises
        ------
        NotFound
            No such transaction.
        """
        return _get_transaction(public_id).recipient.email

    def _change_channel(self, email: str, otp_mobile: str, otp_email: str, user: StaffUser,
                        source_ip: str, public_id: str,
                        ) -> tuple[recipients.ChannelChange, str, str]:
        recipient = Recipient.get_or_none(Recipient.email == email.strip().lower())
        if recipient is None:
            raise NotFound(f"no recipient {email}")
        if not self.may_change_channel(recipient, user):
            raise NotAuthorized("only administrators, and the hospital contact of the "
                                "transaction this recipient's account was made for or of one "
                                "they have signed in through, may change where their "
                                "passcodes go")
        channel = recipients.check_channel(recipient.email, otp_mobile, otp_email)
        change = recipients.change_channel(recipient.id, channel)
        transaction = Transaction.get_or_none(Transaction.public_id == public_id) \
            if public_id else None
        patient_id = transaction.patient_id if transaction is not None else ""
        audit.record(audit.SECURITY_ALERT, "recipient-channel-change", _actor(user, source_ip),
                     transaction=public_id, patient_id=patient_id,
                     detail=f"{recipient.email}: passcode channel {change.old.masked} -> "
                            f"{change.new.masked}; sessions and unused passcodes ended")
        return change, self._contact_line(user, recipient.id), patient_id

    def _contact_line(self, user: StaffUser, recipient_id: int) -> str:
        """Whom the notice tells the recipient to call: the staff user, else their contact."""
        name = user.display_name or user.username
        if user.phone or user.email:
            return f"{name}, {self.node.settings.institution} ({user.phone or user.email})"
        newest = transactions.newest_for(recipient_id)
        reach = newest and (newest.contact_phone or newest.contact_email)
        if reach:
            return f"{newest.contact_name or self.node.settings.institution} ({reach})"
        return self.node.settings.institution

    async def share(self, request: NewTransfer, user: StaffUser,
                    source_ip: str = "") -> Transaction:
        """Create a transfer as ``user`` (see :meth:`Node.share`)."""
        return await self.node.share(request, actor=_actor(user, source_ip), user=user)

    # -- studies -----------------------------------------------------------------------

    def search_studies(self, text: str = "", date_from: str = "", date_to: str = "",
                       user: StaffUser | None = None, source_ip: str = "",
                       limit: int = STUDY_LIMIT) -> list[StudyHit]:
        """Find received studies, newest first, with C-FIND matching.

        ``text`` matches the patient name (case-insensitive; a prefix unless it has
        ``*``/``?``; ``Doe, Jane`` means ``Doe^Jane``), the patient ID or the
        accession number (exact unless wildcards). Searches with criteria are
        audited as Query events.

        Raises
        ------
        InvalidRequest
            A malformed date or date range.
        """
        dates = date_range(date_from, date_to)
        text = _clean(text)
        common = {"StudyDate": dates} if dates else {}
        if text:
            variants = [{"PatientName": name_pattern(text)}, {"PatientID": text},
                        {"AccessionNumber": text}]
        else:
            variants = [{}]
        hits: dict[str, StudyHit] = {}
        for variant in variants:
            query = parse_identifier(_identifier({**common, **variant}), Root.PATIENT)
            select = (select_rows(query, columns=list(_STUDY_COLUMNS))
                      .order_by(Study.study_date.desc(), Study.study_time.desc(),
                                Study.id.desc())
                      .limit(limit).tuples())
            for row in select:
                hits.setdefault(row[0], StudyHit(*row))
        if user is not None and (text or dates):
            audit.record(QUERY, "study-search", _actor(user, source_ip),
                         detail=f"text={text!r} dates={dates!r} found={len(hits)}")
        found = sorted(hits.values(), key=lambda h: (h.study_date, h.study_time), reverse=True)
        return found[:limit]

    def studies_by_uid(self, study_uids: list[str]) -> list[StudyHit]:
        """The indexed studies among ``study_uids`` (to show a rejected share form again)."""
        uids = [u for u in study_uids if u][:STUDY_LIMIT]
        if not uids:
            return []
        rows = (Study.select(*_STUDY_COLUMNS).join(Patient)
                .where(Study.study_uid.in_(uids)).tuples())
        return [StudyHit(*row) for row in rows]

    # -- audit log ---------------------------------------------------------------------

    def audit_log(self, actor: str = "", action: str = "", patient: str = "",
                  page: int = 1, per_page: int = AUDIT_PAGE_SIZE) -> AuditPage:
        """One page of the audit log, newest first.

        ``actor`` matches part of the actor's name (case-insensitive), ``action``
        the action exactly, ``patient`` the patient ID exactly.
        """
        query = AuditEvent.select()
        if actor.strip():
            query = query.where(AuditEvent.actor.contains(_clean(actor, 254)))
        if action.strip():
            query = query.where(AuditEvent.action == action.strip()[:32])
        if patient.strip():
            query = query.where(AuditEvent.patient_id == patient.strip()[:64])
        total = query.count()
        pages = max(1, math.ceil(total / per_page))
        page = min(max(1, page), pages)
        events = list(query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
                      .paginate(page, per_page))
        actions = [a for (a,) in AuditEvent.select(AuditEvent.action).distinct()
                   .order_by(AuditEvent.action).tuples()]
        return AuditPage(events, page, pages, total, actions)

    # -- remote AEs --------------------------------------------------------------------

    def remote_aes(self) -> list[RemoteAE]:
        """The registered remote AEs, by title."""
        return registry.list_remote_aes()

    def add_remote_ae(self, ae_title: str, host: str, port: str, allow: list[str],
                      user: StaffUser, source_ip: str = "", *,
                      send_to: bool | None = None) -> tuple[RemoteAE, bool]:
        """Register or update a remote AE (audited); return it and whether it is new.

        Raises
        ------
        InvalidRequest
            A bad AE title, host, port or service.
        """
        title = ae_title.strip()
        if not _AE_TITLE.match(title):
            raise InvalidRequest("an AE title has 1 to 16 characters, no backslash or "
                                 "control characters")
        host = host.strip()
        if not _HOST.match(host):
            raise InvalidRequest("the host is an IP address, a host name, or * for any")
        try:
            port_number = int(port.strip())
        except ValueError:
            raise InvalidRequest("the port is a number from 1 to 65535") from None
        if not 1 <= port_number <= 65535:
            raise InvalidRequest("the port is a number from 1 to 65535")
        services = {s.strip().lower() for s in allow if s.strip()}
        created = registry.get_remote_ae(title) is None
        try:
            ae = registry.add_remote_ae(title, host, port_number, services, send_to=send_to)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        verb = "ae-add" if created else "ae-update"
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"{verb} {ae.ae_title} {ae.host}:{ae.port} "
                            f"allow=echo{',' + ae.allow if ae.allow else ''}"
                            f"{' send-to' if ae.send_to else ''}")
        return ae, created

    def remove_remote_ae(self, ae_title: str, user: StaffUser, source_ip: str = "") -> None:
        """Unregister a remote AE (audited).

        Raises
        ------
        NotFound
            No such AE.
        """
        title = ae_title.strip()
        if not registry.remove_remote_ae(title):
            raise NotFound(f"no remote AE {title!r}")
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"ae-remove {title}")

    # -- staff users -------------------------------------------------------------------

    def staff_users(self) -> list[StaffUser]:
        """Every staff user, by username."""
        return list(StaffUser.select().order_by(StaffUser.username))

    def add_user(self, username: str, password: str, *, is_admin: bool, display_name: str,
                 email: str, department: str, phone: str, user: StaffUser,
                 source_ip: str = "") -> tuple[StaffUser, str]:
        """Create a staff user (audited); return it and its ``otpauth://`` URI.

        Raises
        ------
        InvalidRequest
            Bad or taken username, short password, bad email.
        """
        email = recipients.normalize_email(email) if email.strip() else ""
        new, uri = staff.create_user(username, password, is_admin=is_admin,
                                     display_name=_clean(display_name, 128), email=email,
                                     department=_clean(department, 128),
                                     phone=_clean(phone, 32))
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"user-add {new.username}{' (admin)' if new.is_admin else ''}")
        return new, uri

    def set_disabled(self, user_id: int, disabled: bool, user: StaffUser,
                     source_ip: str = "") -> StaffUser:
        """Disable (ending its sessions) or enable a staff user (audited).

        Raises
        ------
        NotFound
            No such user.
        InvalidRequest
            Staff cannot disable themselves.
        """
        target = StaffUser.get_or_none(StaffUser.id == user_id)
        if target is None:
            raise NotFound(f"no staff user {user_id}")
        if target.id == user.id and disabled:
            raise InvalidRequest("you cannot disable your own account")
        target.disabled = disabled
        target.save()
        if disabled:
            WebSession.update(ended=True).where(WebSession.staff == target.id).execute()
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"user-{'disable' if disabled else 'enable'} {target.username}")
        return target

    @staticmethod
    def _other_user(user_id: int, admin: StaffUser, what: str) -> StaffUser:
        if not admin.is_admin:
            raise NotAuthorized("only administrators reset other users")
        target = StaffUser.get_or_none(StaffUser.id == user_id)
        if target is None:
            raise NotFound(f"no staff user {user_id}")
        if target.id == admin.id:
            raise InvalidRequest(f"you cannot reset your own {what} here: use Your account")
        return target

    def reset_password(self, user_id: int, temporary: str, user: StaffUser,
                       source_ip: str = "") -> PasswordReset:
        """Give another staff user a temporary password they must change at next login.

        ``temporary`` empty: one is generated (returned once, never stored or logged).
        The user's sessions end and their failed-login lockout is cleared. Audited.

        Raises
        ------
        NotAuthorized
            ``user`` is not an admin.
        NotFound
            No such user.
        InvalidRequest
            The admin's own account, or a typed password shorter than 12 characters.
        """
        target = self._other_user(user_id, user, "password")
        generated = "" if temporary else staff.temporary_password()
        password = temporary or generated
        passwords.check_policy(password)
        with write_transaction():
            StaffUser.update(password_hash=passwords.hash_password(password),
                             must_change_password=True).where(
                StaffUser.id == target.id).execute()
            WebSession.update(ended=True).where(WebSession.staff == target.id).execute()
        self.throttle.succeeded(target.username)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"password-reset {target.username} (temporary password "
                            f"{'generated' if generated else 'typed by the admin'}; "
                            f"sessions ended)")
        return PasswordReset(StaffUser.get_by_id(target.id), generated)

    def reset_totp(self, user_id: int, user: StaffUser, source_ip: str = "") -> StaffUser:
        """Clear another staff user's TOTP secret: they enrol a new one at next login.

        Until they do, their password opens the enrolment page and nothing else.
        Their sessions end. Audited.

        Raises
        ------
        NotAuthorized
            ``user`` is not an admin.
        NotFound
            No such user.
        InvalidRequest
            The admin's own account.
        """
        target = self._other_user(user_id, user, "authenticator")
        with write_transaction():
            StaffUser.update(totp_secret=None).where(StaffUser.id == target.id).execute()
            UsedStaffCode.delete().where(UsedStaffCode.staff == target.id).execute()
            WebSession.update(ended=True).where(WebSession.staff == target.id).execute()
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"totp-reset {target.username} (must enrol at next login; "
                            f"sessions ended)")
        return StaffUser.get_by_id(target.id)

    # -- own account -------------------------------------------------------------------

    def _signature(self, session_id: int, user_id: int, secret: str) -> str:
        message = f"totp-enrol:{session_id}:{user_id}:{secret}".encode()
        return hmac.new(self.node.secret, message, hashlib.sha256).hexdigest()

    def totp_enrolment(self, user: StaffUser, session_id: int,
                       secret: str | None = None) -> TotpEnrolment:
        """A new TOTP secret (or ``secret`` again) signed for this session and user."""
        secret = secret or pyotp.random_base32()
        uri = pyotp.TOTP(secret).provisioning_uri(name=user.username, issuer_name=staff.ISSUER)
        return TotpEnrolment(secret, uri, self._signature(session_id, user.id, secret))

    def check_enrolment(self, user: StaffUser, session_id: int, secret: str,
                        signature: str) -> TotpEnrolment:
        """Return the enrolment a form sent back, if it was made for this session.

        Raises
        ------
        InvalidRequest
            The secret or its signature was changed, or belongs to another session.
        """
        expected = self._signature(session_id, user.id, secret)
        if not hmac.compare_digest(expected, signature):
            raise InvalidRequest("this enrolment is not valid any more: start again")
        return self.totp_enrolment(user, session_id, secret)

    def confirm_totp(self, user: StaffUser, session_id: int, enrolment: TotpEnrolment,
                     password: str, code: str, source_ip: str = "") -> None:
        """Replace the user's TOTP secret once a code from the new one checks out.

        The user's other sessions end. Audited.

        Raises
        ------
        InvalidRequest
            Wrong password, or a code that does not match the new secret.
        """
        actor = _actor(user, source_ip)
        if not _verify_password(user, password):
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor, outcome=audit.MINOR_FAILURE,
                         detail="totp-reenrol refused: wrong password")
            raise InvalidRequest("wrong password")
        if not pyotp.TOTP(enrolment.secret).verify(re.sub(r"\s", "", code), valid_window=1):
            raise InvalidRequest("that code does not match the new secret: check the "
                                 "authenticator app's clock and try the next code")
        StaffUser.update(totp_secret=enrolment.secret).where(StaffUser.id == user.id).execute()
        WebSession.update(ended=True).where(
            (WebSession.staff == user.id) & (WebSession.id != session_id)).execute()
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor,
                     detail=f"totp-reenrol {user.username}")

    def change_password(self, user: StaffUser, session_id: int, current: str, new: str,
                        repeat: str, source_ip: str = "") -> None:
        """Change the user's own password; the user's other sessions end. Audited.

        Raises
        ------
        InvalidRequest
            Wrong current password, a short new one, or the two new ones differ.
        """
        actor = _actor(user, source_ip)
        if not _verify_password(user, current):
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor, outcome=audit.MINOR_FAILURE,
                         detail="password-change refused: wrong password")
            raise InvalidRequest("wrong current password")
        passwords.check_policy(new)
        if new != repeat:
            raise InvalidRequest("the new passwords differ")
        StaffUser.update(password_hash=passwords.hash_password(new)).where(
            StaffUser.id == user.id).execute()
        WebSession.update(ended=True).where(
            (WebSession.staff == user.id) & (WebSession.id != session_id)).execute()
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor,
                     detail=f"password-change {user.username}")

    # -- steps after an admin reset (pending_step) -------------------------------------

    def enrol_first_totp(self, user: StaffUser, session_id: int, enrolment: TotpEnrolment,
                         code: str, source_ip: str = "", now: float | None = None) -> None:
        """Save the TOTP secret of a user who has none, once a code from it checks out.

        The session (opened with the password alone) then counts as a full login: the
        password and a code were both shown. Its code is used up, the user's other
        sessions end (one opened elsewhere with the password alone gains nothing).
        Audited.

        Raises
        ------
        InvalidRequest
            A code that does not match, or the user has a secret already.
        """
        now = time.time() if now is None else now
        code = re.sub(r"\s", "", code)
        if not pyotp.TOTP(enrolment.secret).verify(code, for_time=now, valid_window=1):
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                         outcome=audit.MINOR_FAILURE, detail="totp-enrol refused: wrong code")
            raise InvalidRequest("that code does not match: check the authenticator app's "
                                 "clock and type the code it shows now")
        with write_transaction():
            saved = StaffUser.update(totp_secret=enrolment.secret).where(
                (StaffUser.id == user.id) & StaffUser.totp_secret.is_null()).execute()
            WebSession.update(ended=True).where(
                (WebSession.staff == user.id) & (WebSession.id != session_id)).execute()
        if not saved:
            raise InvalidRequest("an authenticator is enrolled already")
        self._use_code(user.id, code, now)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"totp-enrol {user.username} (after a reset)")

    def set_required_password(self, user: StaffUser, session_id: int, new: str, repeat: str,
                              source_ip: str = "") -> None:
        """Replace a temporary password set by an admin with the user's own. Audited.

        The user's other sessions end.

        Raises
        ------
        InvalidRequest
            No new password is required, a short one, the two differ, or it is the
            temporary password again.
        """
        if not user.must_change_password:
            raise InvalidRequest("your password does not need changing")
        passwords.check_policy(new)
        if new != repeat:
            raise InvalidRequest("the new passwords differ")
        if _verify_password(user, new):
            raise InvalidRequest("choose a password of your own, not the temporary one")
        with write_transaction():
            StaffUser.update(password_hash=passwords.hash_password(new),
                             must_change_password=False).where(
                StaffUser.id == user.id).execute()
            WebSession.update(ended=True).where(
                (WebSession.staff == user.id) & (WebSession.id != session_id)).execute()
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, _actor(user, source_ip),
                     detail=f"password-change {user.username} (after a reset)")
