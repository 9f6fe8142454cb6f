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
the client sees a broken download, never wrong bytes. The bytes go out in ~1 MiB writes,
read inline when the page cache holds them and by worker threads otherwise (one
buffer per download in memory). Each request is audited when it ends, with the
bytes sent and whether it completed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from iepnode.people import audit
from iepnode.sharing.downloads import PROTECTED_TTL, is_downloadable
from iepnode.sharing.package import Package
from iepnode.sharing.pdi import size_text
from iepnode.sharing.zipstream import CHUNK as BATCH
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


def _readers() -> ThreadPoolExecutor:
    """Threads for reads that must wait for the disk (never on the event loop)."""
    global _READERS
    if _READERS is None:
        _READERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="download-read")
    return _READERS


_READERS: ThreadPoolExecutor | None = None
#: ``preadv(RWF_NOWAIT)``: read only what the page cache holds, never wait for the disk.
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (blocking; in a reader thread)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError("a stored file is shorter than planned")
        done += got


async def _fill(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view``: inline from the page cache when it has the data, else in a thread."""
    global _NOWAIT
    got = 0
    if _NOWAIT is not None:
        try:
            got = os.preadv(fd, [view], offset, _NOWAIT)
        except BlockingIOError:
            got = 0
        except OSError as exc:  # RWF_NOWAIT unsupported here: always use threads
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _NOWAIT = None
    if got < len(view):
        await asyncio.get_running_loop().run_in_executor(_readers(), _read_into, fd,
                                                         view[got:], offset + got)


async def _send(response: web.StreamResponse, package: Package, start: int, stop: int,
                sent: list[int]) -> None:
    """Write bytes ``start``-``stop`` of the package, counting them in ``sent[0]``.

    Writes of ~1 MiB: headers and small members are joined to the following file
    data (read straight into the same buffer), so a member costs one write. File
    data already in the page cache is read inline (``RWF_NOWAIT``: never blocks);
    anything that must come from the disk is read in a worker thread, so a cold
    study never stalls the event loop. ``write`` waits while the client is slower:
    one buffer per download is in memory. Measured against ``sendfile`` per member
    and always-threaded reads in docs/benchmarks.md; it also works behind TLS.
    """
    pending = bytearray()  # small pieces that go out with the next file data
    for piece in package.layout.pieces(start, stop):
        if isinstance(piece, bytes):
            pending += piece
            if len(pending) >= BATCH:
                await response.write(pending)
                sent[0] += len(pending)
                pending = bytearray()
            continue
        fd = os.open(piece.path, os.O_RDONLY)
        try:
            offset, left = piece.offset, piece.size
            while left:
                size = min(BATCH, left)
                buffer = bytearray(len(pending) + size)
                buffer[:len(pending)] = pending
                await _fill(fd, memoryview(buffer)[len(pending):], offset)
                await response.write(buffer)
                sent[0] += len(buffer)
                pending = bytearray()
                offset += size
                left -= size
        finally:
            os.close(fd)
    if pending:
        await response.write(pending)
        sent[0] += len(pending)


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
        await _send(response, package, start, stop, sent)
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


def setup_routes(app: web.Application) -> None:
    """Register the download routes and the ``downloadable`` template test."""
    aiohttp_jinja2.get_env(app).tests["downloadable"] = downloadable
    app.router.add_get("/transactions/{public_id}/download", download)
    app.router.add_post("/transactions/{public_id}/download-protected", protect)
    app.router.add_get("/downloads/{token}", protected_file)
