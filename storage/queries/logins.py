"""Recipient login queries (sharing area): attempts, lockout counts, sessions, TOTP.

The conditional updates here are the atomic limits of :mod:`iepnode.sharing.logins`:
each is one statement, and its return value says whether this caller won.
"""

from __future__ import annotations

from storage.models import LoginAttempt, Recipient, Transaction, WebSession
from storage.queries.recipients import recipient_by_id as recipient_by_id


def claim_passcode_send(recipient_id: int, now: float, interval: float) -> bool:
    """Move an unlocked recipient's ``last_passcode_at`` to ``now`` if ``interval`` old.

    Returns
    -------
    bool
        Whether this caller won the send (one statement: of simultaneous callers one wins).
    """
    return bool(Recipient.update(last_passcode_at=now).where(
        (Recipient.id == recipient_id) & Recipient.locked_at.is_null()
        & (Recipient.last_passcode_at <= now - interval)).execute())


def create_attempt(transaction: Transaction, recipient: Recipient, channel: str,
                   now: float, ttl: float) -> LoginAttempt:
    """A new login attempt (no code hash yet) expiring ``ttl`` seconds from ``now``."""
    return LoginAttempt.create(transaction=transaction, recipient=recipient, code_hash="",
                               channel=channel, created_at=now, expires_at=now + ttl)


def set_attempt_code_hash(attempt: LoginAttempt, code_hash: str) -> None:
    """Store the keyed hash of the attempt's passcode (saves ``attempt``)."""
    attempt.code_hash = code_hash
    attempt.save()


def discard_attempt(attempt_id: int, recipient_id: int, claimed_at: float) -> None:
    """Delete an attempt and give back its recipient's send claim if still ``claimed_at``.

    Call inside a write transaction: both statements commit together.
    """
    LoginAttempt.delete().where(LoginAttempt.id == attempt_id).execute()
    Recipient.update(last_passcode_at=0.0).where(
        (Recipient.id == recipient_id)
        & (Recipient.last_passcode_at == claimed_at)).execute()


def claim_check(recipient_id: int, lock_after: int) -> bool:
    """Count one check towards the lockout, if the recipient is unlocked and under it.

    Returns
    -------
    bool
        Whether the check was won (fewer than ``lock_after`` consecutive failures).
    """
    return bool(Recipient.update(consecutive_failures=Recipient.consecutive_failures + 1).where(
        (Recipient.id == recipient_id) & Recipient.locked_at.is_null()
        & (Recipient.consecutive_failures < lock_after)).execute())


def reset_failures(recipient_id: int) -> None:
    """Set the recipient's consecutive failures back to 0."""
    Recipient.update(consecutive_failures=0).where(Recipient.id == recipient_id).execute()


def lock_if_failed(recipient_id: int, now: float, lock_after: int) -> Recipient:
    """Lock the recipient at ``now`` if unlocked with ``lock_after`` failures or more.

    Returns
    -------
    Recipient
        The recipient as saved afterwards.
    """
    Recipient.update(locked_at=now).where(
        (Recipient.id == recipient_id) & Recipient.locked_at.is_null()
        & (Recipient.consecutive_failures >= lock_after)).execute()
    return Recipient.get_by_id(recipient_id)


def attempt_or_none(attempt_id: int) -> LoginAttempt | None:
    """The login attempt with id ``attempt_id``, or ``None``."""
    return LoginAttempt.get_or_none(LoginAttempt.id == attempt_id)


def attempt_by_id(attempt_id: int) -> LoginAttempt:
    """The login attempt with id ``attempt_id`` (``DoesNotExist`` if none)."""
    return LoginAttempt.get_by_id(attempt_id)


