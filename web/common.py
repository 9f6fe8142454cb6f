"""Helpers shared by the recipient and staff pages."""

from __future__ import annotations

from aiohttp import web

from iepnode import dicomtext
from iepnode.errors import NotFound
from iepnode.records import WebSession
from iepnode.rules.identifiers import is_public_id
from iepnode.services import Services
from web.keys import SERVICES_KEY, SESSION_KEY

_SEXES = {"F": "Female", "M": "Male", "O": "Other"}


def services_of(request: web.Request) -> Services:
    """The services the views call."""
    return request.app[SERVICES_KEY]


def client_ip(request: web.Request) -> str:
    """The client's address for the audit trail.

    The TCP peer's, or behind a trusted reverse proxy the address it forwarded
    (set by :mod:`web.proxies`; headers from other peers are ignored).
    """
    return request.remote or ""


def recipient_session(request: web.Request) -> WebSession:
    """The request's recipient session.

    Raises
    ------
    web.HTTPSeeOther
        No session, or a staff one: to ``/signin`` (how a recipient signs in).
    """
    session = request[SESSION_KEY]
    if session is None or session.recipient_id is None:
        raise web.HTTPSeeOther("/signin")
    return session


def public_id_of(request: web.Request) -> str:
    """The ``{public_id}`` of the URL; anything not shaped like an ID is a 404."""
    public_id = request.match_info["public_id"]
    if not is_public_id(public_id):
        raise NotFound(f"no transaction {public_id!r}")
    return public_id


def see_other(location: str) -> web.Response:
    """A ``303 See Other`` response (returned, not raised, so cookies can be set on it)."""
    return web.Response(status=303, headers={"Location": location})


def format_pn(value: str) -> str:
    """Format a DICOM PN value for people: ``Doe^Jane^Ann`` -> ``DOE, Jane Ann``."""
    return dicomtext.person_name(value)


def format_sex(value: str) -> str:
    """Spell out a DICOM Patient's Sex code."""
    return _SEXES.get((value or "").strip().upper(), value or "—")
