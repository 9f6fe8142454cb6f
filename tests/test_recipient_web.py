"""Recipient web pages: link -> passcode -> session -> dashboard, and every way to get it wrong.

The app runs in-process (aiohttp test client) over a :class:`Services` in ``tmp_path``.
Passcodes are read from the outbox (``DATA_DIR/outbox/*.eml``), or from a real
SMTP server (aiosmtpd) in one test. The session cookie is ``Secure``, which
aiohttp's cookie jar never sends over plain HTTP: a small :class:`Browser`
keeps cookies itself. Time is controlled by replacing the clock of
:mod:`iepnode.sharing.logins` (passcode expiry, rate limit, session timeouts).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from datetime import UTC
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iepnode.people.audit import events_for_transaction
from iepnode.services import Services
from iepnode.sharing import logins
from iepnode.sharing import transactions as tx
from iepnode.wiring import build_services
from storage.models import LoginAttempt, Recipient, Transaction, TransactionMessage, WebSession
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files as store
from tests.support.mail import Inbox
from tests.support.settings import make_settings
from web import recipient as pages
from web.app import create_app

CONTACT = tx.Contact("Dr Who", "Radiology", "radiology@hospital.example", "+441234567890")
SESSION = "__Host-iepnode"
PRELOGIN = "__Host-iepnode-csrf"


# -- fixtures and helpers -----------------------------------------------------------------


class Clock:
    """A stand-in for the ``time`` module inside :mod:`iepnode.sharing.logins`."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(logins, "time", fake)
    return fake


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store(services, factory.make_ct_series(
        tmp_path / "ct", 3, PatientName="Doe^Jane", PatientID="P1", PatientBirthDate="19800214",
        PatientSex="F", StudyDate="20240105", StudyDescription="CT HEAD", AccessionNumber="ACC1"))


def share(study_uids: list[str], email: str = "pat@example.org", *, now: float | None = None,
          **kw: Any) -> tuple[Transaction, str]:
    kw.setdefault("otp_mobile", "" if kw.get("otp_email") else "+447700900123")
    request = tx.NewTransfer(tuple(study_uids), email, **kw)
    return tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                              created_by="cli", now=now)




def field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no field {name!r} in the page"
    return match.group(1)


def outbox(services: Services) -> list[Path]:
    folder = services.settings.outbox_dir
    return sorted(folder.glob("*.eml")) if folder.exists() else []


def read_eml(path: Path) -> EmailMessage:
    with path.open("rb") as handle:
        return BytesParser(policy=policy.default).parse(handle)  # type: ignore[return-value]


def latest_code(services: Services) -> str:
    """The passcode of the newest message in the outbox."""
    message = read_eml(outbox(services)[-1])
    match = re.search(r"\b(\d{6})\b", message.get_content())
    assert match, "no passcode in the newest outbox message"
    return match.group(1)


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


@dataclass
class LoginPage:
    html: str
    attempt: str
    csrf: str


async def open_link(browser: Browser, token: str) -> LoginPage:
    response = await browser.get(f"/t/{token}")
    html = await response.text()
    assert response.status == 200, html
    return LoginPage(html, field(html, "attempt"), field(html, "csrf"))


async def submit(browser: Browser, token: str, page: LoginPage, code: str,
                 **extra: str) -> aiohttp.ClientResponse:
    data = {"attempt": page.attempt, "code": code, "csrf": page.csrf, **extra}
    return await browser.post(f"/t/{token}/login", data=data)


async def log_in(browser: Browser, services: Services, token: str) -> str:
    """Follow the link, type the passcode; return the session cookie value."""
    page = await open_link(browser, token)
    response = await submit(browser, token, page, latest_code(services))
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == "/dashboard"
    return browser.cookies[SESSION]


async def page_csrf(browser: Browser) -> str:
    response = await browser.get("/dashboard?tab=all")
    assert response.status == 200
    return field(await response.text(), "csrf")


