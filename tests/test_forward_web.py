"""The forward dialog in-process: the form, the rules on the server, crafted requests,
other people's packages, CSRF, and the forwarded person's login from the mail."""

from __future__ import annotations

import asyncio
import html as htmllib
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iepnode.people.audit import events_for_transaction
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.wiring import build_services
from storage.models import Recipient, Transaction
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files as store
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import field, log_in, make_settings, outbox, read_eml, share
from web.app import create_app


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store(services, factory.make_ct_series(
        tmp_path / "ct", 2, PatientName="Doe^Jane", PatientID="P1", PatientBirthDate="19800214",
        PatientSex="F", StudyDate="20240105", StudyDescription="CT HEAD"))


def form(csrf: str, email: str = "solicitor@law.example", **kw: str) -> dict[str, str]:
    return {"csrf": csrf, "email": email, "email_confirm": email, "first_name": "Sol",
            "last_name": "Icitor", "address": "1 Law Lane\r\nLeeds", "phone": "020 7946 0000",
            "channel": "sms", "otp_mobile": "07700 900555", "otp_email": "",
            "purpose": "second-opinion", "organisation": "", "message": "Please review.",
            "days": "longest", "agree": "yes", **kw}


async def dialog_csrf(browser: Browser, public_id: str) -> str:
    return field(await browser.page(f"/transactions/{public_id}/forward"), "csrf")


def copies_of(source: Transaction) -> list[Transaction]:
    return list(Transaction.select().where(Transaction.forwarded_from == source.id)
                .order_by(Transaction.id))


def link_token(services: Services, email: str) -> str:
    mails = [m for m in map(read_eml, outbox(services)) if str(m["To"]) == email]
    match = re.search(r"https://portal\.example/t/([A-Za-z0-9_-]+)", mails[-1].get_content())
    assert match, mails[-1].get_content()
    return match.group(1)


