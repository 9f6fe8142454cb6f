"""Recipient login: email link -> one-time passcode -> session.

The link token alone never grants access: it starts a login attempt whose
passcode goes to the recipient's second channel (mobile or second email). A
passcode is single use, expires after ``ttl`` seconds, is bound to its attempt
(stored as a keyed hash), and dies after :data:`MAX_TRIES` wrong tries; after
:data:`LOCK_AFTER` consecutive failures the recipient is locked until staff
unlock. A successful login creates a fresh session (new random cookie) with an
idle and an absolute timeout.

A returning recipient may instead enrol an authenticator app (TOTP, RFC 6238):
the link's login page then takes a code from the app and sends nothing. Each code
is accepted once (the last accepted time step is kept per recipient), and wrong
codes count towards the same lockout as wrong passcodes.

Every limit is decided in the database, atomically, before the work it limits
(the same on SQLite, whose writers queue for one write lock, and on PostgreSQL,
where a conditional ``UPDATE`` waits for the row's lock and then re-checks its
condition on the committed row):

- a code is compared only after a conditional ``UPDATE`` won one of the attempt's
  :data:`MAX_TRIES` tries (``tries < MAX_TRIES``, not used, not dead, not expired)
  and one of the recipient's remaining checks before the lock
  (``consecutive_failures < LOCK_AFTER``, not locked). Both counts are taken
  first and given back when the code was right; a guess that wins no slot is
  refused without looking at the code. So at 95 failures at most 5 more guesses
  are ever checked, and the 100th failure locks, however many arrive at once;
- a passcode message is sent only after a conditional ``UPDATE`` moved the
  recipient's ``last_passcode_at`` forward (it must be :data:`RESEND_INTERVAL`
  old); a message that then cannot be sent gives the slot back
  (:func:`discard_attempt`), so a failed send does not stop the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyotp

from iepnode.errors import (
    InvalidRequest,
    LoginRefused,
    NotFound,
    PasscodeRejected,
    RateLimited,
    RecipientLocked,
)
from iepnode.security import new_passcode, new_token, passcode_hash, passcode_matches, token_hash
from iepnode.sharing import recipients
from storage import hot_queries
from storage.db import write_transaction
from storage.models import LoginAttempt, Recipient, Transaction, WebSession
from storage.queries import logins as queries

MAX_TRIES = 5
LOCK_AFTER = 100
#: A new passcode for the same link is sent at most this often (seconds).
RESEND_INTERVAL = 30.0
SESSION_IDLE = 30 * 60.0
SESSION_ABSOLUTE = 12 * 3600.0
#: Activity refreshes ``last_seen`` at most this often: a write per page would
#: serialise every page view on the database; the idle timeout stays within a minute.
LAST_SEEN_GRANULARITY = 60.0
#: Codes of the time step before and after the current one are accepted too (clock drift).
TOTP_VALID_WINDOW = 1


@dataclass(frozen=True)
class PasscodeToSend:
    """A passcode to deliver: the code itself exists only here and in the message."""

    attempt_id: int
    code: str
    channel: str
    destination: str
    #: The recipient, and the ``last_passcode_at`` this send claimed (see :func:`discard_attempt`).
    recipient_id: int = 0
    claimed_at: float = 0.0


@dataclass(frozen=True)
class NewSession:
    """A session to set as a cookie (the token is stored only hashed)."""

    token: str
    csrf_token: str
    session: WebSession


@dataclass(frozen=True)
class TotpEnrolment:
    """A new authenticator secret waiting for confirmation, signed for one session.

    The secret travels in the enrolment form (it is on the page as a QR code anyway);
    ``signature`` is an HMAC of it with the node's secret, bound to the session and
    recipient, so a form can only confirm a secret this node made for that session.
    """

    secret: str
    uri: str
    signature: str


def _attempt_key(attempt: LoginAttempt) -> str:
    return f"{attempt.id}:{attempt.recipient_id}:{attempt.created_at!r}"


def start_attempt(transaction: Transaction, secret: bytes, ttl: float,
                  now: float | None = None) -> PasscodeToSend:
    """Create a login attempt for the link's recipient and return its passcode.

    The send is claimed first: a conditional ``UPDATE`` sets the recipient's
    ``last_passcode_at`` to ``now`` only where it is at least :data:`RESEND_INTERVAL`
    old and the recipient is not locked, so of any number of simultaneous requests
    one gets a passcode. If the message then cannot be sent, give the claim back
    with :func:`discard_attempt`.

    Raises
    ------
    RecipientLocked
        The recipient is locked.
    RateLimited
        A passcode for this recipient was sent less than :data:`RESEND_INTERVAL` ago.
    """
    now = time.time() if now is None else now
    code = new_passcode()
    with write_transaction():
        won = queries.claim_passcode_send(transaction.recipient_id, now, RESEND_INTERVAL)
        recipient = queries.recipient_by_id(transaction.recipient_id)
        if not won:
            if recipient.locked_at is not None:
                raise RecipientLocked("this account is locked: please contact the hospital")
            raise RateLimited(f"a passcode was sent less than {RESEND_INTERVAL:.0f} s ago")
        channel = recipients.channel_of(recipient)
        attempt = queries.create_attempt(transaction, recipient, channel.kind, now, ttl)
        queries.set_attempt_code_hash(attempt,
                                      passcode_hash(secret, _attempt_key(attempt), code))
    return PasscodeToSend(attempt.id, code, channel.kind, channel.destination, recipient.id,
                          now)


def discard_attempt(sent: PasscodeToSend) -> None:
    """Forget an attempt whose passcode could not be sent, and give its send slot back.

    The recipient may then ask again at once (a failed send does not count towards
    :data:`RESEND_INTERVAL`); a newer claim is left alone.
    """
    with write_transaction():
        queries.discard_attempt(sent.attempt_id, sent.recipient_id, sent.claimed_at)


def _claim_check(recipient_id: int) -> bool:
    """Count a check of a code towards the lockout before it is made (in a transaction).

    A conditional ``UPDATE``: it wins only while the recipient is unlocked and has
    fewer than :data:`LOCK_AFTER` consecutive failures, so however many checks run
    at once, at most ``LOCK_AFTER - consecutive_failures`` of them are made. The
    row stays locked until the caller's transaction ends (PostgreSQL); SQLite's
    writers are serialised anyway. A right code resets the count (:func:`_check_passed`).
    """
    return queries.claim_check(recipient_id, LOCK_AFTER)


def _check_passed(recipient_id: int) -> None:
    """A claimed check found the right code: the consecutive failures start again."""
    queries.reset_failures(recipient_id)


def _check_failed(recipient_id: int, now: float) -> Recipient:
    """A claimed check failed: lock the recipient at :data:`LOCK_AFTER` failures."""
    return queries.lock_if_failed(recipient_id, now, LOCK_AFTER)


def _refusal(attempt_id: int) -> LoginRefused:
    """Why a passcode for ``attempt_id`` cannot be checked (it won no try)."""
    attempt = queries.attempt_or_none(attempt_id)
    if attempt is None:
        return PasscodeRejected("this login has expired: ask for a new passcode")
    if queries.recipient_by_id(attempt.recipient_id).locked_at is not None:
        return RecipientLocked("this account is locked: please contact the hospital")
    if attempt.used_at is not None:
        return PasscodeRejected("this passcode has been used: ask for a new one")
    if attempt.dead or attempt.tries >= MAX_TRIES:
        return PasscodeRejected("too many wrong passcodes: ask for a new one")
    return PasscodeRejected("this passcode has expired: ask for a new one")


def verify_passcode(attempt_id: int, code: str, secret: bytes,
                    now: float | None = None) -> Recipient:
    """Check a typed passcode; on success the attempt is used up.

    The code is compared only after two conditional updates won a try of the
    attempt and a check of the recipient (see the module docstring); a guess that
    wins neither is refused unchecked.

    Returns
    -------
    Recipient
        The recipient who is now logged in.

    Raises
    ------
    PasscodeRejected
        Wrong, expired, reused, or the attempt is dead (5 wrong tries).
    RecipientLocked
        The recipient is (or has just become) locked.
    """
    now = time.time() if now is None else now
    with write_transaction():
        if not queries.claim_try(attempt_id, now, MAX_TRIES):
            raise _refusal(attempt_id)
        attempt = queries.attempt_by_id(attempt_id)
        if not _claim_check(attempt.recipient_id):
            # Raised inside the transaction: the try taken above is given back.
            raise RecipientLocked("this account is locked: please contact the hospital")
        if passcode_matches(secret, _attempt_key(attempt), code, attempt.code_hash):
            queries.use_attempt(attempt_id, now)
            _check_passed(attempt.recipient_id)
            return queries.recipient_by_id(attempt.recipient_id)
        dead = attempt.tries >= MAX_TRIES
        if dead:
            queries.kill_attempt(attempt_id)
        recipient = _check_failed(attempt.recipient_id, now)
    if recipient.locked_at is not None:
        raise RecipientLocked("too many failed passcodes: the hospital must unlock this account")
    if dead:
        raise PasscodeRejected("too many wrong passcodes: ask for a new one")
    raise PasscodeRejected(f"wrong passcode ({MAX_TRIES - attempt.tries} tries left)")


def unlock(recipient: Recipient) -> None:
    """Clear a recipient's lock and failure count (a staff action)."""
    queries.unlock_recipient(recipient)


