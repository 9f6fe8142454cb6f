"""Staff pages under /admin: password + TOTP login, studies, sharing, audit, AEs, users.

The app runs in-process (aiohttp test client) over a :class:`Services` in ``tmp_path``;
staff users are created with :func:`iepnode.people.staff.create_user` and log in with
codes from ``pyotp``. The session cookie is ``Secure``, which aiohttp's cookie
jar never sends over plain HTTP, so a small :class:`Browser` keeps cookies itself.
A TOTP code is accepted once per user: a second login of the same user in a test
uses the previous 30-second step's code (still inside the verification window).
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pyotp
import pytest

from config import Settings, load_settings
from iepnode.errors import LoginRefused
from iepnode.people import audit, staff
from iepnode.people.staff_logins import LOGIN_REFUSED, LoginThrottle, LoginThrottled
from iepnode.services import Services
from iepnode.sharing import logins
from iepnode.sharing.transactions import NewTransfer
from iepnode.staff_side import build_staff_side
from iepnode.wiring import build_services
from storage import registry
from storage.models import AuditEvent, Recipient, StaffUser, Transaction, WebSession
from tests import data_factory as factory
from tests.support.browser import Browser, input_value
from tests.support.ingest import store_files as store

SESSION = "__Host-iepnode"
PASSWORD = "correct horse battery"
REFUSED = html.escape(LOGIN_REFUSED)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The services' settings; a test may add some with ``indirect`` parametrization."""
    extra = getattr(request, "param", {})
    return load_settings(overrides={"data_dir": tmp_path / "data", **extra}, environ={})


@pytest.fixture
def services(settings: Settings) -> Services:
    services = build_services(settings)
    services.admin.logins.failure_delay = 0.0
    return services


@pytest.fixture
def studies(services: Services, tmp_path: Path) -> dict[str, str]:
    """Three patients' studies: Jane (Jan 2024), John (Feb 2024), a hostile name (2023)."""
    return {
        "jane": store(services, factory.make_ct_series(
            tmp_path / "jane", 3, PatientName="Doe^Jane", PatientID="P1", StudyDate="20240105",
            AccessionNumber="ACC1", StudyDescription="CT chest")),
        "john": store(services, factory.make_ct_series(
            tmp_path / "john", 2, PatientName="DOE^JOHN", PatientID="P2", StudyDate="20240210",
            AccessionNumber="ACC2")),
        "evil": store(services, factory.make_ct_series(
            tmp_path / "evil", 1, PatientName="<script>alert(1)</script>^Eve", PatientID="P3",
            StudyDate="20230101", AccessionNumber="ACC3")),
    }


def make_user(username: str, *, is_admin: bool = False, **kw: Any) -> tuple[StaffUser, str]:
    """Create a staff user; return it and its TOTP secret."""
    user, uri = staff.create_user(username, PASSWORD, is_admin=is_admin,
                                  display_name=kw.pop("display_name", f"Dr {username.title()}"),
                                  **kw)
    return user, parse_qs(urlsplit(uri).query)["secret"][0]




def shown_studies(page: str) -> set[str]:
    return set(re.findall(r'name="study" value="([^"]+)"', page))


async def log_in(browser: Browser, username: str, secret: str, *, password: str = PASSWORD,
                 code: str | None = None, next_url: str = "") -> aiohttp.ClientResponse:
    """Open the login form (pre-login CSRF cookie) and submit it."""
    url = f"/admin/login?next={next_url}" if next_url else "/admin/login"
    form_page = await browser.page(url)
    data = {"csrf": input_value(form_page, "csrf"), "next": input_value(form_page, "next"),
            "username": username, "password": password,
            "code": pyotp.TOTP(secret).now() if code is None else code}
    return await browser.post("/admin/login", data=data)


#: The pages' own script tags (external files only: the CSP forbids inline scripts).
OWN_SCRIPTS = ('<script src="/static/sends.js" defer></script>',)


