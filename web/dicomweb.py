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
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from iepnode import audit
from iepnode import dicomweb as dw
from iepnode import dicomweb_access as access
from iepnode.errors import BadQuery, Gone, NotFound
from iepnode.query import Level
from web.common import client_ip, node_of
from web.keys import SESSION_KEY, SETTINGS_KEY
from web.middlewares import SECURITY_HEADERS

log = logging.getLogger("iepnode.web.dicomweb")

_PUBLIC_ID = re.compile(r"IEP[0-9]{8}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
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
    if value and (len(value) > 64 or not _UID.fullmatch(value)):
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
        As :func:`iepnode.dicomweb.token_scope` / :func:`recipient_scope`.
    """
    node = node_of(request)
    public_id = request.match_info.get("public_id", "")
    if public_id and not _PUBLIC_ID.fullmatch(public_id):
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
    user = node.admin.staff_for_session(session)
    if user is not None and node.admin.pending_step(user) is None:
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
    node_of(request).group_commit.run(functools.partial(
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
    """A ``multipart/related`` response written part by part (RFC 2387)."""

    def __init__(self, part_type: str) -> None:
        self.boundary = secrets.token_hex(16)
        self.content_type = f'multipart/related; type="{part_type}"; boundary={self.boundary}'

    def head(self, content_type: str, location: str = "") -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        if location:
            lines.append(f"Content-Location: {location}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    async def start(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SECURITY_HEADERS, **_cors(request),
                                               "Content-Type": self.content_type})
        await response.prepare(request)
        return response

    def body(self, parts: list[tuple[str, bytes]]) -> bytes:
        """A whole small body: ``(content type, bytes)`` per part."""
        out = bytearray()
        for content_type, data in parts:
            out += self.head(content_type) + data + b"\r\n"
        return bytes(out + self.end())


# -- QIDO-RS -----------------------------------------------------------------------------


def _search_view(level: Level) -> Handler:
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
            _record(request, call, dw.QUERY, "qido", list(fixed.values())[:1],
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


def _selected(request: web.Request, call: Call, paths) -> list[dw.StoredInstance]:
    return dw.select_instances(call.scope, paths, _uid(request, "study"),
                               _uid(request, "series"), _uid(request, "instance"))


async def retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS retrieve of a study, series or instance: the stored files, multipart."""
    node = node_of(request)
    items = await asyncio.to_thread(_selected, request, call, node.store.path)
    _accepts(request, "application/dicom", {i.transfer_syntax for i in items})
    multipart = Multipart("application/dicom")
    response = await multipart.start(request)
    if request.method == "HEAD":
        return response
    sent, outcome = 0, audit.SERIOUS_FAILURE
    try:
        for item in items:
            url = dw.resource_url(call.base_url, item.study_uid, item.series_uid, item.sop_uid)
            await response.write(multipart.head(
                f"application/dicom; transfer-syntax={item.transfer_syntax}", url))
            with item.path.open("rb") as handle:
                while block := await asyncio.to_thread(handle.read, 1 << 20):
                    await response.write(block)
            await response.write(b"\r\n")
            sent += 1
        await response.write(multipart.end())
        await response.write_eof()
        outcome = audit.SUCCESS
    except (ConnectionError, asyncio.CancelledError):
        outcome = audit.MINOR_FAILURE
        raise
    finally:
        await asyncio.to_thread(
            _record, request, call, audit.INSTANCES_TRANSFERRED, "wado-retrieve",
            [i.study_uid for i in items],
            f"WADO-RS {request.path[:300]}: {sent} of {len(items)} instances", outcome)
    return response


async def metadata(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS metadata of a study, series or instance (DICOM JSON, BulkDataURIs)."""
    _accepts_json(request)
    node = node_of(request)

    def run() -> bytes:
        items = _selected(request, call, node.store.path)
        body = dw.METADATA.body(items, call.base_url)
        _record(request, call, audit.INSTANCES_ACCESSED, "wado-metadata",
                  [i.study_uid for i in items],
                  f"WADO-RS {request.path[:300]}: {len(items)} instances")
        return body

    return web.Response(body=await asyncio.to_thread(run), content_type=DICOM_JSON)


async def frames(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS frames of one instance: native as octet-stream, compressed as stored."""
    node = node_of(request)
    numbers = dw.parse_frame_list(request.match_info["frames"])

    def run() -> tuple[dw.StoredInstance, dw.Frames]:
        item = _selected(request, call, node.store.path)[0]
        got = dw.read_frames(item, numbers)
        return item, got

    item, got = await asyncio.to_thread(run)
    # Compressed frames may also be asked for as octet-stream with transfer-syntax=*.
    alternatives = () if got.media_type == "application/octet-stream" else (
        "application/octet-stream",)
    _accepts(request, got.media_type, {got.transfer_syntax}, alternatives)
    multipart = Multipart(got.media_type)
    part_type = f"{got.media_type}; transfer-syntax={got.transfer_syntax}"
    body = multipart.body([(part_type, part) for part in got.parts])
    await asyncio.to_thread(
        _record, request, call, audit.INSTANCES_ACCESSED, "wado-frames", [item.study_uid],
        f"WADO-RS frames {request.match_info['frames'][:100]} of {item.sop_uid}")
    return web.Response(body=body, headers={"Content-Type": multipart.content_type})


async def bulkdata(request: web.Request, call: Call) -> web.StreamResponse:
    """The target of a metadata BulkDataURI (pixel data: its frames).

    ``multipart/related`` as PS3.18 asks; a single value (a PDF, a LUT) is also given
    as a bare body to a client that asks for exactly its media type (OHIF's
    ``singlepart`` option does, for PDFs).
    """
    node = node_of(request)

    def run() -> tuple[dw.StoredInstance, dw.Bulk]:
        item = _selected(request, call, node.store.path)[0]
        return item, dw.read_bulkdata(item, request.match_info["tag"])

    item, bulk = await asyncio.to_thread(run)
    await asyncio.to_thread(
        _record, request, call, audit.INSTANCES_ACCESSED, "wado-bulkdata", [item.study_uid],
        f"WADO-RS bulkdata {request.match_info['tag'][:8]} of {item.sop_uid}")
    ranges = parse_accept(request.headers.get("Accept", ""))
    if len(bulk.parts) == 1 and not bulk.transfer_syntax and any(
            m.type == bulk.media_type for m in ranges):
        return web.Response(body=bulk.parts[0], content_type=bulk.media_type)
    media = bulk.media_type
    if bulk.transfer_syntax:  # pixel data: as frames are negotiated
        alternatives = () if media == "application/octet-stream" else (
            "application/octet-stream",)
        _accepts(request, media, {bulk.transfer_syntax}, alternatives)
    else:  # other values: their own type, or plain octet-stream
        try:
            _accepts(request, media, {""})
        except NotAcceptable:
            media = "application/octet-stream"
            _accepts(request, media, {""})
    multipart = Multipart(media)
    part_type = media + (f"; transfer-syntax={bulk.transfer_syntax}"
                         if bulk.transfer_syntax else "")
    body = multipart.body([(part_type, p) for p in bulk.parts])
    return web.Response(body=body, headers={"Content-Type": multipart.content_type})


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

    One image is a single body; several (a study, a series, several frames) are
    ``multipart/related`` with one image per part (an instance's first frame at
    study and series level).
    """
    node = node_of(request)
    accept = [m.type for m in parse_accept(request.headers.get("Accept", ""))
              if m.type != "multipart/related"] + [
        m.params.get("type", "") for m in parse_accept(request.headers.get("Accept", ""))
        if m.type == "multipart/related"]
    try:
        how = dw.parse_rendering(request.query, [a for a in accept if a])
    except dw.NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None
    frame_text = request.match_info.get("frames", "")
    numbers = dw.parse_frame_list(frame_text) if frame_text else [1]

    def run() -> tuple[list[dw.StoredInstance], list[bytes]]:
        items = _selected(request, call, node.store.path)
        if request.match_info.get("instance"):
            images = [dw.render_image(items[0], n, how) for n in numbers]
        else:
            images = [dw.render_image(i, 1, how) for i in items[:1000]]
        _record(request, call, audit.INSTANCES_ACCESSED, "wado-rendered",
                  [i.study_uid for i in items],
                  f"WADO-RS {request.path[:300]}: {len(images)} {how.media_type} images")
        return items, images

    _, images = await asyncio.to_thread(run)
    headers = {}
    if how.ignored:
        headers["Warning"] = (f'299 iepnode "Not applied: {", ".join(how.ignored)}"')
    if len(images) == 1:
        return web.Response(body=images[0], content_type=how.media_type, headers=headers)
    multipart = Multipart(how.media_type)
    return web.Response(body=multipart.body([(how.media_type, i) for i in images]),
                        headers={**headers, "Content-Type": multipart.content_type})


async def thumbnail(request: web.Request, call: Call) -> web.StreamResponse:
    """WADO-RS thumbnail: one small JPEG/PNG standing for a study, series or instance.

    The middle instance of the selection (its first frame, or the first frame asked
    for), fitted in 128x128 unless ``viewport`` says otherwise.
    """
    node = node_of(request)
    try:
        how = dw.parse_rendering(request.query, [m.type for m in parse_accept(
            request.headers.get("Accept", ""))])
    except dw.NotAcceptableMedia as exc:
        raise NotAcceptable(str(exc)) from None
    if how.size is None:
        how = dataclasses.replace(how, size=(128, 128))
    frame_text = request.match_info.get("frames", "")
    frame = dw.parse_frame_list(frame_text)[0] if frame_text else 1

    def run() -> bytes:
        items = _selected(request, call, node.store.path)
        image = dw.render_image(items[len(items) // 2], frame, how)
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


def setup_routes(app: web.Application) -> None:
    """Register the DICOMweb routes under both base URLs."""
    study, series, instance = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    routes: list[tuple[str, Handler]] = [
        ("/studies", _search_view(Level.STUDY)),
        ("/series", _search_view(Level.SERIES)),
        ("/instances", _search_view(Level.IMAGE)),
        (f"{study}/series", _search_view(Level.SERIES)),
        (f"{study}/instances", _search_view(Level.IMAGE)),
        (f"{study}{series}/instances", _search_view(Level.IMAGE)),
        (study, retrieve),
        (f"{study}{series}", retrieve),
        (f"{study}{series}{instance}", retrieve),
        (f"{study}/metadata", metadata),
        (f"{study}{series}/metadata", metadata),
        (f"{study}{series}{instance}/metadata", metadata),
        (f"{study}{series}{instance}/frames/{{frames}}", frames),
        (f"{study}{series}{instance}/bulkdata/{{tag}}", bulkdata),
        (f"{study}/rendered", rendered),
        (f"{study}{series}/rendered", rendered),
        (f"{study}{series}{instance}/rendered", rendered),
        (f"{study}{series}{instance}/frames/{{frames}}/rendered", rendered),
        (f"{study}/thumbnail", thumbnail),
        (f"{study}{series}/thumbnail", thumbnail),
        (f"{study}{series}{instance}/thumbnail", thumbnail),
        (f"{study}{series}{instance}/frames/{{frames}}/thumbnail", thumbnail),
    ]
    for base in ("/dicomweb", "/dicomweb/t/{public_id}"):
        for path, view in routes:
            app.router.add_get(base + path, dicomweb_view(view))
    app.router.add_get("/dicomweb/ohif/{token}.json", ohif_data_source)
    app.router.add_route("OPTIONS", "/dicomweb/{tail:.*}", preflight)
