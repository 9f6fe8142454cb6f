"""The Jinja2 environment of the pages: templates, autoescaping, filters, globals, tests.

The filters are the formatting functions of the pages that use them
(:func:`web.recipient.recipient_filters`, :func:`web.staff_pages.staff_filters`), with
times shown in the node's time zone.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from config import Settings
from iepnode.people import passwords
from web import download, recipient, staff_pages

TEMPLATES = Path(__file__).resolve().parent / "templates"


def setup_templates(app: web.Application, settings: Settings) -> jinja2.Environment:
    """Set up aiohttp-jinja2 on ``app`` with everything the templates use.

    Parameters
    ----------
    app : web.Application
        The application (not yet frozen).
    settings : Settings
        Node settings: the institution's name, the time zone, the forward limit.

    Returns
    -------
    jinja2.Environment
        The environment, templates loaded from ``web/templates``.
    """
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        # Templates ship with the code: no stat() of each template on every render.
        auto_reload=False,
    )
    env.globals["institution"] = settings.institution
    env.globals["max_forwards"] = settings.max_forwards
    env.globals["password_min_length"] = passwords.MIN_LENGTH
    env.filters.update(recipient.recipient_filters(settings.zone))
    env.filters.update(staff_pages.staff_filters(settings.zone))
    env.tests["downloadable"] = download.downloadable
    return env
