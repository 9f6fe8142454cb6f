"""Typed application keys shared by the web modules."""

from __future__ import annotations

from aiohttp import web

from config import Settings
from iepnode.records import WebSession
from iepnode.services import Services

SETTINGS_KEY = web.AppKey("settings", Settings)
SERVICES_KEY = web.AppKey("services", Services)
#: The request's live session, or ``None`` (set by the sessions middleware).
SESSION_KEY = web.RequestKey("session", WebSession | None)
