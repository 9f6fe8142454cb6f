"""Staff accounts: each user's own account, and the administrators' staff-user list.

Own account: re-enrol TOTP (a new secret shown as a QR code, signed for the session
so a form cannot swap it) and change the password. Staff users (administrators):
add, disable or enable, and reset another user's password or TOTP (the steps the
user then takes are in :mod:`iepnode.people.staff_logins`). Every change is audited
as ``admin-change`` (110113 Security Alert).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

import pyotp

from iepnode.dicomtext import typed_text
from iepnode.errors import InvalidRequest, NotAuthorized, NotFound
from iepnode.people import audit, passwords, staff
from iepnode.people.audit import ADMIN_CHANGE, Actor, actor_of
from iepnode.people.staff_logins import LoginThrottle, TotpEnrolment
from iepnode.sharing import recipients
from storage.db import write_transaction
from storage.models import StaffUser
from storage.queries import people as queries


@dataclass(frozen=True)
class PasswordReset:
    """A reset password: the user, and the generated password to show once ('' if typed)."""

    user: StaffUser
    generated: str


class StaffAccounts:
    """Own account (TOTP re-enrolment, password) and staff users (add, disable, reset).

    Blocking methods: the web views call them in a worker thread, and those that hash
    or check a password (add a user, change, reset or confirm a password) on the
    bounded pool of :attr:`iepnode.people.staff_logins.StaffLogins.password_work`.

    Parameters
    ----------
    secret : callable
        Returns the node's secret key (signs TOTP enrolments for a session); called
        when an enrolment is signed, so the key is read or created on first use.
    throttle : LoginThrottle
        The login throttle, whose lockout of a user a password reset clears.
    """

    def __init__(self, secret: Callable[[], bytes], throttle: LoginThrottle) -> None:
        self.secret = secret
        self.throttle = throttle

    # -- own account -------------------------------------------------------------------

    def _signature(self, session_id: int, user_id: int, secret: str) -> str:
        message = f"totp-enrol:{session_id}:{user_id}:{secret}".encode()
        return hmac.new(self.secret(), message, hashlib.sha256).hexdigest()

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
        actor = actor_of(user, source_ip)
        if not passwords.verify_password(user.password_hash, password):
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor, outcome=audit.MINOR_FAILURE,
                         detail="totp-reenrol refused: wrong password")
            raise InvalidRequest("wrong password")
        if not pyotp.TOTP(enrolment.secret).verify(re.sub(r"\s", "", code), valid_window=1):
            raise InvalidRequest("that code does not match the new secret: check the "
                                 "authenticator app's clock and try the next code")
        queries.set_totp_secret(user.id, enrolment.secret)
        queries.end_staff_sessions(user.id, keep_session_id=session_id)
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
        actor = actor_of(user, source_ip)
        if not passwords.verify_password(user.password_hash, current):
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor, outcome=audit.MINOR_FAILURE,
                         detail="password-change refused: wrong password")
            raise InvalidRequest("wrong current password")
        passwords.check_policy(new)
        if new != repeat:
            raise InvalidRequest("the new passwords differ")
        queries.set_password_hash(user.id, passwords.hash_password(new))
        queries.end_staff_sessions(user.id, keep_session_id=session_id)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor,
                     detail=f"password-change {user.username}")

    # -- staff users -------------------------------------------------------------------

    def staff_users(self) -> list[StaffUser]:
        """Every staff user, by username."""
        return queries.staff_users()

    def add_user(self, username: str, password: str, *, is_admin: bool, display_name: str,
                 email: str, department: str, phone: str, user: StaffUser | Actor,
                 source_ip: str = "") -> tuple[StaffUser, str]:
        """Create a staff user (audited); return it and its ``otpauth://`` URI.

        ``user`` is the administrator adding it (from ``source_ip``), or the actor of
        the command line (``Actor("cli", <operating-system user>)``).

        Raises
        ------
        InvalidRequest
            Bad or taken username, short password, bad email.
        """
        email = recipients.normalize_email(email) if email.strip() else ""
        new, uri = staff.create_user(username, password, is_admin=is_admin,
                                     display_name=typed_text(display_name, 128), email=email,
                                     department=typed_text(department, 128),
                                     phone=typed_text(phone, 32))
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
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
        target = queries.staff_user_or_none(user_id)
        if target is None:
            raise NotFound(f"no staff user {user_id}")
        if target.id == user.id and disabled:
            raise InvalidRequest("you cannot disable your own account")
        target.disabled = disabled
        queries.save_staff_user(target)
        if disabled:
            queries.end_staff_sessions(target.id)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"user-{'disable' if disabled else 'enable'} {target.username}")
        return target

    @staticmethod
    def _other_user(user_id: int, admin: StaffUser, what: str) -> StaffUser:
        if not admin.is_admin:
            raise NotAuthorized("only administrators reset other users")
        target = queries.staff_user_or_none(user_id)
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
            queries.set_password_hash(target.id, passwords.hash_password(password),
                                      must_change=True)
            queries.end_staff_sessions(target.id)
        self.throttle.succeeded(target.username)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"password-reset {target.username} (temporary password "
                            f"{'generated' if generated else 'typed by the admin'}; "
                            f"sessions ended)")
        return PasswordReset(queries.staff_user_by_id(target.id), generated)

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
            queries.clear_totp_secret(target.id)
            queries.end_staff_sessions(target.id)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"totp-reset {target.username} (must enrol at next login; "
                            f"sessions ended)")
        return queries.staff_user_by_id(target.id)

    # -- own account -------------------------------------------------------------------