def cells(html: str) -> list[str]:
    """Texts of the dashboard header cells."""
    head = re.search(r'<div class="tx-cols tx-head">(.*?)</div>', html, re.S)
    assert head, "no table header"
    return re.findall(r"<span>([^<]*)</span>", head.group(1))


# -- the happy path -----------------------------------------------------------------------


async def test_link_passcode_session_dashboard(browser: Browser, services: Services,
                                               study: str) -> None:
    transaction, token = share([study], message="Your CT from Monday.", nhs_number="9434765919")
    page = await open_link(browser, token)
    assert "A passcode has been sent to your" in page.html
    assert "mobile ending <strong>•••23</strong>" in page.html
    assert "+447700900123" not in page.html
    sms = read_eml(outbox(services)[-1])
    assert "+447700900123" in str(sms["To"]) and str(sms["To"]).startswith("sms:")
    assert PRELOGIN in browser.cookies and SESSION not in browser.cookies

    response = await submit(browser, token, page, latest_code(services))
    assert response.status == 303 and response.headers["Location"] == "/dashboard"
    assert SESSION in browser.cookies and PRELOGIN not in browser.cookies

    dashboard = await browser.get("/dashboard")
    html = await dashboard.text()
    assert dashboard.status == 200
    assert cells(html) == ["Type", "Dir.", "Date", "Patient name", "Institution", "Messages",
                           "Status", "Actions"]
    assert 'aria-current="page">Action Required' in html
    assert f'id="tx-{transaction.public_id}"' in html
    created = pages.format_epoch(transaction.created_at, services.settings.zone)
    for text in ("Transfer", "In", created, "DOE, Jane", "St Elsewhere", "New",
                 transaction.public_id, "14 Feb 1980", "Female", "P1", "9434765919",
                 "5 Jan 2024", "CT HEAD", "ACC1", "3 / 3", "Dr Who", "Radiology",
                 'href="mailto:radiology@hospital.example"', "Your CT from Monday.",
                 "1 new", "Decline this transaction",
                 pages.format_epoch(transaction.expires_at, services.settings.zone)):
        assert text in html, text
    assert f'href="/transactions/{transaction.public_id}/view">View<' in html  # issue 4
    assert f'href="/transactions/{transaction.public_id}/download"' in html  # issue 5
    assert f'href="/transactions/{transaction.public_id}/forward">Forward<' in html
    assert "3 of 3 forwards left" in html
    # Opening the dashboard showed the message: it is read now.
    html = await (await browser.get("/dashboard?tab=all")).text()
    assert "1 new" not in html and "DOE, Jane" in html
    home = await (await browser.get("/dashboard?tab=home")).text()
    assert "Action required" in home and "DOE, Jane" not in home

    actions = [(e.event_code, e.action, e.outcome)
               for e in events_for_transaction(transaction.public_id)]
    assert actions[0] == ("110114", "login", 0)
    assert actions.count(("110110", "view-transaction", 0)) == 2


async def test_transaction_page(browser: Browser, services: Services, study: str) -> None:
    transaction, token = share([study])
    await log_in(browser, services, token)
    response = await browser.get(f"/transactions/{transaction.public_id}")
    html = await response.text()
    assert response.status == 200
    assert "DOE, Jane" in html and "3 / 3" in html and "mailto:radiology@hospital.example" in html
    assert events_for_transaction(transaction.public_id)[-1].detail == "transaction page"


async def test_passcode_by_email_through_a_real_smtp_server(
    aiohttp_client: Any, tmp_path: Path, smtp: Inbox
) -> None:
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=smtp.port,
                             smtp_tls="none")
    services = build_services(settings)
    uid = store(services, factory.make_ct_series(tmp_path / "ct", 2, PatientName="Roe^Rick"))
    transaction, token = share([uid], otp_email="code@example.org")
    browser = Browser(await aiohttp_client(create_app(settings, services),
                                           cookie_jar=aiohttp.DummyCookieJar()))
    page = await open_link(browser, token)
    assert "email <strong>c•••@example.org</strong>" in page.html
    (mail,) = smtp.messages
    assert mail["To"] == "code@example.org" and outbox(services) == []
    code = re.search(r"\b(\d{6})\b", mail.get_content()).group(1)  # type: ignore[union-attr]
    response = await submit(browser, token, page, code)
    assert response.status == 303
    html = await (await browser.get("/dashboard")).text()
    assert "ROE, Rick" in html and transaction.public_id in html


