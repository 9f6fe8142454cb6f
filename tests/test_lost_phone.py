"""A recipient who lost their phone: staff remove the authenticator app; passcodes again.

Same set-up as :mod:`tests.test_recipient_totp` (in-process app, passcodes from the
outbox, the clock of :mod:`iepnode.sharing.logins` under control) plus a staff browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iepnode.services import Services
from iepnode.sharing import logins
from storage.models import AuditEvent, Recipient, WebSession
from tests import data_factory as factory
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_totp import EMAIL, app_login, code_at, enrol_directly, recipient
from tests.test_recipient_web import (
    Browser,
    Clock,
    log_in,
    open_link,
    outbox,
    share,
    store,
)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    fake.now = (int(fake.now) // 30) * 30 + 15.0
    monkeypatch.setattr(logins, "time", fake)
    return fake


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store(services, factory.make_ct_series(tmp_path / "ct", 1, PatientID="P1"))


async def test_staff_remove_a_lost_authenticator_and_passcodes_are_sent_again(
        client: Any, services: Services, study: str, clock: Clock) -> None:
    transaction, token = share([study])
    phone = Browser(client)  # the recipient's browser on the lost phone
    await log_in(phone, services, token)
    secret = enrol_directly()

    staff = Browser(client)
    _, staff_secret = make_user("nurse")  # any staff member, not only admins
    assert (await staff_log_in(staff, "nurse", staff_secret)).status == 303
    url = f"/admin/transactions/{transaction.public_id}"
    page = await staff.page(url)
    assert "Authenticator app" in page and "Remove authenticator app" in page

    forged = await staff.post(f"{url}/authenticator/remove", data={"csrf": "forged"})
    assert forged.status == 403 and recipient().totp_secret == secret

    response = await staff.form(f"{url}/authenticator/remove", {})
    assert response.status == 303 and response.headers["Location"] == f"{url}?done=app-removed"
    assert (recipient().totp_secret, recipient().totp_last_step) == (None, None)
    page = await staff.page(response.headers["Location"])
    assert "authenticator app is removed" in page and "Remove authenticator app" not in page
    assert "Passcode by SMS" in page
    (event,) = AuditEvent.select().where(AuditEvent.action == "recipient-totp-remove")
    assert (event.event_code, event.actor_kind, event.actor) == ("110113", "staff", "nurse")
    assert (event.transaction_public_id, event.patient_id) == (transaction.public_id, "P1")
    assert EMAIL in event.detail and secret not in event.detail
    assert "recipient-totp-remove" in page[page.index('id="audit"'):]

    # The session on the lost phone has ended; the link sends a passcode again.
    response = await phone.get("/dashboard")
    assert response.status == 303 and response.headers["Location"] == "/signin"
    assert not WebSession.select().where((WebSession.recipient.is_null(False))
                                         & (WebSession.ended == False)).exists()  # noqa: E712
    sent = len(outbox(services))
    clock.advance(60)
    finder = Browser(client)  # whoever has the phone now cannot use its app
    login = await open_link(finder, token)
    assert "A passcode has been sent" in login.html and len(outbox(services)) == sent + 1
    refused = await app_login(finder, token, code_at(secret, clock))
    assert refused.status == 403 and "No authenticator app is set up" in await refused.text()

    again = await staff.form(f"{url}/authenticator/remove", {})
    assert again.status == 400 and "has no authenticator app" in await again.text()
    assert (await staff.form("/admin/transactions/IEP00000000/authenticator/remove",
                             {})).status == 404


async def test_the_authenticator_page_says_whom_to_contact_after_losing_the_phone(
        client: Any, services: Services, study: str) -> None:
    _, token = share([study])
    browser = Browser(client)
    await log_in(browser, services, token)
    for enrolled in (False, True):
        if enrolled:
            enrol_directly()
        page = await browser.page("/account/authenticator")
        lost = " ".join(page[page.index("Lost your phone?"):].split())
        assert "Dr Who" in lost and 'href="mailto:radiology@hospital.example"' in lost
        assert "they can remove the authenticator app from your account" in lost
        assert ('Send me a passcode instead' in lost) is enrolled
    assert Recipient.select().count() == 1
