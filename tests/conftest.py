"""Shared fixtures: a served node (``iepnode serve``), real peers (SMTP, PostgreSQL), and
the in-process web app (``client``, ``browser``) over a module's ``services`` fixture.

A module that tests in-process defines ``services`` (a :class:`iepnode.services.Services`
from :func:`iepnode.wiring.build_services`); ``served_node`` is the subprocess instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from iepnode.services import Services
from iepnode.wiring import build_services
from storage.db import close_database
from tests.support.browser import Browser
from tests.support.mail import Inbox, running_smtp
from tests.support.node import RunningNode, running_node
from tests.support.postgres import create_database, drop_database, running_postgres
from tests.support.settings import make_settings
from web.app import create_app

#: The calling AE the tests use for dcmtk/pynetdicom SCUs (allowed everything).
SCU_AE = "TESTSCU"


@pytest.fixture(autouse=True)
def _close_the_database() -> Iterator[None]:
    """After each test, close what in-process services left open in the database.

    Otherwise pooled connections of finished tests pile up (three file descriptors
    each): past 1024 open descriptors pynetdicom's ``select()`` fails and an in-process
    SCU aborts its associations.
    """
    yield
    close_database()


@pytest.fixture
def served_node(tmp_path: Path) -> Iterator[RunningNode]:
    """A running node that accepts store/find/move/get from ``TESTSCU`` at 127.0.0.1."""
    with running_node(tmp_path / "node", register=[(SCU_AE, "127.0.0.1", 0,
                                                     "store,find,move,get")]) as running:
        yield running


@pytest.fixture
def smtp() -> Iterator[Inbox]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1: its inbox, with the ephemeral ``port``."""
    with running_smtp(Inbox()) as (inbox, _port):
        yield inbox


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a real throw-away PostgreSQL server (one per session) and its database."""
    with running_postgres() as url:
        yield url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """URL of a new empty database on the session's server, dropped after the test."""
    url = create_database(postgres_url, f"t_{uuid.uuid4().hex[:16]}")
    yield url
    drop_database(url)


@pytest.fixture
def services(tmp_path: Path) -> Services:
    """In-process services of a portal in ``tmp_path`` (:func:`make_settings`).

    Refused staff logins are answered at once (no ``failure_delay``). A module that
    needs other settings, or a served node, defines its own ``services`` fixture.
    """
    services = build_services(make_settings(tmp_path))
    services.admin.logins.failure_delay = 0.0
    return services


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """The default services' settings on SQLite, then on a fresh PostgreSQL database."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    services = build_services(make_settings(tmp_path, database_url=url))
    yield services
    services.group_commit.close()
    services.close()


@pytest.fixture
async def client(aiohttp_client: Any, services: Services) -> TestClient:
    """The web app over the module's in-process ``services`` (aiohttp's test client).

    It keeps no cookies itself (``DummyCookieJar``): the session cookies are ``Secure``,
    which aiohttp never sends over plain HTTP, so :class:`Browser` keeps them instead.
    A module that needs other settings overrides its ``settings`` or ``services`` fixture.
    """
    return await aiohttp_client(create_app(services.settings, services),
                                cookie_jar=aiohttp.DummyCookieJar())


@pytest.fixture
def browser(client: TestClient) -> Browser:
    """A cookie-keeping browser on ``client`` (recipient and staff pages alike)."""
    return Browser(client)
