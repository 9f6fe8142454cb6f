"""Staff, staff-login and audit-log queries (people area).

The login throttle's claims are single conditional statements (their row counts say
whether the caller won); see :class:`iepnode.people.staff_logins.LoginThrottle`.
"""

from __future__ import annotations

import peewee

from storage.db import write_transaction
from storage.models import AuditEvent, StaffLoginFailures, StaffUser, UsedStaffCode, WebSession

# -- staff users --------------------------------------------------------------------------


def username_taken(username: str) -> bool:
    """Whether a staff user has exactly this (normalised) username."""
    return StaffUser.select().where(StaffUser.username == username).exists()


def create_staff_user(**fields: object) -> StaffUser:
    """A new staff user row with ``fields`` (the model's column names)."""
    return StaffUser.create(**fields)


def staff_user_named(username: str) -> StaffUser | None:
    """The staff user with exactly this (normalised) username, or ``None``."""
    return StaffUser.get_or_none(StaffUser.username == username)


def staff_user_or_none(user_id: int) -> StaffUser | None:
    """The staff user with id ``user_id``, or ``None``."""
    return StaffUser.get_or_none(StaffUser.id == user_id)


def staff_user_by_id(user_id: int) -> StaffUser:
    """The staff user with id ``user_id`` (``StaffUser.DoesNotExist`` if none)."""
    return StaffUser.get_by_id(user_id)


def staff_users() -> list[StaffUser]:
    """Every staff user, by username."""
    return list(StaffUser.select().order_by(StaffUser.username))


def save_staff_user(user: StaffUser) -> None:
    """Save every field of ``user`` as it is now."""
    user.save()


def set_password_hash(user_id: int, password_hash: str, *,
                      must_change: bool | None = None) -> None:
    """Store a staff user's new password hash (and ``must_change_password`` if given)."""
    fields: dict[str, object] = {"password_hash": password_hash}
    if must_change is not None:
        fields["must_change_password"] = must_change
    StaffUser.update(**fields).where(StaffUser.id == user_id).execute()


def set_totp_secret(user_id: int, secret: str) -> None:
    """Store a staff user's TOTP secret (replacing any)."""
    StaffUser.update(totp_secret=secret).where(StaffUser.id == user_id).execute()


def enrol_first_totp_secret(user_id: int, secret: str) -> bool:
    """Store a staff user's TOTP secret if they have none; whether it was stored."""
    return bool(StaffUser.update(totp_secret=secret).where(
        (StaffUser.id == user_id) & StaffUser.totp_secret.is_null()).execute())


def clear_totp_secret(user_id: int) -> None:
    """Forget a staff user's TOTP secret and the codes they used."""
    StaffUser.update(totp_secret=None).where(StaffUser.id == user_id).execute()
    UsedStaffCode.delete().where(UsedStaffCode.staff == user_id).execute()


def end_staff_sessions(user_id: int, *, keep_session_id: int | None = None) -> None:
    """End every session of a staff user (but ``keep_session_id``, if given)."""
    where = WebSession.staff == user_id
    if keep_session_id is not None:
        where &= WebSession.id != keep_session_id
    WebSession.update(ended=True).where(where).execute()


# -- staff login throttle and used codes ---------------------------------------------------


def locked_until(username: str) -> float | None:
    """Until when ``username``'s logins are locked (0: not), or ``None`` with no failures row."""
    row = StaffLoginFailures.get_or_none(StaffLoginFailures.username == username)
    return None if row is None else row.locked_until