def claim_try(attempt_id: int, now: float, max_tries: int) -> bool:
    """Take one try of a live attempt (unused, not dead, under ``max_tries``, unexpired).

    Returns
    -------
    bool
        Whether a try was won.
    """
    return bool(LoginAttempt.update(tries=LoginAttempt.tries + 1).where(
        (LoginAttempt.id == attempt_id) & LoginAttempt.used_at.is_null()
        & (LoginAttempt.dead == False)  # noqa: E712
        & (LoginAttempt.tries < max_tries) & (LoginAttempt.expires_at > now)).execute())


def use_attempt(attempt_id: int, now: float) -> None:
    """Mark the attempt used at ``now`` and give back the try its right code took."""
    LoginAttempt.update(used_at=now, tries=LoginAttempt.tries - 1).where(
        LoginAttempt.id == attempt_id).execute()


def kill_attempt(attempt_id: int) -> None:
    """Mark the attempt dead (no more tries)."""
    LoginAttempt.update(dead=True).where(LoginAttempt.id == attempt_id).execute()


def unlock_recipient(recipient: Recipient) -> None:
    """Clear the recipient's lock and failure count (saves ``recipient``)."""
    recipient.locked_at = None
    recipient.consecutive_failures = 0
    recipient.save()


def create_session(token_hash: str, recipient_id: int | None, staff_id: int | None,
                   csrf_token: str, now: float) -> WebSession:
    """A new web session for a recipient or a staff member, created and seen at ``now``."""
    return WebSession.create(token_hash=token_hash, recipient=recipient_id, staff=staff_id,
                             csrf_token=csrf_token, created_at=now, last_seen=now)


def end_sessions_with_token_hash(token_hash: str) -> None:
    """End the session(s) whose cookie hashes to ``token_hash``."""
    WebSession.update(ended=True).where(WebSession.token_hash == token_hash).execute()


def accept_totp_step(recipient_id: int, step: int) -> bool:
    """Note ``step`` as the last accepted TOTP step if newer, and reset the failures.

    Returns
    -------
    bool
        Whether it was newer (of two requests with the same code, one wins).
    """
    return bool(Recipient.update(totp_last_step=step, consecutive_failures=0).where(
        (Recipient.id == recipient_id)
        & (Recipient.totp_last_step.is_null() | (Recipient.totp_last_step < step))
    ).execute())


def enrol_totp(recipient_id: int, secret: str, step: int) -> bool:
    """Save an authenticator secret (``step`` used) if the recipient has none.

    Returns
    -------
    bool
        Whether it was saved.
    """
    return bool(Recipient.update(totp_secret=secret, totp_last_step=step).where(
        (Recipient.id == recipient_id) & Recipient.totp_secret.is_null()).execute())


def remove_totp(recipient_id: int) -> None:
    """Forget the recipient's authenticator secret and last step."""
    Recipient.update(totp_secret=None, totp_last_step=None).where(
        Recipient.id == recipient_id).execute()


def clear_totp_and_sessions(recipient_id: int) -> bool:
    """Forget a set authenticator secret and, if there was one, end the recipient's sessions.

    Call inside a write transaction.

    Returns
    -------
    bool
        Whether an authenticator secret was set.
    """
    cleared = Recipient.update(totp_secret=None, totp_last_step=None).where(
        (Recipient.id == recipient_id) & Recipient.totp_secret.is_null(False)).execute()
    if cleared:
        WebSession.update(ended=True).where(
            (WebSession.recipient == recipient_id) & (WebSession.ended == False)  # noqa: E712
        ).execute()
    return bool(cleared)


def latest_usable_attempt(transaction_id: int, now: float) -> LoginAttempt | None:
    """The newest unused, live, unexpired login attempt of a link's transaction, or ``None``."""
    return (
        LoginAttempt.select()
        .where((LoginAttempt.transaction == transaction_id)
               & LoginAttempt.used_at.is_null() & (LoginAttempt.dead == False)  # noqa: E712
               & (LoginAttempt.expires_at > now))
        .order_by(LoginAttempt.created_at.desc(), LoginAttempt.id.desc())
        .first()
    )
