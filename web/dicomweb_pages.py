"""Pages that hand out DICOMweb tokens: "Open in another viewer" (recipient and staff).

Routes::

    POST /transactions/{public_id}/dicomweb-token          recipient: a token for one
                                                            transaction, shown once
    POST /transactions/{public_id}/dicomweb-token/revoke   recipient: end their tokens
    GET  /admin/dicomweb                                   staff: what the API is
    POST /admin/dicomweb/token                             staff: a token for all studies
    POST /admin/dicomweb/revoke                            staff: end their tokens

The pages show the base URL, the token and its expiry, and ready-made links for
Weasis (``weasis://``) and OHIF (``dicomwebproxy``, when ``[http] dicomweb_ohif_url``
is set). Every token is audited when issued (:mod:`iepnode.viewing.dicomweb`).
"""

from __future__ import annotations

import asyncio

import aiohttp_jinja2
from aiohttp import web

from iepnode.records import Recipient
from iepnode.sharing.recipients import recipient_by_id
from iepnode.viewing import dicomweb_access as dwa
from web.common import client_ip, public_id_of, recipient_session, see_other
from web.keys import SETTINGS_KEY
from web.staff_pages import Staff, render, staff_view


def _recipient_access(recipient_id: int, public_id: str, ip: str, node_url: str,
                      ohif_url: str) -> tuple[dwa.ViewerAccess, Recipient]:
    issued = dwa.issue_recipient_token(recipient_id, public_id, source_ip=ip)
    uids = sorted(dwa.recipient_scope(recipient_id, public_id).study_uids or ())
    return (dwa.viewer_access(issued, node_url, public_id, uids, ohif_url),
            recipient_by_id(recipient_id))


async def recipient_token(request: web.Request) -> web.Response:
    """``POST /transactions/{public_id}/dicomweb-token``: a new token, shown once."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    settings = request.app[SETTINGS_KEY]
    links, recipient = await asyncio.to_thread(_recipient_access, session.recipient_id, public_id,
                                     client_ip(request), settings.public_url,
                                     settings.dicomweb_ohif_url)
    return aiohttp_jinja2.render_template("recipient/dicomweb.html", request, {
        "access": links, "public_id": public_id, "csrf": session.csrf_token,
        "recipient": recipient,
        "minutes": int(dwa.TOKEN_TTL // 60)})


async def recipient_revoke(request: web.Request) -> web.Response:
    """``POST /transactions/{public_id}/dicomweb-token/revoke``: end the recipient's tokens."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    await asyncio.to_thread(dwa.revoke_tokens, recipient_id=session.recipient_id,
                            public_id=public_id)
    return see_other(f"/transactions/{public_id}")


@staff_view()
async def staff_page(request: web.Request, staff: Staff) -> web.Response:
    """``GET /admin/dicomweb``: the staff DICOMweb address and a button for a token."""
    settings = request.app[SETTINGS_KEY]
    return render(request, staff, "dicomweb.html", {
        "base_url": f"{settings.public_url}/dicomweb", "access": None,
        "minutes": int(dwa.TOKEN_TTL // 60)}, section="dicomweb")


@staff_view()
async def staff_token(request: web.Request, staff: Staff) -> web.Response:
    """``POST /admin/dicomweb/token``: a token over every study, shown once."""
    settings = request.app[SETTINGS_KEY]
    form = await request.post()
    uids = [u for u in str(form.get("studies", "")).split() if u][:50]
    issued = await asyncio.to_thread(dwa.issue_staff_token, staff.user, source_ip=staff.ip)
    links = dwa.viewer_access(issued, settings.public_url, "", uids,
                              settings.dicomweb_ohif_url)
    return render(request, staff, "dicomweb.html", {
        "base_url": links.base_url, "access": links,
        "minutes": int(dwa.TOKEN_TTL // 60)}, section="dicomweb")


@staff_view()
async def staff_revoke(request: web.Request, staff: Staff) -> web.Response:
    """``POST /admin/dicomweb/revoke``: end the staff member's tokens."""
    await asyncio.to_thread(dwa.revoke_tokens, staff_id=staff.user.id)
    return see_other("/admin/dicomweb")
