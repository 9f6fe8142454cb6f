"""Hospital staff accounts: a password (argon2id, :mod:`.passwords`) and a TOTP code."""

from __future__ import annotations

import re
import secrets
import time

import pyotp

from iepnode.errors import InvalidRequest, LoginRefused
from iepnode.people import passwords
from storage.models import StaffUser
from storage.queries import people as queries

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
ISSUER = "iepnode"
#: Letters and digits that cannot be mistaken for each other when read out or copied.
_PLAIN = "abcdefghjkmnpqrstuvwxyz23456789"


def create_user(username: str, password: str, *, is_admin: bool = False, display_name: str = "",
                email: str = "", department: str = "", phone: str = "",
                now: float | None = None) -> tuple[StaffUser, str]:
    """Create a staff user with a TOTP secret to enrol.

    Returns
    -------
    tuple of (StaffUser, str)
        The user and the ``otpauth://`` URI to show once (as text or a QR code).

    Raises
    ------
    InvalidRequest
        Bad username, a password shorter than 12 characters, or a taken username.
    """
    username = username.strip().lower()
    if not _USERNAME.match(username):
        raise InvalidRequest("usernames are 2-64 characters: a-z, 0-9, '.', '_', '-'")
    passwords.check_policy(password)
    if queries.username_taken(username):
        raise InvalidRequest(f"user {username} exists already")
    secret = pyotp.random_base32()
    user = queries.create_staff_user(
        username=username, display_name=display_name.strip()[:128], email=email.strip()[:254],
        department=department.strip()[:128], phone=phone.strip()[:32],
        password_hash=passwords.hash_password(password), totp_secret=secret, is_admin=is_admin,
        created_at=time.time() if now is None else now,
    )
    return user, pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=ISSUER)


def temporary_password() -> str:
    """A random password to pass on once, like ``k3mfp-9xqat-7wbez-2hndr`` (99 bits)."""
    return "-".join("".join(secrets.choice(_PLAIN) for _ in range(5)) for _ in range(4))


def find_user(username: str) -> StaffUser | None:
    """The staff user of a typed username (any case, spaces around ignored), or ``None``."""
    return queries.staff_user_named(username.strip().lower())


def check_password(user: StaffUser | None, password: str) -> str | None:
    """Check ``password``: the hash to keep (stronger when today's parameters are), or None.

    The one slow step of a login (argon2id): run it where hashing is bounded
    (:class:`iepnode.people.passwords.PasswordWork`). An unknown user costs the same time.
    """
    if user is None:
        passwords.spend_one_hash(password)
        return None
    if not passwords.verify_password(user.password_hash, password):
        return None
    if passwords.needs_rehash(user.password_hash):
        return passwords.hash_password(password)
    return user.password_hash


def admit(user: StaffUser | None, kept_hash: str | None, totp_code: str,
          now: float | None = None, *, allow_enrolment: bool = False) -> StaffUser:
    """The rest of a login once :func:`check_password` ran: account state and TOTP code.

    Saves a strengthened hash. See :func:`authenticate` for the parameters.

    Raises
    ------
    LoginRefused
        Unknown user, disabled, wrong password or wrong code (one message for all).
    """
    refused = LoginRefused("wrong username, password or code")
    if user is None or kept_hash is None:
        raise refused
    if user.disabled or not (user.totp_secret or allow_enrolment):
        raise refused
    if user.totp_secret:
        totp = pyotp.TOTP(user.totp_secret)
        if not totp.verify(totp_code.strip(), for_time=now, valid_window=1):
            raise refused
    if kept_hash != user.password_hash:
        user.password_hash = kept_hash
        queries.save_staff_user(user)
    return user


def authenticate(username: str, password: str, totp_code: str,
                 now: float | None = None, *, allow_enrolment: bool = False) -> StaffUser:
    """Check password and TOTP code; return the user.

    Parameters
    ----------
    allow_enrolment : bool
        Accept the password alone of a user who has no TOTP secret (an admin reset
        it). The caller must then let that session do nothing but enrol a new
        authenticator (see
        :meth:`iepnode.people.staff_logins.StaffLogins.pending_step`).

    Raises
    ------
    LoginRefused
        Unknown user, disabled, wrong password or wrong code (one message for all).
    """
    user = find_user(username)
    return admit(user, check_password(user, password), totp_code, now,
                 allow_enrolment=allow_enrolment)
