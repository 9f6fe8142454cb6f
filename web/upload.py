"""The upload page of a request and its resumable chunk protocol (tus-like).

Routes (recipient session; other recipients' requests and files are 404, requests
that are declined, expired or already answered 410)::

    GET    /transactions/{public_id}/upload                    the upload page
    POST   /transactions/{public_id}/upload/files              announce a file (form:
                         csrf, name, relpath, size) -> 201 {id, offset, size, ...}
    GET    /transactions/{public_id}/upload/files/{file_id}    the file's state (JSON)
    HEAD   /transactions/{public_id}/upload/files/{file_id}    Upload-Offset: bytes staged
    PATCH  /transactions/{public_id}/upload/files/{file_id}    append a chunk: headers
                         Upload-Offset (must equal the staged size, else 409 with the
                         right one) and X-CSRF-Token; body: the bytes
                         -> 200 {offset, complete, verdict, reason, objects}
    DELETE /transactions/{public_id}/upload/files/{file_id}    remove a file (X-CSRF-Token)
    POST   /transactions/{public_id}/upload/send               confirm (form: csrf, patient
                         details, message) -> {ok, location} or 400 {error}
    POST   /transactions/{public_id}/upload/cancel             delete everything staged

The body of a chunk is streamed to the staged file in blocks (never whole in memory);
whatever arrives before a connection drops is kept, so the browser asks ``HEAD`` for
the offset and goes on from there. POSTs carry the CSRF token in the form (checked by
:mod:`web.middlewares`); PATCH and DELETE carry it in ``X-CSRF-Token`` (checked here).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp_jinja2
from aiohttp import web

from iepnode.errors import Gone, InvalidRequest, NotFound
from iepnode.records import UploadFile, WebSession
from iepnode.sharing.transactions import COMPLETE
from iepnode.uploads.chunks import FileBusy, OffsetMismatch, TooLarge
from iepnode.uploads.staging import ConfirmedPatient, check_open
from web.common import client_ip, public_id_of, recipient_session, see_other, services_of
from web.keys import SESSION_KEY

#: Bytes gathered from the socket before one write to the staged file.
WRITE_BLOCK = 1 << 20
#: Chunk size the page's script uses (bytes); the server takes any size.
CHUNK_BYTES = 16 << 20
#: Files the page uploads at the same time.
PARALLEL_FILES = 3


def _api_session(request: web.Request, *, csrf_header: bool = False) -> WebSession:
    """The recipient session of a script's request (403 JSON without one)."""
    session = request[SESSION_KEY]
    if session is None or session.recipient_id is None:
        raise web.HTTPForbidden(text='{"error": "not signed in"}',
                                content_type="application/json")
    if csrf_header:
        sent = request.headers.get("X-CSRF-Token", "")
        if not secrets.compare_digest(sent.encode(), session.csrf_token.encode()):
            raise web.HTTPForbidden(text='{"error": "missing or wrong form token"}',
                                    content_type="application/json")
    return session


def _file_id(request: web.Request) -> int:
    text = request.match_info["file_id"]
    if not text.isdigit() or len(text) > 12:
        raise NotFound("no such file")
    return int(text)


def _salvage(content: aiohttp.StreamReader) -> bytes:
    """The bytes a stream still buffers after its connection was lost (private API)."""
    read = getattr(content, "_read_nowait", None)
    try:
        return read(-1) if read is not None else b""
    except Exception:  # best effort: without them the client sends them again
        return b""


def _file_json(file: UploadFile) -> dict[str, Any]:
    return {"id": file.id, "name": file.display_name, "relpath": file.relpath,
            "size": file.size, "offset": file.received if file.completed_at is None
            else file.size, "complete": file.completed_at is not None,
            "verdict": file.verdict, "reason": file.reason, "objects": file.objects}


def _json_errors(view: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Domain errors of the protocol as JSON with the right status (for the script)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await view(request)
        except OffsetMismatch as exc:
            return web.json_response({"error": str(exc), "offset": exc.offset}, status=409,
                                     headers={"Upload-Offset": str(exc.offset)})
        except FileBusy as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except TooLarge as exc:
            return web.json_response({"error": str(exc)}, status=413)
        except NotFound:
            return web.json_response({"error": "not found"}, status=404)
        except Gone as exc:
            return web.json_response({"error": str(exc)}, status=410)
        except InvalidRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)

    handler.__doc__ = view.__doc__
    return handler


async def page(request: web.Request) -> web.Response:
    """``GET /transactions/{public_id}/upload``: the upload page of a request."""
    session = recipient_session(request)
    services = services_of(request)
    view = await asyncio.to_thread(services.uploads.page, session.recipient_id,
                                   public_id_of(request), client_ip(request))
    if view.transaction.status != COMPLETE:
        check_open(view.transaction)  # declined or expired: 410
    return aiohttp_jinja2.render_template("recipient/upload.html", request, {
        "view": view, "t": view.transaction, "csrf": session.csrf_token,
        "files": [_file_json(f) for f in view.files],
        "chunk_bytes": CHUNK_BYTES, "parallel": PARALLEL_FILES,
        "max_file": view.limits.max_file, "max_total": view.limits.max_total,
        "recipient": view.transaction.recipient,
    })


