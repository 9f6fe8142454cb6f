"""``GET /healthz``: the node is up (for monitoring and the tests' readiness polls)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from iepnode import __version__
from web.keys import NODE_KEY


async def healthz(request: web.Request) -> web.Response:
    """Report that the node is up, with its AE title and index counts."""
    node = request.app[NODE_KEY]
    counts = await asyncio.to_thread(node.counts)
    return web.json_response(
        {"status": "ok", "version": __version__, "ae_title": node.settings.ae_title, **counts}
    )
