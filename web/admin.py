"""Staff pages under /admin: signing in and out, own account, the steps after a reset.

Routes (server-rendered, no inline script or style; every POST carries the CSRF
token, checked in :mod:`web.middlewares`)::

    GET  POST /admin/login                       username, password, TOTP code
    POST /admin/logout                           end the staff session
    GET  /admin/account, POST /admin/account/password  own account
    GET  POST /admin/account/totp                re-enrol own TOTP (QR code)
    GET  POST /admin/setup/totp                  enrol after an admin reset the TOTP
    GET  POST /admin/setup/password              own password after an admin reset it

The other staff pages: :mod:`web.admin_transactions` (transactions, studies and
sharing), :mod:`web.admin_aes` (remote AEs, auto-routing, sends),
:mod:`web.admin_users` (staff users), :mod:`web.admin_audit` (the audit log); what
they share (the staff session check, rendering, forms) is :mod:`web.staff_pages`.

Pages other than the login need a staff session (a recipient session is not
enough: such requests go to the login page); AE and user pages need an admin.
A user with a pending step after a reset (``StaffLogins.pending_step``) is sent
to that step's page from every other page: a session opened with the password
alone (no TOTP secret) reaches nothing but the enrolment page.
Blocking work runs in a thread through the staff services (:mod:`iepnode.staff_side`);
work that hashes or checks a password runs on the bounded
``StaffLogins.password_work`` pool
(a login beyond its queue gets 503 at once), never in the threads page views share.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from iepnode.errors import Busy, InvalidRequest, LoginRefused
from iepnode.people.staff_logins import (
    LOGIN_REFUSED,
    STEP_PASSWORD,
    STEP_TOTP,
    LoginThrottled,
    StaffLogins,
)
from iepnode.records import StaffUser
from web import middlewares
from web.common import client_ip, see_other, services_of
from web.keys import SESSION_KEY
from web.staff_pages import (
    STEP_PAGES,
    Staff,
    field,
    qr_svg,
    render,
    staff_view,
)
from web.staff_pages import admin_service as _admin  # the name the views call it by

_NEXT = re.compile(r"/admin(/[A-Za-z0-9/_.-]*)?(\?[A-Za-z0-9_.=&%-]*)?")


def _safe_next(value: object) -> str:
    """Where to go after login: an /admin path only (no open redirect)."""
    text = value if isinstance(value, str) else ""
    return text if _NEXT.fullmatch(text) and "//" not in text else "/admin"


# -- login / logout ----------------------------------------------------------------------


def _login_page(request: web.Request, *, error: str = "", username: str = "",
                next_url: str = "/admin", status: int = 200) -> web.Response:
    # With a live (recipient) session the CSRF middleware checks that session's token.
    session = request[SESSION_KEY]
    csrf = session.csrf_token if session is not None else middlewares.prelogin_csrf(request)
    response = render(request, None, "login.html", {
        "prelogin_csrf": csrf, "error": error, "username": username, "next": next_url,
        "logged_out": request.query.get("out") == "1"}, status=status)
    if session is None:
        middlewares.set_prelogin_cookie(response, csrf)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    """``GET /admin/login``: the staff login form (or home when already logged in)."""
    user = await asyncio.to_thread(_admin(request).logins.staff_for_session, request[SESSION_KEY])
    next_url = _safe_next(request.query.get("next"))
    if user is not None:
        return see_other(next_url)
    return _login_page(request, next_url=next_url)


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /admin/login``: check password and TOTP code, open a staff session."""
    form = await request.post()
    username = field(form, "username", 64)
    code = re.sub(r"\s", "", field(form, "code", 16))
    next_url = _safe_next(form.get("next"))
    service = _admin(request)
    try:
        opened = await service.logins.log_in_bounded(username, field(form, "password", 1024), code,
                                              client_ip(request))
    except Busy as exc:  # too many password checks under way in this process: no wait
        response = _login_page(request, error=str(exc), username=username, next_url=next_url,
                               status=503)
        response.headers["Retry-After"] = str(middlewares.RETRY_AFTER)
        return response
    except LoginThrottled as exc:
        await asyncio.sleep(service.logins.failure_delay)
        return _login_page(request, error=str(exc), username=username, next_url=next_url,
                           status=429)
    except LoginRefused:
        await asyncio.sleep(service.logins.failure_delay)
        return _login_page(request, error=LOGIN_REFUSED, username=username, next_url=next_url,
                           status=403)
    old = request.cookies.get(middlewares.SESSION_COOKIE)
    if old:
        await asyncio.to_thread(services_of(request).logins.end_session, old)
    response = see_other(next_url)
    middlewares.set_session_cookie(response, opened.session.token)
    response.del_cookie(middlewares.PRELOGIN_COOKIE, path="/", secure=True, httponly=True,
                        samesite="Strict")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /admin/logout``: end the session and forget the cookie."""
    token = request.cookies.get(middlewares.SESSION_COOKIE)
    if token:
        service = _admin(request)
        user = await asyncio.to_thread(service.logins.staff_for_session, request[SESSION_KEY])
        await asyncio.to_thread(service.logins.log_out, token, user, client_ip(request))
    response = see_other("/admin/login?out=1")
    middlewares.clear_session_cookie(response)
    return response


# -- own account ---------------------------------------------------------------------------


@staff_view()
async def account(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/account``: own details, password change, TOTP re-enrolment."""
    return render(request, staff, "account.html", {"error": ""}, section="account")


