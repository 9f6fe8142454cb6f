"""``GET /healthz``: the node is up (for monitoring and the tests' readiness polls)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from iepnode import __version__
from web.keys import SERVICES_KEY


async def healthz(request: web.Request) -> web.Response:
    """Report that the node is up, with its AE title and index counts."""
    services = request.app[SERVICES_KEY]
    counts = await asyncio.to_thread(services.archive.counts)
    return web.json_response(
        {"status": "ok", "version": __version__, "ae_title": services.settings.ae_title, **counts}
    )
