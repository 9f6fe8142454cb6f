"""Recipient pages: link login with a passcode, dashboard, transaction actions."""

from __future__ import annotations

from aiohttp import web


def setup_routes(app: web.Application) -> None:
    """Register the recipient routes (being built)."""