def without_own_scripts(page: str) -> str:
    """The page without its own ``<script src>`` tags (to look for injected ones)."""
    for tag in OWN_SCRIPTS:
        page = page.replace(tag, "")
    return page


def previous_code(secret: str) -> str:
    return pyotp.TOTP(secret).at(time.time() - 30)


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id))


@pytest.fixture
async def admin(browser: Browser) -> Browser:
    """A browser logged in as an administrator ``boss``."""
    _, secret = make_user("boss", is_admin=True, display_name="Dr Boss")
    response = await log_in(browser, "boss", secret)
    assert response.status == 303
    return browser


# -- login ---------------------------------------------------------------------------------


async def test_login_with_password_and_totp_sets_a_hardened_cookie(browser: Browser) -> None:
    _, secret = make_user("alice", is_admin=True)
    first = await browser.get("/admin")
    assert first.status == 303 and first.headers["Location"] == "/admin/login?next=/admin"

    response = await log_in(browser, "Alice", secret)
    assert response.status == 303 and response.headers["Location"] == "/admin"
    (header,) = [h for h in browser.set_cookies if h.startswith(f"{SESSION}=")]
    flags = [part.strip().lower() for part in header.split(";")]
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= set(flags)
    assert not any(flag.startswith("domain") for flag in flags)
    assert len(browser.cookies[SESSION]) >= 32

    home = await browser.page("/admin")
    assert "Transactions" in home and "Log out" in home and "Dr Alice" in home
    (event,) = events("login")
    assert (event.event_code, event.actor_kind, event.actor) == ("110114", "staff", "alice")
    assert event.outcome == audit.SUCCESS and event.source_ip == "127.0.0.1"


async def test_login_returns_to_the_page_asked_for_and_nowhere_else(browser: Browser) -> None:
    _, secret = make_user("alice")
    response = await log_in(browser, "alice", secret, next_url="/admin/audit")
    assert response.headers["Location"] == "/admin/audit"
    other = Browser(browser.client)
    response = await log_in(other, "alice", secret, code=previous_code(secret),
                            next_url="https://evil.example/admin")
    assert response.headers["Location"] == "/admin"


async def test_every_failed_login_gets_one_message(browser: Browser, services: Services) -> None:
    _, secret = make_user("alice")
    disabled, disabled_secret = make_user("carol")
    disabled.disabled = True
    disabled.save()
    wrong_code = f"{(int(pyotp.TOTP(secret).now()) + 1) % 1_000_000:06d}"
    attempts = [
        ("alice", "wrong password!!", None, secret),
        ("alice", PASSWORD, wrong_code, secret),
        ("carol", PASSWORD, None, disabled_secret),
        ("nobody", PASSWORD, "123456", secret),
        ("alice", PASSWORD, "", secret),
    ]
    for username, password, code, user_secret in attempts:
        response = await log_in(browser, username, user_secret, password=password, code=code)
        assert response.status == 403, username
        page = await response.text()
        assert REFUSED in page
        assert SESSION not in browser.cookies
    failures = events("login-failed")
    assert len(failures) == len(attempts)
    assert {e.outcome for e in failures} == {audit.MINOR_FAILURE}
    assert [e.detail for e in failures[2:4]] == ["account disabled", "unknown user"]
    assert not events("login")


async def test_a_totp_code_works_once(browser: Browser) -> None:
    _, secret = make_user("alice")
    code = pyotp.TOTP(secret).now()
    assert (await log_in(browser, "alice", secret, code=code)).status == 303
    again = await log_in(Browser(browser.client), "alice", secret, code=code)
    assert again.status == 403 and REFUSED in await again.text()


