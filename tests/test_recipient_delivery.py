"""A passcode that cannot be delivered: a clear page, no dead attempt, an audit event."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp

from iepnode.wiring import build_services
from storage.models import AuditEvent, LoginAttempt
from tests import data_factory as factory
from tests.support.ingest import store_files as store
from tests.test_recipient_web import make_settings, share
from web.app import create_app


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_undeliverable_passcode_is_explained_and_not_rate_limited(
        aiohttp_client: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=_closed_port(),
                             smtp_tls="none", smtp_timeout=2.0)
    services = build_services(settings)
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1))
    _, token = share([study], otp_email="second@example.org", otp_mobile="")
    client = await aiohttp_client(create_app(settings, services),
                                  cookie_jar=aiohttp.DummyCookieJar())
    for _ in range(2):  # the second try is not refused as "sent moments ago"
        response = await client.get(f"/t/{token}")
        page = await response.text()
        assert response.status == 503
        assert "could not send your passcode" in page
        assert "seconds ago" not in page
        assert LoginAttempt.select().count() == 0
    events = list(AuditEvent.select().where(AuditEvent.action == "passcode-not-sent"))
    assert len(events) == 2 and events[0].outcome == 8
    assert events[0].detail.startswith("email: ")
