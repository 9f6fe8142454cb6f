"""DICOMweb (PS3.18) routes: QIDO-RS and WADO-RS for OHIF, Weasis and other viewers.

Base URLs::

    /dicomweb/t/{public_id}   one transaction: its recipient (session cookie or a
                              bearer token for it) or staff
    /dicomweb                 staff over all studies (staff session or staff token)

Under each base (GET; HEAD too)::

    /studies  /series  /instances                         QIDO-RS search
    /studies/{s}/series  /studies/{s}/instances
    /studies/{s}/series/{se}/instances
    /studies/{s}[/series/{se}[/instances/{i}]]            WADO-RS retrieve (multipart)
    .../metadata                                          DICOM JSON
    /studies/{s}/series/{se}/instances/{i}/frames/{list}  frames, as stored
    /studies/{s}/series/{se}/instances/{i}/bulkdata/{tag} BulkDataURI targets
    .../rendered, .../frames/{list}/rendered               JPEG / PNG (window,
                                                          viewport, quality)
    .../thumbnail, .../frames/{list}/thumbnail             one small JPEG / PNG

Authentication failures are 401 (``WWW-Authenticate: Bearer``); anything outside
the caller's scope is 404, never 403; a recipient's transaction that is no longer
available is 410. Errors are short ``text/plain`` bodies. CORS (for a viewer on
another origin) is off unless ``[http] dicomweb_cors_origins`` lists the origin.

Links in bodies (RetrieveURL, BulkDataURI, Content-Location) start with ``[portal]
public_url``, never with the request's Host. A frame list names at most ``[http]
dicomweb_max_frames`` frames (400 beyond). Multipart bodies and metadata are written
as they are read (chunked; :class:`Multipart`): a request holds one block, frame or
rendered image at a time.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from iepnode.archive.query import Level
from iepnode.errors import BadQuery, Gone, NotFound
from iepnode.people import audit
from iepnode.rules.identifiers import is_public_id, is_uid_like
from iepnode.viewing import dicomweb as dw
from iepnode.viewing import dicomweb_access as access
from iepnode.viewing.dicomweb_frames import (
    PIXEL_DATA,
    Part,
    PixelData,
    instance_parts,
    parse_frame_list,
)
from iepnode.viewing.dicomweb_metadata import METADATA, bulk_tag, read_bulk_value
from iepnode.viewing.dicomweb_rendered import (
    NotAcceptableMedia,
    frame_count,
    parse_rendering,
    render_image,
    rendered_frame_parts,
    rendered_parts,
)
from web.common import client_ip, services_of
from web.keys import SESSION_KEY, SETTINGS_KEY
from web.middlewares import SECURITY_HEADERS

log = logging.getLogger("iepnode.web.dicomweb")

DICOM_JSON = "application/dicom+json"
_CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Accept, Content-Type",
    "Access-Control-Expose-Headers": "Warning, Content-Type, Content-Length, Content-Location",
    "Access-Control-Max-Age": "600",
    "Vary": "Origin",
}


class NotAcceptable(Exception):
    """The Accept header asks for a representation the node cannot give (406)."""


@dataclass(frozen=True)
class Call:
    """One authorised DICOMweb request: its scope and its absolute base URL."""

    scope: access.Scope
    base_url: str


# -- helpers -----------------------------------------------------------------------------


def _cors(request: web.Request) -> dict[str, str]:
    """CORS headers for the request's Origin when it is allowed (else none)."""
    origin = request.headers.get("Origin", "")
    allowed = request.app[SETTINGS_KEY].dicomweb_cors_origins
    if origin and (origin in allowed or "*" in allowed):
        return {"Access-Control-Allow-Origin": origin, **_CORS_HEADERS}
    return {}


def _error(request: web.Request, status: int, text: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain",
                        headers={**(headers or {}), **_cors(request)})


def _uid(request: web.Request, name: str) -> str:
    value = request.match_info.get(name, "")
    if value and not is_uid_like(value):
        raise NotFound(f"not a UID: {value!r}")
    return value


