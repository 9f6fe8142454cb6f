"""Admins reset another staff user's password or authenticator; the user's next login must
set a new one before anything else.

Same set-up as :mod:`tests.test_admin_web` (in-process app, a cookie-keeping client,
codes from ``pyotp``). Every page a user might try while a step is pending is asked
for, GETs and POSTs, and none may do anything but send them to that step.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pyotp
import pytest

from config import Settings, load_settings
from iepnode.errors import NotAuthorized
from iepnode.people import audit
from iepnode.services import Services
from iepnode.sharing.transactions import NewTransfer
from iepnode.wiring import build_services
from storage.db import open_database
from storage.models import AuditEvent, StaffUser, Transaction, TransactionMessage, WebSession
from tests import data_factory as factory
from tests.support.browser import Browser, input_value
from tests.support.ingest import store_files
from tests.test_admin_web import (
    PASSWORD,
    events,
    log_in,
    make_user,
    previous_code,
)

NEW_PASSWORD = "my very own password"
#: What a user with a pending step might try: every staff page.
PAGES = ["/admin", "/admin/studies", "/admin/audit", "/admin/aes", "/admin/users",
         "/admin/account", "/admin/account/totp", "/admin/transactions/IEP00000000"]


def next_code(secret: str) -> str:
    return pyotp.TOTP(secret).at(time.time() + 30)


def kim() -> StaffUser:
    return StaffUser.get(StaffUser.username == "kim")


def changes() -> list[str]:
    return [e.detail for e in events("admin-change")]


async def assert_confined_to(browser: Browser, step_page: str, csrf: str,
                             public_id: str) -> None:
    """Every other page sends ``browser`` to ``step_page``; no POST changes anything."""
    for path in [*PAGES, "/admin/setup/totp", "/admin/setup/password"]:
        if path == step_page:
            continue
        response = await browser.get(path)
        assert response.status == 303, path
        assert response.headers["Location"] == step_page, path
    before = (kim().password_hash, kim().totp_secret, TransactionMessage.select().count(),
              Transaction.select().count(), WebSession.select().count())
    posts = {
        "/admin/account/password": {"current": PASSWORD, "new": "x" * 20, "repeat": "x" * 20},
        "/admin/account/totp": {"secret": "A" * 32, "signature": "x", "password": PASSWORD,
                                "code": "123456"},
        f"/admin/transactions/{public_id}/messages": {"body": "hello"},
        "/admin/transfers": {"recipient_email": "x@example.org"},
        "/admin/users": {"username": "mallory", "password": "y" * 20, "is_admin": "1"},
    }
    for path, data in posts.items():
        response = await browser.post(path, data={**data, "csrf": csrf})
        assert response.status == 303 and response.headers["Location"] == step_page, path
    assert (kim().password_hash, kim().totp_secret, TransactionMessage.select().count(),
            Transaction.select().count(), WebSession.select().count()) == before


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(overrides={"data_dir": tmp_path / "data", "fsync": False}, environ={})


@pytest.fixture
def services(settings: Settings) -> Services:
    services = build_services(settings)
    services.admin.logins.failure_delay = 0.0
    return services


@pytest.fixture
async def admin(browser: Browser) -> Browser:
    _, secret = make_user("boss", is_admin=True, display_name="Dr Boss")
    assert (await log_in(browser, "boss", secret)).status == 303
    return browser


@pytest.fixture
async def public_id(services: Services, tmp_path: Path) -> str:
    study = store_files(services, factory.make_ct_series(tmp_path / "ct", 1))
    created = await services.sharing.share(NewTransfer((study,), "pat@example.org",
                                           otp_mobile="+447700900123"),
                               actor=audit.Actor("cli", "t"))
    return created.public_id


async def test_password_reset_with_a_generated_password_shown_once(
        admin: Browser, public_id: str) -> None:
    user, secret = make_user("kim")
    kims = Browser(admin.client)
    assert (await log_in(kims, "kim", secret)).status == 303

    response = await admin.form(f"/admin/users/{user.id}/password-reset", {"password": ""})
    assert response.status == 200
    page = await response.text()
    temporary = re.search(r'admin-secret">([a-z2-9-]+)<', page).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"([a-z2-9]{5}-){3}[a-z2-9]{5}", temporary) and "shown only once" in page
    assert temporary not in await admin.page("/admin/users")
    assert "Must set password" in await admin.page("/admin/users")
    assert (await kims.get("/admin")).status == 303  # the session ended at once
    assert changes() == ["password-reset kim (temporary password generated; sessions ended)"]
    assert events("admin-change")[0].actor == "boss"
    assert temporary not in " ".join(e.detail for e in AuditEvent.select())

    refused = await log_in(kims, "kim", secret, code=previous_code(secret))  # old password
    assert refused.status == 403
    response = await log_in(kims, "kim", secret, password=temporary, code=next_code(secret))
    assert response.status == 303
    assert (await kims.get("/admin")).headers["Location"] == "/admin/setup/password"
    page = await kims.page("/admin/setup/password")
    assert "temporary password" in page and 'href="/admin/studies"' not in page
    csrf = input_value(page, "csrf")
    await assert_confined_to(kims, "/admin/setup/password", csrf, public_id)

    for new, repeat, message in [(temporary, temporary, "not the temporary one"),
                                 (NEW_PASSWORD, "something else!!", "differ"),
                                 ("short", "short", "at least 12 characters")]:
        response = await kims.post("/admin/setup/password",
                                   data={"new": new, "repeat": repeat, "csrf": csrf})
        assert response.status == 400 and message in html.unescape(await response.text())
    assert kim().must_change_password
    response = await kims.post("/admin/setup/password",
                               data={"new": NEW_PASSWORD, "repeat": NEW_PASSWORD, "csrf": csrf})
    assert response.status == 303 and response.headers["Location"] == "/admin?done=welcome"
    assert "You are all set" in await kims.page("/admin?done=welcome")
    assert not kim().must_change_password
    assert (await kims.get("/admin/setup/password")).headers["Location"] == "/admin"
    assert changes()[-1] == "password-change kim (after a reset)"
    assert events("admin-change")[-1].actor == "kim"
    later = Browser(admin.client)
    assert (await log_in(later, "kim", secret, password=NEW_PASSWORD,
                         code=previous_code(secret))).status == 303


async def test_a_typed_temporary_password_and_a_cleared_lockout(admin: Browser,
                                                                 services: Services) -> None:
    user, secret = make_user("kim")
    for _ in range(5):
        await log_in(Browser(admin.client), "kim", secret, password="guess guess guess")
    assert services.admin.logins.throttle.locked_for("kim", time.time()) > 0
    response = await admin.form(f"/admin/users/{user.id}/password-reset",
                                {"password": "short"})
    assert response.status == 400 and "at least 12 characters" in await response.text()
    assert not kim().must_change_password
    response = await admin.form(f"/admin/users/{user.id}/password-reset",
                                {"password": "tell-kim-this-1"})
    assert response.status == 200 and "shown only once" not in await response.text()
    assert services.admin.logins.throttle.locked_for("kim", time.time()) == 0
    assert changes() == ["password-reset kim (temporary password typed by the admin; "
                         "sessions ended)"]
    kims = Browser(admin.client)
    assert (await log_in(kims, "kim", secret, password="tell-kim-this-1")).status == 303
    assert (await kims.get("/admin")).headers["Location"] == "/admin/setup/password"


async def test_totp_reset_lets_the_password_open_only_the_enrolment_page(
        admin: Browser, public_id: str) -> None:
    user, old_secret = make_user("kim")
    kims = Browser(admin.client)
    assert (await log_in(kims, "kim", old_secret)).status == 303

    response = await admin.form(f"/admin/users/{user.id}/totp-reset", {})
    assert response.status == 303 and response.headers["Location"] == "/admin/users?done=totp-reset"
    page = await admin.page(response.headers["Location"])
    assert "Authenticator reset" in page and "Must enrol authenticator" in page
    assert kim().totp_secret is None
    assert (await kims.get("/admin")).status == 303  # the session ended
    assert changes() == ["totp-reset kim (must enrol at next login; sessions ended)"]

    assert (await log_in(kims, "kim", "", password="wrong password!", code="")).status == 403
    response = await log_in(kims, "kim", "", code="")  # the password alone
    assert response.status == 303
    login = events("login")[-1]
    assert login.actor == "kim" and "password only" in login.detail
    assert (await kims.get("/admin")).headers["Location"] == "/admin/setup/totp"
    page = await kims.page("/admin/setup/totp")
    assert "<svg" in page and 'href="/admin/studies"' not in page
    csrf, secret, signature = (input_value(page, "csrf"), input_value(page, "secret"),
                               input_value(page, "signature"))
    await assert_confined_to(kims, "/admin/setup/totp", csrf, public_id)
    elsewhere = Browser(admin.client)  # a second password-only session, e.g. someone else's
    assert (await log_in(elsewhere, "kim", "", code="")).status == 303

    form = {"secret": secret, "signature": signature, "csrf": csrf}
    wrong = await kims.post("/admin/setup/totp", data={**form, "code": "000000"
                                                       if pyotp.TOTP(secret).now() != "000000"
                                                       else "111111"})
    assert wrong.status == 400 and "does not match" in await wrong.text()
    forged = await kims.post("/admin/setup/totp", data={
        **form, "secret": "A" * 32, "code": pyotp.TOTP("A" * 32).now()})
    assert forged.status == 400 and "not valid any more" in await forged.text()
    assert kim().totp_secret is None

    code = pyotp.TOTP(secret).now()
    response = await kims.post("/admin/setup/totp", data={**form, "code": code})
    assert response.status == 303 and response.headers["Location"] == "/admin?done=welcome"
    assert kim().totp_secret == secret
    assert (await kims.get("/admin")).status == 200
    assert (await elsewhere.get("/admin")).status == 303  # ended, not promoted
    assert changes()[-1] == "totp-enrol kim (after a reset)"
    reused = await log_in(Browser(admin.client), "kim", secret, code=code)
    assert reused.status == 403  # the enrolment's code is used up
    no_code = await log_in(Browser(admin.client), "kim", secret, code="")
    assert no_code.status == 403  # with a secret again, the password alone opens nothing
    assert (await log_in(Browser(admin.client), "kim", secret,
                         code=previous_code(secret))).status == 303


async def test_both_reset_enrol_first_then_the_password(admin: Browser) -> None:
    user, _ = make_user("kim")
    await admin.form(f"/admin/users/{user.id}/totp-reset", {})
    response = await admin.form(f"/admin/users/{user.id}/password-reset",
                                {"password": "tell-kim-this-2"})
    assert response.status == 200
    kims = Browser(admin.client)
    assert (await log_in(kims, "kim", "", password="tell-kim-this-2", code="")).status == 303
    page = await kims.page("/admin/setup/totp")
    assert (await kims.get("/admin/setup/password")).headers["Location"] == "/admin/setup/totp"
    secret = input_value(page, "secret")
    response = await kims.post("/admin/setup/totp", data={
        "secret": secret, "signature": input_value(page, "signature"),
        "csrf": input_value(page, "csrf"),
        "code": pyotp.TOTP(secret).now()})
    assert response.headers["Location"] == "/admin/setup/password"
    response = await kims.post("/admin/setup/password", data={
        "new": NEW_PASSWORD, "repeat": NEW_PASSWORD, "csrf": input_value(page, "csrf")})
    assert response.headers["Location"] == "/admin?done=welcome"
    assert (await kims.get("/admin/studies")).status == 200


async def test_resets_are_for_admins_only_and_not_for_oneself(admin: Browser,
                                                              services: Services) -> None:
    user, _ = make_user("kim")
    nurse, nurse_secret = make_user("nurse")
    nurses = Browser(admin.client)
    assert (await log_in(nurses, "nurse", nurse_secret)).status == 303
    for action in ("password-reset", "totp-reset"):
        response = await nurses.form(f"/admin/users/{user.id}/{action}", {"password": ""})
        assert response.status == 403 and "administrators only" in await response.text()
        forged = await admin.post(f"/admin/users/{user.id}/{action}",
                                  data={"csrf": "forged", "password": ""})
        assert forged.status == 403
        boss = StaffUser.get(StaffUser.username == "boss")
        own = await admin.form(f"/admin/users/{boss.id}/{action}", {"password": ""})
        assert own.status == 400 and "your own" in html.unescape(await own.text())
        assert (await admin.form(f"/admin/users/99999/{action}", {})).status == 404
    assert (kim().totp_secret, kim().must_change_password) == (user.totp_secret, False)
    assert changes() == []
    with pytest.raises(NotAuthorized):
        services.admin.accounts.reset_totp(user.id, nurse)
    with pytest.raises(NotAuthorized):
        services.admin.accounts.reset_password(user.id, "", nurse)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/index.db"
    return request.getfixturevalue("fresh_postgres_url")


def test_open_database_adds_must_change_password_to_an_old_staff_table(
        database_url: str) -> None:
    database = open_database(database_url)
    with database.connection_context():
        StaffUser.create(username="old", password_hash="x", created_at=0.0)
        database.execute_sql('ALTER TABLE "staffuser" DROP COLUMN "must_change_password"')
    database.close_all()
    for _ in range(2):  # idempotent
        database = open_database(database_url)
        with database.connection_context():
            assert StaffUser.get(StaffUser.username == "old").must_change_password is False
            StaffUser.update(must_change_password=True).execute()
            assert StaffUser.get(StaffUser.username == "old").must_change_password is True
            StaffUser.update(must_change_password=False).execute()
        database.close_all()

