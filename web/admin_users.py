"""Staff pages of the staff users (administrators only).

Routes (every POST carries the CSRF token, checked in :mod:`web.middlewares`)::

    GET  POST /admin/users, POST /admin/users/{id}/disable|enable   staff (admins)
    POST /admin/users/{id}/password-reset|totp-reset     reset another user (admins)

A new user's TOTP QR code, and a generated temporary password, are shown once.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from iepnode.errors import InvalidRequest
from web.common import see_other
from web.staff_pages import (
    Staff,
    field,
    qr_svg,
    render,
    staff_view,
)
from web.staff_pages import admin_service as _admin  # the name the views call it by

# -- staff users -----------------------------------------------------------------------------


async def _users_page(request: web.Request, staff: Staff, *, error: str = "",
                      values: dict[str, str] | None = None, created: Any = None,
                      status: int = 200) -> web.Response:
    users = await asyncio.to_thread(_admin(request).accounts.staff_users)
    return render(request, staff, "users.html", {
        "users": users, "error": error, "values": values or {}, "created": created,
    }, section="users", status=status)


@staff_view(admin_only=True)
async def users(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/users``: staff users and the form to add one."""
    return await _users_page(request, staff)


@staff_view(admin_only=True)
async def add_user(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users``: add a user; show its TOTP QR code once."""
    form = await request.post()
    values = {k: field(form, k, 254) for k in ("username", "display_name", "email",
                                                "department", "phone")}
    try:
        new, uri = await _admin(request).logins.password_work.run(
            functools.partial(_admin(request).accounts.add_user, values["username"],
                              field(form, "password", 1024), is_admin=form.get("is_admin") == "1",
                              display_name=values["display_name"], email=values["email"],
                              department=values["department"], phone=values["phone"],
                              user=staff.user, source_ip=staff.ip))
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), values=values, status=400)
    secret = parse_qs(urlsplit(uri).query).get("secret", [""])[0]
    created = {"user": new, "uri": uri, "secret": secret, "qr": qr_svg(uri)}
    return await _users_page(request, staff, created=created)


def _user_id(request: web.Request) -> int:
    try:
        return int(request.match_info["user_id"])
    except ValueError:
        raise web.HTTPNotFound() from None


@staff_view(admin_only=True)
async def disable_user(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/disable``: disable a user and end their sessions."""
    try:
        await asyncio.to_thread(_admin(request).accounts.set_disabled, _user_id(request), True,
                                staff.user, staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    return see_other("/admin/users?done=user-disabled")


@staff_view(admin_only=True)
async def enable_user(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/enable``: enable a user again."""
    await asyncio.to_thread(_admin(request).accounts.set_disabled, _user_id(request), False,
                            staff.user, staff.ip)
    return see_other("/admin/users?done=user-enabled")


@staff_view(admin_only=True)
async def reset_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/password-reset``: a temporary password (typed or made).

    A generated password is shown on the page once, like a new user's QR code.
    """
    form = await request.post()
    try:
        done = await _admin(request).logins.password_work.run(
            _admin(request).accounts.reset_password, _user_id(request),
            field(form, "password", 1024), staff.user, staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    users = await asyncio.to_thread(_admin(request).accounts.staff_users)
    return render(request, staff, "users.html", {
        "users": users, "error": "", "values": {}, "created": None, "reset": done,
    }, section="users")


@staff_view(admin_only=True)
async def reset_totp(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/totp-reset``: the user enrols anew at next login."""
    try:
        await asyncio.to_thread(_admin(request).accounts.reset_totp, _user_id(request), staff.user,
                                staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    return see_other("/admin/users?done=totp-reset")