@_json_errors
async def add_file(request: web.Request) -> web.Response:
    """``POST .../upload/files``: announce a file; 201 with where its bytes go."""
    session = _api_session(request)
    form = await request.post()
    try:
        size = int(str(form.get("size", "")))
    except ValueError:
        raise InvalidRequest("size: a number of bytes") from None
    file = await asyncio.to_thread(
        services_of(request).uploads.add_file, session.recipient_id, public_id_of(request),
        str(form.get("name", ""))[:1024], str(form.get("relpath", ""))[:4096], size)
    body = _file_json(file)
    body["url"] = f"/transactions/{public_id_of(request)}/upload/files/{file.id}"
    return web.json_response(body, status=201, headers={"Location": body["url"]})


@_json_errors
async def get_file(request: web.Request) -> web.Response:
    """``GET .../upload/files/{id}``: the file's state (offset, verdict) as JSON."""
    session = _api_session(request)
    file = await asyncio.to_thread(services_of(request).uploads.file, session.recipient_id,
                                   public_id_of(request), _file_id(request))
    return web.json_response(_file_json(file))


@_json_errors
async def head_file(request: web.Request) -> web.Response:
    """``HEAD .../upload/files/{id}``: ``Upload-Offset`` and ``Upload-Length``."""
    session = _api_session(request)
    offset, size = await asyncio.to_thread(services_of(request).uploads.offset,
                                           session.recipient_id, public_id_of(request),
                                           _file_id(request))
    return web.Response(status=200, headers={"Upload-Offset": str(offset),
                                             "Upload-Length": str(size)})


@_json_errors
async def patch_file(request: web.Request) -> web.Response:
    """``PATCH .../upload/files/{id}``: append the body at ``Upload-Offset``."""
    session = _api_session(request, csrf_header=True)
    try:
        offset = int(request.headers.get("Upload-Offset", ""))
    except ValueError:
        raise InvalidRequest("Upload-Offset: a number of bytes") from None
    uploads = services_of(request).uploads
    chunk = await asyncio.to_thread(uploads.open_chunk, session.recipient_id,
                                    public_id_of(request), _file_id(request), offset)
    block = bytearray()
    lost = False
    try:
        length = request.content_length
        if length is not None and offset + length > chunk.size:
            raise TooLarge(f"more bytes than the {chunk.size} announced for this file")
        try:
            async for data in request.content.iter_any():
                block += data
                if len(block) >= WRITE_BLOCK:
                    full, block = block, bytearray()
                    await asyncio.to_thread(chunk.write, full)
        except (ConnectionError, aiohttp.ClientPayloadError):
            # The connection dropped mid-chunk. aiohttp refuses to hand out bytes it
            # buffered once the connection is lost; they arrived in order and are the
            # file's next bytes, so keep them: the client resumes after them.
            block += _salvage(request.content)
            lost = True
    finally:
        # Whatever arrived is kept, also when the connection dropped mid-chunk.
        try:
            if block:
                full, block = block, bytearray()
                await asyncio.to_thread(chunk.write, full)
        finally:
            file = await asyncio.to_thread(uploads.close_chunk, chunk)
    if lost:  # nobody is listening any more
        return web.Response(status=400, text="connection lost")
    return web.json_response(_file_json(file), headers={"Upload-Offset": str(chunk.position)})


@_json_errors
async def delete_file(request: web.Request) -> web.Response:
    """``DELETE .../upload/files/{id}``: remove a file and its staged bytes."""
    session = _api_session(request, csrf_header=True)
    await asyncio.to_thread(services_of(request).uploads.remove_file, session.recipient_id,
                            public_id_of(request), _file_id(request))
    return web.Response(status=204)


@_json_errors
async def send(request: web.Request) -> web.Response:
    """``POST .../upload/send``: the uploader confirms; staff review the upload next."""
    session = _api_session(request)
    form = await request.post()

    def text(name: str, limit: int = 200) -> str:
        return str(form.get(name, ""))[:limit]

    patient = ConfirmedPatient(text("family_name"), text("given_name"), text("birth_date"),
                               text("sex", 8))
    public_id = public_id_of(request)
    await services_of(request).requests.send_upload(session.recipient_id, public_id, patient,
                                       text("message", 4001), client_ip(request))
    return web.json_response({"ok": True,
                              "location": f"/transactions/{public_id}/upload"})


async def cancel(request: web.Request) -> web.Response:
    """``POST .../upload/cancel``: delete every staged file of the current upload."""
    session = recipient_session(request)
    public_id = public_id_of(request)
    await asyncio.to_thread(services_of(request).uploads.cancel, session.recipient_id, public_id,
                            client_ip(request))
    if request.headers.get("Accept", "").startswith("application/json"):
        return web.json_response({"ok": True})
    return see_other(f"/transactions/{public_id}/upload")
