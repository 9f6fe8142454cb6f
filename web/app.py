"""Application factory for the node's web interface."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from config import Settings
from iepnode import __version__
from iepnode.services import Services
from web import (
    admin,
    admin_requests,
    dicomweb,
    dicomweb_pages,
    download,
    forward,
    middlewares,
    proxies,
    recipient,
    uploads_admin,  # staff review of patient uploads (issue 7)
    viewer,
)
from web import reports as report_views
from web import upload as upload_views
from web.keys import SERVICES_KEY, SETTINGS_KEY

HERE = Path(__file__).resolve().parent

__all__ = ["SERVICES_KEY", "SETTINGS_KEY", "create_app"]


async def healthz(request: web.Request) -> web.Response:
    """Report that the node is up, with its AE title and index counts."""
    services = request.app[SERVICES_KEY]
    counts = await asyncio.to_thread(services.archive.counts)
    return web.json_response(
        {"status": "ok", "version": __version__, "ae_title": services.settings.ae_title, **counts}
    )


def create_app(settings: Settings, services: Services) -> web.Application:
    """Build the aiohttp application.

    Parameters
    ----------
    settings : Settings
        Node settings.
    services : Services
        The services the views call.
    """
    chain = [middlewares.security_headers, middlewares.domain_errors, middlewares.sessions,
             report_views.upload_limit,  # issue 4: attachment uploads (before csrf reads them)
             middlewares.csrf]
    if settings.trusted_proxies:  # first: everything after it sees the client's address
        chain.insert(0, proxies.middleware(settings.trusted_proxies))
    app = web.Application(middlewares=chain, client_max_size=1 << 20)
    app[SETTINGS_KEY] = settings
    app[SERVICES_KEY] = services
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        # Templates ship with the code: no stat() of each template on every render.
        auto_reload=False,
    )
    env.globals["institution"] = settings.institution
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static", HERE / "static", name="static")
    recipient.setup_routes(app)
    download.setup_routes(app)
    forward.setup_routes(app)
    admin.setup_routes(app)
    uploads_admin.setup_routes(app)  # issue 7: /admin/uploads
    viewer.setup_routes(app)  # issue 4
    dicomweb.setup_routes(app)  # issue 4: DICOMweb
    dicomweb_pages.setup_routes(app)
    upload_views.setup_routes(app)  # issue 7: uploads on request
    admin_requests.setup_routes(app)  # issue 7: staff create requests
    report_views.setup_routes(app)  # issue 4: reports and attachments
    return app
