"""Staff review of patient uploads under /admin/uploads (issue 7).

Routes (every POST carries the CSRF token, checked in :mod:`web.middlewares`)::

    GET  /admin/uploads                     uploads, those waiting for review first
    GET  /admin/uploads/{upload_id}         request, message, files, verdicts, flags,
                                            original patients and studies found
    POST /admin/uploads/{upload_id}/recheck inspect every file again
    POST /admin/uploads/{upload_id}/release reconcile and store (``exclude`` = patient keys
                                            left out), then send to the PACS if configured
    POST /admin/uploads/{upload_id}/reject  delete the staged files, store nothing

Everything taken from the uploaded files (names, patient values, file names) is
rendered by autoescaped templates: never marked safe. Handlers are thin: the work is
:mod:`iepnode.uploads.review` through the :class:`iepnode.services.Services`.
"""

from __future__ import annotations

import asyncio
import functools

from aiohttp import web

from iepnode.errors import InvalidRequest, NotFound
from web.common import see_other, services_of
from web.staff_pages import Staff, field, render, staff_actor, staff_view

_NOTICES = {
    "released": "The upload is released: its images are reconciled and stored.",
    "rejected": "The upload is rejected: its files are deleted.",
    "rechecked": "Every file was inspected again.",
}


def _upload_id(request: web.Request) -> int:
    text = request.match_info["upload_id"]
    if not text.isdigit() or len(text) > 12:
        raise web.HTTPNotFound()
    return int(text)


@staff_view()
async def uploads(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/uploads``: every upload, those waiting for review first."""
    rows = await asyncio.to_thread(services_of(request).requests.upload_rows)
    return render(request, staff, "uploads.html", {"rows": rows}, section="uploads")


async def _page(request: web.Request, staff: Staff, upload_id: int, *, error: str = "",
                status: int = 200) -> web.Response:
    try:
        detail = await asyncio.to_thread(services_of(request).requests.upload_detail, upload_id)
    except NotFound:
        raise web.HTTPNotFound() from None
    notice = _NOTICES.get(request.query.get("did", ""), "")
    return render(request, staff, "upload.html", {
        "d": detail, "review": detail.review, "error": error, "did": notice,
        "pacs_ae": services_of(request).settings.upload_pacs_ae,
        "pacs_problem": await asyncio.to_thread(services_of(request).requests.upload_pacs_problem),
    }, section="uploads", status=status)


@staff_view()
async def upload(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/uploads/{upload_id}``: the review page."""
    return await _page(request, staff, _upload_id(request))


async def _act(request: web.Request, staff: Staff, work: functools.partial,
               did: str) -> web.StreamResponse:
    upload_id = _upload_id(request)
    try:
        await asyncio.to_thread(work)
    except NotFound:
        raise web.HTTPNotFound() from None
    except InvalidRequest as exc:
        return await _page(request, staff, upload_id, error=str(exc), status=409)
    return see_other(f"/admin/uploads/{upload_id}?did={did}")


@staff_view()
async def recheck(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/uploads/{upload_id}/recheck``: inspect the files again."""
    await request.post()
    work = functools.partial(services_of(request).requests.intake_upload, _upload_id(request),
                             staff_actor(staff), fresh=True)
    return await _act(request, staff, work, "rechecked")


@staff_view()
async def release(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/uploads/{upload_id}/release``: reconcile and store."""
    form = await request.post()
    exclude = frozenset(v for v in form.getall("exclude", []) if isinstance(v, str))
    work = functools.partial(services_of(request).requests.release_upload, _upload_id(request),
                             staff_actor(staff), exclude)
    return await _act(request, staff, work, "released")


@staff_view()
async def reject(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/uploads/{upload_id}/reject``: delete the staged files."""
    form = await request.post()
    work = functools.partial(services_of(request).requests.reject_upload, _upload_id(request),
                             staff_actor(staff), field(form, "reason", 1000))
    return await _act(request, staff, work, "rejected")