async def test_the_dialog_has_four_steps_and_the_disclaimer(browser: Browser, services: Services,
                                                            study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    html = await browser.page(f"/transactions/{source.public_id}/forward")
    for text in ("1. Choose destination", "2. Additional info", "3. Message", "4. Retention",
                 source.public_id, "DOE, Jane", "Female", "14 Feb 1980",
                 "You are forwarding to a <strong>Patient / Individual</strong>",
                 "E-mail address of individual", "Confirm e-mail address",
                 "Create new individual or patient", "Contact telephone number", "Address",
                 "Use email instead", "you are sending confidential data for the patient listed "
                 "to the selected recipient", "the details of the recipient are correct",
                 "the originating hospital will be aware of this action",
                 'name="agree" value="yes" required', 'id="finish"',
                 '<script src="/static/forward.js"></script>', "3 more times"):
        assert text in html, text
    assert "<script>" not in html and "style=" not in html  # the CSP allows neither
    events = events_for_transaction(source.public_id)
    assert events[-1].detail == "forward dialog"
    static = await browser.get("/static/forward.js")
    assert static.status == 200 and "finish.disabled = !agree.checked" in await static.text()


async def test_forward_then_the_new_person_logs_in_and_cannot_forward(
        client: Any, browser: Browser, services: Services, study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, source.public_id)
    response = await browser.post(f"/transactions/{source.public_id}/forward", data=form(
        csrf, message="Look at <b>slice 3</b>."))
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == f"/transactions/{source.public_id}/forwards?done=sent"
    listing = await browser.page(response.headers["Location"])
    assert "The package has been forwarded." in listing
    assert "solicitor@law.example" in listing and "Forwarded 1 of 3 times." in listing
    (copy,) = copies_of(source)
    details = await browser.page(f"/transactions/{source.public_id}")
    assert "2 of 3 forwards left" in details and "See to whom you forwarded it (1)" in details
    home = await browser.page("/dashboard?tab=home")
    assert "Forward a package to another person" in home and "up to 3 times" in home
    solicitor = Recipient.get(Recipient.email == "solicitor@law.example")
    assert (solicitor.phone, solicitor.otp_mobile, solicitor.address) == (
        "02079460000", "07700900555", "1 Law Lane\nLeeds")
    notice = [m for m in map(read_eml, outbox(services))
              if str(m["To"]) == "radiology@hospital.example"]
    assert len(notice) == 1 and copy.public_id in notice[0].get_content()

    # The new person follows the link in their mail and gets their own passcode.
    other = Browser(client)
    await log_in(other, services, link_token(services, "solicitor@law.example"))
    sms = read_eml(outbox(services)[-1])
    assert str(sms["To"]).startswith("sms:") and "07700900555" in str(sms["To"])
    board = await other.page("/dashboard?tab=all")
    assert copy.public_id in board and source.public_id not in board
    assert "Look at &lt;b&gt;slice 3&lt;/b&gt;." in board
    assert f"/transactions/{copy.public_id}/forward" not in board
    assert "This package was forwarded to you: it cannot be forwarded again." in board
    assert "<dt>Forwarded by</dt><dd>pat@example.org</dd>" in board
    # A crafted request is refused by the server, and audited.
    csrf = field(board, "csrf")
    response = await other.post(f"/transactions/{copy.public_id}/forward",
                                data=form(csrf, "third@law.example"))
    assert response.status == 400
    assert "cannot be forwarded again" in await response.text()
    assert (await other.get(f"/transactions/{copy.public_id}/forward")).status == 400
    assert copies_of(copy) == [] and Recipient.get_or_none(
        Recipient.email == "third@law.example") is None
    refused = [e for e in events_for_transaction(copy.public_id) if e.action == "forward-refused"]
    assert len(refused) == 2 and all(e.outcome == 4 for e in refused)
    # The forwarder's package, not the copy, is in the other person's reach: 404.
    assert (await other.get(f"/transactions/{source.public_id}/forwards")).status == 404


async def test_the_fourth_forward_is_refused(browser: Browser, services: Services,
                                             study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    for n in range(3):
        csrf = await dialog_csrf(browser, source.public_id)
        response = await browser.post(f"/transactions/{source.public_id}/forward",
                                      data=form(csrf, f"p{n}@law.example"))
        assert response.status == 303, await response.text()
    details = await browser.page(f"/transactions/{source.public_id}")
    assert f"/transactions/{source.public_id}/forward\"" not in details
    assert "This package has been forwarded 3 times already, the most allowed." in details
    response = await browser.get(f"/transactions/{source.public_id}/forward")
    assert response.status == 400 and "3 times already" in await response.text()
    csrf = field(details, "csrf")
    response = await browser.post(f"/transactions/{source.public_id}/forward",
                                  data=form(csrf, "p4@law.example"))
    assert response.status == 400 and "3 times already" in await response.text()
    assert len(copies_of(source)) == 3
    listing = await browser.page(f"/transactions/{source.public_id}/forwards")
    assert all(f"p{n}@law.example" in listing for n in range(3))


async def test_ten_concurrent_posts_create_exactly_three(browser: Browser, services: Services,
                                                         study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, source.public_id)
    responses = await asyncio.gather(*(
        browser.post(f"/transactions/{source.public_id}/forward",
                     data=form(csrf, f"p{n}@law.example")) for n in range(10)))
    assert sorted(r.status for r in responses) == [303] * 3 + [400] * 7
    assert len(copies_of(source)) == 3


async def test_mistakes_come_back_with_the_values_and_the_step(browser: Browser, services: Services,
                                                               study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, source.public_id)
    cases = [
        ({"email_confirm": "solicitor@law.exampel"}, "1", "The two email addresses differ"),
        ({"phone": "ring me"}, "1", "contact telephone number"),
        ({"otp_mobile": ""}, "1", "a mobile number or a second email"),
        ({"channel": "email", "otp_email": "solicitor@law.example"}, "1", "must differ"),
        ({"purpose": ""}, "2", "Choose why you forward"),
        ({"days": "forever"}, "4", "Choose how long"),
        ({"agree": ""}, "4", "Tick the box"),
        ({"email": "pat@example.org", "email_confirm": "pat@example.org"}, "1", "yourself"),
    ]
    for changes, step, text in cases:
        response = await browser.post(f"/transactions/{source.public_id}/forward",
                                      data=form(csrf, **{"organisation": "Law & Co", **changes}))
        html = await response.text()
        assert response.status == 400, changes
        assert text in htmllib.unescape(html), (changes, text)
        assert f'data-step="{step}"' in html, changes
        assert 'value="Law &amp; Co"' in html  # what was typed is kept
    assert copies_of(source) == []


async def test_someone_forwarded_to_before_needs_only_the_email(browser: Browser,
                                                                services: Services,
                                                                study: str) -> None:
    first, token = share([study])
    second, _ = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, first.public_id)
    assert (await browser.post(f"/transactions/{first.public_id}/forward",
                               data=form(csrf))).status == 303
    html = await browser.page(f"/transactions/{second.public_id}/forward")
    assert '<option value="solicitor@law.example"></option>' in html
    bare = {"csrf": csrf, "email": "Solicitor@Law.example",
            "email_confirm": "solicitor@law.example", "purpose": "care", "agree": "yes"}
    response = await browser.post(f"/transactions/{second.public_id}/forward", data=bare)
    assert response.status == 303, await response.text()
    (copy,) = copies_of(second)
    assert copy.recipient_id == Recipient.get(Recipient.email == "solicitor@law.example").id
    # Someone not forwarded to before (even with an account) needs the details.
    share([study], "gp@example.org")
    response = await browser.post(f"/transactions/{second.public_id}/forward",
                                  data={**bare, "email": "gp@example.org",
                                        "email_confirm": "gp@example.org"})
    assert response.status == 400 and "Give the first name" in await response.text()


async def test_declined_and_expired_packages_cannot_be_forwarded(browser: Browser,
                                                                 services: Services,
                                                                 study: str) -> None:
    declined, token = share([study])
    expired, _ = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, declined.public_id)
    tx.decline(declined, "not mine")
    Transaction.update(expires_at=1.0).where(Transaction.id == expired.id).execute()
    for source, reason in ((declined, "You declined this package"),
                           (expired, "This package has expired")):
        response = await browser.post(f"/transactions/{source.public_id}/forward",
                                      data=form(csrf))
        assert response.status == 400 and reason in await response.text()
        assert copies_of(source) == []
        details = await browser.page(f"/transactions/{source.public_id}")
        assert f'/transactions/{source.public_id}/forward"' not in details and reason in details