# -- login refused --------------------------------------------------------------------------


async def test_unknown_link_is_404(browser: Browser, services: Services, study: str) -> None:
    response = await browser.get("/t/" + "x" * 32)
    assert response.status == 404
    assert "This link is not valid" in await response.text()
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert outbox(services) == []


async def test_head_on_a_link_sends_no_passcode(browser: Browser, services: Services,
                                                study: str) -> None:
    _, token = share([study])
    response = await browser.request("HEAD", f"/t/{token}")
    assert response.status == 405 and outbox(services) == []


async def test_link_token_alone_gives_no_access(browser: Browser, services: Services,
                                                study: str) -> None:
    _, token = share([study])
    await open_link(browser, token)
    assert SESSION not in browser.cookies
    for cookie in ({}, {"Cookie": f"{SESSION}={token}"}):
        response = await browser.get("/dashboard", headers=cookie)
        assert response.status == 303 and response.headers["Location"] == "/signin"
    signin = await browser.get("/signin")
    assert "open the link in your email again" in await signin.text()
    data = {"attempt": "", "code": "", "csrf": browser.cookies[PRELOGIN]}
    response = await browser.post(f"/t/{token}/login", data=data)
    assert response.status == 403 and SESSION not in browser.cookies


async def test_reused_passcode_is_refused(client: Any, services: Services, study: str) -> None:
    _, token = share([study])
    first = Browser(client)
    page = await open_link(first, token)
    code = latest_code(services)
    assert (await submit(first, token, page, code)).status == 303
    second = Browser(client)
    second.cookies[PRELOGIN] = page.csrf
    response = await submit(second, token, page, code)
    assert response.status == 403
    assert "This passcode has been used" in await response.text()
    assert SESSION not in second.cookies


async def test_expired_passcode_is_refused(browser: Browser, services: Services, study: str,
                                           clock: Clock) -> None:
    _, token = share([study])
    page = await open_link(browser, token)
    clock.advance(10 * 60 + 1)
    response = await submit(browser, token, page, latest_code(services))
    assert response.status == 403 and "expired" in await response.text()
    assert SESSION not in browser.cookies


async def test_sixth_try_is_refused_even_with_the_right_code(browser: Browser, services: Services,
                                                             study: str) -> None:
    _, token = share([study])
    page = await open_link(browser, token)
    code = latest_code(services)
    for left in (4, 3, 2, 1):
        response = await submit(browser, token, page, wrong(code))
        assert response.status == 403
        assert f"Wrong passcode ({left} tries left)" in await response.text()
    response = await submit(browser, token, page, wrong(code))
    assert "Too many wrong passcodes" in await response.text()
    response = await submit(browser, token, page, code)
    assert response.status == 403 and "Too many wrong passcodes" in await response.text()
    assert SESSION not in browser.cookies
    assert LoginAttempt.get_by_id(int(page.attempt)).dead


async def test_resend_is_rate_limited(browser: Browser, services: Services, study: str,
                                      clock: Clock) -> None:
    _, token = share([study])
    page = await open_link(browser, token)
    again = await browser.post(f"/t/{token}/resend", data={"csrf": page.csrf})
    html = await again.text()
    assert again.status == 200 and "less than 30 seconds ago" in html
    assert field(html, "attempt") == page.attempt and len(outbox(services)) == 1
    clock.advance(31)
    again = await browser.post(f"/t/{token}/resend", data={"csrf": page.csrf})
    html = await again.text()
    assert "A passcode has been sent" in html and len(outbox(services)) == 2
    newer = LoginPage(html, field(html, "attempt"), page.csrf)
    assert newer.attempt != page.attempt
    assert (await submit(browser, token, newer, latest_code(services))).status == 303


