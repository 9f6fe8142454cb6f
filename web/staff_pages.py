"""Base of the staff pages under /admin: who is signed in, rendering, forms, filters.

Every staff view module (:mod:`web.admin`, :mod:`web.admin_transactions`,
:mod:`web.admin_aes`, :mod:`web.admin_users`, :mod:`web.admin_audit`,
:mod:`web.admin_requests`, :mod:`web.uploads_admin`, the staff views of
:mod:`web.reports` and :mod:`web.dicomweb_pages`) builds on these:

- :func:`staff_view` decorates a view that needs a staff session (and, with
  ``admin_only``, an administrator), and passes it the :class:`Staff` of the request;
- :func:`render` renders an ``admin/`` template with what every staff page shows
  (the user, the CSRF token, the section, the fixed notice named by ``?done=``);
- :func:`field` reads one text field of a posted form, bounded;
- :func:`staff_actor` is the audit actor of the staff member;
- :func:`qr_svg` draws an authenticator URI as an inline SVG QR code (also used by the
  recipients' authenticator page);
- the ``staff_*`` Jinja2 filters (:func:`staff_filters`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date, tzinfo
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import qrcode
from aiohttp import web
from markupsafe import Markup
from qrcode.image.svg import SvgPathImage

from iepnode import timefmt
from iepnode.people.audit import Actor
from iepnode.people.staff_logins import STEP_PASSWORD, STEP_TOTP, StaffLogins
from iepnode.records import StaffUser, Transaction, WebSession
from iepnode.sharing.transactions import NEW, is_expired
from iepnode.staff_side import StaffSide
from web.common import client_ip, format_pn, format_sex
from web.keys import SERVICES_KEY, SESSION_KEY
from web.middlewares import Handler

_OUTCOMES = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
#: Fixed notices shown after a redirect (``?done=``): no text is reflected from the URL.
NOTICES = {
    "created": "Transaction created: the recipient has been emailed the link.",
    "created-channel-kept": "Transaction created: the recipient has been emailed the link. "
                            "They already had an account, so their passcodes still go where "
                            "they went before (shown under Recipient): the mobile number or "
                            "email you typed was not used. If it really changed, an "
                            "administrator, or the hospital contact of a transaction they "
                            "have signed in through, can change it on that transaction's "
                            "page.",
    "channel-changed": "The recipient's passcodes now go to the new channel. Their open "
                       "sessions and unused passcodes have ended, and they were told on the "
                       "old channel.",
    "channel-changed-unnotified": "The recipient's passcodes now go to the new channel and "
                                  "their open sessions have ended, but the notice to the old "
                                  "channel could not be sent (the audit trail below says why).",
    "unlocked": "The recipient is unlocked and can sign in again.",
    "app-removed": "The recipient's authenticator app is removed: they get a passcode by "
                   "text message or email again, and their open sessions have ended.",
    "replied": "Your message was added to the thread, and the recipient was emailed to sign "
               "in and read it.",
    "replied-failed": "Your message was added to the thread, but the email telling the "
                      "recipient about it could not be sent (the audit trail below says why). "
                      "They will see the message the next time they sign in.",
    "replied-expired": "Your message was added to the thread. The recipient was not emailed: "
                       "the transaction has expired, so its link no longer signs in.",
    "ae-saved": "Remote AE saved.",
    "ae-removed": "Remote AE removed.",
    "user-disabled": "User disabled: their sessions have ended.",
    "user-enabled": "User enabled.",
    "totp-reset": "Authenticator reset: the user's sessions have ended. At their next login "
                  "(password only) they must enrol a new authenticator before anything else.",
    "welcome": "You are all set: your password and authenticator are your own.",
    "password": "Your password was changed. Your other sessions have ended.",
    "totp": "Your authenticator is enrolled. Your other sessions have ended.",
    "send-queued": "The send is queued: its progress shows below.",
    "recipient-send": "Saved where the recipient may send this transaction.",
    "route-added": "Routing rule added.",
    "route-removed": "Routing rule removed.",
    # -- hardening (issue 13): attachments --
    "attachment-filed": "The attachment is filed into the patient's study: it is now part of "
                        "the hospital's record, in every transaction sharing the study.",
    "attachment-removed": "The attachment is removed.",
}

#: Notices that report something that did not work (shown as an error, not as info).
WARNINGS = frozenset({"replied-failed", "replied-expired", "created-channel-kept",
                       "channel-changed-unnotified"})


@dataclass(frozen=True)
class Staff:
    """The logged-in staff member of a request."""

    user: StaffUser
    session: WebSession
    ip: str


StaffHandler = Callable[[web.Request, Staff], Awaitable[web.StreamResponse]]

#: The page of each step a user must take after an admin reset.
STEP_PAGES = {STEP_TOTP: "/admin/setup/totp", STEP_PASSWORD: "/admin/setup/password"}


# -- formatting (Jinja2 filters, staff_ prefix) ------------------------------------------


def format_time(value: float | None, zone: tzinfo) -> str:
    """Format a Unix time as ``2026-11-23 14:05 GMT`` in ``zone``; ``—`` when missing."""
    return timefmt.iso_minute(value, zone) if value else "—"


def format_seconds(value: float | None, zone: tzinfo) -> str:
    """Format a Unix time as ``2026-11-23 14:05:09 GMT`` in ``zone`` (audit events)."""
    return timefmt.iso_second(value, zone) if value else "—"


def format_day(value: float | None, zone: tzinfo) -> str:
    """Format a Unix time as a date ``2026-11-23`` in ``zone``."""
    return timefmt.iso_day(value, zone) if value else "—"


def format_da(value: str) -> str:
    """Format a DICOM DA value ``20240105`` as ``2024-01-05``; other text as given."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
        except ValueError:
            return text
    return text or "—"


