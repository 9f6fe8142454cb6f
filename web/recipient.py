"""Recipient pages: link login with a passcode, dashboard, transaction actions.

Routes (all server-rendered, no inline script or style)::

    GET  /t/{token}                          send a passcode, show the login form (with an
                                             authenticator app: ask for its code, send nothing)
    POST /t/{token}/resend                   send a new passcode (rate-limited)
    POST /t/{token}/login                    check the passcode, open a session
    POST /t/{token}/login-app                check an authenticator app code, open a session
    GET  /signin                             "open the link in your email again"
    GET  /dashboard?tab=home|action|all      the dashboard (default: action)
    GET  /transactions/{public_id}           one transaction, expanded
    POST /transactions/{public_id}/messages  add a message to its thread
    POST /transactions/{public_id}/decline   decline it with a reason
    POST /transactions/{public_id}/send      send its studies to a PACS staff allowed
    GET  /account/authenticator              enrol an authenticator app (QR code), or its status
    POST /account/authenticator              confirm the enrolment with a code from the app
    POST /account/authenticator/remove       remove the app (needs a current code from it)
    POST /logout                             end the session

Views are thin: blocking calls into the :class:`~iepnode.services.Services` run in
a thread, domain errors become pages in :mod:`web.middlewares`, and CSRF is
checked there for every POST.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from iepnode import dicomtext, timefmt
from iepnode.errors import (
    InvalidRequest,
    LoginRefused,
    NotFound,
    PasscodeRejected,
    RateLimited,
    RecipientLocked,
)
from iepnode.outbound.messaging import DeliveryError
from iepnode.records import Recipient, WebSession
from iepnode.sharing import recipients
from iepnode.sharing.logins import RESEND_INTERVAL, NewSession, TotpEnrolment
from web import forward, middlewares
from web.common import (
    client_ip,
    format_pn,
    format_sex,
    public_id_of,
    recipient_session,
    see_other,
    services_of,
)
from web.keys import SESSION_KEY
from web.staff_pages import qr_svg

STATIC = Path(__file__).resolve().parent / "static"
TABS = ("home", "action", "all")
_STATUSES = {"NEW": "New", "COMPLETE": "Complete", "DECLINED": "Declined",
             "EXPIRED": "Expired"}
#: Fixed notices shown after a redirect (``?done=``): no text is reflected from the URL.
_NOTICES = {
    "enrolled": "Your authenticator app is set up. Next time you open a link from your "
                "email, sign in with a code from the app: no passcode will be sent.",
    "removed": "Your authenticator app has been removed. You will get a passcode by "
               "text message or email again.",
}


# -- formatting (Jinja2 filters) ------------------------------------------------------


def format_epoch(value: float | None, zone: tzinfo) -> str:
    """Format a Unix time as a date like ``23 Nov 2026`` in ``zone``; ``—`` when missing."""
    return timefmt.day(value, zone) if value else "—"


def format_epoch_time(value: float | None, zone: tzinfo) -> str:
    """Format a Unix time as ``23 Nov 2026 14:05 GMT`` in ``zone``; ``—`` when missing."""
    return timefmt.day_time(value, zone) if value else "—"


def format_da(value: str) -> str:
    """Format a DICOM DA value (``YYYYMMDD``) as ``5 Jan 2024``; other text as given."""
    return dicomtext.dicom_date(value)


def format_status(view: Any) -> str:
    """The status a recipient is shown (a NEW transaction past its expiry is Expired)."""
    if view.expired:
        return "Expired"
    return _STATUSES.get(view.transaction.status, view.transaction.status.title())


def mask_destination(channel: str, destination: str) -> str:
    """Show where a passcode went without giving the address away (:func:`recipients.mask`).

    ``+447700900123`` -> ``•••23``; ``anna@example.org`` -> ``a•••@example.org``.
    """
    return recipients.mask(channel, destination)


# -- helpers ----------------------------------------------------------------------------


def _tab(value: object, default: str = "action") -> str:
    return value if isinstance(value, str) and value in TABS else default


def _code(form: Any) -> str:
    """The code a form sent, without spaces (people copy ``123 456``)."""
    return re.sub(r"\s", "", str(form.get("code", "")))[:12]


def _text(form: Any, name: str, limit: int) -> str:
    return str(form.get(name, ""))[:limit]


# -- link login -------------------------------------------------------------------------


async def _login_page(request: web.Request, token: str, *, sent: bool, notice: str = "",
                      error: str = "", attempt_id: int | None = None,
                      status: int = 200) -> web.Response:
    """Render the passcode form of a link, with the CSRF value its forms must carry."""
    services = services_of(request)
    state = await asyncio.to_thread(services.logins.link_login, token)
    # With a live session the CSRF middleware checks the session's token, so the
    # form must carry that one (e.g. a signed-in recipient opening a newer link).
    session = request[SESSION_KEY]
    csrf = session.csrf_token if session is not None else middlewares.prelogin_csrf(request)
    context = {
        "token": token,
        "totp": state.totp,
        "attempt_id": attempt_id if attempt_id is not None else state.attempt_id,
        "channel": state.channel,
        "masked": mask_destination(state.channel, state.destination),
        "sent": sent,
        "notice": notice,
        "error": error,
        "contact": state.contact,
        "csrf": csrf,
        "minutes": services.settings.passcode_ttl_minutes,
    }
    response = aiohttp_jinja2.render_template("recipient/login.html", request, context,
                                              status=status)
    if session is None:
        middlewares.set_prelogin_cookie(response, csrf)
    return response


async def _locked_page(request: web.Request, token: str) -> web.Response:
    state = await asyncio.to_thread(services_of(request).logins.link_login, token)
    return aiohttp_jinja2.render_template("recipient/locked.html", request,
                                          {"contact": state.contact}, status=403)


async def _send_and_show(request: web.Request, token: str) -> web.Response:
    try:
        await services_of(request).logins.send_passcode(token, client_ip(request))
    except RateLimited:
        return await _login_page(
            request, token, sent=False,
            notice=f"A passcode was sent less than {RESEND_INTERVAL:.0f} seconds ago. Use "
                   "that one, or wait a moment before asking for a new one.")
    except RecipientLocked:
        return await _locked_page(request, token)
    except DeliveryError:
        return await _login_page(
            request, token, sent=False, status=503,
            error="We could not send your passcode just now. Please try again in a few "
                  "minutes, or contact the hospital.")
    return await _login_page(request, token, sent=True)


async def link(request: web.Request) -> web.Response:
    """``GET /t/{token}``: send a passcode to the second channel and show the login form.

    A recipient with an authenticator app is asked for its code and sent nothing (the
    page's "send me a passcode instead" button still sends one).
    """
    token = request.match_info["token"]
    try:
        state = await asyncio.to_thread(services_of(request).logins.link_login, token)
        if not state.totp:
            return await _send_and_show(request, token)
        if state.locked:
            return await _locked_page(request, token)
        return await _login_page(request, token, sent=False)
    except NotFound:
        return aiohttp_jinja2.render_template("recipient/link_invalid.html", request, {},
                                              status=404)


async def resend(request: web.Request) -> web.Response:
    """``POST /t/{token}/resend``: send a new passcode (rate-limited)."""
    return await _send_and_show(request, request.match_info["token"])


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /t/{token}/login``: check the passcode; on success open a session."""
    token = request.match_info["token"]
    form = await request.post()
    code = _code(form)
    try:
        attempt_id = int(str(form.get("attempt", "")))
    except ValueError:
        attempt_id = -1
    services = services_of(request)
    try:
        opened = await asyncio.to_thread(services.logins.log_in, token, attempt_id, code,
                                         client_ip(request))
    except RecipientLocked:
        return await _locked_page(request, token)
    except PasscodeRejected as exc:
        reason = str(exc)
        return await _login_page(request, token, sent=False, error=reason[:1].upper() + reason[1:],
                                 attempt_id=attempt_id if attempt_id > 0 else None,
                                 status=403)
    return await _logged_in(request, opened)


async def login_app(request: web.Request) -> web.StreamResponse:
    """``POST /t/{token}/login-app``: check a code from the authenticator app; open a session."""
    token = request.match_info["token"]
    form = await request.post()
    services = services_of(request)
    try:
        opened = await asyncio.to_thread(services.logins.log_in_app, token, _code(form),
                                         client_ip(request))
    except RecipientLocked:
        return await _locked_page(request, token)
    except PasscodeRejected as exc:
        return await _login_page(request, token, sent=False, error=_sentence(exc),
                                 status=403)
    return await _logged_in(request, opened)


async def _logged_in(request: web.Request, opened: NewSession) -> web.Response:
    """End the browser's old session, set the new cookie, and go to the dashboard."""
    old = request.cookies.get(middlewares.SESSION_COOKIE)
    if old:
        await asyncio.to_thread(services_of(request).logins.end_session, old)
    response = see_other("/dashboard")
    middlewares.set_session_cookie(response, opened.token)
    response.del_cookie(middlewares.PRELOGIN_COOKIE, path="/", secure=True, httponly=True,
                        samesite="Strict")
    return response


@aiohttp_jinja2.template("recipient/signin.html")
async def signin(request: web.Request) -> dict[str, Any]:
    """``GET /signin``: where pages needing a session send a browser without one."""
    return {}


# -- dashboard and transactions ---------------------------------------------------------


async def dashboard(request: web.Request) -> web.Response:
    """``GET /dashboard?tab=home|action|all``: the recipient's transactions."""
    session = recipient_session(request)
    tab = _tab(request.query.get("tab"))
    board = await asyncio.to_thread(services_of(request).sharing.recipient_dashboard,
                                    session.recipient_id, tab, client_ip(request))
    sending = await _sending(request, session, [v.transaction.public_id
                                                for v in board.transactions])
    return aiohttp_jinja2.render_template("recipient/dashboard.html", request, {
        "board": board, "tab": tab, "open_id": request.query.get("open", ""),
        "csrf": session.csrf_token, "recipient": board.recipient, **sending,
        "forwarding": await forward.states_for(request, board.transactions),
    })


async def transaction(request: web.Request) -> web.Response:
    """``GET /transactions/{public_id}``: one transaction with everything expanded."""
    session = recipient_session(request)
    view = await asyncio.to_thread(services_of(request).sharing.recipient_transaction,
                                   session.recipient_id, public_id_of(request), client_ip(request))
    sending = await _sending(request, session, [view.transaction.public_id])
    return aiohttp_jinja2.render_template("recipient/transaction.html", request, {
        "view": view, "csrf": session.csrf_token, "tab": "all", "recipient": view.recipient,
        "forwarding": await forward.states_for(request, [view]),
        **sending,
    })


async def _sending(request: web.Request, session: WebSession,
                   public_ids: list[str]) -> dict[str, Any]:
    """Where the recipient may send these transactions, and the sends they asked for."""
    if not public_ids:
        return {"send_options": {}, "recipient_sends": {}}
    services = services_of(request)

    def load() -> dict[str, Any]:
        return {"send_options": services.sends.recipient_send_options(session.recipient_id,
                                                                      public_ids),
                "recipient_sends": services.sends.recipient_sends(session.recipient_id, public_ids)}

    return await asyncio.to_thread(load)


async def send_to_pacs(request: web.Request) -> web.StreamResponse:
    """``POST /transactions/{public_id}/send``: send the studies to an allowed PACS."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    form = await request.post()
    await asyncio.to_thread(services_of(request).sends.recipient_send, session.recipient_id,
                            public_id, _text(form, "ae_title", 16), client_ip(request))
    return _back(public_id, _tab(form.get("tab"), "all"))


def _back(public_id: str, tab: str) -> web.Response:
    return see_other(f"/dashboard?tab={tab}&open={public_id}#tx-{public_id}")


async def post_message(request: web.Request) -> web.StreamResponse:
    """``POST /transactions/{public_id}/messages``: add a message, back to the dashboard."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    form = await request.post()
    await asyncio.to_thread(services_of(request).sharing.post_message, session.recipient_id,
                            public_id, str(form.get("body", "")), client_ip(request))
    return _back(public_id, _tab(form.get("tab"), "all"))


async def decline(request: web.Request) -> web.StreamResponse:
    """``POST /transactions/{public_id}/decline``: decline with a reason."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    form = await request.post()
    await asyncio.to_thread(services_of(request).sharing.decline, session.recipient_id, public_id,
                            str(form.get("reason", "")), client_ip(request))
    return _back(public_id, "all")


# -- authenticator app ---------------------------------------------------------------------


async def _authenticator_page(request: web.Request, session: WebSession,
                              recipient: Recipient, enrolment: TotpEnrolment | None, *,
                              error: str = "", notice: str = "",
                              status: int = 200) -> web.Response:
    contact = await asyncio.to_thread(services_of(request).sharing.recipient_contact, recipient.id)
    return aiohttp_jinja2.render_template("recipient/authenticator.html", request, {
        "recipient": recipient, "csrf": session.csrf_token, "enrolment": enrolment,
        "qr": qr_svg(enrolment.uri) if enrolment else "", "error": error, "notice": notice,
        "contact": contact,
    }, status=status)


def _sentence(exc: Exception) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:]


async def authenticator(request: web.Request) -> web.Response:
    """``GET /account/authenticator``: a new secret as a QR code to enrol, or the app's status."""
    session = recipient_session(request)
    recipient, enrolment = await asyncio.to_thread(
        services_of(request).logins.recipient_authenticator, session.recipient_id, session.id)
    notice = _NOTICES.get(request.query.get("done", ""), "")
    return await _authenticator_page(request, session, recipient, enrolment, notice=notice)


async def enrol_authenticator(request: web.Request) -> web.StreamResponse:
    """``POST /account/authenticator``: save the new secret once a code from it checks out.

    The pending secret comes back in the form with an HMAC (node secret, bound to this
    session and recipient): nothing is stored until the code checks out.
    """
    session = recipient_session(request)
    form = await request.post()
    services = services_of(request)
    enrolment: TotpEnrolment | None = None
    try:
        enrolment = await asyncio.to_thread(
            services.logins.check_totp_enrolment, session.recipient_id, session.id,
            _text(form, "secret", 64), _text(form, "signature", 128))
        await asyncio.to_thread(services.logins.enrol_totp, session.recipient_id, enrolment,
                                _code(form), client_ip(request))
    except InvalidRequest as exc:
        recipient, fresh = await asyncio.to_thread(services.logins.recipient_authenticator,
                                                   session.recipient_id, session.id)
        # After a wrong code the same secret again (the app has it already), a new one
        # after a bad signature, none once an app is enrolled.
        shown = (enrolment or fresh) if fresh is not None else None
        return await _authenticator_page(request, session, recipient, shown,
                                         error=_sentence(exc), status=400)
    return see_other("/account/authenticator?done=enrolled")


async def remove_authenticator(request: web.Request) -> web.StreamResponse:
    """``POST /account/authenticator/remove``: remove the app; needs a current code from it."""
    session = recipient_session(request)
    form = await request.post()
    services = services_of(request)
    try:
        await asyncio.to_thread(services.logins.remove_totp, session.recipient_id, _code(form),
                                client_ip(request))
    except LoginRefused as exc:
        recipient, enrolment = await asyncio.to_thread(services.logins.recipient_authenticator,
                                                       session.recipient_id, session.id)
        return await _authenticator_page(request, session, recipient, enrolment,
                                         error=_sentence(exc), status=403)
    return see_other("/account/authenticator?done=removed")


async def logout(request: web.Request) -> web.Response:
    """``POST /logout``: end the session and forget the cookie."""
    token = request.cookies.get(middlewares.SESSION_COOKIE)
    if token:
        await asyncio.to_thread(services_of(request).logins.end_session, token)
    response = aiohttp_jinja2.render_template("recipient/logged_out.html", request, {})
    middlewares.clear_session_cookie(response)
    return response


async def favicon(request: web.Request) -> web.FileResponse:
    """``GET /favicon.ico``: browsers ask for it on every site (a 404 is a console error)."""
    return web.FileResponse(STATIC / "favicon.ico",
                            headers={"Cache-Control": "public, max-age=86400"})


def recipient_filters(zone: tzinfo) -> dict[str, Callable[..., Any]]:
    """The Jinja2 filters of the recipient templates, times shown in ``zone``.

    Parameters
    ----------
    zone : tzinfo
        The node's time zone (``Settings.zone``).
    """
    return {"epoch": functools.partial(format_epoch, zone=zone),
            "epoch_time": functools.partial(format_epoch_time, zone=zone),
            "da": format_da, "pn": format_pn, "sex": format_sex, "status": format_status}
