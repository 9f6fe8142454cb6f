"""Recipient login: email link -> one-time passcode -> session.

The link token alone never grants access: it starts a login attempt whose
passcode goes to the recipient's second channel (mobile or second email). A
passcode is single use, expires after ``ttl`` seconds, is bound to its attempt
(stored as a keyed hash), and dies after :data:`MAX_TRIES` wrong tries; after
:data:`LOCK_AFTER` consecutive failures the recipient is locked until staff
unlock. A successful login creates a fresh session (new random cookie) with an
idle and an absolute timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from iepnode.errors import NotFound, PasscodeRejected, RateLimited, RecipientLocked
from iepnode.security import new_passcode, new_token, passcode_hash, passcode_matches, token_hash
from storage.models import LoginAttempt, Recipient, Transaction, WebSession, database_proxy

MAX_TRIES = 5
LOCK_AFTER = 100
#: A new passcode for the same link is sent at most this often (seconds).
RESEND_INTERVAL = 30.0
SESSION_IDLE = 30 * 60.0
SESSION_ABSOLUTE = 12 * 3600.0
#: Activity refreshes ``last_seen`` at most this often: a write per page would
#: serialise every page view on the database; the idle timeout stays within a minute.
LAST_SEEN_GRANULARITY = 60.0


@dataclass(frozen=True)
class PasscodeToSend:
    """A passcode to deliver: the code itself exists only here and in the message."""

    attempt_id: int
    code: str
    channel: str
    destination: str


@dataclass(frozen=True)
class NewSession:
    """A session to set as a cookie (the token is stored only hashed)."""

    token: str
    csrf_token: str
    session: WebSession


def _attempt_key(attempt: LoginAttempt) -> str:
    return f"{attempt.id}:{attempt.recipient_id}:{attempt.created_at!r}"


def start_attempt(transaction: Transaction, secret: bytes, ttl: float,
                  now: float | None = None) -> PasscodeToSend:
    """Create a login attempt for the link's recipient and return its passcode.

    Raises
    ------
    RecipientLocked
        The recipient is locked.
    RateLimited
        A passcode for this recipient was sent less than :data:`RESEND_INTERVAL` ago.
    """
    now = time.time() if now is None else now
    recipient = Recipient.get_by_id(transaction.recipient_id)
    if recipient.locked_at is not None:
        raise RecipientLocked("this account is locked: please contact the hospital")
    recent = LoginAttempt.select().where(
        (LoginAttempt.recipient == recipient.id) & (LoginAttempt.created_at > now - RESEND_INTERVAL)
    )
    if recent.exists():
        raise RateLimited(f"a passcode was sent less than {RESEND_INTERVAL:.0f} s ago")
    channel, destination = (
        ("sms", recipient.otp_mobile) if recipient.otp_mobile else ("email", recipient.otp_email)
    )
    code = new_passcode()
    with database_proxy.obj.atomic():
        attempt = LoginAttempt.create(transaction=transaction, recipient=recipient,
                                      code_hash="", channel=channel, created_at=now,
                                      expires_at=now + ttl)
        attempt.code_hash = passcode_hash(secret, _attempt_key(attempt), code)
        attempt.save()
    return PasscodeToSend(attempt.id, code, channel, destination)


def verify_passcode(attempt_id: int, code: str, secret: bytes,
                    now: float | None = None) -> Recipient:
    """Check a typed passcode; on success the attempt is used up.

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
    with database_proxy.obj.atomic():
        attempt = LoginAttempt.get_or_none(LoginAttempt.id == attempt_id)
        if attempt is None:
            raise PasscodeRejected("this login has expired: ask for a new passcode")
        recipient = Recipient.get_by_id(attempt.recipient_id)
        if recipient.locked_at is not None:
            raise RecipientLocked("this account is locked: please contact the hospital")
        if attempt.used_at is not None:
            raise PasscodeRejected("this passcode has been used: ask for a new one")
        if attempt.dead:
            raise PasscodeRejected("too many wrong passcodes: ask for a new one")
        if attempt.expires_at <= now:
            raise PasscodeRejected("this passcode has expired: ask for a new one")
        if passcode_matches(secret, _attempt_key(attempt), code, attempt.code_hash):
            attempt.used_at = now
            attempt.save()
            recipient.consecutive_failures = 0
            recipient.save()
            return recipient
        attempt.tries += 1
        attempt.dead = attempt.tries >= MAX_TRIES
        attempt.save()
        recipient.consecutive_failures += 1
        if recipient.consecutive_failures >= LOCK_AFTER:
            recipient.locked_at = now
        recipient.save()
    if recipient.locked_at is not None:
        raise RecipientLocked("too many failed passcodes: the hospital must unlock this account")
    if attempt.dead:
        raise PasscodeRejected("too many wrong passcodes: ask for a new one")
    raise PasscodeRejected(f"wrong passcode ({MAX_TRIES - attempt.tries} tries left)")


def unlock(recipient: Recipient) -> None:
    """Clear a recipient's lock and failure count (a staff action)."""
    recipient.locked_at = None
    recipient.consecutive_failures = 0
    recipient.save()


def open_session(recipient: Recipient | None = None, staff_id: int | None = None,
                 now: float | None = None) -> NewSession:
    """Create a session with a fresh random token (never reuse one from before login)."""
    now = time.time() if now is None else now
    token, csrf = new_token(), new_token()
    session = WebSession.create(token_hash=token_hash(token),
                                recipient=recipient.id if recipient else None, staff=staff_id,
                                csrf_token=csrf, created_at=now, last_seen=now)
    return NewSession(token, csrf, session)


def resume_session(token: str, now: float | None = None) -> WebSession:
    """Return the live session for a cookie value and note the activity.

    Raises
    ------
    NotFound
        Unknown, ended, idle for more than 30 minutes, or older than 12 hours.
    """
    now = time.time() if now is None else now
    session = WebSession.get_or_none(WebSession.token_hash == token_hash(token))
    if (
        session is None
        or session.ended
        or session.last_seen <= now - SESSION_IDLE
        or session.created_at <= now - SESSION_ABSOLUTE
    ):
        raise NotFound("no session")
    if now - session.last_seen >= LAST_SEEN_GRANULARITY:
        WebSession.update(last_seen=now).where(WebSession.id == session.id).execute()
    return session


def end_session(token: str) -> None:
    """Log out: the cookie value is dead from now on."""
    WebSession.update(ended=True).where(WebSession.token_hash == token_hash(token)).execute()



