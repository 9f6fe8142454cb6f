"""Staff logins: password + TOTP, sessions, brute-force protection, steps after a reset.

Audit events (PS3.15 A.5 EventIDs)::

    110114 User Authentication  login, login-failed, logout
    110113 Security Alert       login-locked, admin-change (enrolling TOTP or setting a
                                password after an admin reset)

Resets: an admin may reset another staff user's password (to a temporary one that
must be changed at the next login) or TOTP secret (cleared: the next login, with the
password alone, may only enrol a new authenticator; see
:class:`iepnode.people.staff_accounts.StaffAccounts`). Until then
:meth:`StaffLogins.pending_step` names the one page that user's sessions may open, and
:meth:`StaffLogins.enrol_first_totp` / :meth:`StaffLogins.set_required_password` take
those steps.

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
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyotp

from iepnode.dicomtext import typed_text
from iepnode.errors import Busy, InvalidRequest, LoginRefused
from iepnode.people import audit, passwords, staff
from iepnode.people.audit import ADMIN_CHANGE, Actor, actor_of
from iepnode.sharing import logins
from storage.db import write_transaction
from storage.models import StaffUser, WebSession
from storage.queries import people as queries

if TYPE_CHECKING:
    from iepnode.sharing.logins import NewSession

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


class LoginThrottled(LoginRefused):
    """Too many failed logins for this username: refused without checking."""


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaffLogin:
    """A successful staff login: the new session (cookie token) and the user."""

    session: NewSession
    user: StaffUser


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
        until = queries.locked_until(username)
        return max(0.0, until - now) if until is not None else 0.0

    def begin(self, username: str, now: float) -> bool:
        """Claim one password check for ``username``; ``False``: locked, check nothing.

        A window that is over, or a lockout that has ended, starts a new count.
        """
        return queries.claim_login_check(username, now, self.window, self.max_failures)

    def give_back(self, username: str) -> None:
        """Return a claimed check that was never made (the server was too busy)."""
        queries.give_back_login_check(username)

    def failed(self, username: str, now: float) -> bool:
        """Note that a claimed check failed; return ``True`` when it starts a lockout."""
        # Also keeps the table small: rows of usernames with nothing left to remember go.
        return queries.lock_failed_logins(username, now, self.lockout, self.window,
                                          self.max_failures)

    def succeeded(self, username: str) -> None:
        """Forget the failures of a username that has just logged in."""
        queries.forget_login_failures(username)


def username_key(username: str) -> str:
    """The form of a typed username that logins are counted and looked up by."""
    return typed_text(username).lower()


def use_code(user_id: int, code: str, now: float) -> None:
    """Accept each TOTP code once per user (RFC 6238 section 5.2), in every process.

    Raises
    ------
    LoginRefused
        The code was used already (within :data:`TOTP_REPLAY_WINDOW`).
    """
    if not queries.use_staff_code(user_id, code, now, now + TOTP_REPLAY_WINDOW):
        raise LoginRefused("code used already")


class StaffLogins:
    """Staff logins and logouts, the login throttle, and the steps after an admin reset.

    Blocking methods: the web views call them in a worker thread, and those that hash
    or check a password (log in, set a password) through :attr:`password_work`, never
    in the threads page views share.

    Parameters
    ----------
    password_work : PasswordWork
        Where the web views run the methods that hash or check a password (bounded).
    throttle : LoginThrottle, optional
        Counts failed logins (the default limits when not given).
    """

    def __init__(self, password_work: passwords.PasswordWork,
                 throttle: LoginThrottle | None = None) -> None:
        self.throttle = throttle or LoginThrottle()
        #: Seconds the web view waits before answering a failed login.
        self.failure_delay = FAILURE_DELAY
        #: Where the web views run the methods that hash or check a password (bounded).
        self.password_work = password_work

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
        key = username_key(username)
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
                use_code(user.id, code.strip(), now)
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
        audit.record(audit.USER_AUTHENTICATION, "login", actor_of(user, source_ip), now=now,
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
        user = queries.staff_user_named(username)
        if user is None:
            return "unknown user"
        if user.disabled:
            return "account disabled"
        return "wrong password or code"

    def staff_for_session(self, session: WebSession | None) -> StaffUser | None:
        """The enabled staff user of a session, or ``None`` (none, recipient, disabled)."""
        if session is None or session.staff_id is None:
            return None
        user = queries.staff_user_or_none(session.staff_id)
        if user is None or user.disabled:
            return None
        return user

    def log_out(self, token: str, user: StaffUser | None, source_ip: str = "") -> None:
        """End the session of a cookie value (audited when it was a staff session)."""
        logins.end_session(token)
        if user is not None:
            audit.record(audit.USER_AUTHENTICATION, "logout", actor_of(user, source_ip))

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
            audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                         outcome=audit.MINOR_FAILURE, detail="totp-enrol refused: wrong code")
            raise InvalidRequest("that code does not match: check the authenticator app's "
                                 "clock and type the code it shows now")
        with write_transaction():
            saved = queries.enrol_first_totp_secret(user.id, enrolment.secret)
            queries.end_staff_sessions(user.id, keep_session_id=session_id)
        if not saved:
            raise InvalidRequest("an authenticator is enrolled already")
        use_code(user.id, code, now)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
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
        if passwords.verify_password(user.password_hash, new):
            raise InvalidRequest("choose a password of your own, not the temporary one")
        with write_transaction():
            queries.set_password_hash(user.id, passwords.hash_password(new), must_change=False)
            queries.end_staff_sessions(user.id, keep_session_id=session_id)
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"password-change {user.username} (after a reset)")
