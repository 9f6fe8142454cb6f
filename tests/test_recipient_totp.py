"""Recipient authenticator app (TOTP): enrol, log in from a link with an app code, remove.

Same set-up as :mod:`tests.test_recipient_web` (in-process aiohttp client, a cookie
store that sends ``Secure`` cookies, passcodes from the outbox); time is controlled
through the clock of :mod:`iepnode.sharing.logins`, so app codes are made for ``clock.now``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest

from iepnode.errors import InvalidRequest, PasscodeRejected, RecipientLocked
from iepnode.people.audit import events_for_transaction
from iepnode.services import Services
from iepnode.sharing import logins
from storage.db import open_database
from storage.models import AuditEvent, LoginAttempt, Recipient, WebSession
from tests import data_factory as factory
from tests.test_recipient_web import (
    PRELOGIN,
    SESSION,
    Browser,
    Clock,
    field,
    latest_code,
    log_in,
    open_link,
    outbox,
    share,
    store,
)

EMAIL = "pat@example.org"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # Mid-way through a 30 s time step: "the next code" is then 30 s away, never 1 s.
    fake.now = (int(fake.now) // 30) * 30 + 15.0
    monkeypatch.setattr(logins, "time", fake)
    return fake


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store(services, factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Jane",
                                              PatientID="P1"))


def recipient() -> Recipient:
    return Recipient.get(Recipient.email == EMAIL)


def code_at(secret: str, clock: Clock, offset: float = 0.0) -> str:
    return pyotp.TOTP(secret).at(clock.now + offset)


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def enrol_directly() -> str:
    """Give the recipient an app without the pages; return its secret."""
    secret = pyotp.random_base32()
    Recipient.update(totp_secret=secret).where(Recipient.email == EMAIL).execute()
    return secret


def audit_actions(action: str) -> list[tuple[int, str]]:
    return [(e.outcome, e.detail) for e in
            AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id)]


async def app_login(browser: Browser, token: str, code: str,
                    csrf: str | None = None) -> aiohttp.ClientResponse:
    data = {"code": code} if csrf == "" else {
        "code": code, "csrf": csrf if csrf is not None else browser.cookies[PRELOGIN]}
    return await browser.post(f"/t/{token}/login-app", data=data)


async def account_page(browser: Browser) -> str:
    response = await browser.get("/account/authenticator")
    html = await response.text()
    assert response.status == 200, html
    return html


# -- enrol, then log in with the app ------------------------------------------------------


async def test_enrol_then_log_in_with_the_app_and_no_passcode_is_sent(
    client: Any, services: Services, study: str, clock: Clock
) -> None:
    transaction, token = share([study])
    browser = Browser(client)
    await log_in(browser, services, token)
    dashboard = await (await browser.get("/dashboard")).text()
    assert 'href="/account/authenticator"' in dashboard

    html = await account_page(browser)
    assert "<svg" in html and 'aria-label="QR code for an authenticator app"' in html
    assert "<script" not in html and "style=" not in html
    secret, signature, csrf = field(html, "secret"), field(html, "signature"), field(html, "csrf")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret) and secret in html  # the setup key
    assert recipient().totp_secret is None

    form = {"secret": secret, "signature": signature, "csrf": csrf}
    refused = await browser.post("/account/authenticator",
                                 data={**form, "code": wrong(code_at(secret, clock))})
    html = await refused.text()
    assert refused.status == 400 and "That code does not match" in html
    assert field(html, "secret") == secret  # the same secret again: the app has it already
    assert recipient().totp_secret is None

    confirmed = await browser.post("/account/authenticator",
                                   data={**form, "code": code_at(secret, clock)})
    assert confirmed.status == 303
    assert confirmed.headers["Location"] == "/account/authenticator?done=enrolled"
    assert recipient().totp_secret == secret
    html = await (await browser.get(confirmed.headers["Location"])).text()
    assert "Your authenticator app is set up" in html and "Remove the app" in html
    assert 'name="secret"' not in html
    assert [outcome for outcome, _ in audit_actions("recipient-totp-enrol")] == [4, 0]
    (event,) = AuditEvent.select().where((AuditEvent.action == "recipient-totp-enrol")
                                         & (AuditEvent.outcome == 0))
    assert (event.event_code, event.actor_kind, event.actor) == ("110113", "recipient", EMAIL)
    assert secret not in " ".join(e.detail for e in AuditEvent.select())

    # A new visit from the emailed link: the app is the default, nothing is sent.
    clock.advance(30)
    sent_before, attempts_before = len(outbox(services)), LoginAttempt.select().count()
    fresh = Browser(client)
    response = await fresh.get(f"/t/{token}")
    html = await response.text()
    assert response.status == 200
    assert "Use my authenticator app" in html and 'action="/t/' + token + '/login-app"' in html
    assert "A passcode has been sent" not in html and "Send me a passcode instead" in html
    assert 'name="attempt"' not in html
    assert len(outbox(services)) == sent_before and LoginAttempt.select().count() == attempts_before

    response = await app_login(fresh, token, code_at(secret, clock))
    assert response.status == 303 and response.headers["Location"] == "/dashboard"
    assert SESSION in fresh.cookies and PRELOGIN not in fresh.cookies
    assert (await fresh.get("/dashboard")).status == 200
    assert len(outbox(services)) == sent_before
    login = [e for e in events_for_transaction(transaction.public_id) if e.action == "login"][-1]
    assert (login.event_code, login.detail, login.outcome) == ("110114", "totp", 0)
    assert recipient().totp_last_step == int(clock.now // 30)


async def test_each_app_code_is_accepted_once(client: Any, services: Services, study: str,
                                              clock: Clock) -> None:
    _, token = share([study])
    browser = Browser(client)
    await log_in(browser, services, token)
    html = await account_page(browser)
    secret = field(html, "secret")
    enrol_code = code_at(secret, clock)
    await browser.post("/account/authenticator", data={
        "secret": secret, "signature": field(html, "signature"), "csrf": field(html, "csrf"),
        "code": enrol_code})
    assert recipient().totp_secret == secret

    # The code that confirmed the enrolment is used up, and so is an older one.
    first = Browser(client)
    await first.get(f"/t/{token}")
    for code in (enrol_code, code_at(secret, clock, -30)):
        response = await app_login(first, token, code)
        assert response.status == 403 and "This code has been used" in await response.text()
    assert recipient().consecutive_failures == 2

    clock.advance(30)
    code = code_at(secret, clock)
    assert (await app_login(first, token, code)).status == 303
    assert recipient().consecutive_failures == 0
    second = Browser(client)
    await second.get(f"/t/{token}")
    response = await app_login(second, token, code)
    assert response.status == 403 and "This code has been used" in await response.text()
    assert SESSION not in second.cookies and recipient().consecutive_failures == 1
    failed = [e for e in AuditEvent.select().where(AuditEvent.action == "login-failed")]
    assert [e.detail for e in failed] == ["totp PasscodeRejected"] * 3


async def test_wrong_app_codes_count_towards_the_lockout(browser: Browser, services: Services,
                                                         study: str, clock: Clock) -> None:
    _, token = share([study])
    secret = enrol_directly()
    await browser.get(f"/t/{token}")
    Recipient.update(consecutive_failures=logins.LOCK_AFTER - 2).where(
        Recipient.email == EMAIL).execute()
    response = await app_login(browser, token, wrong(code_at(secret, clock)))
    assert response.status == 403 and "Wrong code" in await response.text()
    assert recipient().consecutive_failures == logins.LOCK_AFTER - 1
    response = await app_login(browser, token, wrong(code_at(secret, clock)))
    assert response.status == 403 and "Your access is locked" in await response.text()
    assert recipient().locked_at is not None
    # Locked: the right code, the link and the passcode button all stay shut.
    response = await app_login(browser, token, code_at(secret, clock))
    assert response.status == 403 and "Your access is locked" in await response.text()
    response = await browser.get(f"/t/{token}")
    assert response.status == 403 and "Your access is locked" in await response.text()
    assert outbox(services) == [] and SESSION not in browser.cookies

    logins.unlock(recipient())
    assert (await app_login(browser, token, code_at(secret, clock))).status == 303
    assert recipient().consecutive_failures == 0


async def test_passcode_instead_still_works(browser: Browser, services: Services, study: str,
                                            clock: Clock) -> None:
    _, token = share([study])
    enrol_directly()
    await browser.get(f"/t/{token}")
    assert outbox(services) == []
    response = await browser.post(f"/t/{token}/resend",
                                  data={"csrf": browser.cookies[PRELOGIN]})
    html = await response.text()
    assert "A passcode has been sent" in html and len(outbox(services)) == 1
    assert "Use my authenticator app" in html  # still offered
    response = await browser.post(f"/t/{token}/login", data={
        "attempt": field(html, "attempt"), "code": latest_code(services),
        "csrf": browser.cookies[PRELOGIN]})
    assert response.status == 303 and SESSION in browser.cookies


# -- removal --------------------------------------------------------------------------------


async def test_removal_needs_a_current_code(browser: Browser, services: Services, study: str,
                                            clock: Clock) -> None:
    _, token = share([study])
    await log_in(browser, services, token)
    secret = enrol_directly()
    html = await account_page(browser)
    csrf = field(html, "csrf")
    assert 'action="/account/authenticator/remove"' in html

    for data in ({"code": code_at(secret, clock)}, {"code": code_at(secret, clock), "csrf": ""}):
        response = await browser.post("/account/authenticator/remove", data=data)
        assert response.status == 403
    response = await browser.post("/account/authenticator/remove",
                                  data={"code": wrong(code_at(secret, clock)), "csrf": csrf})
    assert response.status == 403 and "Wrong code" in await response.text()
    assert recipient().totp_secret == secret and recipient().consecutive_failures == 1

    response = await browser.post("/account/authenticator/remove",
                                  data={"code": code_at(secret, clock), "csrf": csrf})
    assert response.status == 303
    assert response.headers["Location"] == "/account/authenticator?done=removed"
    assert recipient().totp_secret is None and recipient().consecutive_failures == 0
    html = await (await browser.get(response.headers["Location"])).text()
    assert "has been removed" in html and 'name="secret"' in html
    assert [outcome for outcome, _ in audit_actions("recipient-totp-remove")] == [4, 0]

    # Back to passcodes: opening the link sends one again.
    clock.advance(31)
    sent = len(outbox(services))
    page = await open_link(Browser(browser.client), token)
    assert "A passcode has been sent" in page.html and "Use my authenticator app" not in page.html
    assert len(outbox(services)) == sent + 1


# -- refusals -------------------------------------------------------------------------------


async def test_missing_csrf_is_refused(client: Any, services: Services, study: str,
                                       clock: Clock) -> None:
    _, token = share([study])
    secret = enrol_directly()
    visitor = Browser(client)
    await visitor.get(f"/t/{token}")
    for csrf in ("", "forged"):
        response = await app_login(visitor, token, code_at(secret, clock), csrf=csrf)
        assert response.status == 403 and SESSION not in visitor.cookies
    assert recipient().consecutive_failures == 0 and recipient().totp_last_step is None

    Recipient.update(totp_secret=None).where(Recipient.email == EMAIL).execute()
    browser = Browser(client)
    await log_in(browser, services, token)
    html = await account_page(browser)
    form = {"secret": field(html, "secret"), "signature": field(html, "signature"),
            "code": code_at(field(html, "secret"), clock)}
    for extra in ({}, {"csrf": ""}, {"csrf": "forged"}):
        response = await browser.post("/account/authenticator", data={**form, **extra})
        assert response.status == 403
    assert recipient().totp_secret is None


async def test_enrolment_form_is_bound_to_the_session(client: Any, services: Services, study: str,
                                                      clock: Clock) -> None:
    _, token = share([study])
    one, two = Browser(client), Browser(client)
    await log_in(one, services, token)
    clock.advance(31)
    await log_in(two, services, token)
    html = await account_page(one)
    secret, signature = field(html, "secret"), field(html, "signature")
    csrf_two = field(await account_page(two), "csrf")
    mine = pyotp.random_base32()
    for sent_secret, sent_signature in ((secret, signature), (mine, signature), (mine, "")):
        # Another session's form, or a secret of the sender's choosing: refused.
        response = await two.post("/account/authenticator", data={
            "secret": sent_secret, "signature": sent_signature, "csrf": csrf_two,
            "code": code_at(sent_secret, clock)})
        html = await response.text()
        assert response.status == 400 and "not valid any more" in html
        assert field(html, "secret") not in (secret, mine)
    assert recipient().totp_secret is None


async def test_without_an_app_the_passcode_flow_is_unchanged(browser: Browser, services: Services,
                                                             study: str) -> None:
    _, token = share([study])
    page = await open_link(browser, token)
    assert "A passcode has been sent" in page.html and len(outbox(services)) == 1
    assert "login-app" not in page.html and "Use my authenticator app" not in page.html
    assert "Send me a new passcode" in page.html
    response = await app_login(browser, token, "123456")
    assert response.status == 403 and "No authenticator app is set up" in await response.text()
    assert recipient().consecutive_failures == 0
    response = await browser.post(f"/t/{token}/login", data={
        "attempt": page.attempt, "code": latest_code(services), "csrf": page.csrf})
    assert response.status == 303 and SESSION in browser.cookies


async def test_account_page_needs_a_recipient_session(browser: Browser, services: Services,
                                                      study: str) -> None:
    response = await browser.get("/account/authenticator")
    assert response.status == 303 and response.headers["Location"] == "/signin"
    for path in ("/account/authenticator", "/account/authenticator/remove"):
        response = await browser.post(path, data={"code": "123456", "csrf": "x"},
                                      headers={"Cookie": f"{PRELOGIN}=x"})
        assert response.status == 303 and response.headers["Location"] == "/signin"
    response = await browser.post("/t/unknown-token-0000000000000/login-app",
                                  data={"code": "123456", "csrf": "x"},
                                  headers={"Cookie": f"{PRELOGIN}=x"})
    assert response.status == 404 and "login-failed" not in audit_actions("login-failed")


# -- domain rules ---------------------------------------------------------------------------


def test_codes_are_checked_within_one_step_either_side(services: Services, study: str) -> None:
    transaction, _ = share([study])
    secret = pyotp.random_base32()
    totp = pyotp.TOTP(secret)
    t0 = 1_800_000_015.0
    enrolment = logins.TotpEnrolment(secret, "", "")
    with pytest.raises(InvalidRequest, match="does not match"):
        logins.enrol_totp(transaction.recipient_id, enrolment, totp.at(t0 - 60), now=t0)
    logins.enrol_totp(transaction.recipient_id, enrolment, totp.at(t0 + 30), now=t0)
    with pytest.raises(InvalidRequest, match="set up already"):
        logins.enrol_totp(transaction.recipient_id, enrolment, totp.at(t0 + 30), now=t0)
    # The enrolment used step t0+30: that step and older are spent.
    with pytest.raises(PasscodeRejected, match="used"):
        logins.verify_totp(transaction.recipient_id, totp.at(t0 + 30), now=t0 + 30)
    later = t0 + 90
    with pytest.raises(PasscodeRejected, match="wrong code"):
        logins.verify_totp(transaction.recipient_id, totp.at(later + 60), now=later)
    assert logins.verify_totp(transaction.recipient_id, f"{totp.at(later - 30)[:3]} "
                              f"{totp.at(later - 30)[3:]}", now=later).totp_last_step == int(
        (later - 30) // 30)
    assert logins.verify_totp(transaction.recipient_id, totp.at(later + 30),
                              now=later).consecutive_failures == 0
    for bad in ("", "12345", "1234567", "abcdef"):
        with pytest.raises(PasscodeRejected):
            logins.verify_totp(transaction.recipient_id, bad, now=later)
    Recipient.update(consecutive_failures=logins.LOCK_AFTER - 1).where(
        Recipient.id == transaction.recipient_id).execute()
    with pytest.raises(RecipientLocked):
        logins.verify_totp(transaction.recipient_id, "000000" if totp.at(later) != "000000"
                           else "111111", now=later)
    assert Recipient.get_by_id(transaction.recipient_id).locked_at == later
    assert WebSession.select().count() == 0


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/index.db"
    return request.getfixturevalue("fresh_postgres_url")


def test_open_database_adds_the_new_column_to_an_old_recipient_table(database_url: str) -> None:
    database = open_database(database_url)
    with database.connection_context():
        database.execute_sql('ALTER TABLE "recipient" DROP COLUMN "totp_last_step"')
        assert "totp_last_step" not in {c.name for c in database.get_columns("recipient")}
    database.close_all()
    for n in range(2):  # idempotent: the second open finds the column and adds nothing
        database = open_database(database_url)
        with database.connection_context():
            assert "totp_last_step" in {c.name for c in database.get_columns("recipient")}
            Recipient.create(email=f"r{n}@example.org", created_at=0.0, totp_last_step=7)
            assert Recipient.get(Recipient.email == f"r{n}@example.org").totp_last_step == 7
        database.close_all()