def open_session(recipient: Recipient | None = None, staff_id: int | None = None,
                 now: float | None = None) -> NewSession:
    """Create a session with a fresh random token (never reuse one from before login)."""
    now = time.time() if now is None else now
    token, csrf = new_token(), new_token()
    session = queries.create_session(token_hash(token), recipient.id if recipient else None,
                                     staff_id, csrf, now)
    return NewSession(token, csrf, session)


def resume_session(token: str, now: float | None = None, *,
                   run_write: Callable[[Callable[[], None]], None] | None = None) -> WebSession:
    """Return the live session for a cookie value and note the activity.

    Parameters
    ----------
    token : str
        The session cookie's value.
    now : float, optional
        The current time (tests).
    run_write : callable, optional
        Runs the activity update (at most once a minute per session) in a write
        transaction; the node passes its group committer. Default: a transaction
        of its own.

    Raises
    ------
    NotFound
        Unknown, ended, idle for more than 30 minutes, or older than 12 hours.
    """
    now = time.time() if now is None else now
    session = hot_queries.session_by_token_hash(token_hash(token))
    if (
        session is None
        or session.ended
        or session.last_seen <= now - SESSION_IDLE
        or session.created_at <= now - SESSION_ABSOLUTE
    ):
        raise NotFound("no session")
    if now - session.last_seen >= LAST_SEEN_GRANULARITY:
        seen = session.id
        (run_write or _own_transaction)(lambda: hot_queries.note_session_seen(seen, now))
    return session