async def test_failed_logins_lock_the_username_for_a_while(browser: Browser,
                                                           services: Services) -> None:
    _, secret = make_user("alice")
    _, bob_secret = make_user("bob")
    # 3 s: long enough that the next request lands inside it even on a loaded machine
    services.admin.logins.throttle = LoginThrottle(max_failures=5, lockout=3.0)
    for _ in range(5):
        response = await log_in(browser, "alice", secret, password="guess guess guess")
        assert response.status == 403
    locked = await log_in(browser, "alice", secret)  # right password and code, still refused
    assert locked.status == 429 and "Too many failed logins" in await locked.text()
    (alert,) = events("login-locked")
    assert alert.event_code == "110113" and alert.actor == "alice"
    bob = Browser(browser.client)
    assert (await log_in(bob, "bob", bob_secret)).status == 303  # others unaffected

    for _ in range(5):  # unknown usernames lock the same way: nothing to enumerate
        await log_in(browser, "ghost", secret)
    assert (await log_in(browser, "ghost", secret)).status == 429

    # the lockout ends by itself: poll (a locked attempt checks nothing, uses no code)
    deadline = time.monotonic() + 30
    while True:
        later = await log_in(Browser(browser.client), "alice", secret,
                             code=previous_code(secret))
        if later.status != 429 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert later.status == 303


def test_lockouts_and_used_codes_are_shared_by_all_web_processes(services: Services) -> None:
    """Each HTTP process has its own staff services: the counts and used codes are in the DB."""
    _, secret = make_user("alice")
    other_process = build_staff_side(services.settings, lambda: services.secret, services.messenger)
    code = pyotp.TOTP(secret).now()
    services.admin.logins.log_in("alice", PASSWORD, code)
    with pytest.raises(LoginRefused):
        other_process.logins.log_in("alice", PASSWORD, code)
    for service in [services.admin, other_process] * 2 + [services.admin]:
        with pytest.raises(LoginRefused):
            service.logins.log_in("carol", "wrong password", "000000")
    with pytest.raises(LoginThrottled):
        other_process.logins.log_in("carol", "wrong password", "000000")


async def test_failed_logins_are_answered_slowly(browser: Browser, services: Services) -> None:
    _, secret = make_user("alice")
    services.admin.logins.failure_delay = 0.3
    started = time.monotonic()
    response = await log_in(browser, "alice", secret, password="not the password")
    assert response.status == 403 and time.monotonic() - started >= 0.3


async def test_logout_ends_the_session(admin: Browser) -> None:
    token = admin.cookies[SESSION]
    response = await admin.form("/admin/logout", {})
    assert response.status == 303 and response.headers["Location"] == "/admin/login?out=1"
    assert SESSION not in admin.cookies
    assert WebSession.get(WebSession.token_hash == logins.token_hash(token)).ended
    again = await admin.get("/admin", headers={"Cookie": f"{SESSION}={token}"})
    assert again.status == 303
    assert events("logout")[0].actor == "boss"


# -- who may see what ----------------------------------------------------------------------


async def test_a_recipient_session_opens_no_staff_page(browser: Browser, services: Services,
                                                       studies: dict[str, str]) -> None:
    await services.sharing.share(NewTransfer((studies["jane"],), "pat@example.org",
                                 otp_mobile="+447700900123"), actor=audit.Actor("cli", "t"))
    recipient = Recipient.get(Recipient.email == "pat@example.org")
    opened = logins.open_session(recipient)
    browser.cookies[SESSION] = opened.token
    for path in ("/admin", "/admin/studies", "/admin/users", "/admin/aes", "/admin/audit",
                 f"/admin/transactions/{Transaction.get().public_id}"):
        response = await browser.get(path)
        assert response.status == 303, path
        assert response.headers["Location"].startswith("/admin/login")
    response = await browser.post("/admin/aes", data={
        "csrf": opened.csrf_token, "ae_title": "EVIL", "host": "*", "port": "104"})
    assert response.status == 303 and registry.list_remote_aes() == []
    _, secret = make_user("alice")  # staff who are also recipients can still log in
    assert (await log_in(browser, "alice", secret)).status == 303
    assert browser.cookies[SESSION] != opened.token
    assert WebSession.get(WebSession.id == opened.session.id).ended
    assert (await browser.get("/admin")).status == 200


