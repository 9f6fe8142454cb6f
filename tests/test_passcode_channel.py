"""A share never moves an existing recipient's passcodes; only an audited staff change does.

The issue: ``transfer create --to carol@... --otp-email attacker@...`` by any staff
user replaced Carol's passcode channel for all her transactions. Now a share (staff
page, ``transfer create``, requests, forwards) keeps the channel an existing
recipient has and tells the staff user so; changing it is a separate action for
administrators and the recipient's established hospital contacts (of the transaction
their account was made for, or of one they signed in through), audited with both
channels masked, announced on the old channel, and it ends the
recipient's sessions and unused passcodes.

The web half runs the app in-process over a :class:`Services` (messages in the outbox);
the CLI half runs ``iepnode`` commands on the same data folder. Each runs on SQLite and
on PostgreSQL (the change locks the recipient row there).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from config import Settings, load_settings
from iepnode.people.audit import Actor
from iepnode.services import Services
from iepnode.sharing import logins
from iepnode.sharing import transactions as tx
from iepnode.uploads.image_requests import NewRequest
from iepnode.wiring import build_services
from storage.models import AuditEvent, LoginAttempt, Recipient, Transaction, WebSession
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.support.node import REPO, run_cli
from tests.test_admin_web import log_in, make_user
from tests.test_recipient_web import read_eml

CAROL = "carol@example.org"
CAROL_MOBILE = "+447700900123"
ATTACKER = "attacker@evil.example"
NEW_ADDRESS = "carol.codes@example.net"
CONTACT = tx.Contact("Dr Who", "Radiology", "radiology@hospital.example", "+441234567890")


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    return load_settings(overrides={"data_dir": tmp_path / "data", "fsync": False,
                                    "institution": "St Elsewhere", "database_url": url},
                         environ={})


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    services = build_services(settings)
    services.admin.logins.failure_delay = 0.0
    yield services
    services.group_commit.close()
    services.close()


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store_files(services, factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Carol",
                                                    PatientID="P7"))


async def staff_browser(client: Any, username: str, *, is_admin: bool = False) -> Browser:
    _, secret = make_user(username, is_admin=is_admin, phone="+441234000000")
    browser = Browser(client)
    assert (await log_in(browser, username, secret)).status == 303
    return browser


def carols_transfer(study: str, created_by: str = "drwho") -> tuple[Transaction, str]:
    request = tx.NewTransfer((study,), CAROL, otp_mobile=CAROL_MOBILE, recipient_name="Carol")
    return tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                              created_by=created_by)


def carol() -> Recipient:
    return Recipient.get(Recipient.email == CAROL)


def messages(services: Services) -> list[EmailMessage]:
    folder = services.settings.outbox_dir
    return [read_eml(p) for p in sorted(folder.glob("*.eml"))] if folder.exists() else []


def sent_to(services: Services, address: str) -> list[str]:
    return [m.get_content() for m in messages(services) if address in str(m["To"])]


def details(action: str) -> list[str]:
    return [e.detail for e in AuditEvent.select().where(AuditEvent.action == action)
            .order_by(AuditEvent.id)]


# -- a share keeps the channel -------------------------------------------------------------


async def test_a_staff_share_cannot_take_over_an_existing_recipients_passcodes(
        client: Any, services: Services, study: str) -> None:
    first, _ = carols_transfer(study)
    mallory = await staff_browser(client, "mallory")
    response = await mallory.form("/admin/transfers", {
        "study": study, "recipient_email": CAROL, "channel": "email", "otp_email": ATTACKER,
        "priority": "NORMAL", "expiry_days": "7"})
    assert response.status == 303
    location = response.headers["Location"]
    assert location.endswith("?done=created-channel-kept")
    page = await mallory.page(location)
    assert "the mobile number or email you typed was not used" in page
    assert (carol().otp_mobile, carol().otp_email) == (CAROL_MOBILE, "")
    assert any("existing passcode channel mobile •••23 kept" in d
               for d in details("transfer-create"))

    # The new transaction's link sends its passcode to Carol's phone, not to the attacker.
    public_id = location.split("/")[-1].split("?")[0]
    sent = await services.logins.send_passcode(_token_of(services, public_id))
    assert (sent.channel, sent.destination) == ("sms", CAROL_MOBILE)
    assert sent_to(services, ATTACKER) == []
    assert Transaction.get_by_id(first.id).recipient_id == carol().id


def _token_of(services: Services, public_id: str) -> str:
    """The link token of a transaction, from the email the share sent."""
    for message in reversed(messages(services)):
        if public_id in str(message["Subject"]):
            return re.search(r"/t/([A-Za-z0-9_-]+)", message.get_content()).group(1)  # type: ignore[union-attr]
    raise AssertionError(f"no link email for {public_id}")


async def test_a_request_keeps_the_channel_too(services: Services, study: str) -> None:
    carols_transfer(study)
    request = NewRequest(CAROL, "Doe", otp_email=ATTACKER, patient_id="P7")
    created = await services.requests.create_request(request, actor=Actor("staff", "mallory"))
    assert created.recipient_id == carol().id
    assert (carol().otp_mobile, carol().otp_email) == (CAROL_MOBILE, "")
    assert any("kept (the one given was not used)" in d for d in details("request-create"))


# -- changing it is a separate, audited staff action ---------------------------------------


async def test_only_admins_and_carols_contacts_change_it_and_carol_is_told(
        client: Any, services: Services, study: str) -> None:
    transaction, token = carols_transfer(study, created_by="drwho")  # her account's first
    url = f"/admin/transactions/{transaction.public_id}/passcode-channel"
    change = {"channel": "email", "otp_email": NEW_ADDRESS}

    mallory = await staff_browser(client, "mallory")
    assert "Change passcode channel" not in await mallory.page(
        f"/admin/transactions/{transaction.public_id}")
    refused = await mallory.form(url, change)
    assert refused.status == 403 and "hospital contact" in await refused.text()
    assert (await mallory.post(url, data=change)).status == 403  # no CSRF token
    # Sharing with Carol makes Mallory the contact of a transaction Carol never opened:
    # not enough, or any share could be followed by a takeover.
    hers, her_token = carols_transfer(study, created_by="mallory")
    hers_url = f"/admin/transactions/{hers.public_id}/passcode-channel"
    assert (await mallory.form(hers_url, change)).status == 403
    assert carol().otp_mobile == CAROL_MOBILE and details("recipient-channel-change") == []

    # Carol is signed in and has a passcode waiting: both end with the change.
    session = logins.open_session(carol())
    waiting = logins.start_attempt(transaction, services.secret, 600)
    boss = await staff_browser(client, "boss", is_admin=True)
    page = await boss.page(f"/admin/transactions/{transaction.public_id}")
    assert 'action="' + url + '"' in page
    bad = await boss.form(url, {"channel": "email", "otp_email": CAROL})
    assert bad.status == 400 and "must differ" in await bad.text()
    response = await boss.form(url, change)
    assert response.status == 303
    assert response.headers["Location"].endswith("?done=channel-changed")
    assert (carol().otp_mobile, carol().otp_email) == ("", NEW_ADDRESS)
    assert WebSession.get_by_id(session.session.id).ended
    assert LoginAttempt.get_by_id(waiting.attempt_id).dead

    (audited,) = details("recipient-channel-change")
    assert "mobile •••23 -> email c•••@example.net" in audited
    assert NEW_ADDRESS not in audited and CAROL_MOBILE not in audited
    (notice,) = sent_to(services, CAROL_MOBILE)[-1:]
    assert "changed where your image exchange passcodes are sent" in notice
    assert "email c•••@example.net" in notice and NEW_ADDRESS not in notice
    assert "+441234000000" in notice  # whom to call: the admin who changed it
    assert details("recipient-channel-notice") == [f"{CAROL}: told on the old mobile •••23"]

    # The next passcode goes to the new address, at once (the resend limit starts again).
    sent = await services.logins.send_passcode(token)
    assert (sent.channel, sent.destination) == ("email", NEW_ADDRESS)
    assert sent.code in sent_to(services, NEW_ADDRESS)[-1]

    # The contact of the transaction Carol's account was made for may change it too.
    drwho = await staff_browser(client, "drwho")
    back = await drwho.form(url, {"channel": "sms", "otp_mobile": "+44 7700 900999"})
    assert back.status == 303 and carol().otp_mobile == "+447700900999"
    assert sent_to(services, NEW_ADDRESS)[-1].startswith("St Elsewhere: on ")

    # And so may Mallory once Carol has signed in through Mallory's transaction.
    sent = await services.logins.send_passcode(her_token)
    services.logins.log_in(her_token, sent.attempt_id, sent.code)
    again = await mallory.form(hers_url, {"channel": "sms", "otp_mobile": "+447700900888"})
    assert again.status == 303 and carol().otp_mobile == "+447700900888"


# -- the command line ------------------------------------------------------------------------


def add_staff(services: Services, username: str, *flags: str) -> None:
    """``iepnode user add`` with the password on standard input."""
    proc = subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", username, *flags,
         "--password-stdin", "--data-dir", str(services.settings.data_dir), *database(services)],
        input="correct horse battery staple\n", capture_output=True, text=True, cwd=REPO,
        timeout=60)
    assert proc.returncode == 0, proc.stderr


def database(services: Services) -> list[str]:
    """The ``--database-url`` flag the CLI needs to use the node's index."""
    url = services.settings.database_url
    return ["--database-url", url] if url else []