def _own_transaction(job: Callable[[], None]) -> None:
    with write_transaction():
        job()


def end_session(token: str) -> None:
    """Log out: the cookie value is dead from now on."""
    queries.end_sessions_with_token_hash(token_hash(token))


# -- authenticator app (TOTP) -------------------------------------------------------------


def _totp_signature(key: bytes, session_id: int, recipient_id: int, totp_secret: str) -> str:
    message = f"recipient-totp-enrol:{session_id}:{recipient_id}:{totp_secret}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def totp_enrolment(recipient: Recipient, session_id: int, key: bytes, issuer: str,
                   totp_secret: str | None = None) -> TotpEnrolment:
    """A new authenticator secret (or ``totp_secret`` again) signed for this session."""
    totp_secret = totp_secret or pyotp.random_base32()
    uri = pyotp.TOTP(totp_secret).provisioning_uri(name=recipient.email, issuer_name=issuer)
    return TotpEnrolment(totp_secret, uri,
                         _totp_signature(key, session_id, recipient.id, totp_secret))


def check_totp_enrolment(recipient: Recipient, session_id: int, key: bytes, issuer: str,
                         totp_secret: str, signature: str) -> TotpEnrolment:
    """Return the enrolment a form sent back, if this node made it for this session.

    Raises
    ------
    InvalidRequest
        The secret or its signature was changed, or belongs to another session.
    """
    expected = _totp_signature(key, session_id, recipient.id, totp_secret)
    if not totp_secret or not hmac.compare_digest(expected, signature):
        raise InvalidRequest("this set-up is not valid any more: please start again")
    return totp_enrolment(recipient, session_id, key, issuer, totp_secret)


