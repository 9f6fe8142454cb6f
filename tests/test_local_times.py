"""Times in the hospital's time zone ([portal] timezone): settings, pages and emails.

Transactions and messages get fixed times (a winter evening that is already the
next day in New Zealand, a summer noon) so the expected texts are written out by
hand, zone abbreviations included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from config import ConfigError, load_settings
from config import settings as settings_module
from iepnode import timefmt
from iepnode.outbound import notifications
from iepnode.wiring import build_services
from storage.models import Transaction, TransactionMessage
from tests import data_factory as factory
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import (
    Browser,
    log_in,
    make_settings,
    outbox,
    read_eml,
    share,
    store,
)
from web.app import create_app

#: 2026-11-23 23:30 UTC and 2026-07-01 12:00 UTC.
WINTER_EVENING = 1_795_476_600.0
SUMMER_NOON = 1_782_907_200.0


# -- settings ------------------------------------------------------------------------------


def test_timezone_is_checked_when_the_settings_load(tmp_path: Path) -> None:
    settings = load_settings(overrides={"timezone": " Europe/London "}, environ={})
    assert settings.timezone == "Europe/London" and settings.zone == ZoneInfo("Europe/London")
    from_env = load_settings(environ={"IEPNODE_TIMEZONE": "Asia/Tokyo"})
    assert from_env.zone == ZoneInfo("Asia/Tokyo")
    toml = tmp_path / "iepnode.toml"
    toml.write_text('[portal]\ntimezone = "America/New_York"\n')
    assert load_settings(toml, environ={}).zone == ZoneInfo("America/New_York")
    for bad in ("Europe/Londn", "GMT+5 hours", "../../etc/passwd", "/etc/localtime"):
        with pytest.raises(ConfigError, match="not a known IANA time zone name"):
            load_settings(overrides={"timezone": bad}, environ={})


def test_empty_timezone_is_the_servers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module.tzlocal, "get_localzone_name", lambda: "Europe/Paris")
    settings = load_settings(environ={})
    assert settings.timezone == "" and settings.zone == ZoneInfo("Europe/Paris")
    monkeypatch.setattr(settings_module.tzlocal, "get_localzone_name", lambda: None)
    assert load_settings(environ={}).zone == ZoneInfo("UTC")  # a zone without a name
    monkeypatch.setattr(settings_module.tzlocal, "get_localzone_name", lambda: "Mars/Olympus")
    with pytest.raises(ConfigError, match="the server's local time zone 'Mars/Olympus'"):
        load_settings(environ={})


def test_formats_carry_the_zone_abbreviation_where_a_time_of_day_is_shown() -> None:
    london, auckland = ZoneInfo("Europe/London"), ZoneInfo("Pacific/Auckland")
    assert timefmt.day_time(WINTER_EVENING, london) == "23 Nov 2026 23:30 GMT"
    assert timefmt.day_time(SUMMER_NOON, london) == "1 Jul 2026 13:00 BST"
    assert timefmt.day_time(WINTER_EVENING, auckland) == "24 Nov 2026 12:30 NZDT"
    assert timefmt.day(WINTER_EVENING, auckland) == "24 Nov 2026"
    assert timefmt.long_day(WINTER_EVENING, auckland) == "24 November 2026"
    assert timefmt.iso_minute(SUMMER_NOON, london) == "2026-07-01 13:00 BST"
    assert timefmt.iso_second(SUMMER_NOON + 9, auckland) == "2026-07-02 00:00:09 NZST"
    assert timefmt.iso_day(WINTER_EVENING, auckland) == "2026-11-24"


def test_the_transfer_email_gives_the_expiry_day_in_the_hospitals_zone() -> None:
    transaction = Transaction(institution="St Elsewhere", public_id="IEP12345678",
                              contact_name="Dr Who", contact_email="", expires_at=WINTER_EVENING)
    _, in_london = notifications.transfer_email(transaction, "https://x/t/abc",
                                                ZoneInfo("Europe/London"))
    _, in_auckland = notifications.transfer_email(transaction, "https://x/t/abc",
                                                  ZoneInfo("Pacific/Auckland"))
    assert "until\n23 November 2026." in in_london
    assert "until\n24 November 2026." in in_auckland


# -- pages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("zone", "created", "message", "expires"), [
    ("Europe/London", ("23 Nov 2026 23:30 GMT", "2026-11-23 23:30 GMT"),
     ("1 Jul 2026 13:00 BST", "2026-07-01 13:00 BST"), "7 Dec 2026"),
    ("Pacific/Auckland", ("24 Nov 2026 12:30 NZDT", "2026-11-24 12:30 NZDT"),
     ("2 Jul 2026 00:00 NZST", "2026-07-02 00:00 NZST"), "8 Dec 2026"),
])
async def test_recipient_and_staff_pages_show_times_in_the_hospitals_zone(
        aiohttp_client: Any, tmp_path: Path, zone: str, created: tuple[str, str],
        message: tuple[str, str], expires: str) -> None:
    services = build_services(make_settings(tmp_path, timezone=zone))
    services.admin.logins.failure_delay = 0.0
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1, PatientName="Doe^Jane"))
    transaction, token = share([study])
    client = await aiohttp_client(create_app(services.settings, services),
                                  cookie_jar=aiohttp.DummyCookieJar())
    recipient = Browser(client)
    await log_in(recipient, services, token)
    Transaction.update(created_at=WINTER_EVENING, expires_at=WINTER_EVENING + 14 * 86400).where(
        Transaction.id == transaction.id).execute()
    TransactionMessage.create(transaction=transaction, author_kind="staff", author="Dr Who",
                              body="Hello", created_at=SUMMER_NOON)

    page = await recipient.page(f"/transactions/{transaction.public_id}")
    assert f"<dd>{created[0]}</dd>" in page and f"<time>{message[0]}</time>" in page
    assert f"<dd>{expires}</dd>" in page and " UTC" not in page  # (tokens may hold "UTC")

    staff = Browser(client)
    _, secret = make_user("nurse")
    assert (await staff_log_in(staff, "nurse", secret)).status == 303
    page = await staff.page(f"/admin/transactions/{transaction.public_id}")
    assert f"<dd>{created[1]}</dd>" in page and f"<time>{message[1]}</time>" in page
    abbreviation = created[1].split()[-1]
    audit_times = page[page.index('id="audit"'):].count(f" {abbreviation}</td>")
    assert audit_times >= 2  # the login and this page view, in the hospital's zone
    assert created[1] in await staff.page("/admin")


async def test_the_transfer_email_of_a_share_uses_the_configured_zone(tmp_path: Path) -> None:
    from iepnode.people.audit import Actor
    from iepnode.sharing.transactions import NewTransfer

    services = build_services(make_settings(tmp_path, timezone="Pacific/Auckland"))
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1))
    shared = await services.sharing.share(NewTransfer((study,), "pat@example.org",
                                          otp_mobile="+447700900123"), actor=Actor("cli", "t"))
    text = read_eml(outbox(services)[-1]).get_content()
    assert timefmt.long_day(shared.expires_at, ZoneInfo("Pacific/Auckland")) in text