async def test_staff_who_are_not_admins_get_403_on_admin_pages(browser: Browser) -> None:
    _, secret = make_user("nurse")
    await log_in(browser, "nurse", secret)
    home = await browser.page("/admin")
    assert 'href="/admin/users"' not in home and 'href="/admin/studies"' in home
    for path in ("/admin/users", "/admin/aes"):
        assert "administrators only" in await browser.page(path, status=403)
    response = await browser.form("/admin/aes", {"ae_title": "PACS", "host": "*",
                                                 "port": "104"})
    assert response.status == 403 and registry.list_remote_aes() == []
    response = await browser.form("/admin/users", {"username": "mallory",
                                                   "password": "x" * 20, "is_admin": "1"})
    assert response.status == 403
    assert not StaffUser.select().where(StaffUser.username == "mallory").exists()


async def test_posts_without_the_csrf_token_are_refused(admin: Browser, services: Services,
                                                        studies: dict[str, str]) -> None:
    for token in (None, "forged"):
        data = {"ae_title": "PACS", "host": "10.0.0.5", "port": "104", "allow": "store"}
        if token:
            data["csrf"] = token
        assert (await admin.post("/admin/aes", data=data)).status == 403
        share = {"study": studies["jane"], "recipient_email": "pat@example.org",
                 "channel": "sms", "otp_mobile": "+447700900123"}
        if token:
            share["csrf"] = token
        assert (await admin.post("/admin/transfers", data=share)).status == 403
    assert registry.list_remote_aes() == [] and Transaction.select().count() == 0
    # The login form needs its double-submit cookie too.
    fresh = Browser(admin.client)
    response = await fresh.post("/admin/login", data={"csrf": "x", "username": "boss",
                                                      "password": PASSWORD, "code": "123456"})
    assert response.status == 403 and not events("login-failed")


# -- studies and sharing ---------------------------------------------------------------------


async def test_study_search_matches_like_c_find(admin: Browser,
                                                studies: dict[str, str]) -> None:
    jane, john, evil = studies["jane"], studies["john"], studies["evil"]
    assert shown_studies(await admin.page("/admin/studies")) == {jane, john, evil}
    cases = {
        "doe": {jane, john},          # prefix, case-insensitive
        "DOE^J*": {jane, john},
        "*jane*": {jane},
        "d?e^jo*": {john},
        "Doe, Jane": {jane},
        "P2": {john},                 # patient ID
        "ACC3": {evil},               # accession number
        "P": set(),                   # IDs match exactly
        "jane": set(),                # names match from the start
    }
    for q, expected in cases.items():
        page = await admin.page(f"/admin/studies?q={q.replace('^', '%5E')}")
        assert shown_studies(page) == expected, q
    page = await admin.page("/admin/studies?from=2024-01-01&to=2024-01-31")
    assert shown_studies(page) == {jane}
    assert shown_studies(await admin.page("/admin/studies?from=2024-01-06")) == {john}
    assert shown_studies(await admin.page("/admin/studies?to=2023-12-31")) == {evil}
    assert shown_studies(await admin.page("/admin/studies?q=doe&to=2024-01-31")) == {jane}
    page = await admin.page("/admin/studies?q=p1")
    assert "DOE, Jane" not in page
    page = await admin.page("/admin/studies?q=P1")
    assert "DOE, Jane" in page and "CT chest" in page and "2024-01-05" in page
    bad = await admin.page("/admin/studies?from=2024-13-45", status=400)
    assert "is not a date" in bad
    bad = await admin.page("/admin/studies?from=2024-02-01&to=2024-01-01", status=400)
    assert "ends before it starts" in bad
    searches = events("study-search")
    assert searches and searches[0].event_code == "110112" and searches[0].actor == "boss"


