"""Typed application keys shared by the web modules."""

from __future__ import annotations

from aiohttp import web

from config import Settings
from iepnode.node import Node
from iepnode.records import WebSession

SETTINGS_KEY = web.AppKey("settings", Settings)
NODE_KEY = web.AppKey("node", Node)
#: The request's live session, or ``None`` (set by the sessions middleware).
SESSION_KEY = web.RequestKey("session", WebSession | None)