def _totp_step(totp_secret: str, code: str, now: float) -> int | None:
    """The time step whose code ``code`` is (within :data:`TOTP_VALID_WINDOW`), else ``None``."""
    code = re.sub(r"\s", "", code)
    totp = pyotp.TOTP(totp_secret)
    if not code.isdigit() or len(code) != totp.digits:
        return None
    current = int(now // totp.interval)
    for step in range(current + TOTP_VALID_WINDOW, current - TOTP_VALID_WINDOW - 1, -1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def verify_totp(recipient_id: int, code: str, now: float | None = None) -> Recipient:
    """Check a code from the recipient's authenticator app; each code works once.

    A wrong or reused code counts towards the lockout like a wrong passcode; a right
    one resets the count and remembers its time step, so neither it nor an older
    code is accepted again.

    Returns
    -------
    Recipient
        The recipient, as saved after the check.

    Raises
    ------
    PasscodeRejected
        No app enrolled, a wrong code, or a code used already.
    RecipientLocked
        The recipient is (or has just become) locked.
    """
    now = time.time() if now is None else now
    with write_transaction():
        recipient = queries.recipient_by_id(recipient_id)
        if recipient.locked_at is not None:
            raise RecipientLocked("this account is locked: please contact the hospital")
        if not recipient.totp_secret:
            raise PasscodeRejected("no authenticator app is set up: ask for a passcode")
        if not _claim_check(recipient_id):
            raise RecipientLocked("this account is locked: please contact the hospital")
        step = _totp_step(recipient.totp_secret, code, now)
        # Conditional update: of two requests with the same code, one wins.
        if step is not None and queries.accept_totp_step(recipient_id, step):
            return queries.recipient_by_id(recipient_id)
        recipient = _check_failed(recipient_id, now)
    if recipient.locked_at is not None:
        raise RecipientLocked("too many failed codes: the hospital must unlock this account")
    if step is not None:
        raise PasscodeRejected("this code has been used: wait for the next one in the app")
    raise PasscodeRejected("wrong code: check the authenticator app and try again")


def enrol_totp(recipient_id: int, enrolment: TotpEnrolment, code: str,
               now: float | None = None) -> Recipient:
    """Save a new authenticator secret once a code from it checks out.

    The confirming code's time step counts as used (it cannot then log in).

    Raises
    ------
    InvalidRequest
        An app is enrolled already, or the code does not match the new secret.
    """
    now = time.time() if now is None else now
    step = _totp_step(enrolment.secret, code, now)
    if step is None:
        raise InvalidRequest("that code does not match: check that the app's clock is right "
                             "and type the code it shows now")
    with write_transaction():
        saved = queries.enrol_totp(recipient_id, enrolment.secret, step)
    if not saved:
        raise InvalidRequest("an authenticator app is set up already: remove it first")
    return queries.recipient_by_id(recipient_id)


def remove_totp(recipient_id: int, code: str, now: float | None = None) -> Recipient:
    """Remove the recipient's authenticator app; needs a current code from it.

    Raises
    ------
    PasscodeRejected, RecipientLocked
        As :func:`verify_totp` (a wrong code counts towards the lockout).
    """
    verify_totp(recipient_id, code, now)
    queries.remove_totp(recipient_id)
    return queries.recipient_by_id(recipient_id)


def clear_totp(recipient_id: int) -> bool:
    """Remove the recipient's authenticator app without a code, and end their sessions.

    For staff helping a recipient who lost their phone: passcodes go to the mobile
    or second email again, and a session left open on the lost phone ends.

    Returns
    -------
    bool
        Whether an app was set up.
    """
    with write_transaction():
        return queries.clear_totp_and_sessions(recipient_id)

