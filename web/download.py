"""Recipient downloads: the transaction's zip, streamed, resumable; password-protected copies.

Routes (recipient session required; someone else's transaction is a 404, an
expired, declined or purged one a 410 page)::

    GET  /transactions/{public_id}/download            the zip (HEAD too), Range/If-Range
    POST /transactions/{public_id}/download-protected  write an AES-256 copy, show its
                                                       password once
    GET  /downloads/{token}                            the protected copy (Range by aiohttp)

The zip is planned before the first byte (:mod:`iepnode.sharing.package`), so the response
has its exact ``Content-Length`` and a strong ``ETag``, and any single byte range
can be served (``206``; ``416`` beyond the end). A stored file that cannot be read
when its turn comes (cut short or removed since the plan) ends the response early:
the client sees a broken download, never wrong bytes. The bytes come from the
domain's async iterator (:mod:`iepnode.sharing.download_stream`) in ~1 MiB buffers,
each written before the next is read (one buffer per download in memory); ``write``
waits while the client is slower. Each request is audited when it ends, with the
bytes sent and whether it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from iepnode.people import audit
from iepnode.sharing.downloads import PROTECTED_TTL, is_downloadable
from iepnode.sharing.pdi import size_text
from web.common import client_ip, public_id_of, recipient_session, services_of
from web.middlewares import SECURITY_HEADERS

log = logging.getLogger("iepnode.web.download")

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_SAFE_FILENAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, stop)`` a ``Range`` header asks for, or ``None`` for all.

    Only single ``bytes=`` ranges are honoured; a malformed header or several ranges
    are ignored (the whole archive is sent, as RFC 9110 14.2 allows).

    Raises
    ------
    web.HTTPRequestRangeNotSatisfiable
        A well-formed range that lies outside the archive (416, with ``Content-Range``).
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None
    elif last:
        start, stop = max(0, size - int(last)), size
        if int(last) == 0:
            start = size
    else:
        return None
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _attachment(filename: str) -> str:
    if not _SAFE_FILENAME.fullmatch(filename):  # names are generated; this is a guard
        filename = "download.zip"
    return f'attachment; filename="{filename}"'


async def download(request: web.Request) -> web.StreamResponse:
    """``GET /transactions/{public_id}/download``: the transaction's zip (resumable)."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    services = services_of(request)
    package = await asyncio.to_thread(services.downloads.recipient_package, session.recipient_id,
                                      public_id)
    etag = f'"{package.etag}"'
    wanted = parse_range(request.headers.get("Range"), package.size)
    if_range = request.headers.get("If-Range")
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of other bytes: start again
    start, stop = wanted or (0, package.size)
    response = web.StreamResponse(status=206 if wanted else 200, headers={
        # The security_headers middleware runs after the handler: too late for headers
        # of a response already streaming, so they are set here.
        **SECURITY_HEADERS,
        "Content-Type": "application/zip",
        "Content-Disposition": _attachment(package.filename),
        "Accept-Ranges": "bytes",
        "ETag": etag,
    })
    if wanted:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{package.size}"
    response.content_length = stop - start
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    sent, outcome, note = [0], audit.SERIOUS_FAILURE, "failed"
    try:
        async with contextlib.aclosing(services.downloads.package_bytes(package, start,
                                                                        stop)) as chunks:
            async for chunk in chunks:
                await response.write(chunk)
                sent[0] += len(chunk)
        await response.write_eof()
        outcome, note = audit.SUCCESS, "complete"
    except (ConnectionError, asyncio.CancelledError):
        outcome, note = audit.MINOR_FAILURE, "interrupted by the client"
        raise
    except OSError as exc:
        # A stored file cut short, removed or unreadable since the plan: end the
        # response short of its Content-Length, so the client sees a broken download
        # rather than a zip of wrong bytes; the next request plans again.
        outcome, note = audit.SERIOUS_FAILURE, f"failed: {exc}"
        log.error("download of %s aborted after %d of %d bytes: %s", public_id, sent[0],
                  stop - start, exc)
        raise
    finally:
        detail = (f"bytes {start}-{stop - 1} of {package.size} ({note}"
                  f"{'' if note == 'complete' else f' after {sent[0]} bytes'})")
        await asyncio.to_thread(services.downloads.record_recipient_download, session.recipient_id,
                                package, public_id=public_id, source_ip=client_ip(request),
                                outcome=outcome, detail=detail)
    return response


async def protect(request: web.Request) -> web.Response:
    """``POST /transactions/{public_id}/download-protected``: write an AES-256 copy.

    The page shows the password once: it is stored nowhere, and the page is ``no-store``.
    """
    session = recipient_session(request)
    public_id = public_id_of(request)
    copy, recipient = await asyncio.to_thread(services_of(request).downloads.protect_package,
                                              session.recipient_id, public_id,
                                              client_ip(request))
    return aiohttp_jinja2.render_template("recipient/protected.html", request, {
        "copy": copy, "public_id": public_id, "hours": int(PROTECTED_TTL // 3600),
        "size": size_text(copy.size), "recipient": recipient,
        "csrf": session.csrf_token,
    })


async def protected_file(request: web.Request) -> web.FileResponse:
    """``GET /downloads/{token}``: a protected copy (aiohttp serves Range and If-Range)."""
    session = recipient_session(request)
    rng = request.headers.get("Range", "")
    path, filename = await asyncio.to_thread(
        services_of(request).downloads.protected_download, session.recipient_id,
        request.match_info["token"], client_ip(request),
        f"range {rng}" if rng else "whole file")
    return web.FileResponse(path, headers={
        "Content-Type": "application/zip",
        "Content-Disposition": _attachment(filename),
    })


def downloadable(view: Any) -> bool:
    """Jinja2 test: may the recipient download this transaction (``RecipientView``) now?"""
    return is_downloadable(view.transaction, time.time())