def _base_url(request: web.Request) -> str:
    """The absolute base URL of the request's DICOMweb root, for RetrieveURL,
    BulkDataURI and Content-Location links.

    Built from the configured ``public_url`` (``[portal] public_url``), never from
    the request's ``Host``, ``X-Forwarded-Host`` or scheme: a forged header must not
    put someone else's address into the links a viewer follows with its token.
    """
    public_id = request.match_info.get("public_id", "")
    path = f"/dicomweb/t/{public_id}" if public_id else "/dicomweb"
    return request.app[SETTINGS_KEY].public_url + path


def _scope(request: web.Request) -> access.Scope:
    """Who is asking and what they may see (runs in a thread: database reads).

    Raises
    ------
    access.TokenRefused
        A bad bearer token, or no credentials at all.
    NotFound, Gone
        As :func:`iepnode.viewing.dicomweb.token_scope` / :func:`recipient_scope`.
    """
    services = services_of(request)
    public_id = request.match_info.get("public_id", "")
    if public_id and not is_public_id(public_id):
        raise NotFound("no such transaction")
    ip = client_ip(request)
    authorization = request.headers.get("Authorization", "")
    if authorization:
        return access.token_scope(access.resolve_token(_token(authorization)), public_id, ip)
    session = request[SESSION_KEY]
    if session is not None and session.recipient_id is not None:
        if not public_id:
            raise NotFound("recipients use their transaction's base URL")
        return access.recipient_scope(session.recipient_id, public_id, ip)
    user = services.admin.logins.staff_for_session(session)
    if user is not None and services.admin.logins.pending_step(user) is None:
        return access.staff_scope(user, public_id, ip)
    raise access.TokenRefused("sign in, or send a bearer token")


def _token(authorization: str) -> str:
    """The token of ``Bearer TOKEN``, or of ``Basic`` credentials whose password is one.

    (OHIF's data sources send ``requestOptions.auth`` as Basic credentials.)

    Raises
    ------
    access.TokenRefused
        Another scheme, or malformed credentials.
    """
    kind, _, value = authorization.strip().partition(" ")
    if kind.lower() == "bearer" and value.strip():
        return value.strip()
    if kind.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if password:
            return password
    raise access.TokenRefused("send a bearer token")


Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


def _record(request: web.Request, call: Call, event: tuple[str, str], action: str,
            study_uids: list[str], detail: str, outcome: int = audit.SUCCESS) -> None:
    """Audit one DICOMweb request through the node's group committer (blocks: a thread).

    A viewer opening a series asks for hundreds of frames; each request's audit event
    shares a commit with those of its neighbours instead of queueing alone for the
    database's single write lock.
    """
    services_of(request).group_commit.run(functools.partial(
        dw.record, call.scope, event, action, study_uids, detail, outcome))


