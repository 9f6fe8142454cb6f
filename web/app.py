"""Application factory for the node's web interface."""

from __future__ import annotations

from aiohttp import web

from config import Settings
from iepnode.services import Services
from web import middlewares
from web.keys import SERVICES_KEY, SETTINGS_KEY
from web.routes import add_routes
from web.templating import setup_templates

__all__ = ["SERVICES_KEY", "SETTINGS_KEY", "create_app"]


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
             middlewares.upload_limit,  # issue 4: attachment uploads (before csrf reads them)
             middlewares.csrf]
    if settings.trusted_proxies:  # first: everything after it sees the client's address
        chain.insert(0, middlewares.trusted_proxies(settings.trusted_proxies))
    app = web.Application(middlewares=chain, client_max_size=1 << 20)
    app[SETTINGS_KEY] = settings
    app[SERVICES_KEY] = services
    setup_templates(app, settings)
    add_routes(app)
    return app
