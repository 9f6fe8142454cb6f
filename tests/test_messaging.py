"""Mail and SMS: a real SMTP server (aiosmtpd), a real HTTP gateway, the outbox folder.

The settings for ``[mail]``, ``[sms]`` and ``[portal]`` are tested here too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from config import ConfigError, Settings, load_settings
from iepnode.errors import NodeError
from iepnode.outbound import messaging
from iepnode.outbound.messaging import (
    Delivery,
    DeliveryError,
    Messenger,
    check_email,
    normalize_phone,
)
from tests.support.mail import PortZeroController

#: Secret-looking content that must never reach a log line or an error text.
PASSCODE = "731942"
BODY = f"Grüße, Zoë! Your passcode is {PASSCODE}. https://portal.example/t/Zx9"
SUBJECT = "Ihre Bilder vom Universitätsspital – Zürich"
HTML = f"<p>Grüße! Code <b>{PASSCODE}</b></p>"
USER, PASSWORD = "iep-user", "s3cret-pässword"
TOKEN = "tok-5f2a9c"
#: Loggers of the test peers (aiosmtpd logs whole DATA lines at DEBUG; the aiohttp
#: server logs request lines): what they print is not the node's doing.
PEER_LOGGERS = {"mail.log", "aiohttp.access", "aiohttp.server", "aiohttp.web"}


# -- a real SMTP server --------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    """One message as the SMTP server got it."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: bytes | None