async def test_lockout_after_100_failures_until_staff_unlock(browser: Browser, services: Services,
                                                             study: str, clock: Clock) -> None:
    _, token = share([study])
    page = await open_link(browser, token)
    for round_ in range(20):
        if round_:
            clock.advance(31)
            response = await browser.post(f"/t/{token}/resend", data={"csrf": page.csrf})
            page = LoginPage("", field(await response.text(), "attempt"), page.csrf)
        code = latest_code(services)
        for _ in range(5):
            response = await submit(browser, token, page, wrong(code))
            assert response.status == 403
    html = await response.text()
    assert "Your access is locked" in html and 'href="mailto:radiology@hospital.example"' in html
    recipient = Recipient.get(Recipient.email == "pat@example.org")
    assert recipient.locked_at is not None and recipient.consecutive_failures == 100
    clock.advance(31)
    sent = len(outbox(services))
    response = await browser.get(f"/t/{token}")
    assert response.status == 403 and "Your access is locked" in await response.text()
    assert len(outbox(services)) == sent
    logins.unlock(recipient)
    await log_in(browser, services, token)
    assert (await browser.get("/dashboard")).status == 200


# -- sessions and cookies -------------------------------------------------------------------


async def test_cookie_flags_and_a_new_value_at_each_login(browser: Browser, services: Services,
                                                          study: str, clock: Clock) -> None:
    _, token = share([study])
    first = await log_in(browser, services, token)
    (header,) = [h for h in browser.set_cookies if h.startswith(f"{SESSION}=")]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}
    assert attributes == {"httponly", "path", "samesite", "secure"}
    assert "Path=/" in header and "SameSite=Lax" in header and "Domain" not in header
    assert len(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))) >= 16
    assert first != token
    clock.advance(31)
    second = await log_in(browser, services, token)
    assert second != first
    with pytest.raises(Exception, match="no session"):
        logins.resume_session(first)
    response = await browser.get("/dashboard", headers={"Cookie": f"{SESSION}={first}"})
    assert response.status == 303


async def test_session_idle_and_absolute_expiry(client: Any, services: Services, study: str,
                                                clock: Clock) -> None:
    _, token = share([study])
    idle = Browser(client)
    await log_in(idle, services, token)
    clock.advance(29 * 60)
    assert (await idle.get("/dashboard")).status == 200
    clock.advance(30 * 60 + 1)
    response = await idle.get("/dashboard")
    assert response.status == 303 and response.headers["Location"] == "/signin"

    clock.advance(31)
    busy = Browser(client)
    await log_in(busy, services, token)
    for _ in range(35):
        clock.advance(20 * 60)
        assert (await busy.get("/dashboard")).status == 200
    clock.advance(20 * 60 + 1)  # 12 h after login, with activity every 20 minutes
    response = await busy.get("/dashboard")
    assert response.status == 303 and response.headers["Location"] == "/signin"


async def test_logout_kills_the_cookie(browser: Browser, services: Services, study: str) -> None:
    _, token = share([study])
    value = await log_in(browser, services, token)
    csrf = await page_csrf(browser)
    response = await browser.post("/logout", data={"csrf": csrf})
    assert response.status == 200 and "You are logged out" in await response.text()
    cleared = [h for h in browser.set_cookies if h.startswith(f"{SESSION}=")][-1]
    assert "Max-Age=0" in cleared and "Secure" in cleared and "Path=/" in cleared
    assert SESSION not in browser.cookies
    response = await browser.get("/dashboard", headers={"Cookie": f"{SESSION}={value}"})
    assert response.status == 303
    assert WebSession.get(WebSession.csrf_token == csrf).ended