def dicomweb_view(view: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Authorise the request, run ``view``, turn domain errors into PS3.18 statuses."""

    @functools.wraps(view)
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            scope = await asyncio.to_thread(_scope, request)
            response = await view(request, Call(scope, _base_url(request)))
        except access.TokenRefused as exc:
            return _error(request, 401, f"Unauthorized: {exc}",
                          {"WWW-Authenticate": 'Bearer realm="dicomweb"'})
        except NotFound:
            return _error(request, 404, "Not found")
        except Gone as exc:
            return _error(request, 410, str(exc))
        except BadQuery as exc:
            return _error(request, 400, f"Bad request: {exc}")
        except NotAcceptable as exc:
            return _error(request, 406, f"Not acceptable: {exc}")
        if not response.prepared:
            response.headers.update(_cors(request))
        return response

    return handler


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header."""

    type: str
    params: dict[str, str]


def parse_accept(header: str) -> list[MediaRange]:
    """Split an Accept header into media ranges with their (unquoted) parameters."""
    out = []
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', header or ""):
        pieces = re.findall(r'(?:[^;"]|"[^"]*")+', item)
        if not pieces or not pieces[0].strip():
            continue
        params = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        out.append(MediaRange(pieces[0].strip().lower(), params))
    return out


def _accepts(request: web.Request, part_type: str, transfer_syntaxes: set[str],
             alternatives: tuple[str, ...] = ()) -> None:
    """Check that a multipart answer of ``part_type`` parts is acceptable.

    ``transfer_syntaxes`` are those of the parts (as stored). A media range
    matches when it is ``*/*``, ``multipart/*`` or ``multipart/related`` whose
    ``type`` (absent: any) is ``part_type`` or one of ``alternatives``, and whose
    ``transfer-syntax`` is absent, ``*`` or the parts' one (for an alternative
    type it must be given: ``*`` or the parts' one).

    Raises
    ------
    NotAcceptable
        No media range matches.
    """
    ranges = parse_accept(request.headers.get("Accept", ""))
    if not ranges:
        return
    for media in ranges:
        if media.type in ("*/*", "multipart/*"):
            return
        if media.type != "multipart/related":
            continue
        wanted = media.params.get("type", "").lower()
        if wanted and wanted not in (part_type, *alternatives, "*/*"):
            continue
        syntax = media.params.get("transfer-syntax", "")
        if syntax == "*" or transfer_syntaxes == {syntax}:
            return
        if not syntax and wanted not in alternatives:
            return
    raise NotAcceptable(f'this resource is multipart/related; type="{part_type}" in its '
                        f"stored transfer syntax ({', '.join(sorted(transfer_syntaxes))}); "
                        'ask for transfer-syntax=* or that one')


def _accepts_json(request: web.Request) -> None:
    ranges = parse_accept(request.headers.get("Accept", ""))
    if ranges and not any(m.type in (DICOM_JSON, "application/json", "*/*", "application/*")
                          for m in ranges):
        raise NotAcceptable(f"this resource is {DICOM_JSON}")


def _json(request: web.Request, body: list, warnings: list[str] | None = None) -> web.Response:
    import json

    headers = {}
    if warnings:
        headers["Warning"] = ", ".join(f'299 iepnode "{w}"' for w in warnings)
    return web.Response(body=json.dumps(body, ensure_ascii=False).encode(),
                        content_type=DICOM_JSON, headers=headers)


class Multipart:
    """A ``multipart/related`` response (RFC 2387) written part by part as it is read.

    :meth:`send` advances the parts (and each part's blocks) in a worker thread and
    writes each block as soon as it is read, with chunked transfer encoding: the
    response holds one block, frame or image at a time, never the whole body, and a
    slow reader holds back the reading (aiohttp waits for the socket to drain).
    """

    def __init__(self, part_type: str) -> None:
        self.boundary = secrets.token_hex(16)
        self.content_type = f'multipart/related; type="{part_type}"; boundary={self.boundary}'
        #: Parts written so far.
        self.sent = 0

    def head(self, content_type: str, location: str = "") -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        if location:
            lines.append(f"Content-Location: {location}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    async def start(self, request: web.Request,
                    headers: dict[str, str] | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SECURITY_HEADERS, **_cors(request),
                                               **(headers or {}),
                                               "Content-Type": self.content_type})
        await response.prepare(request)
        return response

    async def send(self, request: web.Request, parts: Iterator[Part],
                   headers: dict[str, str] | None = None,
                   first: Part | None = None) -> web.StreamResponse:
        """Start the response and write ``first`` (if given), then every part of ``parts``.

        A HEAD request gets the headers only (nothing is read).
        """
        response = await self.start(request, headers)
        if request.method == "HEAD":
            _close(parts)
            return response
        try:
            part = first or await _advance(parts)
            while part is not None:
                await response.write(self.head(part.content_type, part.location))
                blocks = iter(part.blocks)
                try:
                    while (block := await _advance(blocks)) is not None:
                        await response.write(block)
                finally:
                    _close(blocks)
                await response.write(b"\r\n")
                self.sent += 1
                part = await _advance(parts)
            await response.write(self.end())
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise StreamAborted(request, exc) from exc
        finally:
            _close(parts)
        await response.write_eof()
        return response


