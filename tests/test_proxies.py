"""Behind a reverse proxy: X-Forwarded-For/-Proto believed from trusted peers only.

The node's app runs in-process; the test client connects from 127.0.0.1, which
is a trusted proxy in some tests and not in others. The audited address of a
failed staff login shows which address the node believed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config import ConfigError, load_settings
from iepnode.wiring import build_services
from storage.models import AuditEvent
from tests.support.browser import Browser, input_value
from web import middlewares, proxies
from web.app import create_app

NETS = [ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")]


async def audited_ip_of_a_login(aiohttp_client: Any, tmp_path: Path, trusted: list[str],
                                headers: dict[str, str]) -> str:
    """Fail a staff login with ``headers``; return the source IP the audit event got."""
    settings = load_settings(overrides={"data_dir": tmp_path / "data",
                                        "trusted_proxies": trusted}, environ={})
    services = build_services(settings)
    services.admin.logins.failure_delay = 0.0
    browser = Browser(await aiohttp_client(create_app(settings, services),
                                           cookie_jar=aiohttp.DummyCookieJar()))
    form = await browser.page("/admin/login")
    response = await browser.post("/admin/login", headers=headers, data={
        "csrf": input_value(form, "csrf"), "username": "alice", "password": "x", "code": "1"})
    assert response.status == 403
    (event,) = AuditEvent.select().where(AuditEvent.action == "login-failed")
    return event.source_ip


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(aiohttp_client: Any,
                                                               tmp_path: Path) -> None:
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    assert await audited_ip_of_a_login(aiohttp_client, tmp_path, [], spoof) == "127.0.0.1"
    other = tmp_path / "other"
    assert await audited_ip_of_a_login(aiohttp_client, other, ["10.0.0.0/8"],
                                       spoof) == "127.0.0.1"


async def test_forwarded_for_from_a_trusted_proxy_is_the_client(aiohttp_client: Any,
                                                                tmp_path: Path) -> None:
    # The client wrote 198.51.100.7 itself; the proxy appended the address it saw.
    headers = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    assert await audited_ip_of_a_login(aiohttp_client, tmp_path, ["127.0.0.1"],
                                       headers) == "203.0.113.9"


def test_the_client_is_the_right_most_address_that_is_not_a_trusted_proxy() -> None:
    def remote(peer: str, *xff: str) -> str:
        return proxies.forwarded(peer, xff, [], NETS).remote

    assert remote("127.0.0.1", "198.51.100.7, 10.1.2.3") == "198.51.100.7"  # two proxies
    assert remote("127.0.0.1", "1.1.1.1, 198.51.100.7", "10.1.2.3") == "198.51.100.7"
    assert remote("127.0.0.1", "10.9.9.9, 10.1.2.3") == "10.9.9.9"  # all trusted: left-most
    assert remote("127.0.0.1") == "127.0.0.1"  # a proxy that forwarded nothing
    assert remote("127.0.0.1", "unknown, 10.1.2.3") == "10.1.2.3"  # garbage: last proxy
    assert remote("127.0.0.1", "203.0.113.9:5123") == "203.0.113.9"
    assert remote("127.0.0.1", "[2001:db8::1]:443") == "2001:db8::1"
    assert remote("::ffff:10.0.0.5", "203.0.113.9") == "203.0.113.9"  # dual-stack socket
    assert remote("fd00::1", "2001:db8::7") == "2001:db8::7"
    assert remote("192.0.2.1", "203.0.113.9") == "192.0.2.1"  # untrusted peer
    assert remote("", "203.0.113.9") == ""


def test_the_scheme_is_the_nearest_proxys_and_only_http_or_https() -> None:
    def scheme(peer: str, *xfp: str) -> str | None:
        return proxies.forwarded(peer, ["203.0.113.9"], xfp, NETS).scheme

    assert scheme("127.0.0.1", "https") == "https"
    assert scheme("127.0.0.1", "http, HTTPS") == "https"
    assert scheme("127.0.0.1", "javascript") is None
    assert scheme("127.0.0.1") is None
    assert scheme("192.0.2.1", "https") is None


async def test_the_middleware_sets_remote_and_scheme_for_later_handlers(
        aiohttp_client: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"remote": request.remote, "scheme": request.scheme,
                                  "secure": request.secure})

    def app(trusted: list[str]) -> web.Application:
        application = web.Application(middlewares=[middlewares.trusted_proxies(trusted)])
        application.router.add_get("/", echo)
        return application

    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    behind = await aiohttp_client(app(["127.0.0.0/8"]))
    assert await (await behind.get("/", headers=headers)).json() == {
        "remote": "203.0.113.9", "scheme": "https", "secure": True}
    direct = await aiohttp_client(app(["10.0.0.0/8"]))
    assert await (await direct.get("/", headers=headers)).json() == {
        "remote": "127.0.0.1", "scheme": "http", "secure": False}


def test_trusted_proxies_settings(tmp_path: Path) -> None:
    toml = tmp_path / "iepnode.toml"
    toml.write_text('[http]\ntrusted_proxies = ["10.0.0.5", "10.1.0.0/16", "fd00::1"]\n')
    assert load_settings(toml, environ={}).trusted_proxies == (
        "10.0.0.5/32", "10.1.0.0/16", "fd00::1/128")
    env = load_settings(environ={"IEPNODE_TRUSTED_PROXIES": "10.0.0.5, 10.0.0.6 10.0.0.5"})
    assert env.trusted_proxies == ("10.0.0.5/32", "10.0.0.6/32")
    assert load_settings(environ={}).trusted_proxies == ()
    with pytest.raises(ConfigError, match=r"trusted_proxies 'proxy\.example'"):
        load_settings(overrides={"trusted_proxies": ["proxy.example"]}, environ={})
    toml.write_text('[http]\ntrusted_proxies = "10.0.0.5"\n')  # a string is a list of one
    assert load_settings(toml, environ={}).trusted_proxies == ("10.0.0.5/32",)
    toml.write_text("[http]\ntrusted_proxies = [5]\n")
    with pytest.raises(ConfigError, match="a list of strings"):
        load_settings(toml, environ={})