async def test_share_from_the_form_creates_a_transaction_and_emails_the_link(
        admin: Browser, services: Services, studies: dict[str, str]) -> None:
    response = await admin.form("/admin/transfers", {
        "study": studies["jane"], "recipient_email": "Pat@Example.org",
        "recipient_name": "Pat Doe", "channel": "sms", "otp_mobile": "+44 7700 900123",
        "otp_email": "ignored@example.org", "message": "Your CT from Monday.",
        "priority": "URGENT", "expiry_days": "7"})
    assert response.status == 303
    transaction = Transaction.get()
    assert response.headers["Location"] == (
        f"/admin/transactions/{transaction.public_id}?done=created")
    assert (transaction.priority, transaction.created_by) == ("URGENT", "boss")
    assert transaction.contact_name == "Dr Boss"
    assert round((transaction.expires_at - transaction.created_at) / 86400) == 7
    recipient = transaction.recipient
    assert (recipient.email, recipient.otp_mobile, recipient.otp_email) == (
        "pat@example.org", "+447700900123", "")
    (mail,) = sorted((services.settings.data_dir / "outbox").glob("*.eml"))
    text = mail.read_text()
    assert "To: pat@example.org" in text and "/t/" in text

    page = await admin.page(response.headers["Location"])
    assert transaction.public_id in page and "Transaction created" in page
    assert "Your CT from Monday." in page and "DOE, Jane" in page
    trail = page[page.index('id="audit"'):]
    assert "transfer-create" in trail and "110106" in trail and "boss" in trail
    assert "view-transaction" in trail
    listing = await admin.page("/admin")
    assert transaction.public_id in listing and "pat@example.org" in listing
    assert transaction.public_id in await admin.page("/admin?q=pat%20doe")
    assert transaction.public_id not in await admin.page("/admin?q=nobody")


async def test_the_default_expiry_comes_from_the_settings(admin: Browser, services: Services,
                                                          studies: dict[str, str]) -> None:
    page = await admin.page("/admin/studies")
    assert input_value(page, "expiry_days") == str(services.settings.transaction_expiry_days)
    response = await admin.form("/admin/transfers", {
        "study": studies["john"], "recipient_email": "pat@example.org", "channel": "email",
        "otp_email": "pat.second@example.org", "priority": "NORMAL", "expiry_days": ""})
    assert response.status == 303
    transaction = Transaction.get()
    days = (transaction.expires_at - transaction.created_at) / 86400
    assert round(days) == services.settings.transaction_expiry_days
    assert transaction.recipient.otp_email == "pat.second@example.org"


@pytest.mark.parametrize(("change", "message"), [
    ({"study": []}, "choose at least one study"),
    ({"recipient_email": "not-an-email"}, "not an email address"),
    ({"otp_mobile": ""}, "exactly one passcode channel"),
    ({"otp_mobile": "call me"}, "not a mobile number"),
    ({"channel": ""}, "choose where the passcode goes"),
    ({"channel": "email", "otp_email": "pat@example.org"}, "must differ"),
    ({"expiry_days": "soon"}, "whole number of days"),
    ({"expiry_days": "0"}, "expiry must be 1 to 3650 days"),
    ({"priority": "HIGH"}, "priority must be one of"),
    ({"study": ["jane", "john"]}, "studies of one patient only"),
    ({"study": ["1.2.3.4"]}, "unknown study"),
])
async def test_bad_share_input_is_shown_on_the_form_and_creates_nothing(
        admin: Browser, services: Services, studies: dict[str, str], change: dict[str, Any],
        message: str) -> None:
    data: dict[str, Any] = {"study": ["jane"], "recipient_email": "pat@example.org",
                            "channel": "sms", "otp_mobile": "+447700900123",
                            "priority": "NORMAL", "expiry_days": "14",
                            "message": "Hello <b>there</b>"}
    data.update(change)
    items = [(k, v) for k, v in data.items() if k != "study"]
    items += [("study", studies.get(s, s)) for s in data["study"]]
    response = await admin.form("/admin/transfers", items)
    assert response.status == 400
    page = await response.text()
    assert html.escape(message, quote=True) in page or message in page
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in page  # the form keeps what was typed
    assert Transaction.select().count() == 0
    assert not list((services.settings.data_dir / "outbox").glob("*.eml"))
    assert shown_studies(page) <= set(studies.values())