class Recorder:
    """aiosmtpd handler keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[Received] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        assert isinstance(envelope.content, bytes)
        wire = envelope.content.replace(b"\r\n", b"\n")
        parsed = BytesParser(policy=policy.default).parsebytes(wire)
        login = session.auth_data if session.authenticated else None
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      parsed, login))  # type: ignore[arg-type]
        return "250 OK stored"


def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
    """Accept ``USER``/``PASSWORD`` only."""
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
          and auth_data.password == PASSWORD.encode())
    # handled=False: aiosmtpd answers "535" itself on failure.
    return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)


@dataclasses.dataclass
class SMTPServer:
    port: int
    recorder: Recorder


@pytest.fixture
def smtp_server() -> Iterator[SMTPServer]:
    """An SMTP server on 127.0.0.1 (no TLS) offering AUTH but not requiring it."""
    recorder = Recorder()
    controller = PortZeroController(recorder, hostname="127.0.0.1", port=0,
                                    authenticator=authenticate, auth_require_tls=False)
    controller.start()
    try:
        yield SMTPServer(controller.port, recorder)
    finally:
        controller.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(overrides={"data_dir": tmp_path / "data", **overrides}, environ={})


def smtp_settings(tmp_path: Path, port: int, **overrides: Any) -> Settings:
    values = {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_tls": "none",
              "smtp_timeout": 5, **overrides}
    return make_settings(tmp_path, **values)


def outbox_files(settings: Settings) -> list[Path]:
    if not settings.outbox_dir.exists():
        return []
    return sorted(settings.outbox_dir.iterdir())


def read_eml(path: Path) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def assert_no_secrets(caplog: pytest.LogCaptureFixture, *extra: str) -> None:
    """No log record (at any level, any logger) holds the body, subject or secrets."""
    for record in caplog.records:
        if record.name in PEER_LOGGERS:
            continue
        text = record.getMessage()
        for secret in (PASSCODE, "Grüße", SUBJECT, PASSWORD, TOKEN, *extra):
            assert secret not in text, (record.name, text)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


# -- SMTP ----------------------------------------------------------------------------------


async def test_smtp_delivery_plain(
    tmp_path: Path, smtp_server: SMTPServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = smtp_settings(tmp_path, smtp_server.port, mail_from="St Elsewhere <iep@x.org>")

    delivery = await Messenger(settings).send_email("patient@example.org", SUBJECT, BODY,
                                                    HTML, kind="login-link")

    assert delivery.channel == "smtp" and delivery.outbox_path is None
    assert delivery.to == "patient@example.org"
    [got] = smtp_server.recorder.messages
    assert got.mail_from == "iep@x.org" and got.rcpt_tos == ["patient@example.org"]
    assert got.login is None
    message = got.message
    assert message["Subject"] == SUBJECT
    assert message["From"] == "St Elsewhere <iep@x.org>"
    assert message["To"] == "patient@example.org"
    assert message["Message-ID"] == delivery.message_id
    assert delivery.message_id.endswith("@x.org>")
    assert message["Date"] and message["X-Iepnode-Kind"] == "login-link"
    assert message.get_content_type() == "multipart/alternative"
    body = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert body is not None and html is not None
    assert body.get_content().rstrip("\n") == BODY
    assert html.get_content().rstrip("\n") == HTML
    assert body.get_content_charset() == "utf-8"
    assert not settings.outbox_dir.exists()
    assert any("patient@example.org (login-link) sent via SMTP" in r.getMessage()
               for r in debug_logs.records)
    assert_no_secrets(debug_logs)


async def test_smtp_auth(
    tmp_path: Path, smtp_server: SMTPServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = smtp_settings(tmp_path, smtp_server.port, smtp_user=USER, smtp_password=PASSWORD)
    await Messenger(settings).send_email("patient@example.org", "Hello", BODY)
    [got] = smtp_server.recorder.messages
    assert got.login == USER.encode()
    # Credentials over plain text are allowed (a trusted relay) but warned about.
    assert any("without TLS" in r.getMessage() and r.levelno == logging.WARNING
               for r in debug_logs.records)
    assert_no_secrets(debug_logs)


async def test_smtp_wrong_password(
    tmp_path: Path, smtp_server: SMTPServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = smtp_settings(tmp_path, smtp_server.port, smtp_user=USER, smtp_password="nope-x1")
    with pytest.raises(DeliveryError) as info:
        await Messenger(settings).send_email("patient@example.org", SUBJECT, BODY)
    assert "patient@example.org" in str(info.value) and "535" in str(info.value)
    assert "nope-x1" not in str(info.value) and PASSCODE not in str(info.value)
    assert smtp_server.recorder.messages == []
    assert_no_secrets(debug_logs, "nope-x1")


async def test_starttls_required_but_not_offered(
    tmp_path: Path, smtp_server: SMTPServer
) -> None:
    """``smtp_tls = "starttls"`` never falls back to plain text (credentials stay safe)."""
    settings = smtp_settings(tmp_path, smtp_server.port, smtp_tls="starttls",
                             smtp_user=USER, smtp_password=PASSWORD)
    with pytest.raises(DeliveryError, match="STARTTLS"):
        await Messenger(settings).send_email("patient@example.org", SUBJECT, BODY)
    assert smtp_server.recorder.messages == []


async def test_smtp_server_down(
    tmp_path: Path, closed_port: int, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = smtp_settings(tmp_path, closed_port)
    with pytest.raises(DeliveryError) as info:
        await Messenger(settings).send_email("patient@example.org", SUBJECT, BODY)
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert isinstance(info.value, NodeError)
    assert not settings.outbox_dir.exists()  # a failed send is not silently parked
    assert any(r.levelno == logging.WARNING and "failed" in r.getMessage()
               for r in debug_logs.records)
    assert_no_secrets(debug_logs)


# -- the outbox ------------------------------------------------------------------------------


async def test_outbox_when_no_smtp_host(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    messenger = Messenger(settings)

    first = await messenger.send_email("patient@example.org", SUBJECT, BODY, HTML,
                                       kind="login-link")
    second = await messenger.send_email("other@example.org", "Plain", "ascii only")

    assert first.channel == "outbox" and first.outbox_path is not None
    assert outbox_files(settings) == sorted([first.outbox_path, second.outbox_path])
    assert re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{8}\.eml", first.outbox_path.name)
    assert stat.S_IMODE(first.outbox_path.stat().st_mode) == 0o600
    message = read_eml(first.outbox_path)
    assert message["To"] == "patient@example.org"
    assert message["Subject"] == SUBJECT
    assert message["Message-ID"] == first.message_id
    body = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert body is not None and body.get_content().rstrip("\n") == BODY
    assert html is not None and html.get_content().rstrip("\n") == HTML
    plain = read_eml(second.outbox_path)  # type: ignore[arg-type]
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content().rstrip("\n") == "ascii only"

    lines = [r.getMessage() for r in debug_logs.records if r.name == "iepnode.messaging"]
    assert (f"mail to patient@example.org (login-link) written to "
            f"outbox/{first.outbox_path.name}") in lines
    assert_no_secrets(debug_logs)


async def test_outbox_unwritable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    settings.outbox_dir.write_text("a file where the folder should be")
    with pytest.raises(DeliveryError, match="outbox"):
        await Messenger(settings).send_email("patient@example.org", SUBJECT, BODY)


def test_blocking_wrappers(tmp_path: Path, smtp_server: SMTPServer) -> None:
    outbox = Messenger(make_settings(tmp_path / "a"))
    assert outbox.send_email_blocking("p@example.org", "Hi", BODY).channel == "outbox"
    assert outbox.send_sms_blocking("+44 7700 900123", BODY).channel == "outbox"
    smtp = Messenger(smtp_settings(tmp_path / "b", smtp_server.port))
    assert smtp.send_email_blocking("p@example.org", "Hi", BODY, kind="x").channel == "smtp"
    assert len(smtp_server.recorder.messages) == 1


# -- SMS ---------------------------------------------------------------------------------


async def test_sms_to_outbox(tmp_path: Path, debug_logs: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    delivery = await Messenger(settings).send_sms("+44 7700-900 123", BODY)
    assert delivery == Delivery("outbox", "+447700900123", delivery.outbox_path,
                                delivery.message_id)
    assert delivery.outbox_path is not None
    raw = delivery.outbox_path.read_bytes()
    assert b"\nTo: sms:+447700900123\n" in raw
    message = read_eml(delivery.outbox_path)
    assert message["Subject"] == "SMS"
    assert message.get_content().rstrip("\n") == BODY
    assert (f"SMS to +447700900123 written to outbox/{delivery.outbox_path.name}"
            in [r.getMessage() for r in debug_logs.records])
    assert_no_secrets(debug_logs)


async def test_sms_by_email_through_smtp(
    tmp_path: Path, smtp_server: SMTPServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = smtp_settings(tmp_path, smtp_server.port, sms_gateway="email",
                             sms_email_domain="sms.example.org")
    delivery = await Messenger(settings).send_sms("+447700900123", BODY)
    assert delivery.channel == "sms-email" and delivery.outbox_path is None
    assert delivery.to == "447700900123@sms.example.org"
    [got] = smtp_server.recorder.messages
    assert got.rcpt_tos == ["447700900123@sms.example.org"]
    assert got.message.get_content().rstrip("\n") == BODY
    assert got.message["Message-ID"] == delivery.message_id
    assert_no_secrets(debug_logs)


async def test_sms_by_email_without_smtp_goes_to_the_outbox(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sms_gateway="email", sms_email_domain="sms.example.org")
    delivery = await Messenger(settings).send_sms("07700 900123", BODY)
    assert delivery.channel == "sms-email" and delivery.outbox_path is not None
    assert read_eml(delivery.outbox_path)["To"] == "07700900123@sms.example.org"


@dataclasses.dataclass
class Gateway:
    url: str
    requests: list[tuple[str | None, Any]]


@pytest.fixture
async def gateway(aiohttp_server: Callable[..., Any]) -> AsyncIterator[Gateway]:
    """An HTTP SMS gateway: records (Authorization, JSON); ``/fail`` answers 500,
    ``/slow`` never answers until the test ends, ``/plain`` answers 200 without JSON."""
    requests: list[tuple[str | None, Any]] = []
    release = asyncio.Event()

    async def send(request: web.Request) -> web.StreamResponse:
        requests.append((request.headers.get("Authorization"), await request.json()))
        if request.path == "/fail":
            return web.Response(status=500, text=f"upstream echoed {PASSCODE}")
        if request.path == "/slow":
            await release.wait()
        if request.path == "/plain":
            return web.Response(text="queued")
        return web.json_response({"id": "msg-0042", "status": "queued"})

    app = web.Application()
    app.router.add_post("/{tail:.*}", send)
    server = await aiohttp_server(app)
    yield Gateway(str(server.make_url("")).rstrip("/"), requests)
    release.set()  # before the server's own teardown waits for its handlers


async def test_sms_http_gateway(
    tmp_path: Path, gateway: Gateway, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, sms_gateway="http", sms_http_url=f"{gateway.url}/sms",
                             sms_http_token=TOKEN)
    delivery = await Messenger(settings).send_sms("+1 415-555-0100", BODY)
    assert delivery == Delivery("sms-http", "+14155550100", None, "msg-0042")
    assert gateway.requests == [(f"Bearer {TOKEN}", {"to": "+14155550100", "text": BODY})]
    assert not settings.outbox_dir.exists()
    assert_no_secrets(debug_logs)


async def test_sms_http_gateway_without_token_or_json_answer(
    tmp_path: Path, gateway: Gateway
) -> None:
    settings = make_settings(tmp_path, sms_gateway="http", sms_http_url=f"{gateway.url}/plain")
    delivery = await Messenger(settings).send_sms("+14155550100", "hi")
    assert delivery.channel == "sms-http" and delivery.message_id.startswith("<")
    assert gateway.requests == [(None, {"to": "+14155550100", "text": "hi"})]


async def test_sms_http_gateway_error_status(
    tmp_path: Path, gateway: Gateway, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, sms_gateway="http",
                             sms_http_url=f"{gateway.url}/fail?api_key=k-77", sms_http_token=TOKEN)
    with pytest.raises(DeliveryError, match="HTTP 500") as info:
        await Messenger(settings).send_sms("+14155550100", BODY)
    assert len(gateway.requests) == 1
    for secret in (PASSCODE, TOKEN, "k-77"):
        assert secret not in str(info.value)
    assert_no_secrets(debug_logs, "k-77")


async def test_sms_http_gateway_unreachable(tmp_path: Path, closed_port: int) -> None:
    settings = make_settings(tmp_path, sms_gateway="http",
                             sms_http_url=f"http://127.0.0.1:{closed_port}/sms")
    with pytest.raises(DeliveryError, match="failed"):
        await Messenger(settings).send_sms("+14155550100", BODY)


async def test_sms_http_gateway_timeout(
    tmp_path: Path, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messaging, "SMS_HTTP_TIMEOUT", 0.2)
    settings = make_settings(tmp_path, sms_gateway="http", sms_http_url=f"{gateway.url}/slow")
    with pytest.raises(DeliveryError, match="Timeout"):
        await Messenger(settings).send_sms("+14155550100", BODY)


# -- refused input -------------------------------------------------------------------------


@pytest.mark.parametrize(("to", "subject"), [
    ("patient@example.org\r\nBcc: all@example.org", "Hi"),
    ("patient@example.org\n", "Hi"),
    ("patient@example.org", "Hi\r\nBcc: all@example.org"),
    ("patient@example.org", "Hi\nthere"),
    ("patient@example.org", "Hi\rthere"),
])
async def test_header_injection_refused(tmp_path: Path, to: str, subject: str) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(ValueError, match="line breaks"):
        await Messenger(settings).send_email(to, subject, BODY)
    assert outbox_files(settings) == []


@pytest.mark.parametrize("address", [
    "", "patient", "a@b@example.org", "@example.org", "patient@", "two words@example.org",
    "a@example.org, b@example.org", "Name <a@example.org>", "a@example.org;b@x.org",
    "a\x00@example.org",
])
def test_bad_email_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="email address"):
        check_email(address)


async def test_bad_kind_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        await Messenger(make_settings(tmp_path)).send_email("a@example.org", "s", "t",
                                                           kind="x\ny")


@pytest.mark.parametrize("number", [
    "", "12345", "+1234567890123456", "++447700900123", "44 7700 90012a", "4477\n00900123",
    "+44(0)7700900123", "٤٤٧٧٠٠٩٠٠١٢٣", "+44 7700 900123\r\nX: y",
])
async def test_bad_phone_numbers(tmp_path: Path, number: str) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(ValueError, match="phone number"):
        await Messenger(settings).send_sms(number, BODY)
    assert outbox_files(settings) == []


@pytest.mark.parametrize(("number", "expected"), [
    ("+44 7700 900123", "+447700900123"), ("07700-900-123", "07700900123"),
    ("1234567", "1234567"), (" +123456789012345 ", "+123456789012345"),
    ("447700900123\n", "447700900123"),  # surrounding white space is dropped
])
def test_phone_numbers_are_normalised(number: str, expected: str) -> None:
    assert normalize_phone(number) == expected


# -- settings ------------------------------------------------------------------------------


def test_messaging_defaults(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path}, environ={})
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls) == ("", 587, "starttls")
    assert settings.mail_from == "iepnode@localhost" and settings.smtp_timeout == 30.0
    assert settings.sms_gateway == "outbox"
    assert settings.public_url == "http://localhost:8080" and settings.institution == "iepnode"
    assert (settings.transaction_expiry_days, settings.dashboard_days,
            settings.passcode_ttl_minutes) == (14, 28, 10)
    assert settings.outbox_dir == tmp_path / "outbox"


def test_messaging_toml_keys_and_env(tmp_path: Path) -> None:
    path = tmp_path / "iepnode.toml"
    path.write_text("""