class StreamAborted(Exception):
    """A response failed after its first bytes went out: no status can tell the client,
    so the connection is closed (aiohttp does that for any error after the headers).

    Not a domain error: the handlers' error mapping must not answer it with a page.
    """

    def __init__(self, request: web.Request, cause: BaseException) -> None:
        super().__init__(f"{request.method} {request.path[:200]}: response cut short by "
                         f"{type(cause).__name__}: {cause}")
        log.warning("%s", self)


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a worker thread, carried through to its end even if the
    request is cancelled meanwhile (aiohttp cancels a handler whose client went away).

    The cancellation goes on once the call is done: a read is never left running
    while its generator is closed, and an audit event queued for a thread is never
    dropped before it is written.
    """
    job = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise


async def _advance(iterator: Iterator[Any]) -> Any:
    """The next item of ``iterator`` (``None`` at its end), read in a worker thread."""
    return await _in_thread(next, iterator, None)


def _close(iterator: Iterator) -> None:
    """Close a generator left part-way (its ``with`` blocks close their files)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:  # still running in its thread (cancelled twice): left to the GC
            log.debug("generator still running; closed when collected")


# -- QIDO-RS -----------------------------------------------------------------------------


def search_view(level: Level) -> Handler:
    async def view(request: web.Request, call: Call) -> web.StreamResponse:
        _accepts_json(request)
        fixed = {}
        if study := _uid(request, "study"):
            fixed["StudyInstanceUID"] = study
        if series := _uid(request, "series"):
            fixed["SeriesInstanceUID"] = series
        query = dw.parse_search(level, list(request.query.items()), fixed)

        def run() -> list:
            rows = dw.search(call.scope, query, call.base_url)
            _record(request, call, audit.QUERY, "qido", list(fixed.values())[:1],
                      f"QIDO-RS {request.path_qs[:300]}: {len(rows)} results")
            return rows

        rows = await asyncio.to_thread(run)
        warnings = []
        if query.fuzzy:
            warnings.append("fuzzymatching is not supported: exact matching was used")
        if query.ignored:
            warnings.append("The following attributes are not supported and were ignored: "
                            + ", ".join(query.ignored))
        return _json(request, rows, warnings)

    return view


# -- WADO-RS -----------------------------------------------------------------------------


def _selected(request: web.Request, call: Call,
              dicomweb: dw.DicomWebService) -> list[dw.StoredInstance]:
    return dicomweb.select(call.scope, _uid(request, "study"), _uid(request, "series"),
                           _uid(request, "instance"))


async def retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS retrieve of a study, series or instance: the stored files, multipart."""
    services = services_of(request)
    items = await asyncio.to_thread(_selected, request, call, services.dicomweb)
    _accepts(request, "application/dicom", {i.transfer_syntax for i in items})
    multipart = Multipart("application/dicom")
    if request.method == "HEAD":
        return await multipart.start(request)
    outcome = audit.SERIOUS_FAILURE
    try:
        response = await multipart.send(request, instance_parts(items, call.base_url))
        outcome = audit.SUCCESS
    except (ConnectionError, asyncio.CancelledError):
        outcome = audit.MINOR_FAILURE
        raise
    finally:
        await _in_thread(
            _record, request, call, audit.INSTANCES_TRANSFERRED, "wado-retrieve",
            [i.study_uid for i in items],
            f"WADO-RS {request.path[:300]}: {multipart.sent} of {len(items)} instances",
            outcome)
    return response


async def metadata(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS metadata of a study, series or instance (DICOM JSON, BulkDataURIs).

    Written one instance at a time (a study's metadata can run to many megabytes).
    """
    _accepts_json(request)
    services = services_of(request)

    def run() -> list[dw.StoredInstance]:
        items = _selected(request, call, services.dicomweb)
        _record(request, call, audit.INSTANCES_ACCESSED, "wado-metadata",
                [i.study_uid for i in items],
                f"WADO-RS {request.path[:300]}: {len(items)} instances")
        return items

    items = await asyncio.to_thread(run)
    blocks = METADATA.blocks(items, call.base_url)
    response = web.StreamResponse(headers={**SECURITY_HEADERS, **_cors(request),
                                           "Content-Type": DICOM_JSON})
    try:
        # The first instance before the headers: an unreadable file is still a status.
        head = b"".join([await _advance(blocks) or b"", await _advance(blocks) or b""])
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            await response.write(head)
            while (block := await _advance(blocks)) is not None:
                await response.write(block)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise StreamAborted(request, exc) from exc
    finally:
        _close(blocks)
    await response.write_eof()
    return response


