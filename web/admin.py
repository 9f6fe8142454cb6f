"""Staff pages under /admin: login with password + TOTP, studies, transfers, audit."""

from __future__ import annotations

from aiohttp import web


def setup_routes(app: web.Application) -> None:
    """Register the /admin routes (being built)."""
