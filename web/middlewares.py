"""Every middleware of the application, and the session and CSRF cookies they read.

In the order :func:`web.app.create_app` chains them (the first sees the request first):

- :func:`trusted_proxies` (only with ``[http] trusted_proxies``): the client's address
  and scheme from a trusted reverse proxy's headers (the rule: :mod:`web.proxies`);
- :func:`security_headers`: the headers every response carries, errors included;
- :func:`domain_errors`: domain errors that reach the edge become HTTP error pages;
- :func:`sessions`: the live session of the session cookie, as ``request[SESSION_KEY]``;
- :func:`upload_limit`: attachment-sized bodies for the attachment POSTs of a session;
- :func:`csrf`: every POST's form is read (:func:`read_form`) and its token checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable

import aiohttp_jinja2
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader
from multidict import MultiDictProxy

from iepnode.errors import (
    Busy,
    Gone,
    InProgress,
    InvalidRequest,
    LoginRefused,
    NodeError,
    NotAuthorized,
    NotFound,
)
from iepnode.rules.identifiers import PUBLIC_ID_PATTERN, new_token
from iepnode.rules.text import UNSAFE_NAME
from iepnode.viewing.attachments import MAX_UPLOAD_BYTES
from web import proxies
from web.keys import SERVICES_KEY, SESSION_KEY

log = logging.getLogger("iepnode.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

SESSION_COOKIE = "__Host-iepnode"
#: Seconds a ``503 Busy`` answer asks the client to wait (``Retry-After``).
RETRY_AFTER = 2
#: Double-submit CSRF cookie for forms shown before a session exists.
PRELOGIN_COOKIE = "__Host-iepnode-csrf"
SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
}
#: The attachment POSTs (recipient and staff) that may carry a file bigger than 1 MiB.
_ATTACH_POST = re.compile(rf"(/admin)?/transactions/{PUBLIC_ID_PATTERN}/attachments")
#: Room for the form's other fields and the multipart framing.
_FORM_MARGIN = 64 * 1024


def trusted_proxies(trusted: Iterable[str]) -> Middleware:
    """A middleware that sets ``request.remote`` and ``request.scheme`` from trusted proxies.

    Install it first, so every later middleware and view (the audit trail through
    :func:`web.common.client_ip`, the CSRF log lines) sees the client's address.
    Headers from any other peer are ignored (:func:`web.proxies.forwarded`).

    Parameters
    ----------
    trusted : iterable of str
        Addresses or networks (``10.0.0.5``, ``10.0.0.0/8``), as in the settings.
    """
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)

    @web.middleware
    async def trusted_proxies(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or ""
        found = proxies.forwarded(peer, request.headers.getall(hdrs.X_FORWARDED_FOR, []),
                                  request.headers.getall(hdrs.X_FORWARDED_PROTO, []),
                                  networks)
        overrides: dict[str, str] = {}
        if found.remote != peer:
            overrides["remote"] = found.remote
        if found.scheme is not None and found.scheme != request.scheme:
            overrides["scheme"] = found.scheme
        return await handler(request.clone(**overrides) if overrides else request)

    return trusted_proxies


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Add the headers every response carries, error responses included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        for name, value in SECURITY_HEADERS.items():
            exc.headers.setdefault(name, value)
        raise
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def domain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors that reach the edge into HTTP errors with a readable page."""
    try:
        return await handler(request)
    except NotFound:
        return _error_page(request, 404, "Not found",
                           "This page does not exist, or it is not yours to see.")
    except Gone as exc:
        return _error_page(request, 410, "No longer available", str(exc))
    except (LoginRefused, NotAuthorized) as exc:
        return _error_page(request, 403, "Not allowed", str(exc))
    except InProgress as exc:
        return _error_page(request, 409, "Already under way", str(exc))
    except Busy as exc:
        response = _error_page(request, 503, "Busy just now", str(exc))
        response.headers["Retry-After"] = str(RETRY_AFTER)
        return response
    except InvalidRequest as exc:
        return _error_page(request, 400, "That did not work", str(exc))
    except NodeError as exc:
        log.warning("request %s %s failed: %s", request.method, request.path, exc)
        return _error_page(request, 500, "Something went wrong", "Please try again later.")


