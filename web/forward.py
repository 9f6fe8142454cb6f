"""The forward dialog: a recipient forwards a package they received to another person.

Routes (server-rendered; ``/static/forward.js`` shows the dialog one step at a time
and keeps Finish disabled until the disclaimer is ticked, the page works without it)::

    GET  /transactions/{public_id}/forward    the 4-step dialog: destination, additional
                                              info, message, retention + disclaimer
    POST /transactions/{public_id}/forward    forward; the dialog again with the error, or
                                              on to the list of forwards
    GET  /transactions/{public_id}/forwards   the package's forwards (to whom, until when)

The rules (limit, copies, declined/expired) are enforced by the domain
(:mod:`iepnode.sharing.forwarding`) whatever the page showed; refusals become a 400 page
with the reason, other people's packages 404, and every POST needs the CSRF token
(:mod:`web.middlewares`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from iepnode.outbound.messaging import DeliveryError
from iepnode.records import WebSession
from iepnode.sharing.forwarding import (
    PURPOSES,
    RETENTION,
    ForwardInvalid,
    ForwardRequest,
    ForwardState,
)
from iepnode.sharing.transactions import is_expired
from web.common import client_ip, public_id_of, recipient_session, see_other, services_of

#: The fields of the dialog, with the most characters kept of each.
FIELDS = {"email": 254, "email_confirm": 254, "first_name": 64, "last_name": 64,
          "address": 500, "phone": 32, "channel": 8, "otp_mobile": 32, "otp_email": 254,
          "purpose": 32, "organisation": 128, "message": 4000, "days": 8}
_DONE = {"sent": "The package has been forwarded. The recipient gets an email with a "
                 "personal link, and a one-time passcode when they open it. The hospital "
                 "has been told."}


def _values(form: Any) -> dict[str, str]:
    """The dialog's fields as typed (cut to length), for the request and a re-render."""
    values = {name: str(form.get(name, ""))[:limit] for name, limit in FIELDS.items()}
    values["channel"] = "email" if values["channel"] == "email" else "sms"
    values["agree"] = "yes" if form.get("agree") == "yes" else ""
    return values


def _request(values: dict[str, str]) -> ForwardRequest:
    days_text = values["days"].strip()
    if days_text in ("", "longest"):
        days = None
    elif days_text.isdigit():
        days = int(days_text)
    else:
        raise ForwardInvalid("choose how long the recipient has the package", RETENTION)
    sms = values["channel"] == "sms"
    return ForwardRequest(
        email=values["email"], email_confirm=values["email_confirm"],
        first_name=values["first_name"], last_name=values["last_name"],
        address=values["address"], phone=values["phone"],
        otp_mobile=values["otp_mobile"] if sms else "",
        otp_email="" if sms else values["otp_email"],
        purpose=values["purpose"], organisation=values["organisation"],
        message=values["message"], days=days, agreed=values["agree"] == "yes",
    )


async def _dialog(request: web.Request, session: WebSession, *, values: dict[str, str],
                  error: str = "", step: int = 1, status: int = 200) -> web.Response:
    dialog = await asyncio.to_thread(services_of(request).forwards.forward_dialog,
                                     session.recipient_id,
                                     public_id_of(request), client_ip(request))
    return aiohttp_jinja2.render_template("recipient/forward.html", request, {
        "dialog": dialog, "t": dialog.transaction, "recipient": dialog.forwarder,
        "csrf": session.csrf_token, "values": values, "error": error, "step": step,
        "purposes": PURPOSES,
    }, status=status)


async def dialog(request: web.Request) -> web.Response:
    """``GET /transactions/{public_id}/forward``: the dialog (400 with the reason if refused)."""
    session = recipient_session(request)
    return await _dialog(request, session, values={"channel": "sms"})


async def forward(request: web.Request) -> web.StreamResponse:
    """``POST /transactions/{public_id}/forward``: forward the package to a person."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    values = _values(await request.post())
    try:
        await services_of(request).forwards.forward_to_person(session.recipient_id, public_id,
                                                 _request(values), client_ip(request))
    except ForwardInvalid as exc:
        return await _dialog(request, session, values=values, error=_sentence(exc),
                             step=exc.step, status=400)
    except DeliveryError:
        return await _dialog(
            request, session, values=values, step=RETENTION, status=503,
            error=f"We could not send the email to {values['email'].strip()} just now, so "
                  "nothing was forwarded. Please try again in a few minutes.")
    return see_other(f"/transactions/{public_id}/forwards?done=sent")


async def forwards(request: web.Request) -> web.Response:
    """``GET /transactions/{public_id}/forwards``: to whom the package was forwarded."""
    session = recipient_session(request)
    services = services_of(request)
    history = await asyncio.to_thread(services.forwards.forward_history, session.recipient_id,
                                      public_id_of(request))
    return aiohttp_jinja2.render_template("recipient/forwards.html", request, {
        "history": history, "t": history.transaction, "recipient": history.forwarder,
        "csrf": session.csrf_token, "notice": _DONE.get(request.query.get("done", ""), ""),
        "now": time.time(), "is_expired": is_expired,
    })


async def states_for(request: web.Request, views: list[Any]) -> dict[str, ForwardState]:
    """Whether each shown transaction may be forwarded, for the Forward button."""
    if not views:
        return {}
    return await asyncio.to_thread(services_of(request).forwards.forward_states,
                                   [v.transaction for v in views])


def _sentence(exc: Exception) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
