"""Staff pages under /admin: login with password + TOTP, studies, transfers, audit.

Routes (server-rendered, no inline script or style; every POST carries the CSRF
token, checked in :mod:`web.middlewares`)::

    GET  POST /admin/login                       username, password, TOTP code
    POST /admin/logout                           end the staff session
    GET  /admin?q=                               recent transactions, searchable
    GET  /admin/studies?q=&from=&to=             received studies + the share form
    POST /admin/transfers                        share the chosen studies
    GET  /admin/transactions/{public_id}         details, thread, audit trail
    POST /admin/transactions/{public_id}/messages   staff reply (emails the recipient)
    POST /admin/transactions/{public_id}/unlock     unlock a locked recipient
    POST /admin/transactions/{public_id}/authenticator/remove   recipient lost their phone
    POST /admin/transactions/{public_id}/passcode-channel   where the recipient's passcodes go
                                                 (admins and the recipient's contacts)
    GET  /admin/audit?actor=&action=&patient=&page=  the audit log, 50 a page
    GET  POST /admin/aes, POST /admin/aes/remove       remote AEs (admins)
    GET  POST /admin/users, POST /admin/users/{id}/disable|enable   staff (admins)
    POST /admin/users/{id}/password-reset|totp-reset     reset another user (admins)
    POST /admin/transactions/{public_id}/send            send its studies to a DICOM node
    POST /admin/transactions/{public_id}/recipient-send  AEs its recipient may send to
    GET  /admin/sends, GET /admin/sends.json?transaction=  send jobs and their progress
    GET  POST /admin/routes, POST /admin/routes/{id}/remove  auto-routing rules (admins)
    GET  /admin/account, POST /admin/account/password  own account
    GET  POST /admin/account/totp                re-enrol own TOTP (QR code)
    GET  POST /admin/setup/totp                  enrol after an admin reset the TOTP
    GET  POST /admin/setup/password              own password after an admin reset it

Pages other than the login need a staff session (a recipient session is not
enough: such requests go to the login page); AE and user pages need an admin.
A user with a pending step after a reset (``AdminService.pending_step``) is sent
to that step's page from every other page: a session opened with the password
alone (no TOTP secret) reaches nothing but the enrolment page.
Blocking work runs in a thread through :class:`iepnode.people.admin.AdminService`; work that
hashes or checks a password runs on the bounded ``AdminService.password_work`` pool
(a login beyond its queue gets 503 at once), never in the threads page views share.
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
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp_jinja2
import qrcode
from aiohttp import web
from markupsafe import Markup
from qrcode.image.svg import SvgPathImage

from iepnode import timefmt
from iepnode.errors import Busy, InvalidRequest, LoginRefused, UnknownDestination
from iepnode.outbound.messaging import DeliveryError
from iepnode.people.admin import (
    LOGIN_REFUSED,
    STEP_PASSWORD,
    STEP_TOTP,
    AdminService,
    LoginThrottled,
)
from iepnode.people.audit import Actor
from iepnode.sharing import recipients
from iepnode.sharing.transactions import PRIORITIES, NewTransfer
from storage.models import StaffUser, Transaction, WebSession
from storage.registry import SERVICES
from web import middlewares
from web.common import (
    client_ip,
    format_pn,
    format_sex,
    public_id_of,
    see_other,
    services_of,
)
from web.keys import SERVICES_KEY, SESSION_KEY, SETTINGS_KEY

_NEXT = re.compile(r"/admin(/[A-Za-z0-9/_.-]*)?(\?[A-Za-z0-9_.=&%-]*)?")
_OUTCOMES = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
#: Fixed notices shown after a redirect (``?done=``): no text is reflected from the URL.
_NOTICES = {
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
_WARNINGS = frozenset({"replied-failed", "replied-expired", "created-channel-kept",
                       "channel-changed-unnotified"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    if transaction.status == "NEW" and transaction.expires_at <= time.time():
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


# -- helpers -------------------------------------------------------------------------------


def _admin(request: web.Request) -> AdminService:
    return request.app[SERVICES_KEY].admin


def _safe_next(value: object) -> str:
    """Where to go after login: an /admin path only (no open redirect)."""
    text = value if isinstance(value, str) else ""
    return text if _NEXT.fullmatch(text) and "//" not in text else "/admin"


def _text(form: Mapping[str, Any], name: str, limit: int = 4000) -> str:
    value = form.get(name, "")
    return value[:limit] if isinstance(value, str) else ""


def _render(request: web.Request, staff: Staff | None, template: str,
            context: dict[str, Any], *, section: str = "", status: int = 200) -> web.Response:
    done = request.query.get("done", "")
    base = {"me": staff.user if staff else None,
            "setup": bool(staff and AdminService.pending_step(staff.user)),
            "csrf": staff.session.csrf_token if staff else "",
            "section": section, "notice": _NOTICES.get(done, ""),
            "notice_class": "error" if done in _WARNINGS else "info"}
    return aiohttp_jinja2.render_template(f"admin/{template}", request, {**base, **context},
                                          status=status)


def staff_view(*, admin_only: bool = False,
               step: str | None = None) -> Callable[[StaffHandler], Handler]:
    """Decorate a view that needs a staff session (and, with ``admin_only``, an admin).

    Without one the browser goes to the login page (and comes back after it);
    a staff member who is not an admin gets 403. A user with a pending step after a
    reset goes to that step's page, whatever they asked for; ``step`` marks the view
    of that step, which in turn is open only while that step is pending.
    """

    def decorate(view: StaffHandler) -> Handler:
        @functools.wraps(view)
        async def handler(request: web.Request) -> web.StreamResponse:
            session = request[SESSION_KEY]
            service = _admin(request)
            user = await asyncio.to_thread(service.staff_for_session, session)
            if user is None or session is None:
                target = request.path_qs if request.method == "GET" else "/admin"
                raise web.HTTPSeeOther(f"/admin/login?next={quote(target, safe='/')}")
            pending = service.pending_step(user)
            if pending != step:
                raise web.HTTPSeeOther(STEP_PAGES[pending] if pending else "/admin")
            staff = Staff(user, session, client_ip(request))
            if admin_only and not user.is_admin:
                return _render(request, staff, "message.html", {
                    "title": "Not allowed",
                    "text": "This page is for administrators only."}, status=403)
            return await view(request, staff)

        return handler

    return decorate


# -- login / logout ----------------------------------------------------------------------


def _login_page(request: web.Request, *, error: str = "", username: str = "",
                next_url: str = "/admin", status: int = 200) -> web.Response:
    # With a live (recipient) session the CSRF middleware checks that session's token.
    session = request[SESSION_KEY]
    csrf = session.csrf_token if session is not None else middlewares.prelogin_csrf(request)
    response = _render(request, None, "login.html", {
        "prelogin_csrf": csrf, "error": error, "username": username, "next": next_url,
        "logged_out": request.query.get("out") == "1"}, status=status)
    if session is None:
        middlewares.set_prelogin_cookie(response, csrf)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    """``GET /admin/login``: the staff login form (or home when already logged in)."""
    user = await asyncio.to_thread(_admin(request).staff_for_session, request[SESSION_KEY])
    next_url = _safe_next(request.query.get("next"))
    if user is not None:
        return see_other(next_url)
    return _login_page(request, next_url=next_url)


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /admin/login``: check password and TOTP code, open a staff session."""
    form = await request.post()
    username = _text(form, "username", 64)
    code = re.sub(r"\s", "", _text(form, "code", 16))
    next_url = _safe_next(form.get("next"))
    service = _admin(request)
    try:
        opened = await service.log_in_bounded(username, _text(form, "password", 1024), code,
                                              client_ip(request))
    except Busy as exc:  # too many password checks under way in this process: no wait
        response = _login_page(request, error=str(exc), username=username, next_url=next_url,
                               status=503)
        response.headers["Retry-After"] = str(middlewares.RETRY_AFTER)
        return response
    except LoginThrottled as exc:
        await asyncio.sleep(service.failure_delay)
        return _login_page(request, error=str(exc), username=username, next_url=next_url,
                           status=429)
    except LoginRefused:
        await asyncio.sleep(service.failure_delay)
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
        user = await asyncio.to_thread(service.staff_for_session, request[SESSION_KEY])
        await asyncio.to_thread(service.log_out, token, user, client_ip(request))
    response = see_other("/admin/login?out=1")
    middlewares.clear_session_cookie(response)
    return response