def format_outcome(value: int) -> str:
    """Name a PS3.15 EventOutcomeIndicator."""
    return _OUTCOMES.get(value, str(value))


def format_modalities(value: str) -> str:
    """``CT\\SR`` -> ``CT, SR``."""
    return ", ".join(m for m in (value or "").split("\\") if m) or "—"


def transaction_status(transaction: Transaction) -> str:
    """The status staff see: a NEW transaction past its expiry shows as EXPIRED."""
    if transaction.status == NEW and is_expired(transaction, time.time()):
        return "EXPIRED"
    return transaction.status


def qr_svg(data: str) -> Markup:
    """Render ``data`` as an inline SVG QR code (no inline style: fine under the CSP)."""
    image = qrcode.make(data, image_factory=SvgPathImage, box_size=10, border=4)
    svg = image.to_string(encoding="unicode")
    svg = svg[svg.index("<svg"):]
    head, rest = svg.split(">", 1)
    head = re.sub(r'\s(width|height)="[^"]*"', "", head)
    head = head.replace("<svg", '<svg class="admin-qr-code" role="img" '
                        'aria-label="QR code for an authenticator app"', 1)
    return Markup(f"{head}>{rest}")  # generated here from the URI: no user markup


def staff_filters(zone: tzinfo) -> dict[str, Callable[..., Any]]:
    """The ``staff_*`` Jinja2 filters of the staff templates, times shown in ``zone``.

    Parameters
    ----------
    zone : tzinfo
        The node's time zone (``Settings.zone``).
    """
    return {
        "staff_time": functools.partial(format_time, zone=zone),
        "staff_seconds": functools.partial(format_seconds, zone=zone),
        "staff_day": functools.partial(format_day, zone=zone),
        "staff_da": format_da, "staff_pn": format_pn, "staff_sex": format_sex,
        "staff_outcome": format_outcome, "staff_modalities": format_modalities,
        "staff_status": transaction_status,
    }


# -- helpers -------------------------------------------------------------------------------


def admin_service(request: web.Request) -> StaffSide:
    """The staff side of the domain the staff pages call (``services.admin``)."""
    return request.app[SERVICES_KEY].admin


def field(form: Mapping[str, Any], name: str, limit: int = 4000) -> str:
    """The text field ``name`` of a posted form, cut to ``limit`` characters (``""``
    when missing or a file)."""
    value = form.get(name, "")
    return value[:limit] if isinstance(value, str) else ""


def staff_actor(staff: Staff) -> Actor:
    """The audit actor of the staff member of a request."""
    return Actor("staff", staff.user.username, staff.ip)


def render(request: web.Request, staff: Staff | None, template: str,
           context: dict[str, Any], *, section: str = "", status: int = 200) -> web.Response:
    """Render ``admin/{template}`` with what every staff page shows, and ``context``.

    Parameters
    ----------
    request : web.Request
        The request (its ``?done=`` names the fixed notice shown, if any).
    staff : Staff or None
        The signed-in staff member (``None`` on the login page).
    template : str
        The template's name under ``admin/``.
    context : dict
        The page's own values (they override the common ones).
    section : str
        The navigation section to highlight.
    status : int
        The HTTP status.
    """
    done = request.query.get("done", "")
    base = {"me": staff.user if staff else None,
            "setup": bool(staff and StaffLogins.pending_step(staff.user)),
            "csrf": staff.session.csrf_token if staff else "",
            "section": section, "notice": NOTICES.get(done, ""),
            "notice_class": "error" if done in WARNINGS else "info"}
    return aiohttp_jinja2.render_template(f"admin/{template}", request, {**base, **context},
                                          status=status)


def staff_view(*, admin_only: bool = False,
               step: str | None = None) -> Callable[[StaffHandler], Handler]:
    """Decorate a view that needs a staff session (and, with ``admin_only``, an admin).

    Without one the browser goes to the login page (and comes back after it);
    a staff member who is not an admin gets 403. A user with a pending step after a
    reset goes to that step's page, whatever they asked for; ``step`` marks the view
    of that step, which in turn is open only while that step is pending.

    Parameters
    ----------
    admin_only : bool
        Administrators only (others get a 403 page).
    step : str or None
        The pending step (``STEP_TOTP``, ``STEP_PASSWORD``) this view completes.
    """

    def decorate(view: StaffHandler) -> Handler:
        @functools.wraps(view)
        async def handler(request: web.Request) -> web.StreamResponse:
            session = request[SESSION_KEY]
            service = admin_service(request)
            user = await asyncio.to_thread(service.logins.staff_for_session, session)
            if user is None or session is None:
                target = request.path_qs if request.method == "GET" else "/admin"
                raise web.HTTPSeeOther(f"/admin/login?next={quote(target, safe='/')}")
            pending = service.logins.pending_step(user)
            if pending != step:
                raise web.HTTPSeeOther(STEP_PAGES[pending] if pending else "/admin")
            staff = Staff(user, session, client_ip(request))
            if admin_only and not user.is_admin:
                return render(request, staff, "message.html", {
                    "title": "Not allowed",
                    "text": "This page is for administrators only."}, status=403)
            return await view(request, staff)

        return handler

    return decorate