def claim_login_check(username: str, now: float, window: float, max_failures: int) -> bool:
    """Claim one password check of ``username`` in one conditional update; whether it won.

    A window older than ``window`` seconds, or a lockout that has ended, starts a new
    count at 1; otherwise the count goes up if it is below ``max_failures``, and
    nothing happens while locked.
    """
    rows = StaffLoginFailures
    over = (rows.window_start < now - window) | (
        (rows.locked_until > 0) & (rows.locked_until <= now))
    with write_transaction():
        rows.insert(username=username, failures=0, window_start=now,
                    locked_until=0.0).on_conflict_ignore().execute()
        won = rows.update(
            failures=peewee.Case(None, [(over, 1)], rows.failures + 1),
            window_start=peewee.Case(None, [(over, now)], rows.window_start),
            locked_until=peewee.Case(None, [(over, 0.0)], rows.locked_until),
        ).where((rows.username == username) & (rows.locked_until <= now)
                & (over | (rows.failures < max_failures))).execute()
    return bool(won)


def give_back_login_check(username: str) -> None:
    """Return one claimed check of ``username`` (never below 0)."""
    rows = StaffLoginFailures
    with write_transaction():
        rows.update(failures=rows.failures - 1).where(
            (rows.username == username) & (rows.failures > 0)).execute()


def lock_failed_logins(username: str, now: float, lockout: float, window: float,
                       max_failures: int) -> bool:
    """Lock ``username`` for ``lockout`` s if its checks are used up; whether it did.

    Also deletes the rows of usernames with nothing left to remember (window over,
    not locked), in the same transaction.
    """
    rows = StaffLoginFailures
    with write_transaction():
        locked = rows.update(locked_until=now + lockout).where(
            (rows.username == username) & (rows.failures >= max_failures)
            & (rows.locked_until <= now)).execute()
        rows.delete().where((rows.window_start < now - window)
                            & (rows.locked_until < now)).execute()
    return bool(locked)


def forget_login_failures(username: str) -> None:
    """Delete the failure count of ``username``."""
    with write_transaction():
        StaffLoginFailures.delete().where(StaffLoginFailures.username == username).execute()


def use_staff_code(user_id: int, code: str, now: float, expires_at: float) -> bool:
    """Note a TOTP code as used by ``user_id`` until ``expires_at``; ``False``: used already.

    Codes expired at ``now`` are deleted first, in the same transaction.
    """
    try:
        with write_transaction():
            UsedStaffCode.delete().where(UsedStaffCode.expires_at <= now).execute()
            UsedStaffCode.create(staff=user_id, code=code, expires_at=expires_at)
    except peewee.IntegrityError:
        return False
    return True


# -- audit log ----------------------------------------------------------------------------


def add_audit_event(**fields: object) -> AuditEvent:
    """A new audit event row with ``fields`` (the model's column names)."""
    return AuditEvent.create(**fields)


def audit_events_of_transaction(public_id: str) -> list[AuditEvent]:
    """The audit events of a transaction (by public ID), oldest first."""
    return list(
        AuditEvent.select()
        .where(AuditEvent.transaction_public_id == public_id)
        .order_by(AuditEvent.at, AuditEvent.id)
    )


def _audit_filtered(actor: str, action: str, patient_id: str) -> peewee.ModelSelect:
    query = AuditEvent.select()
    if actor:
        query = query.where(AuditEvent.actor.contains(actor))
    if action:
        query = query.where(AuditEvent.action == action)
    if patient_id:
        query = query.where(AuditEvent.patient_id == patient_id)
    return query


def count_audit_events(actor: str, action: str, patient_id: str) -> int:
    """How many audit events match the filters.

    ``actor`` is part of the actor's name (case-insensitive), ``action`` and
    ``patient_id`` match exactly; an empty filter matches any.
    """
    return _audit_filtered(actor, action, patient_id).count()


def audit_events_page(actor: str, action: str, patient_id: str, page: int,
                      per_page: int) -> list[AuditEvent]:
    """Page ``page`` (from 1, ``per_page`` long) of the matching audit events, newest first.

    The filters are those of :func:`count_audit_events`.
    """
    return list(_audit_filtered(actor, action, patient_id)
                .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).paginate(page, per_page))


def audit_actions() -> list[str]:
    """Every action that occurs in the audit log, sorted."""
    return [a for (a,) in AuditEvent.select(AuditEvent.action).distinct()
            .order_by(AuditEvent.action).tuples()]