@staff_view()
async def change_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/account/password``: change own password."""
    form = await request.post()
    try:
        await _admin(request).logins.password_work.run(
            _admin(request).accounts.change_password, staff.user, staff.session.id,
            field(form, "current", 1024), field(form, "new", 1024), field(form, "repeat", 1024),
            staff.ip)
    except InvalidRequest as exc:
        return render(request, staff, "account.html", {"error": str(exc)}, section="account",
                      status=400)
    return see_other("/admin/account?done=password")


def _totp_page(request: web.Request, staff: Staff, enrolment: Any, *, error: str = "",
               status: int = 200) -> web.Response:
    return render(request, staff, "totp.html", {
        "enrolment": enrolment, "qr": qr_svg(enrolment.uri), "error": error,
    }, section="account", status=status)


@staff_view()
async def totp_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/account/totp``: a new TOTP secret as a QR code, to confirm."""
    enrolment = await asyncio.to_thread(_admin(request).accounts.totp_enrolment, staff.user,
                                        staff.session.id)
    return _totp_page(request, staff, enrolment)


@staff_view()
async def totp_confirm(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/account/totp``: save the new secret once a code from it checks out."""
    form = await request.post()
    service = _admin(request)
    try:
        enrolment = await asyncio.to_thread(service.accounts.check_enrolment, staff.user,
                                            staff.session.id, field(form, "secret", 64),
                                            field(form, "signature", 128))
    except InvalidRequest as exc:
        fresh = await asyncio.to_thread(service.accounts.totp_enrolment, staff.user,
                                        staff.session.id)
        return _totp_page(request, staff, fresh, error=str(exc), status=400)
    try:
        await service.logins.password_work.run(service.accounts.confirm_totp, staff.user,
                                               staff.session.id,
                                        enrolment, field(form, "password", 1024),
                                        field(form, "code", 16), staff.ip)
    except InvalidRequest as exc:
        return _totp_page(request, staff, enrolment, error=str(exc), status=400)
    return see_other("/admin/account?done=totp")


# -- steps after an admin reset ----------------------------------------------------------


def _setup_totp_page(request: web.Request, staff: Staff, enrolment: Any, *, error: str = "",
                     status: int = 200) -> web.Response:
    return render(request, staff, "setup_totp.html", {
        "enrolment": enrolment, "qr": qr_svg(enrolment.uri), "error": error,
    }, status=status)


def _after_setup(user: StaffUser) -> web.Response:
    pending = StaffLogins.pending_step(user)
    return see_other(STEP_PAGES[pending] if pending else "/admin?done=welcome")


@staff_view(step=STEP_TOTP)
async def setup_totp_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/setup/totp``: enrol an authenticator (the only page until done)."""
    enrolment = await asyncio.to_thread(_admin(request).accounts.totp_enrolment, staff.user,
                                        staff.session.id)
    return _setup_totp_page(request, staff, enrolment)


@staff_view(step=STEP_TOTP)
async def setup_totp(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/setup/totp``: save the new secret once a code from it checks out."""
    form = await request.post()
    service = _admin(request)
    try:
        enrolment = await asyncio.to_thread(service.accounts.check_enrolment, staff.user,
                                            staff.session.id, field(form, "secret", 64),
                                            field(form, "signature", 128))
    except InvalidRequest as exc:
        fresh = await asyncio.to_thread(service.accounts.totp_enrolment, staff.user,
                                        staff.session.id)
        return _setup_totp_page(request, staff, fresh, error=str(exc), status=400)
    try:
        await asyncio.to_thread(service.logins.enrol_first_totp, staff.user, staff.session.id,
                                enrolment, field(form, "code", 16), staff.ip)
    except InvalidRequest as exc:
        return _setup_totp_page(request, staff, enrolment, error=str(exc), status=400)
    user = await asyncio.to_thread(StaffUser.get_by_id, staff.user.id)
    return _after_setup(user)


@staff_view(step=STEP_PASSWORD)
async def setup_password_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/setup/password``: choose a password to replace the temporary one."""
    return render(request, staff, "setup_password.html", {"error": ""})


@staff_view(step=STEP_PASSWORD)
async def setup_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/setup/password``: replace the temporary password."""
    form = await request.post()
    try:
        await _admin(request).logins.password_work.run(
            _admin(request).logins.set_required_password, staff.user, staff.session.id,
            field(form, "new", 1024), field(form, "repeat", 1024), staff.ip)
    except InvalidRequest as exc:
        return render(request, staff, "setup_password.html", {"error": str(exc)},
                      status=400)
    user = await asyncio.to_thread(StaffUser.get_by_id, staff.user.id)
    return _after_setup(user)