def _max_frames(request: web.Request) -> int:
    return request.app[SETTINGS_KEY].dicomweb_max_frames


async def frames(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS frames of one instance: native as octet-stream, compressed as stored.

    Each frame is read from the file when its part is written (one frame in memory).
    """
    services = services_of(request)
    numbers = parse_frame_list(request.match_info["frames"], _max_frames(request))

    def run() -> tuple[dw.StoredInstance, PixelData]:
        item = _selected(request, call, services.dicomweb)[0]
        pixels = PixelData(item)
        try:
            pixels.check(numbers)
        except BaseException:
            pixels.close()
            raise
        return item, pixels

    item, pixels = await asyncio.to_thread(run)
    try:
        # Compressed frames may also be asked for as octet-stream with transfer-syntax=*.
        alternatives = () if pixels.media_type == "application/octet-stream" else (
            "application/octet-stream",)
        _accepts(request, pixels.media_type, {pixels.transfer_syntax}, alternatives)
        await _in_thread(
            _record, request, call, audit.INSTANCES_ACCESSED, "wado-frames", [item.study_uid],
            f"WADO-RS frames {request.match_info['frames'][:100]} of {item.sop_uid}")
        return await Multipart(pixels.media_type).send(request, pixels.frame_parts(numbers))
    finally:
        pixels.close()


async def bulkdata(request: web.Request, call: Call) -> web.StreamResponse:
    """The target of a metadata BulkDataURI (pixel data: its frames).

    ``multipart/related`` as PS3.18 asks; a single value (a PDF, a LUT) is also given
    as a bare body to a client that asks for exactly its media type (OHIF's
    ``singlepart`` option does, for PDFs). Pixel data is streamed (native: in blocks;
    compressed: a frame at a time); other values are one part.
    """
    services = services_of(request)
    tag = bulk_tag(request.match_info["tag"])
    item = (await asyncio.to_thread(_selected, request, call, services.dicomweb))[0]
    if tag == PIXEL_DATA:
        pixels = await asyncio.to_thread(PixelData, item)
        try:
            alternatives = () if pixels.media_type == "application/octet-stream" else (
                "application/octet-stream",)
            _accepts(request, pixels.media_type, {pixels.transfer_syntax}, alternatives)
            await _record_bulk(request, call, item)
            return await Multipart(pixels.media_type).send(request, pixels.value_parts())
        finally:
            pixels.close()
    value, media = await asyncio.to_thread(read_bulk_value, item, tag)
    await _record_bulk(request, call, item)
    if any(m.type == media for m in parse_accept(request.headers.get("Accept", ""))):
        return web.Response(body=value, content_type=media)
    try:  # its own type, or plain octet-stream
        _accepts(request, media, {""})
    except NotAcceptable:
        media = "application/octet-stream"
        _accepts(request, media, {""})
    return await Multipart(media).send(request, iter([Part(media, (value,))]))


async def _record_bulk(request: web.Request, call: Call, item: dw.StoredInstance) -> None:
    await _in_thread(
        _record, request, call, audit.INSTANCES_ACCESSED, "wado-bulkdata", [item.study_uid],
        f"WADO-RS bulkdata {request.match_info['tag'][:8]} of {item.sop_uid}")


async def ohif_data_source(request: web.Request) -> web.Response:
    """``GET /dicomweb/ohif/{token}.json``: OHIF's ``dicomwebproxy`` configuration.

    The token in the address is the credential (the JSON carries it anyway), so the
    address is as secret as the token and stops working with it.
    """
    settings = request.app[SETTINGS_KEY]
    try:
        config = await asyncio.to_thread(access.ohif_config, request.match_info["token"],
                                         settings.public_url)
    except access.TokenRefused:
        return _error(request, 404, "Not found")
    return web.json_response(config, headers=_cors(request))


async def rendered(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS rendered: JPEG or PNG of frames, an instance, a series or a study.

    One image is a single body; several (a study or series of several instances,
    several frames) are ``multipart/related`` with one image per part (an instance's
    first frame at study and series level; instances without an image are passed
    over), each rendered when its part is written: one image in memory at a time.
    """
    services = services_of(request)
    accept = [m.type for m in parse_accept(request.headers.get("Accept", ""))
              if m.type != "multipart/related"] + [
        m.params.get("type", "") for m in parse_accept(request.headers.get("Accept", ""))
        if m.type == "multipart/related"]
    try:
        how = parse_rendering(request.query, [a for a in accept if a])
    except NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None
    frame_text = request.match_info.get("frames", "")
    numbers = parse_frame_list(frame_text, _max_frames(request)) if frame_text else [1]
    one_instance = bool(request.match_info.get("instance"))

    def select() -> list[dw.StoredInstance]:
        items = _selected(request, call, services.dicomweb)[:1000]
        if one_instance and frame_count(items[0]) < max(numbers):
            raise NotFound("no such frame")
        return items

    items = await asyncio.to_thread(select)
    parts = (rendered_frame_parts(items[0], numbers, how) if one_instance
             else rendered_parts(items, how))
    # The first image before any byte is sent: nothing to render is still a 404.
    first = await _advance(parts)
    if first is None:
        raise NotFound("no image to render")
    headers = {}
    if how.ignored:
        headers["Warning"] = (f'299 iepnode "Not applied: {", ".join(how.ignored)}"')
    multipart = Multipart(how.media_type)
    try:
        if (one_instance and len(numbers) == 1) or (not one_instance and len(items) == 1):
            _close(parts)
            multipart.sent = 1
            return web.Response(body=b"".join(first.blocks), content_type=how.media_type,
                                headers=headers)
        return await multipart.send(request, parts, headers, first=first)
    finally:
        await _in_thread(
            _record, request, call, audit.INSTANCES_ACCESSED, "wado-rendered",
            [i.study_uid for i in items],
            f"WADO-RS {request.path[:300]}: {multipart.sent} {how.media_type} images")


async def thumbnail(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS thumbnail: one small JPEG/PNG standing for a study, series or instance.

    The middle instance of the selection (its first frame, or the first frame asked
    for), fitted in 128x128 unless ``viewport`` says otherwise.
    """
    services = services_of(request)
    try:
        how = parse_rendering(request.query, [m.type for m in parse_accept(
            request.headers.get("Accept", ""))])
    except NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None
    if how.size is None:
        how = dataclasses.replace(how, size=(128, 128))
    frame_text = request.match_info.get("frames", "")
    frame = parse_frame_list(frame_text, _max_frames(request))[0] if frame_text else 1

    def run() -> bytes:
        items = _selected(request, call, services.dicomweb)
        image = render_image(items[len(items) // 2], frame, how)
        _record(request, call, audit.INSTANCES_ACCESSED, "wado-thumbnail",
                  [items[0].study_uid], f"WADO-RS {request.path[:300]}")
        return image

    return web.Response(body=await asyncio.to_thread(run), content_type=how.media_type)


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: the allowed methods and headers for an allowed origin."""
    headers = _cors(request)
    if not headers:
        return web.Response(status=403, text="origin not allowed\n", content_type="text/plain")
    return web.Response(status=204, headers=headers)
