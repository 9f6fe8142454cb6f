"""The web viewer: pages and the JSON/pixels they load (thin over :mod:`iepnode.viewing.service`).

Routes, the same under two prefixes: ``/transactions/{public_id}`` for the
recipient (their session; someone else's transaction or instance is a 404, a
declined/expired/purged one a 410) and ``/admin/transactions/{public_id}`` for
staff (signed in at /admin; any transaction whose images are stored)::

    GET {prefix}/view                                   the viewer page
    GET {prefix}/view/manifest.json                     patient, studies, series, instances
    GET {prefix}/view/opened?study=UID                  audit: this study was opened (204)
    GET {prefix}/view/instances/{sop}/frames/{n}.raw?max=S   frame n (1-based), raw values
                                                        (reduced to fit S pixels if given)
    GET {prefix}/view/instances/{sop}/frames/{n}.{png,jpg}?window=C,W&size=S   rendered
    GET {prefix}/view/instances/{sop}/thumbnail.jpg     series thumbnail

Frames and thumbnails are immutable (a stored file is never rewritten): strong
ETags, ``Cache-Control: private, max-age=31536000, immutable``, 304 on a match.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from iepnode.errors import NotFound
from iepnode.people import audit
from iepnode.records import Transaction
from iepnode.rules.identifiers import is_uid_like
from iepnode.sharing.previews import placeholder_jpeg
from iepnode.viewing.rendering import RenderError
from web.common import client_ip, public_id_of, recipient_session, services_of
from web.keys import SESSION_KEY

_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_IMMUTABLE = "private, max-age=31536000, immutable"
_FORMATS = {"png": "image/png", "jpg": "image/jpeg"}

# The audit actor of a request, built only where it is recorded (it may read the database:
# call it in a thread).
ActorOf = Callable[[], audit.Actor]
# (transaction, actor) of the request, or an HTTP redirect/error.
Resolver = Callable[[web.Request], Awaitable[tuple[Transaction, ActorOf]]]


async def _as_recipient(request: web.Request) -> tuple[Transaction, ActorOf]:
    session = recipient_session(request)
    transaction = await asyncio.to_thread(services_of(request).viewing.for_recipient,
                                          session.recipient_id, public_id_of(request))
    ip = client_ip(request)
    # Frames (hundreds per series) need no actor: its email is read only when audited.
    return transaction, lambda: audit.Actor("recipient", transaction.recipient.email, ip)


async def _as_staff(request: web.Request) -> tuple[Transaction, ActorOf]:
    session = request[SESSION_KEY]
    services = services_of(request)
    admin = services.admin
    user = await asyncio.to_thread(admin.logins.staff_for_session, session)
    if user is None or session is None or admin.logins.pending_step(user):
        raise web.HTTPSeeOther("/admin/login")
    transaction = await asyncio.to_thread(services.viewing.for_staff, public_id_of(request))
    actor = audit.Actor("staff", user.username, client_ip(request))
    return transaction, lambda: actor


def _uid(request: web.Request, name: str = "sop") -> str:
    value = request.match_info.get(name) or request.query.get(name, "")
    if not is_uid_like(value):
        raise NotFound(f"no such UID {value!r}")
    return value


def _frame_index(request: web.Request) -> int:
    text = request.match_info["frame"]
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise NotFound(f"no frame {text!r}")
    return int(text) - 1


def _window(text: str) -> tuple[float, float]:
    """``CENTER,WIDTH`` as two finite numbers (no spaces, no nan/inf: ValueError)."""
    values = text.split(",")
    if len(values) != 2 or not all(_NUMBER.fullmatch(v) for v in values):
        raise ValueError(f"not a window: {text!r}")
    center, width = float(values[0]), float(values[1])
    if not (math.isfinite(center) and math.isfinite(width)):  # 1e999
        raise ValueError(f"not a window: {text!r}")
    return center, width


def _not_modified(request: web.Request, etag: str) -> bool:
    return etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]


def _immutable(request: web.Request, etag: str, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> web.Response:
    common = {"ETag": etag, "Cache-Control": _IMMUTABLE, **(headers or {})}
    if _not_modified(request, etag):
        return web.Response(status=304, headers=common)
    return web.Response(body=body, content_type=content_type, headers=common)


def _views(resolve: Resolver, *, staff: bool) -> dict[str, Callable]:
    async def page(request: web.Request) -> web.Response:
        transaction, _ = await resolve(request)
        prefix = "/admin/transactions" if staff else "/transactions"
        base = f"{prefix}/{transaction.public_id}"
        return aiohttp_jinja2.render_template("viewer.html", request, {
            "t": transaction, "api": f"{base}/view",
            "back": f"/admin/transactions/{transaction.public_id}" if staff
            else f"/?open={transaction.public_id}",
        })

    async def manifest(request: web.Request) -> web.Response:
        transaction, _ = await resolve(request)
        data = await asyncio.to_thread(services_of(request).viewing.manifest, transaction)
        return web.json_response(data, dumps=lambda v: json.dumps(v, separators=(",", ":")))

    async def opened(request: web.Request) -> web.Response:
        transaction, actor_of = await resolve(request)
        study = _uid(request, "study")

        def record() -> None:
            services_of(request).viewing.record_view(transaction, study, actor_of())

        await asyncio.to_thread(record)
        return web.Response(status=204)

    async def raw(request: web.Request) -> web.Response:
        transaction, _ = await resolve(request)
        service = services_of(request).viewing
        index = _frame_index(request)
        text = request.query.get("max", "")
        if text and not (text.isdigit() and 64 <= int(text) <= 16384):
            raise web.HTTPBadRequest(text="max must be 64 to 16384 pixels")
        max_size = int(text) if text else None
        located = await asyncio.to_thread(service.locate, transaction, _uid(request))
        etag = f'"{located.key}-{index}-raw-{max_size or 0}"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": _IMMUTABLE})
        try:
            body, header = await asyncio.to_thread(service.raw, located, index, max_size)
        except RenderError as exc:
            raise web.HTTPUnprocessableEntity(text=str(exc)) from None
        return _immutable(request, etag, body, "application/octet-stream", {
            "X-Frame-Info": json.dumps(header, separators=(",", ":")),
        })

    async def rendered(request: web.Request) -> web.Response:
        transaction, _ = await resolve(request)
        service = services_of(request).viewing
        index = _frame_index(request)
        media_type = _FORMATS[request.match_info["fmt"]]
        center = width = None
        window = request.query.get("window", "")
        try:
            if window:
                center, width = _window(window)
            size = int(request.query["size"]) if "size" in request.query else None
        except ValueError:
            raise web.HTTPBadRequest(text="window=CENTER,WIDTH and size=PIXELS") from None
        if size is not None and not 16 <= size <= 8192:
            raise web.HTTPBadRequest(text="size must be 16 to 8192 pixels")
        located = await asyncio.to_thread(service.locate, transaction, _uid(request))
        # From the parsed numbers, not the query text: "40,400" and "40.0,400.0" are one
        # image. repr() is the shortest text that gives the float back, so two different
        # windows never share an ETag (":g" would round to 6 digits). No comma: the
        # If-None-Match list is split on commas.
        shown = f"{center!r}_{width!r}" if window else ""
        etag = f'"{located.key}-{index}-{shown}-{size}-{request.match_info["fmt"]}"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": _IMMUTABLE})
        try:
            body = await asyncio.to_thread(service.rendered, located, index,
                                           media_type=media_type, center=center, width=width,
                                           size=size)
        except RenderError as exc:
            raise web.HTTPUnprocessableEntity(text=str(exc)) from None
        return _immutable(request, etag, body, media_type)

    async def thumbnail(request: web.Request) -> web.Response:
        transaction, _ = await resolve(request)
        service = services_of(request).viewing
        located = await asyncio.to_thread(service.locate, transaction, _uid(request))
        frames = int(request.query.get("frames", "1")) if request.query.get(
            "frames", "1").isdigit() else 1
        etag = f'"{located.key}-thumb-{frames}"'
        if _not_modified(request, etag):
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": _IMMUTABLE})
        try:
            body = await asyncio.to_thread(service.thumbnail, located, frames)
        except RenderError:
            body = placeholder_jpeg("No image", size=96)
        return _immutable(request, etag, body, "image/jpeg")

    return {"page": page, "manifest": manifest, "opened": opened, "raw": raw,
            "rendered": rendered, "thumbnail": thumbnail}


#: The viewer's views for a recipient (their session, their transactions) and for staff
#: (a staff session, any transaction), by name; :mod:`web.routes` mounts them under
#: ``/transactions/{public_id}/view`` and ``/admin/transactions/{public_id}/view``.
RECIPIENT_VIEWS: dict[str, Any] = _views(_as_recipient, staff=False)
STAFF_VIEWS: dict[str, Any] = _views(_as_staff, staff=True)