# -- transaction page --------------------------------------------------------------------------


async def test_staff_reply_and_unlock_a_locked_recipient(admin: Browser, services: Services,
                                                         studies: dict[str, str]) -> None:
    created = await services.sharing.share(NewTransfer((studies["jane"],), "pat@example.org",
                                           otp_mobile="+447700900123"),
                               actor=audit.Actor("cli", "t"))
    url = f"/admin/transactions/{created.public_id}"
    Recipient.update(locked_at=time.time(), consecutive_failures=100).execute()
    page = await admin.page(url)
    assert "Unlock recipient" in page and "Locked" in page

    response = await admin.form(f"{url}/unlock", {})
    assert response.status == 303 and response.headers["Location"] == f"{url}?done=unlocked"
    recipient = Recipient.get()
    assert recipient.locked_at is None and recipient.consecutive_failures == 0
    page = await admin.page(response.headers["Location"])
    assert "Unlock recipient" not in page and "recipient is unlocked" in page
    (event,) = events("recipient-unlock")
    assert (event.actor, event.transaction_public_id, event.patient_id) == (
        "boss", created.public_id, "P1")
    assert "recipient-unlock" in page[page.index('id="audit"'):]
    assert (await admin.form(f"{url}/unlock", {})).status == 400  # not locked any more

    response = await admin.form(f"{url}/messages", {"body": "Call us <script>x()</script>"})
    assert response.status == 303
    page = await admin.page(url)
    assert "Call us &lt;script&gt;x()&lt;/script&gt;" in page
    assert "<script" not in without_own_scripts(page)
    assert events("message")[0].detail == "staff reply"
    response = await admin.form(f"{url}/messages", {"body": "   "})
    assert response.status == 400 and "a message has 1 to" in await response.text()
    assert (await admin.get("/admin/transactions/IEP00000000")).status == 404
    assert (await admin.get("/admin/transactions/../../etc")).status == 404


async def test_pages_escape_hostile_names_and_messages(admin: Browser, services: Services,
                                                       studies: dict[str, str]) -> None:
    await services.sharing.share(NewTransfer((studies["evil"],), "pat@example.org",
                                 otp_mobile="+447700900123", recipient_name="<i>Pat</i>",
                                 message="<script>alert('msg')</script>"),
                     actor=audit.Actor("cli", "t"))
    await log_in(Browser(admin.client), "<script>alert(2)</script>", "A" * 32)
    public_id = Transaction.get().public_id
    for path in ("/admin", "/admin/studies", f"/admin/transactions/{public_id}",
                 "/admin/audit", "/admin/studies?q=%3Cscript%3E*"):
        page = await admin.page(path)
        assert "<script" not in without_own_scripts(page).lower() and "<i>" not in page, path
        assert "&lt;script&gt;" in page.lower(), path


# -- audit log ---------------------------------------------------------------------------------


async def test_audit_log_is_paged_and_filtered(admin: Browser) -> None:
    for n in range(120):
        audit.record(audit.INSTANCES_ACCESSED, "download", audit.Actor(
            "recipient", f"r{n % 3}@example.org", "10.1.1.1"), patient_id=f"PAT{n % 2}",
            now=1_800_000_000.0 + n)
    first = await admin.page("/admin/audit")
    total = AuditEvent.select().count()
    assert f"{total} events, newest first" in first and "Page 1 of 3" in first
    assert first.count("<tr>") == 1 + 50
    assert 'href="/admin/audit?page=2"' in first
    last = await admin.page("/admin/audit?page=3")
    assert last.count("<tr>") == 1 + total - 100 and 'rel="next"' not in last
    page = await admin.page("/admin/audit?actor=R1%40EXAMPLE&action=download&patient=PAT0")
    assert "20 events" in page
    assert "actor=R1%40EXAMPLE&amp;action=download&amp;patient=PAT0&amp;page=" not in page
    assert (await admin.get("/admin/audit?page=x")).status == 200


