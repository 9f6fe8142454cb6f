"""Staff: ask an individual for images they hold (issue 7).

Routes (staff session; the POST carries the CSRF token, checked in :mod:`web.middlewares`)::

    GET  /admin/requests/new      the request form
    POST /admin/requests          create the request and email its link

The uploads that answer requests are reviewed on the pages of the reconciliation.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from iepnode.errors import InvalidRequest
from iepnode.outbound.messaging import DeliveryError
from iepnode.sharing import recipients
from iepnode.sharing.transactions import PRIORITIES
from iepnode.uploads.image_requests import NewRequest
from web.common import see_other, services_of
from web.staff_pages import Staff, field, render, staff_actor, staff_view

FIELDS = ("recipient_email", "recipient_name", "channel", "otp_mobile", "otp_email",
          "family_name", "given_name", "birth_date", "sex", "patient_id", "issuer",
          "nhs_number", "reason", "message", "priority", "expiry_days")


def _defaults(request: web.Request) -> dict[str, str]:
    return {"channel": "sms", "priority": "NORMAL",
            "expiry_days": str(services_of(request).settings.transaction_expiry_days)}


def _form_page(request: web.Request, staff: Staff, values: dict[str, str], *,
               error: str = "", status: int = 200) -> web.Response:
    return render(request, staff, "request_new.html", {
        "form": values, "error": error, "priorities": PRIORITIES,
    }, section="transactions", status=status)


@staff_view()
async def new_request(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/requests/new``: the form."""
    return _form_page(request, staff, _defaults(request))


@staff_view()
async def create_request(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/requests``: create the request, email its link, show it."""
    form = await request.post()
    values: dict[str, Any] = {name: field(form, name, 4000) for name in FIELDS}
    services = services_of(request)
    try:
        try:
            expiry = int(values["expiry_days"].strip() or services.settings.transaction_expiry_days)
        except ValueError:
            raise InvalidRequest("expiry: give a whole number of days") from None
        channel = values["channel"]
        if channel not in ("sms", "email"):
            raise InvalidRequest("choose where the passcode goes: a mobile number or an email")
        new = NewRequest(
            recipient_email=values["recipient_email"], recipient_name=values["recipient_name"],
            otp_mobile=values["otp_mobile"] if channel == "sms" else "",
            otp_email=values["otp_email"] if channel == "email" else "",
            patient_family_name=values["family_name"], patient_given_name=values["given_name"],
            patient_birth_date=values["birth_date"], patient_sex=values["sex"],
            patient_id=values["patient_id"], patient_id_issuer=values["issuer"],
            nhs_number=values["nhs_number"], reason=values["reason"],
            message=values["message"], priority=values["priority"], expiry_days=expiry)
        created = await services.requests.create_request(
            new, actor=staff_actor(staff), user=staff.user)
    except (InvalidRequest, DeliveryError) as exc:
        message = str(exc)
        if isinstance(exc, DeliveryError):
            message = (f"The request was created, but the email with its link could not be "
                       f"sent ({exc}). It is listed under Transactions; do not create it again.")
        return _form_page(request, staff, {**_defaults(request),
                                           **{k: v for k, v in values.items() if v}},
                          error=message, status=400)
    kept = recipients.kept_instead(created.recipient, new.otp_mobile, new.otp_email)
    done = "created-channel-kept" if kept else "created"
    return see_other(f"/admin/transactions/{created.public_id}?done={done}")