async def test_other_peoples_packages_are_404_and_every_post_needs_csrf(
        browser: Browser, services: Services, study: str) -> None:
    mine, token = share([study])
    theirs, _ = share([study], "someone@example.org", otp_mobile="+447700900999")
    assert (await browser.get(f"/transactions/{mine.public_id}/forward")).status == 303
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, mine.public_id)
    for public_id in (theirs.public_id, "IEP00000000"):
        assert (await browser.get(f"/transactions/{public_id}/forward")).status == 404
        assert (await browser.get(f"/transactions/{public_id}/forwards")).status == 404
        response = await browser.post(f"/transactions/{public_id}/forward", data=form(csrf))
        assert response.status == 404
    assert (await browser.get("/transactions/not-an-id/forward")).status == 404
    for bad in ("", "forged", csrf[:-1]):
        response = await browser.post(f"/transactions/{mine.public_id}/forward",
                                      data=form(bad))
        assert response.status == 403, bad
    assert copies_of(mine) == [] and copies_of(theirs) == []
    assert Recipient.get_or_none(Recipient.email == "solicitor@law.example") is None


async def test_staff_see_the_forward_in_both_audit_trails(client: Any, browser: Browser,
                                                          services: Services, study: str) -> None:
    source, token = share([study])
    await log_in(browser, services, token)
    csrf = await dialog_csrf(browser, source.public_id)
    assert (await browser.post(f"/transactions/{source.public_id}/forward",
                               data=form(csrf))).status == 303
    (copy,) = copies_of(source)
    _, secret = make_user("drwho")
    staff = Browser(client)
    assert (await staff_log_in(staff, "drwho", secret)).status == 303
    trail = htmllib.unescape(await staff.page(f"/admin/transactions/{source.public_id}"))
    assert f"forwarded to solicitor@law.example as {copy.public_id}" in trail
    assert "hospital contact radiology@hospital.example told" in trail
    copy_page = htmllib.unescape(await staff.page(f"/admin/transactions/{copy.public_id}"))
    assert f"copy of {source.public_id} for solicitor@law.example" in copy_page
    assert "solicitor@law.example" in copy_page and "pat@example.org" in copy_page


async def test_max_forwards_zero_turns_forwarding_off(aiohttp_client: Any, tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, max_forwards=0))
    uid = store(services, factory.make_ct_series(tmp_path / "ct", 1, PatientName="Roe^Rick"))
    source, token = share([uid])
    browser = Browser(await aiohttp_client(create_app(services.settings, services),
                                           cookie_jar=aiohttp.DummyCookieJar()))
    await log_in(browser, services, token)
    board = await browser.page("/dashboard?tab=all")
    assert f"/transactions/{source.public_id}/forward\"" not in board
    assert "Forwarding is turned off." in board
    assert "Forward a package" not in await browser.page("/dashboard?tab=home")
    response = await browser.post(f"/transactions/{source.public_id}/forward",
                                  data=form(field(board, "csrf")))
    assert response.status == 400 and "turned off" in await response.text()
    assert copies_of(source) == []