async def test_security_headers_on_every_page(browser: Browser, services: Services,
                                              study: str) -> None:
    _, token = share([study])
    pages_seen = [await browser.get(f"/t/{token}"), await browser.get("/signin"),
                  await browser.get("/t/unknown-token-0000000000000")]
    await log_in(browser, services, token)
    for path in ("/dashboard", "/dashboard?tab=home", "/transactions/IEP00000000",
                 "/dashboard?tab=all"):
        pages_seen.append(await browser.get(path))
    for response in pages_seen:
        assert response.headers["Referrer-Policy"] == "no-referrer"
        csp = response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        html = await response.text()
        assert "<script" not in html and "style=" not in html and "<style" not in html


# -- authorisation and CSRF -----------------------------------------------------------------


async def test_another_recipients_transaction_is_404(browser: Browser, services: Services,
                                                     study: str) -> None:
    mine, token = share([study])
    theirs, _ = share([study], "someone@example.org", otp_mobile="+447700900999")
    await log_in(browser, services, token)
    csrf = await page_csrf(browser)
    before = TransactionMessage.select().where(TransactionMessage.transaction == theirs.id).count()
    for path, data in ((f"/transactions/{theirs.public_id}/messages", {"body": "hi"}),
                       (f"/transactions/{theirs.public_id}/decline", {"reason": "no"}),
                       ("/transactions/IEP00000000/decline", {"reason": "no"})):
        response = await browser.post(path, data={**data, "csrf": csrf})
        assert response.status == 404, path
    assert (await browser.get(f"/transactions/{theirs.public_id}")).status == 404
    assert (await browser.get("/transactions/not-an-id")).status == 404
    html = await (await browser.get("/dashboard?tab=all")).text()
    assert mine.public_id in html and theirs.public_id not in html
    assert Transaction.get_by_id(theirs.id).status == tx.NEW
    after = TransactionMessage.select().where(TransactionMessage.transaction == theirs.id).count()
    assert after == before


async def test_missing_or_wrong_csrf_token_is_refused(browser: Browser, services: Services,
                                                      study: str) -> None:
    transaction, token = share([study])
    page = await open_link(browser, token)
    for csrf in ("", "forged"):
        response = await submit(browser, token, page, latest_code(services), csrf=csrf)
        assert response.status == 403 and SESSION not in browser.cookies
    assert LoginAttempt.get_by_id(int(page.attempt)).tries == 0
    await log_in_with(browser, token, page, services)
    good = await page_csrf(browser)
    for data in ({}, {"csrf": ""}, {"csrf": page.csrf}, {"csrf": good[:-1]}):
        for path, body in ((f"/transactions/{transaction.public_id}/messages", {"body": "hi"}),
                           (f"/transactions/{transaction.public_id}/decline", {"reason": "x"}),
                           ("/logout", {})):
            response = await browser.post(path, data={**body, **data})
            assert response.status == 403, (path, data)
    assert Transaction.get_by_id(transaction.id).status == tx.NEW
    assert list(Transaction.get_by_id(transaction.id).messages) == []
    assert (await browser.get("/dashboard")).status == 200


async def log_in_with(browser: Browser, token: str, page: LoginPage, services: Services) -> None:
    response = await submit(browser, token, page, latest_code(services))
    assert response.status == 303


# -- what a recipient can do ----------------------------------------------------------------


async def test_messages_are_escaped_and_threaded(browser: Browser, services: Services,
                                                 study: str) -> None:
    transaction, token = share([study], message="Hello from radiology")
    Transaction.update(patient_name="<script>alert(1)</script>^Jane").where(
        Transaction.id == transaction.id).execute()
    await log_in(browser, services, token)
    csrf = await page_csrf(browser)
    response = await browser.post(f"/transactions/{transaction.public_id}/messages",
                                  data={"body": "<script>alert('x')</script> thanks\nline 2",
                                        "csrf": csrf, "tab": "action"})
    assert response.status == 303
    assert response.headers["Location"] == (
        f"/dashboard?tab=action&open={transaction.public_id}#tx-{transaction.public_id}")
    tx.add_message(Transaction.get_by_id(transaction.id), "staff", "Dr Who", "Reply <b>bold</b>")
    html = await (await browser.get(response.headers["Location"])).text()
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;SCRIPT&gt;ALERT(1)&lt;/SCRIPT&gt;, Jane" in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; thanks\nline 2" in html
    assert f'id="tx-{transaction.public_id}" open' in html and "1 new" in html
    bodies = [m.body for m in Transaction.get_by_id(transaction.id).messages.order_by(
        TransactionMessage.id)]
    assert bodies[0] == "Hello from radiology" and bodies[2] == "Reply <b>bold</b>"
    assert html.index("Hello from radiology") < html.index("thanks") < html.index("Reply")
    empty = await browser.post(f"/transactions/{transaction.public_id}/messages",
                               data={"body": "   ", "csrf": csrf})
    assert empty.status == 400
    assert [e.action for e in events_for_transaction(transaction.public_id)].count("message") == 1