# -- transactions --------------------------------------------------------------------------


@staff_view()
async def home(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin?q=``: recent transactions, newest first."""
    q = request.query.get("q", "")[:200]
    rows = await asyncio.to_thread(_admin(request).recent_transactions, q)
    return _render(request, staff, "home.html", {"rows": rows, "q": q},
                   section="transactions")


async def _transaction_page(request: web.Request, staff: Staff, public_id: str, *,
                            error: str = "", body: str = "", send_error: str = "",
                            channel_error: str = "", status: int = 200) -> web.Response:
    view = await asyncio.to_thread(_admin(request).transaction_view, public_id, staff.user,
                                   staff.ip)
    services = services_of(request)

    def sending() -> dict[str, Any]:
        return {"destinations": services.sends.send_destinations(),
                "sends": services.sends.send_jobs(transaction=public_id),
                "recipient_aes": set(services.sends.recipient_send_aes(public_id))}

    return _render(request, staff, "transaction.html",
                   {"view": view, "error": error, "body": body, "send_error": send_error,
                    "channel_error": channel_error, **await asyncio.to_thread(sending)},
                   section="transactions", status=status)


@staff_view()
async def transaction(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/transactions/{public_id}``: details, thread and audit trail."""
    return await _transaction_page(request, staff, public_id_of(request))


@staff_view()
async def reply(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/messages``: add a staff message, email the recipient.

    A failed email does not lose the message: the page says so in its notice.
    """
    public_id = public_id_of(request)
    form = await request.post()
    body = _text(form, "body", 8000)
    try:
        outcome = await _admin(request).reply(public_id, staff.user, body, staff.ip)
    except InvalidRequest as exc:
        return await _transaction_page(request, staff, public_id, error=str(exc), body=body,
                                       status=400)
    done = "replied" if outcome.emailed else f"replied-{outcome.reason}"
    return see_other(f"/admin/transactions/{public_id}?done={done}#messages")


@staff_view()
async def unlock(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/unlock``: unlock the recipient."""
    public_id = public_id_of(request)
    await asyncio.to_thread(_admin(request).unlock_recipient, public_id, staff.user, staff.ip)
    return see_other(f"/admin/transactions/{public_id}?done=unlocked")


@staff_view()
async def change_channel(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/passcode-channel``: passcodes go elsewhere now.

    For administrators and the recipient's established contacts (others get 403, see
    ``AdminService.may_change_channel``); the recipient is told on the old channel.
    """
    public_id = public_id_of(request)
    form = await request.post()
    channel = _text(form, "channel", 8)
    service = _admin(request)
    email = await asyncio.to_thread(service.recipient_email_of, public_id)
    try:
        if channel not in ("sms", "email"):
            raise InvalidRequest("choose where the passcodes go: a mobile number or an email")
        changed = await service.change_passcode_channel(
            email, _text(form, "otp_mobile", 64) if channel == "sms" else "",
            _text(form, "otp_email", 254) if channel == "email" else "", staff.user, staff.ip,
            public_id=public_id)
    except InvalidRequest as exc:
        return await _transaction_page(request, staff, public_id, channel_error=str(exc),
                                       status=400)
    done = "channel-changed" if changed.notified else "channel-changed-unnotified"
    return see_other(f"/admin/transactions/{public_id}?done={done}")


@staff_view()
async def remove_recipient_app(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/authenticator/remove``: the recipient lost it."""
    public_id = public_id_of(request)
    await asyncio.to_thread(_admin(request).remove_recipient_authenticator, public_id,
                            staff.user, staff.ip)
    return see_other(f"/admin/transactions/{public_id}?done=app-removed")
# -- sends to DICOM nodes (issue 6) ---------------------------------------------------------


def _staff_actor(staff: Staff) -> Actor:
    return Actor("staff", staff.user.username, staff.ip)


@staff_view()
async def send_transaction(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/send``: queue a send of its studies."""
    public_id = public_id_of(request)
    form = await request.post()
    try:
        await asyncio.to_thread(services_of(request).sends.send_transaction, public_id,
                                _text(form, "ae_title", 16), _staff_actor(staff))
    except (InvalidRequest, UnknownDestination) as exc:
        return await _transaction_page(request, staff, public_id, send_error=str(exc),
                                       status=400)
    return see_other(f"/admin/transactions/{public_id}?done=send-queued#send")


@staff_view()
async def recipient_send(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/recipient-send``: AEs the recipient may use."""
    public_id = public_id_of(request)
    form = await request.post()
    titles = [t[:16] for t in form.getall("ae_title", []) if isinstance(t, str)][:50]
    try:
        await asyncio.to_thread(services_of(request).sends.set_recipient_send_aes, public_id,
                                titles, _staff_actor(staff))
    except UnknownDestination as exc:
        return await _transaction_page(request, staff, public_id, send_error=str(exc),
                                       status=400)
    return see_other(f"/admin/transactions/{public_id}?done=recipient-send#send")


@staff_view()
async def sends(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/sends``: the latest send jobs with live progress."""
    jobs = await asyncio.to_thread(services_of(request).sends.send_jobs)
    return _render(request, staff, "sends.html", {"jobs": jobs}, section="sends")


@staff_view()
async def sends_json(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/sends.json?transaction=``: send jobs' progress for the pages' script."""
    transaction = request.query.get("transaction") or None
    if transaction is not None and not re.fullmatch(r"IEP[0-9]{8}", transaction):
        raise web.HTTPNotFound()
    jobs = await asyncio.to_thread(services_of(request).sends.send_jobs, transaction)
    return web.json_response({"jobs": [job.as_json() for job in jobs]})


async def _routes_page(request: web.Request, staff: Staff, *, error: str = "",
                       values: dict[str, str] | None = None, status: int = 200) -> web.Response:
    services = services_of(request)
    rules, destinations = await asyncio.to_thread(
        lambda: (services.sends.route_rules(), services.sends.send_destinations()))
    return _render(request, staff, "routes.html", {
        "rules": rules, "destinations": destinations, "error": error, "values": values or {},
    }, section="routes", status=status)


@staff_view(admin_only=True)
async def routes(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/routes``: auto-routing rules and the form to add one."""
    return await _routes_page(request, staff)


@staff_view(admin_only=True)
async def add_route(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/routes``: add an auto-routing rule."""
    form = await request.post()
    values = {k: _text(form, k, 64) for k in ("calling_ae", "accession_prefix", "modality",
                                              "destination")}
    try:
        await asyncio.to_thread(functools.partial(
            services_of(request).sends.add_route, values["destination"], _staff_actor(staff),
            calling_ae=values["calling_ae"], accession_prefix=values["accession_prefix"],
            modality=values["modality"]))
    except (InvalidRequest, UnknownDestination) as exc:
        return await _routes_page(request, staff, error=str(exc), values=values, status=400)
    return see_other("/admin/routes?done=route-added")


@staff_view(admin_only=True)
async def remove_route(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/routes/{rule_id}/remove``: delete an auto-routing rule."""
    try:
        rule_id = int(request.match_info["rule_id"])
    except ValueError:
        raise web.HTTPNotFound() from None
    await asyncio.to_thread(services_of(request).sends.remove_route, rule_id, _staff_actor(staff))
    return see_other("/admin/routes?done=route-removed")


# -- studies and sharing -------------------------------------------------------------------


def _share_defaults(request: web.Request) -> dict[str, str]:
    return {"channel": "sms", "priority": "NORMAL",
            "expiry_days": str(services_of(request).settings.transaction_expiry_days)}


@staff_view()
async def studies(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/studies?q=&from=&to=``: search received studies, share some."""
    q, date_from, date_to = (request.query.get(k, "")[:64] for k in ("q", "from", "to"))
    error, status, hits = "", 200, []
    try:
        hits = await asyncio.to_thread(_admin(request).search_studies, q, date_from, date_to,
                                       staff.user, staff.ip)
    except InvalidRequest as exc:
        error, status = str(exc), 400
    return _render(request, staff, "studies.html", {
        "hits": hits, "q": q, "date_from": date_from, "date_to": date_to,
        "search_error": error, "share": _share_defaults(request), "chosen": set(),
        "share_error": "", "priorities": PRIORITIES,
    }, section="studies", status=status)


@staff_view()
async def create_transfer(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transfers``: share the chosen studies; show the new transaction."""
    form = await request.post()
    uids = [u[:64] for u in form.getall("study", []) if isinstance(u, str)][:200]
    fields = ("recipient_email", "recipient_name", "channel", "otp_mobile", "otp_email",
              "nhs_number", "message", "priority", "expiry_days")
    values = {name: _text(form, name, 8000) for name in fields}
    service = _admin(request)
    try:
        try:
            expiry = int(values["expiry_days"].strip() or
                         services_of(request).settings.transaction_expiry_days)
        except ValueError:
            raise InvalidRequest("expiry: give a whole number of days") from None
        channel = values["channel"]
        if channel not in ("sms", "email"):
            raise InvalidRequest("choose where the passcode goes: a mobile number or an email")
        new = NewTransfer(
            study_uids=tuple(uids), recipient_email=values["recipient_email"],
            otp_mobile=values["otp_mobile"] if channel == "sms" else "",
            otp_email=values["otp_email"] if channel == "email" else "",
            recipient_name=values["recipient_name"], message=values["message"],
            priority=values["priority"], expiry_days=expiry, nhs_number=values["nhs_number"],
        )
        created = await service.share(new, staff.user, staff.ip)
        kept = recipients.kept_instead(created.recipient, new.otp_mobile, new.otp_email)
    except (InvalidRequest, ValueError, DeliveryError) as exc:
        if isinstance(exc, DeliveryError):
            message = (f"The transaction was created, but the email with its link could not be "
                       f"sent ({exc}). It is listed under Transactions; do not share again.")
        else:
            message = str(exc)
        hits = await asyncio.to_thread(service.studies_by_uid, uids)
        return _render(request, staff, "studies.html", {
            "hits": hits, "q": "", "date_from": "", "date_to": "", "search_error": "",
            "share": {**_share_defaults(request), **{k: v for k, v in values.items() if v}},
            "chosen": set(uids), "share_error": message, "priorities": PRIORITIES,
        }, section="studies", status=400)
    done = "created-channel-kept" if kept else "created"
    return see_other(f"/admin/transactions/{created.public_id}?done={done}")


# -- audit log -------------------------------------------------------------------------------


@staff_view()
async def audit_log(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/audit?actor=&action=&patient=&page=``: the audit log, newest first."""
    filters = {k: request.query.get(k, "")[:254] for k in ("actor", "action", "patient")}
    try:
        page_number = int(request.query.get("page", "1"))
    except ValueError:
        page_number = 1
    page = await asyncio.to_thread(_admin(request).audit_log, filters["actor"],
                                   filters["action"], filters["patient"], page_number)
    query = {k: v for k, v in filters.items() if v}
    links = {
        "newer": f"/admin/audit?{urlencode({**query, 'page': page.page - 1})}"
        if page.page > 1 else "",
        "older": f"/admin/audit?{urlencode({**query, 'page': page.page + 1})}"
        if page.page < page.pages else "",
    }
    return _render(request, staff, "audit.html",
                   {"page": page, "filters": filters, "links": links}, section="audit")


# -- remote AEs ------------------------------------------------------------------------------


async def _aes_page(request: web.Request, staff: Staff, *, error: str = "",
                    values: dict[str, Any] | None = None, status: int = 200) -> web.Response:
    aes = await asyncio.to_thread(_admin(request).remote_aes)
    return _render(request, staff, "aes.html", {
        "aes": aes, "error": error, "services": SERVICES,
        "values": values or {"allow": ["store"]},
    }, section="aes", status=status)


@staff_view(admin_only=True)
async def aes(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/aes``: registered remote AEs and the form to add one."""
    return await _aes_page(request, staff)


@staff_view(admin_only=True)
async def add_ae(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/aes``: register (or update) a remote AE."""
    form = await request.post()
    values: dict[str, Any] = {k: _text(form, k, 255) for k in ("ae_title", "host", "port")}
    values["allow"] = [s for s in form.getall("allow", []) if isinstance(s, str)]
    values["send_to"] = form.get("send_to") == "1"
    try:
        await asyncio.to_thread(functools.partial(
            _admin(request).add_remote_ae, values["ae_title"], values["host"], values["port"],
            values["allow"], staff.user, staff.ip, send_to=values["send_to"]))
    except InvalidRequest as exc:
        return await _aes_page(request, staff, error=str(exc), values=values, status=400)
    return see_other("/admin/aes?done=ae-saved")


@staff_view(admin_only=True)
async def remove_ae(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/aes/remove``: unregister a remote AE."""
    form = await request.post()
    await asyncio.to_thread(_admin(request).remove_remote_ae, _text(form, "ae_title", 64),
                            staff.user, staff.ip)
    return see_other("/admin/aes?done=ae-removed")


# -- staff users -----------------------------------------------------------------------------


async def _users_page(request: web.Request, staff: Staff, *, error: str = "",
                      values: dict[str, str] | None = None, created: Any = None,
                      status: int = 200) -> web.Response:
    users = await asyncio.to_thread(_admin(request).staff_users)
    return _render(request, staff, "users.html", {
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
    values = {k: _text(form, k, 254) for k in ("username", "display_name", "email",
                                               "department", "phone")}
    try:
        new, uri = await _admin(request).password_work.run(
            functools.partial(_admin(request).add_user, values["username"],
                              _text(form, "password", 1024), is_admin=form.get("is_admin") == "1",
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
        await asyncio.to_thread(_admin(request).set_disabled, _user_id(request), True,
                                staff.user, staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    return see_other("/admin/users?done=user-disabled")


@staff_view(admin_only=True)
async def enable_user(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/enable``: enable a user again."""
    await asyncio.to_thread(_admin(request).set_disabled, _user_id(request), False,
                            staff.user, staff.ip)
    return see_other("/admin/users?done=user-enabled")


@staff_view(admin_only=True)
async def reset_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/password-reset``: a temporary password (typed or made).

    A generated password is shown on the page once, like a new user's QR code.
    """
    form = await request.post()
    try:
        done = await _admin(request).password_work.run(
            _admin(request).reset_password, _user_id(request), _text(form, "password", 1024),
            staff.user, staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    users = await asyncio.to_thread(_admin(request).staff_users)
    return _render(request, staff, "users.html", {
        "users": users, "error": "", "values": {}, "created": None, "reset": done,
    }, section="users")


@staff_view(admin_only=True)
async def reset_totp(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/users/{user_id}/totp-reset``: the user enrols anew at next login."""
    try:
        await asyncio.to_thread(_admin(request).reset_totp, _user_id(request), staff.user,
                                staff.ip)
    except InvalidRequest as exc:
        return await _users_page(request, staff, error=str(exc), status=400)
    return see_other("/admin/users?done=totp-reset")


# -- own account ---------------------------------------------------------------------------


@staff_view()
async def account(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/account``: own details, password change, TOTP re-enrolment."""
    return _render(request, staff, "account.html", {"error": ""}, section="account")


@staff_view()
async def change_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/account/password``: change own password."""
    form = await request.post()
    try:
        await _admin(request).password_work.run(
            _admin(request).change_password, staff.user, staff.session.id,
            _text(form, "current", 1024), _text(form, "new", 1024), _text(form, "repeat", 1024),
            staff.ip)
    except InvalidRequest as exc:
        return _render(request, staff, "account.html", {"error": str(exc)}, section="account",
                       status=400)
    return see_other("/admin/account?done=password")


def _totp_page(request: web.Request, staff: Staff, enrolment: Any, *, error: str = "",
               status: int = 200) -> web.Response:
    return _render(request, staff, "totp.html", {
        "enrolment": enrolment, "qr": qr_svg(enrolment.uri), "error": error,
    }, section="account", status=status)


@staff_view()
async def totp_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/account/totp``: a new TOTP secret as a QR code, to confirm."""
    enrolment = await asyncio.to_thread(_admin(request).totp_enrolment, staff.user,
                                        staff.session.id)
    return _totp_page(request, staff, enrolment)


@staff_view()
async def totp_confirm(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/account/totp``: save the new secret once a code from it checks out."""
    form = await request.post()
    service = _admin(request)
    try:
        enrolment = await asyncio.to_thread(service.check_enrolment, staff.user,
                                            staff.session.id, _text(form, "secret", 64),
                                            _text(form, "signature", 128))
    except InvalidRequest as exc:
        fresh = await asyncio.to_thread(service.totp_enrolment, staff.user, staff.session.id)
        return _totp_page(request, staff, fresh, error=str(exc), status=400)
    try:
        await service.password_work.run(service.confirm_totp, staff.user, staff.session.id,
                                        enrolment, _text(form, "password", 1024),
                                        _text(form, "code", 16), staff.ip)
    except InvalidRequest as exc:
        return _totp_page(request, staff, enrolment, error=str(exc), status=400)
    return see_other("/admin/account?done=totp")


# -- steps after an admin reset ----------------------------------------------------------


def _setup_totp_page(request: web.Request, staff: Staff, enrolment: Any, *, error: str = "",
                     status: int = 200) -> web.Response:
    return _render(request, staff, "setup_totp.html", {
        "enrolment": enrolment, "qr": qr_svg(enrolment.uri), "error": error,
    }, status=status)


def _after_setup(user: StaffUser) -> web.Response:
    pending = AdminService.pending_step(user)
    return see_other(STEP_PAGES[pending] if pending else "/admin?done=welcome")


@staff_view(step=STEP_TOTP)
async def setup_totp_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/setup/totp``: enrol an authenticator (the only page until done)."""
    enrolment = await asyncio.to_thread(_admin(request).totp_enrolment, staff.user,
                                        staff.session.id)
    return _setup_totp_page(request, staff, enrolment)


@staff_view(step=STEP_TOTP)
async def setup_totp(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/setup/totp``: save the new secret once a code from it checks out."""
    form = await request.post()
    service = _admin(request)
    try:
        enrolment = await asyncio.to_thread(service.check_enrolment, staff.user,
                                            staff.session.id, _text(form, "secret", 64),
                                            _text(form, "signature", 128))
    except InvalidRequest as exc:
        fresh = await asyncio.to_thread(service.totp_enrolment, staff.user, staff.session.id)
        return _setup_totp_page(request, staff, fresh, error=str(exc), status=400)
    try:
        await asyncio.to_thread(service.enrol_first_totp, staff.user, staff.session.id,
                                enrolment, _text(form, "code", 16), staff.ip)
    except InvalidRequest as exc:
        return _setup_totp_page(request, staff, enrolment, error=str(exc), status=400)
    user = await asyncio.to_thread(StaffUser.get_by_id, staff.user.id)
    return _after_setup(user)


@staff_view(step=STEP_PASSWORD)
async def setup_password_form(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/setup/password``: choose a password to replace the temporary one."""
    return _render(request, staff, "setup_password.html", {"error": ""})


@staff_view(step=STEP_PASSWORD)
async def setup_password(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/setup/password``: replace the temporary password."""
    form = await request.post()
    try:
        await _admin(request).password_work.run(
            _admin(request).set_required_password, staff.user, staff.session.id,
            _text(form, "new", 1024), _text(form, "repeat", 1024), staff.ip)
    except InvalidRequest as exc:
        return _render(request, staff, "setup_password.html", {"error": str(exc)},
                       status=400)
    user = await asyncio.to_thread(StaffUser.get_by_id, staff.user.id)
    return _after_setup(user)


def setup_routes(app: web.Application) -> None:
    """Register the /admin routes and the template filters they use.

    Parameters
    ----------
    app : web.Application
        The application, with aiohttp-jinja2 already set up.
    """
    env = aiohttp_jinja2.get_env(app)
    zone = app[SETTINGS_KEY].zone
    env.filters.update(
        staff_time=functools.partial(format_time, zone=zone),
        staff_seconds=functools.partial(format_seconds, zone=zone),
        staff_day=functools.partial(format_day, zone=zone),
        staff_da=format_da, staff_pn=format_pn, staff_sex=format_sex,
        staff_outcome=format_outcome, staff_modalities=format_modalities,
        staff_status=transaction_status,
    )
    router = app.router
    router.add_get("/admin/login", login_form)
    router.add_post("/admin/login", login)
    router.add_post("/admin/logout", logout)
    router.add_get("/admin", home)
    router.add_get("/admin/studies", studies)
    router.add_post("/admin/transfers", create_transfer)
    router.add_get("/admin/transactions/{public_id}", transaction)
    router.add_post("/admin/transactions/{public_id}/messages", reply)
    router.add_post("/admin/transactions/{public_id}/unlock", unlock)
    router.add_post("/admin/transactions/{public_id}/authenticator/remove",
                    remove_recipient_app)
    router.add_post("/admin/transactions/{public_id}/passcode-channel", change_channel)
    router.add_get("/admin/audit", audit_log)
    router.add_get("/admin/aes", aes)
    router.add_post("/admin/aes", add_ae)
    router.add_post("/admin/aes/remove", remove_ae)
    router.add_get("/admin/users", users)
    router.add_post("/admin/users", add_user)
    router.add_post("/admin/users/{user_id}/disable", disable_user)
    router.add_post("/admin/users/{user_id}/enable", enable_user)
    router.add_post("/admin/users/{user_id}/password-reset", reset_password)
    router.add_post("/admin/users/{user_id}/totp-reset", reset_totp)
    router.add_post("/admin/transactions/{public_id}/send", send_transaction)
    router.add_post("/admin/transactions/{public_id}/recipient-send", recipient_send)
    router.add_get("/admin/sends", sends)
    router.add_get("/admin/sends.json", sends_json)
    router.add_get("/admin/routes", routes)
    router.add_post("/admin/routes", add_route)
    router.add_post("/admin/routes/{rule_id}/remove", remove_route)
    router.add_get("/admin/account", account)
    router.add_post("/admin/account/password", change_password)
    router.add_get("/admin/account/totp", totp_form)
    router.add_post("/admin/account/totp", totp_confirm)
    router.add_get("/admin/setup/totp", setup_totp_form)
    router.add_post("/admin/setup/totp", setup_totp)
    router.add_get("/admin/setup/password", setup_password_form)
    router.add_post("/admin/setup/password", setup_password)