def test_the_cli_keeps_the_channel_and_changes_it_only_for_admins(
        services: Services, study: str) -> None:
    data = services.settings.data_dir
    carols_transfer(study, created_by="drwho")
    add_staff(services, "mallory")
    add_staff(services, "boss", "--admin", "--email", "boss@hospital.example")

    shared = run_cli(data, "transfer", "create", "--study", study, "--to", CAROL,
                     "--otp-email", ATTACKER, "--as-user", "mallory", extra=database(services))
    assert re.fullmatch(r"IEP\d{8}\n", shared.stdout)
    assert f"{CAROL} already has an account" in shared.stderr
    assert "mobile •••23" in shared.stderr and "iepnode recipient channel" in shared.stderr
    assert (carol().otp_mobile, carol().otp_email) == (CAROL_MOBILE, "")

    # Mallory is the contact of the share she just made: that does not let her move them.
    refused = run_cli(data, "recipient", "channel", CAROL, "--otp-email", ATTACKER,
                      "--as-user", "mallory", check=False, extra=database(services))
    assert refused.returncode == 1 and "hospital contact" in refused.stderr
    assert carol().otp_mobile == CAROL_MOBILE

    changed = run_cli(data, "recipient", "channel", CAROL, "--otp-email", NEW_ADDRESS,
                      "--as-user", "boss", extra=database(services))
    assert "now go to their email c•••@example.net" in changed.stdout
    assert (carol().otp_mobile, carol().otp_email) == ("", NEW_ADDRESS)
    notice = sent_to(services, CAROL_MOBILE)[-1]
    assert "changed where your image exchange passcodes are sent" in notice
    assert "boss@hospital.example" in notice
    (audited,) = [e for e in AuditEvent.select().where(
        AuditEvent.action == "recipient-channel-change")]
    assert audited.actor == "boss" and "mobile •••23 -> email c•••@example.net" in audited.detail