# -- remote AEs --------------------------------------------------------------------------------


async def test_remote_aes_are_added_updated_and_removed(admin: Browser) -> None:
    response = await admin.form("/admin/aes", [("ae_title", "PACS"), ("host", "10.0.0.5"),
                                               ("port", "104"), ("allow", "store"),
                                               ("allow", "find")])
    assert response.status == 303
    (ae,) = registry.list_remote_aes()
    assert (ae.ae_title, ae.host, ae.port, ae.allowed) == ("PACS", "10.0.0.5", 104,
                                                           {"store", "find"})
    page = await admin.page("/admin/aes")
    assert "PACS" in page and "10.0.0.5" in page and "Remote AE saved" not in page
    await admin.form("/admin/aes", {"ae_title": "PACS", "host": "10.0.0.6", "port": "11112"})
    (ae,) = registry.list_remote_aes()
    assert (ae.host, ae.port, ae.allowed) == ("10.0.0.6", 11112, frozenset())
    for bad, message in [({"ae_title": "A" * 17}, "1 to 16 characters"),
                         ({"ae_title": "BAD\\AE"}, "1 to 16 characters"),
                         ({"host": "bad host"}, "the host is"),
                         ({"port": "0"}, "the port is"), ({"port": "x"}, "the port is"),
                         ({"allow": "delete"}, "unknown service")]:
        data = {"ae_title": "NEWAE", "host": "10.0.0.7", "port": "104", **bad}
        response = await admin.form("/admin/aes", data)
        assert response.status == 400 and message in html.unescape(await response.text())
    assert [a.ae_title for a in registry.list_remote_aes()] == ["PACS"]

    response = await admin.form("/admin/aes/remove", {"ae_title": "PACS"})
    assert response.status == 303 and registry.list_remote_aes() == []
    assert (await admin.form("/admin/aes/remove", {"ae_title": "PACS"})).status == 404
    details = [e.detail for e in events("admin-change")]
    assert details == ["ae-add PACS 10.0.0.5:104 allow=echo,store,find",
                       "ae-update PACS 10.0.0.6:11112 allow=echo", "ae-remove PACS"]
    assert {e.event_code for e in events("admin-change")} == {"110113"}


# -- staff users -------------------------------------------------------------------------------


