"""Application factory for the node's web interface."""

from __future__ import annotations

import asyncio

from aiohttp import web

from config import Settings
from iepnode import __version__
from iepnode.node import Node

SETTINGS_KEY = web.AppKey("settings", Settings)
NODE_KEY = web.AppKey("node", Node)


async def healthz(request: web.Request) -> web.Response:
    """Report that the node is up, with its AE title and index counts."""
    node = request.app[NODE_KEY]
    counts = await asyncio.to_thread(node.counts)
    return web.json_response(
        {"status": "ok", "version": __version__, "ae_title": node.settings.ae_title, **counts}
    )


SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
}


@web.middleware
async def security_headers(request: web.Request, handler) -> web.StreamResponse:
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


def create_app(settings: Settings, node: Node) -> web.Application:
    """Build the aiohttp application.

    Parameters
    ----------
    settings : Settings
        Node settings.
    node : Node
        The domain façade the views call.
    """
    app = web.Application(middlewares=[security_headers])
    app[SETTINGS_KEY] = settings
    app[NODE_KEY] = node
    app.router.add_get("/healthz", healthz)
    return app