[mail]
smtp_host = "mail.example.org"
smtp_port = 465
smtp_tls = "tls"
smtp_user = "iep"
from_address = "Imaging <imaging@example.org>"
timeout = 7.5
[sms]
gateway = "http"
email_domain = "sms.example.org"
http_url = "https://sms.example.org/api/send/"
[portal]
public_url = "https://share.example.org/iep/"
institution = "  St Elsewhere  "
expiry_days = 30
dashboard_days = 60
passcode_minutes = 5
""", encoding="utf-8")
    environ = {"IEPNODE_SMTP_PASSWORD": PASSWORD, "IEPNODE_SMS_HTTP_TOKEN": TOKEN}
    settings = load_settings(path, environ=environ)
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls) == (
        "mail.example.org", 465, "tls")
    assert (settings.smtp_user, settings.smtp_password) == ("iep", PASSWORD)
    assert settings.mail_from == "Imaging <imaging@example.org>"
    assert settings.smtp_timeout == 7.5
    assert settings.sms_gateway == "http" and settings.sms_email_domain == "sms.example.org"
    assert settings.sms_http_url == "https://sms.example.org/api/send"
    assert settings.sms_http_token == TOKEN
    assert settings.public_url == "https://share.example.org/iep"  # no trailing slash
    assert settings.institution == "St Elsewhere"
    assert (settings.transaction_expiry_days, settings.dashboard_days,
            settings.passcode_ttl_minutes) == (30, 60, 5)
    assert PASSWORD not in repr(settings) and TOKEN not in repr(settings)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"smtp_tls": "ssl"}, "smtp_tls 'ssl': one of starttls, tls, none"),
    ({"smtp_port": 0}, "smtp_port 0: must be 1-65535"),
    ({"smtp_host": "smtp://mail.example.org"}, "smtp_host"),
    ({"smtp_host": "mail.example.org:25"}, "the port is smtp_port"),
    ({"smtp_host": "::1"}, None),  # IPv6 addresses are fine
    ({"smtp_password": "x"}, "smtp_user is empty"),
    ({"smtp_timeout": 0}, "smtp_timeout"),
    ({"mail_from": "nobody"}, "mail_from"),
    ({"mail_from": "a@example.org\r\nBcc: b@example.org"}, "mail_from"),
    ({"sms_gateway": "carrier-pigeon"}, "sms_gateway 'carrier-pigeon': one of outbox"),
    ({"sms_gateway": "http"}, "needs sms_http_url"),
    ({"sms_gateway": "email"}, "needs sms_email_domain"),
    ({"sms_email_domain": "@sms.example.org"}, "sms_email_domain"),
    ({"sms_http_url": "ftp://sms.example.org/"}, "sms_http_url"),
    ({"public_url": "localhost:8080"}, "public_url"),
    ({"public_url": "https://"}, "public_url"),
    ({"public_url": "https://user:pw@share.example.org"}, "no user or password"),
    ({"public_url": "https://share.example.org/?a=1"}, "no query string"),
    ({"public_url": "https://share.example.org:99999"}, "public_url"),
    ({"public_url": "https://share.example.org/\nx"}, "public_url"),
    ({"institution": "  "}, "institution"),
    ({"transaction_expiry_days": 0}, "transaction_expiry_days 0: must be 1-3650"),
    ({"dashboard_days": 4000}, "dashboard_days"),
    ({"passcode_ttl_minutes": 61}, "passcode_ttl_minutes 61: must be 1-60"),
])
def test_bad_messaging_settings(overrides: dict[str, Any], message: str | None) -> None:
    if message is None:
        load_settings(overrides=overrides, environ={})
        return
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides, environ={})
    assert message in str(info.value)


def test_bad_messaging_values_from_env_and_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="passcode_ttl_minutes"):
        load_settings(environ={"IEPNODE_PASSCODE_TTL_MINUTES": "ten"})
    path = tmp_path / "iepnode.toml"
    path.write_text("[mail]\nport = 25\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'port' in \[mail\]"):
        load_settings(path, environ={})