async def test_a_new_user_gets_a_qr_code_once_and_can_log_in(admin: Browser) -> None:
    response = await admin.form("/admin/users", {
        "username": "Nurse.Kim", "password": "a long password 1", "display_name": "Kim Lee",
        "department": "Radiology", "email": "kim@hospital.example"})
    assert response.status == 200
    page = await response.text()
    assert "<svg" in page and 'class="admin-qr-code"' in page and "shown only once" in page
    uri = html.unescape(re.search(r"otpauth://[^<\s]+", page).group(0))
    secret = parse_qs(urlsplit(uri).query)["secret"][0]
    assert secret in page
    assert "<svg" not in await admin.page("/admin/users")
    (event,) = events("admin-change")
    assert event.detail == "user-add nurse.kim" and event.actor == "boss"

    kim = Browser(admin.client)
    response = await log_in(kim, "nurse.kim", secret, password="a long password 1")
    assert response.status == 303
    assert "Kim Lee" in await kim.page("/admin")
    assert (await kim.get("/admin/users")).status == 403

    for bad, message in [({"username": "nurse.kim"}, "exists already"),
                         ({"password": "short"}, "at least 12 characters"),
                         ({"username": "x"}, "usernames are"),
                         ({"email": "nope"}, "not an email")]:
        data = {"username": "someone", "password": "a long password 2", **bad}
        response = await admin.form("/admin/users", data)
        assert response.status == 400 and message in html.unescape(await response.text())

    user = StaffUser.get(StaffUser.username == "nurse.kim")
    response = await admin.form(f"/admin/users/{user.id}/disable", {})
    assert response.status == 303
    assert (await kim.get("/admin")).status == 303  # the session ended at once
    refused = await log_in(kim, "nurse.kim", secret, password="a long password 1",
                           code=previous_code(secret))
    assert refused.status == 403 and REFUSED in await refused.text()
    await admin.form(f"/admin/users/{user.id}/enable", {})
    again = await log_in(kim, "nurse.kim", secret, password="a long password 1",
                         code=pyotp.TOTP(secret).at(time.time() + 30))
    assert again.status == 303
    boss = StaffUser.get(StaffUser.username == "boss")
    response = await admin.form(f"/admin/users/{boss.id}/disable", {})
    assert response.status == 400 and "your own account" in html.unescape(await response.text())
    assert [e.detail for e in events("admin-change")][-2:] == [
        "user-disable nurse.kim", "user-enable nurse.kim"]


async def test_re_enrol_own_totp(admin: Browser) -> None:
    page = await admin.page("/admin/account/totp")
    assert "<svg" in page
    secret, signature = input_value(page, "secret"), input_value(page, "signature")
    old = StaffUser.get(StaffUser.username == "boss").totp_secret
    assert secret != old

    wrong = await admin.form("/admin/account/totp", {
        "secret": secret, "signature": signature, "password": PASSWORD,
        "code": pyotp.TOTP(old).now()})
    assert wrong.status == 400 and "does not match the new secret" in await wrong.text()
    assert input_value(await wrong.text(), "secret") == secret  # same secret: scan once
    forged = await admin.form("/admin/account/totp", {
        "secret": "A" * 32, "signature": signature, "password": PASSWORD,
        "code": pyotp.TOTP("A" * 32).now()})
    assert forged.status == 400 and "not valid any more" in await forged.text()
    no_password = await admin.form("/admin/account/totp", {
        "secret": secret, "signature": signature, "password": "nope",
        "code": pyotp.TOTP(secret).now()})
    assert no_password.status == 400
    assert StaffUser.get(StaffUser.username == "boss").totp_secret == old

    done = await admin.form("/admin/account/totp", {
        "secret": secret, "signature": signature, "password": PASSWORD,
        "code": pyotp.TOTP(secret).now()})
    assert done.status == 303 and done.headers["Location"] == "/admin/account?done=totp"
    assert StaffUser.get(StaffUser.username == "boss").totp_secret == secret
    assert "authenticator is enrolled" in await admin.page(done.headers["Location"])
    other = Browser(admin.client)
    assert (await log_in(other, "boss", old, code=pyotp.TOTP(old).at(time.time() + 30))
            ).status == 403
    assert (await log_in(other, "boss", secret, code=previous_code(secret))).status == 303
    assert events("admin-change")[-1].detail == "totp-reenrol boss"


async def test_change_own_password(admin: Browser) -> None:
    response = await admin.form("/admin/account/password", {
        "current": "wrong", "new": "a new long password", "repeat": "a new long password"})
    assert response.status == 400 and "wrong current password" in await response.text()
    response = await admin.form("/admin/account/password", {
        "current": PASSWORD, "new": "a new long password", "repeat": "something else!!"})
    assert response.status == 400 and "differ" in await response.text()
    response = await admin.form("/admin/account/password", {
        "current": PASSWORD, "new": "a new long password", "repeat": "a new long password"})
    assert response.status == 303
    user = StaffUser.get(StaffUser.username == "boss")
    assert staff.authenticate("boss", "a new long password", pyotp.TOTP(user.totp_secret).now())
