"""Staff pages of the DICOM nodes: remote AEs, auto-routing rules, send jobs (issue 6).

Routes (staff session; AEs and routes for admins; every POST carries the CSRF token,
checked in :mod:`web.middlewares`)::

    GET  POST /admin/aes, POST /admin/aes/remove       remote AEs (admins)
    GET  /admin/sends, GET /admin/sends.json?transaction=  send jobs and their progress
    GET  POST /admin/routes, POST /admin/routes/{id}/remove  auto-routing rules (admins)
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiohttp import web

from iepnode.errors import InvalidRequest, UnknownDestination
from iepnode.records import SERVICES
from iepnode.rules.identifiers import is_public_id
from web.common import see_other, services_of
from web.staff_pages import (
    Staff,
    field,
    render,
    staff_actor,
    staff_view,
)
from web.staff_pages import admin_service as _admin  # the name the views call it by

# -- remote AEs ------------------------------------------------------------------------------


async def _aes_page(request: web.Request, staff: Staff, *, error: str = "",
                    values: dict[str, Any] | None = None, status: int = 200) -> web.Response:
    aes = await asyncio.to_thread(_admin(request).peers.remote_aes)
    return render(request, staff, "aes.html", {
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
    values: dict[str, Any] = {k: field(form, k, 255) for k in ("ae_title", "host", "port")}
    values["allow"] = [s for s in form.getall("allow", []) if isinstance(s, str)]
    values["send_to"] = form.get("send_to") == "1"
    try:
        await asyncio.to_thread(functools.partial(
            _admin(request).peers.add_remote_ae, values["ae_title"], values["host"], values["port"],
            values["allow"], staff.user, staff.ip, send_to=values["send_to"]))
    except InvalidRequest as exc:
        return await _aes_page(request, staff, error=str(exc), values=values, status=400)
    return see_other("/admin/aes?done=ae-saved")


@staff_view(admin_only=True)
async def remove_ae(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/aes/remove``: unregister a remote AE."""
    form = await request.post()
    await asyncio.to_thread(_admin(request).peers.remove_remote_ae, field(form, "ae_title", 64),
                            staff.user, staff.ip)
    return see_other("/admin/aes?done=ae-removed")


# -- sends and auto-routing (issue 6) -------------------------------------------------------


@staff_view()
async def sends(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/sends``: the latest send jobs with live progress."""
    jobs = await asyncio.to_thread(services_of(request).sends.send_jobs)
    return render(request, staff, "sends.html", {"jobs": jobs}, section="sends")


@staff_view()
async def sends_json(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/sends.json?transaction=``: send jobs' progress for the pages' script."""
    transaction = request.query.get("transaction") or None
    if transaction is not None and not is_public_id(transaction):
        raise web.HTTPNotFound()
    jobs = await asyncio.to_thread(services_of(request).sends.send_jobs, transaction)
    return web.json_response({"jobs": [job.as_json() for job in jobs]})


async def _routes_page(request: web.Request, staff: Staff, *, error: str = "",
                       values: dict[str, str] | None = None, status: int = 200) -> web.Response:
    services = services_of(request)
    rules, destinations = await asyncio.to_thread(
        lambda: (services.sends.route_rules(), services.sends.send_destinations()))
    return render(request, staff, "routes.html", {
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
    values = {k: field(form, k, 64) for k in ("calling_ae", "accession_prefix", "modality",
                                               "destination")}
    try:
        await asyncio.to_thread(functools.partial(
            services_of(request).sends.add_route, values["destination"], staff_actor(staff),
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
    await asyncio.to_thread(services_of(request).sends.remove_route, rule_id, staff_actor(staff))
    return see_other("/admin/routes?done=route-removed")
