"""Staff pages of transactions: the list, one transaction and its actions, sharing studies.

Routes (staff session; every POST carries the CSRF token, checked in
:mod:`web.middlewares`)::

    GET  /admin?q=                               recent transactions, searchable
    GET  /admin/studies?q=&from=&to=             received studies + the share form
    POST /admin/transfers                        share the chosen studies
    GET  /admin/transactions/{public_id}         details, thread, audit trail
    POST /admin/transactions/{public_id}/messages   staff reply (emails the recipient)
    POST /admin/transactions/{public_id}/unlock     unlock a locked recipient
    POST /admin/transactions/{public_id}/authenticator/remove   recipient lost their phone
    POST /admin/transactions/{public_id}/passcode-channel   where the recipient's passcodes go
                                                 (admins and the recipient's contacts)
    POST /admin/transactions/{public_id}/send            send its studies to a DICOM node
    POST /admin/transactions/{public_id}/recipient-send  AEs its recipient may send to
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from iepnode.errors import InvalidRequest, UnknownDestination
from iepnode.outbound.messaging import DeliveryError
from iepnode.sharing import recipients
from iepnode.sharing.transactions import PRIORITIES, NewTransfer
from web.common import public_id_of, see_other, services_of
from web.staff_pages import (
    Staff,
    field,
    render,
    staff_actor,
    staff_view,
)
from web.staff_pages import admin_service as _admin  # the name the views call it by

# -- transactions --------------------------------------------------------------------------


@staff_view()
async def home(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin?q=``: recent transactions, newest first."""
    q = request.query.get("q", "")[:200]
    rows = await asyncio.to_thread(_admin(request).transactions.recent_transactions, q)
    return render(request, staff, "home.html", {"rows": rows, "q": q},
                  section="transactions")


async def _transaction_page(request: web.Request, staff: Staff, public_id: str, *,
                            error: str = "", body: str = "", send_error: str = "",
                            channel_error: str = "", status: int = 200) -> web.Response:
    view = await asyncio.to_thread(_admin(request).transactions.transaction_view, public_id,
                                   staff.user, staff.ip)
    services = services_of(request)

    def sending() -> dict[str, Any]:
        return {"destinations": services.sends.send_destinations(),
                "sends": services.sends.send_jobs(transaction=public_id),
                "recipient_aes": set(services.sends.recipient_send_aes(public_id))}

    return render(request, staff, "transaction.html",
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
    body = field(form, "body", 8000)
    try:
        outcome = await _admin(request).transactions.reply(public_id, staff.user, body, staff.ip)
    except InvalidRequest as exc:
        return await _transaction_page(request, staff, public_id, error=str(exc), body=body,
                                       status=400)
    done = "replied" if outcome.emailed else f"replied-{outcome.reason}"
    return see_other(f"/admin/transactions/{public_id}?done={done}#messages")


@staff_view()
async def unlock(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/unlock``: unlock the recipient."""
    public_id = public_id_of(request)
    await asyncio.to_thread(_admin(request).transactions.unlock_recipient, public_id, staff.user,
                            staff.ip)
    return see_other(f"/admin/transactions/{public_id}?done=unlocked")


@staff_view()
async def change_channel(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/passcode-channel``: passcodes go elsewhere now.

    For administrators and the recipient's established contacts (others get 403, see
    ``PasscodeChannels.may_change_channel``); the recipient is told on the old channel.
    """
    public_id = public_id_of(request)
    form = await request.post()
    channel = field(form, "channel", 8)
    service = _admin(request)
    email = await asyncio.to_thread(service.transactions.recipient_email_of, public_id)
    try:
        if channel not in ("sms", "email"):
            raise InvalidRequest("choose where the passcodes go: a mobile number or an email")
        changed = await service.channels.change_passcode_channel(
            email, field(form, "otp_mobile", 64) if channel == "sms" else "",
            field(form, "otp_email", 254) if channel == "email" else "", staff.user, staff.ip,
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
    await asyncio.to_thread(_admin(request).transactions.remove_recipient_authenticator, public_id,
                            staff.user, staff.ip)
    return see_other(f"/admin/transactions/{public_id}?done=app-removed")


# -- sends to DICOM nodes (issue 6) ---------------------------------------------------------


@staff_view()
async def send_transaction(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/send``: queue a send of its studies."""
    public_id = public_id_of(request)
    form = await request.post()
    try:
        await asyncio.to_thread(services_of(request).sends.send_transaction, public_id,
                                field(form, "ae_title", 16), staff_actor(staff))
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
                                titles, staff_actor(staff))
    except UnknownDestination as exc:
        return await _transaction_page(request, staff, public_id, send_error=str(exc),
                                       status=400)
    return see_other(f"/admin/transactions/{public_id}?done=recipient-send#send")


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
        hits = await asyncio.to_thread(_admin(request).studies.search_studies, q, date_from,
                                       date_to, staff.user, staff.ip)
    except InvalidRequest as exc:
        error, status = str(exc), 400
    return render(request, staff, "studies.html", {
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
    values = {name: field(form, name, 8000) for name in fields}
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
        created = await services_of(request).sharing.share(new, actor=staff_actor(staff),
                                                           user=staff.user)
        kept = recipients.kept_instead(created.recipient, new.otp_mobile, new.otp_email)
    except (InvalidRequest, ValueError, DeliveryError) as exc:
        if isinstance(exc, DeliveryError):
            message = (f"The transaction was created, but the email with its link could not be "
                       f"sent ({exc}). It is listed under Transactions; do not share again.")
        else:
            message = str(exc)
        hits = await asyncio.to_thread(service.studies.studies_by_uid, uids)
        return render(request, staff, "studies.html", {
            "hits": hits, "q": "", "date_from": "", "date_to": "", "search_error": "",
            "share": {**_share_defaults(request), **{k: v for k, v in values.items() if v}},
            "chosen": set(uids), "share_error": message, "priorities": PRIORITIES,
        }, section="studies", status=400)
    done = "created-channel-kept" if kept else "created"
    return see_other(f"/admin/transactions/{created.public_id}?done={done}")