def _error_page(request: web.Request, status: int, title: str, text: str) -> web.Response:
    response = aiohttp_jinja2.render_template(
        "error.html", request, {"title": title, "text": text}, status=status
    )
    return response


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the live session (or ``None``) for the session cookie as ``request['session']``."""
    request[SESSION_KEY] = None
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        services = request.app[SERVICES_KEY]
        try:
            request[SESSION_KEY] = await asyncio.to_thread(services.logins.resume_session, token)
        except NotFound:
            request[SESSION_KEY] = None
    return await handler(request)


@web.middleware
async def upload_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Allow attachment-sized bodies on the attachment POSTs of a logged-in session.

    Must run after the sessions middleware and before the CSRF one (which reads the form).
    The limit is :data:`~iepnode.viewing.attachments.MAX_UPLOAD_BYTES` (and room for the
    form around the file); beyond it the answer is a 413 page (:mod:`web.reports`).
    """
    if (request.method == "POST" and request.get(SESSION_KEY) is not None
            and _ATTACH_POST.fullmatch(request.path)):
        request = request.clone(client_max_size=MAX_UPLOAD_BYTES + _FORM_MARGIN)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return aiohttp_jinja2.render_template("error.html", request, {
                "title": "File too large",
                "text": f"The largest file you can attach is "
                        f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB. Nothing was stored."},
                status=413)
        finally:
            close_form_files(request)
    return await handler(request)


#: What aiohttp raises for a body that is not the form its Content-Type says: a part
#: header broken by CR/LF/NUL, a missing boundary or name, an unknown charset or
#: transfer encoding, a truncated body (the warning is raised where warnings are errors).
_MALFORMED = (HttpProcessingError, ValueError, LookupError, RuntimeError,
              BadContentDispositionHeader)


async def read_form(request: web.Request) -> MultiDictProxy:
    """The request's form fields (urlencoded or multipart), or a 400 saying why not.

    Every form read goes through here first (the CSRF check below reads the form of
    every POST; aiohttp keeps it for the view's own ``request.post()``), so a body
    that cannot be parsed, or a field or file name with a control character, is a
    400 for every form route instead of an error page from deep inside a view.

    Raises
    ------
    web.HTTPBadRequest
        The body is not a well-formed form, or a name carries a control character.
    web.HTTPRequestEntityTooLarge
        Over the request's body limit (as aiohttp decides).
    """
    try:
        form = await request.post()
    except web.HTTPException:
        raise
    except _MALFORMED as exc:
        log.warning("malformed form: %s %s from %s: %s", request.method, request.path,
                    request.remote, " ".join(str(exc).split())[:200])
        raise web.HTTPBadRequest(
            text="Malformed form: the request body could not be read as a form "
                 "(a part header broken by a line break or control character?).") from None
    for name, value in form.items():
        filename = value.filename if isinstance(value, web.FileField) else ""
        if UNSAFE_NAME.search(name) or UNSAFE_NAME.search(filename or ""):
            log.warning("form with a control character in a name: %s %s from %s",
                        request.method, request.path, request.remote)
            raise web.HTTPBadRequest(
                text="Malformed form: a field name or file name contains a control "
                     "character (such as a line break). Rename the file and try again.")
    return form


@web.middleware
async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse any POST without the right CSRF token (form field ``csrf``).

    With a session the token is the session's; before login it must equal the
    pre-login cookie (double submit). Compared in constant time. The form is read
    by :func:`read_form` (400 for a malformed one).
    """
    if request.method != "POST":
        return await handler(request)
    try:
        form = await read_form(request)
        sent = str(form.get("csrf", ""))
        session = request.get(SESSION_KEY)
        expected = session.csrf_token if session is not None else request.cookies.get(
            PRELOGIN_COOKIE, "")
        if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
            log.warning("CSRF check failed: %s %s from %s", request.method, request.path,
                        request.remote)
            raise web.HTTPForbidden(text="Missing or wrong form token: reload the page.")
        return await handler(request)
    finally:
        close_form_files(request)


def close_form_files(request: web.Request) -> None:
    """Close the temporary files aiohttp spooled a form's file fields into.

    aiohttp leaves them open; the parsed form is kept on the request (``_post``), also
    when the form was refused. Any POST may carry file parts, wanted or not.
    """
    form = getattr(request, "_post", None) or {}
    for value in form.values():
        if isinstance(value, web.FileField):
            value.file.close()


def set_session_cookie(response: web.StreamResponse, token: str) -> None:
    """Set the session cookie: ``__Host-`` prefix, Secure, HttpOnly, SameSite=Lax."""
    response.set_cookie(SESSION_COOKIE, token, path="/", secure=True, httponly=True,
                        samesite="Lax")


def clear_session_cookie(response: web.StreamResponse) -> None:
    """Remove the session cookie from the browser."""
    response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")


def prelogin_csrf(request: web.Request) -> str:
    """Return the pre-login CSRF value for a form, reusing the browser's cookie if set."""
    return request.cookies.get(PRELOGIN_COOKIE) or new_token()


def set_prelogin_cookie(response: web.StreamResponse, value: str) -> None:
    """Set the double-submit CSRF cookie used by forms shown before login."""
    response.set_cookie(PRELOGIN_COOKIE, value, path="/", secure=True, httponly=True,
                        samesite="Strict")