async def test_decline_with_a_reason(browser: Browser, services: Services, study: str) -> None:
    transaction, token = share([study])
    await log_in(browser, services, token)
    csrf = await page_csrf(browser)
    path = f"/transactions/{transaction.public_id}/decline"
    response = await browser.post(path, data={"reason": "  ", "csrf": csrf})
    assert response.status == 400
    assert Transaction.get_by_id(transaction.id).status == tx.NEW
    response = await browser.post(path, data={"reason": "Not my patient", "csrf": csrf})
    assert response.status == 303
    assert response.headers["Location"].startswith("/dashboard?tab=all&open=")
    html = await (await browser.get(response.headers["Location"])).text()
    assert "Declined: Not my patient" in html and 'status-declined">Declined<' in html
    assert "Decline this transaction" not in html
    action = await (await browser.get("/dashboard?tab=action")).text()
    assert transaction.public_id not in action and "Nothing needs your attention" in action
    assert (await browser.post(path, data={"reason": "again", "csrf": csrf})).status == 400
    (event,) = [e for e in events_for_transaction(transaction.public_id) if e.action == "decline"]
    assert (event.event_code, event.event_name, event.actor) == (
        "110110", "Patient Record", "pat@example.org")
    assert "Not my patient" not in event.detail


async def test_purge_after_expiry_keeps_studies_shared_elsewhere(
    browser: Browser, services: Services, study: str, tmp_path: Path
) -> None:
    only_here = store(services, factory.make_ct_series(tmp_path / "b", 2, PatientID="P1",
                                                   PatientName="Doe^Jane"))
    objects = services.settings.store_dir
    assert len([p for p in objects.rglob("*") if p.is_file()]) == 5
    expired, old_token = share([study, only_here], now=time.time() - 2 * tx.DAY, expiry_days=1)
    _, token = share([study], "gp@example.org", otp_mobile="+447700900999")
    assert services.sharing.purge_expired() == 2
    files = [p for p in objects.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert (services.archive.study(only_here) is None
            and services.archive.study(study).num_instances == 3)
    assert Transaction.get_by_id(expired.id).status == tx.EXPIRED
    assert (await browser.get(f"/t/{old_token}")).status == 404
    await log_in(browser, services, token)
    html = await (await browser.get("/dashboard?tab=all")).text()
    assert "3 / 3" in html


def test_formatting() -> None:
    assert pages.format_pn("Doe^Jane") == "DOE, Jane"
    assert pages.format_pn("Müller^Jürgen^K^Dr^Jr") == "MÜLLER, Dr Jürgen K Jr"
    assert pages.format_pn("=山田^太郎") == "山田, 太郎"
    assert pages.format_pn("") == "—"
    assert pages.format_da("20261123") == "23 Nov 2026"
    assert pages.format_da("20240105") == "5 Jan 2024"
    assert pages.format_da("2024") == "2024" and pages.format_da("") == "—"
    assert pages.format_epoch(1_795_392_000.0, UTC) == "23 Nov 2026"
    assert pages.format_epoch(None, UTC) == "—"
    assert pages.mask_destination("sms", "+447700900123") == "•••23"
    assert pages.mask_destination("email", "anna@example.org") == "a•••@example.org"
