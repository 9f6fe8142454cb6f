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


@web.middleware
async def security_headers(request: web.Request, handler) -> web.StreamResponse:
    """Add headers every response should carry."""
    response = await handler(request)
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"
    )
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
