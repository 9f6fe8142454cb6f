"""End to end: a patient forwards a package to a solicitor in Chromium, on a running node.

``iepnode serve`` (two HTTP processes sharing the port) receives a CT study from
dcmtk's ``storescu``; ``iepnode transfer create`` shares it twice with the patient
through a real SMTP server (aiosmtpd). Headless Chromium logs the patient in from
the mail, walks the 4-step forward dialog (the disclaimer gates Finish), and the
solicitor logs in from the mail they receive and finds no Forward action (the
server also refuses a crafted request). The fourth forward, from a dialog opened
before the third, is refused; ten simultaneous forward requests sent by the page
create exactly three copies; the same race over plain HTTP against a node on
PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    expect,
    sync_playwright,
)
from pydicom import dcmread

from tests import data_factory as factory
from tests.support.browser import Browser as CookieBrowser
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS, portal_environment, require_chromium
from tests.support.mail import Inbox, wait_for_mail
from tests.support.node import add_staff_user, run_cli, running_node
from tests.support.scu import storescu
from tests.test_recipient_web import field, read_eml

INSTITUTION = "St Elsewhere NHS Trust"
HOSPITAL = "radiology@hospital.example"
SOLICITOR = "solicitor@law.example"
SOLICITOR_CODES = "sol-codes@law.example"


def passcode(inbox: Inbox, address: str, count: int) -> str:
    mail = wait_for_mail(inbox, address, count)
    match = re.search(r"\b(\d{6})\b", mail.get_content())
    assert match, mail.get_content()
    return match.group(1)


def link_in(inbox: Inbox, address: str, count: int = 1) -> str:
    mail = wait_for_mail(inbox, address, count)
    match = re.search(r"http://127\.0\.0\.1:\d+/t/[A-Za-z0-9_-]+", mail.get_content())
    assert match, mail.get_content()
    return match.group(0)


def sign_in(page: Page, link: str, inbox: Inbox, codes_to: str, count: int) -> None:
    page.goto(link)
    expect(page.locator("h1")).to_have_text("Sign in to see your images")
    page.get_by_label("Passcode").fill(passcode(inbox, codes_to, count))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dashboard")


def forward_copies(data_dir: Path, public_id: str) -> list[str]:
    """Public IDs of the forwarded copies of ``public_id``, read from the node's index."""
    uri = f"file:{data_dir / 'index.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        rows = conn.execute(
            'SELECT c."public_id" FROM "transaction" c JOIN "transaction" s '
            'ON c."forwarded_from_id" = s."id" WHERE s."public_id" = ? ORDER BY c."id"',
            (public_id,)).fetchall()
    return [r[0] for r in rows]


def test_forward_dialog_limits_and_the_forwarded_recipient_in_chromium(
    tmp_path: Path, smtp: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_chromium()
    inbox, smtp_port = smtp, smtp.port
    http_port = portal_environment(monkeypatch, smtp_port, INSTITUTION)
    files = factory.make_ct_series(
        tmp_path / "ct", 2, PatientName="Connor^Flake", PatientID="SDH1088",
        PatientBirthDate="19710402", PatientSex="M", StudyDate="20240105",
        StudyDescription="CT HEAD")
    study_uid = dcmread(files[0]).StudyInstanceUID
    data_dir = tmp_path / "node"
    run_cli(data_dir, "ae", "add", "TESTSCU", "127.0.0.1", "0", "--allow", "store")
    add_staff_user(data_dir, "drwho", "--name", "Dr Who", "--department", "Radiology",
                   "--email", HOSPITAL)
    with running_node(data_dir, extra=["--http-port", str(http_port),
                                       "--http-workers", "2"]) as node:
        assert storescu(node, files).returncode == 0
        packages = [run_cli(data_dir, "transfer", "create", "--study", study_uid, "--to",
                            "pat@example.org", "--otp-email", "pat-codes@example.org",
                            "--as-user", "drwho").stdout.strip() for _ in range(2)]
        first, second = packages
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                patient = browser.new_context(viewport={"width": 1280, "height": 900})
                problems = _watch(patient)
                page = patient.new_page()
                sign_in(page, link_in(inbox, "pat@example.org", 1), inbox,
                        "pat-codes@example.org", 1)

                _first_forward(page, first, tmp_path)
                notice = wait_for_mail(inbox, HOSPITAL)
                assert first in notice.get_content() and SOLICITOR in notice.get_content()
                assert forward_copies(data_dir, first) != []
                _solicitor(browser, inbox, forward_copies(data_dir, first)[0], tmp_path)

                _second_and_stale_fourth(patient, page, first, tmp_path)
                assert len(forward_copies(data_dir, first)) == 3

                statuses = _ten_at_once(page, second)
                assert sorted(statuses) == [0] * 3 + [400] * 7, statuses
                assert len(forward_copies(data_dir, second)) == 3
                page.goto(f"http://127.0.0.1:{http_port}/transactions/{second}/forwards")
                expect(page.locator("#fwd-list tbody tr")).to_have_count(3)
                # Only the refusals the test asked for went wrong.
                unexpected = [p for p in problems if not re.search(
                    r"(HTTP 400 for \S+/forward$)|(status of 400)", p)]
                assert unexpected == [], unexpected
            finally:
                browser.close()


def _watch(context: BrowserContext) -> list[str]:
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    context.on("console", console)
    context.on("weberror", lambda error: problems.append(f"page error: {error.error}"))
    context.on("page", lambda page: page.on(
        "pageerror", lambda exc: problems.append(f"page error: {exc}")))
    context.on("response", lambda r: r.status >= 400 and problems.append(
        f"HTTP {r.status} for {r.url}"))
    return problems


def _base(page: Page) -> str:
    match = re.match(r"https?://[^/]+", page.url)
    assert match, page.url
    return match.group(0)


def _open_dialog(page: Page, public_id: str) -> None:
    page.goto(f"{_base(page)}/dashboard?tab=all")
    row = page.locator(f"#tx-{public_id}")
    row.locator("> summary").click()
    row.get_by_role("link", name="Forward", exact=True).click()
    page.wait_for_url(f"**/transactions/{public_id}/forward")
    expect(page.locator("h1")).to_have_text("Forward")


def _step(page: Page, number: int) -> None:
    """Only step ``number`` shows, and the step list marks it."""
    for n in range(1, 5):
        fieldset = page.locator(f'fieldset.fwd-step[data-step="{n}"]')
        (expect(fieldset).to_be_visible if n == number else expect(fieldset).to_be_hidden)()
    expect(page.locator('.fwd-steps li[aria-current="step"]')).to_have_attribute(
        "data-step", str(number))


def _next(page: Page, number: int) -> None:
    page.locator(f'fieldset.fwd-step[data-step="{number}"]').get_by_role(
        "button", name="Next").click()


def _first_forward(page: Page, public_id: str, shots: Path) -> None:
    _open_dialog(page, public_id)
    facts = page.locator(".fwd-package")
    for text in (public_id, "CONNOR, Flake", "Male", "SDH1088", "2 Apr 1971"):
        expect(facts).to_contain_text(text)
    expect(page.locator(".fwd-to")).to_contain_text("Patient / Individual")
    _step(page, 1)
    _next(page, 1)
    _step(page, 1)  # nothing typed: the browser keeps the step and points at the field
    page.get_by_label("E-mail address of individual").fill(SOLICITOR)
    page.get_by_label("Confirm e-mail address").fill("solicitor@law.exampel")
    _next(page, 1)
    _step(page, 1)
    assert page.get_by_label("Confirm e-mail address").evaluate("e => e.validationMessage") == (
        "The two email addresses differ: type the same address twice.")
    page.get_by_label("Confirm e-mail address").fill(SOLICITOR.upper())
    page.get_by_label("Contact first name").fill("Hanna")
    page.get_by_label("Contact last name").fill("Law")
    page.get_by_label("Address", exact=True).fill("1 Law Lane\nLeeds LS1 1AA")
    page.get_by_label("Contact telephone number").fill("0113 496 0000")
    page.get_by_label("Use email instead").check()
    expect(page.get_by_label("Mobile number for the passcode")).to_be_disabled()
    page.get_by_label("Second email address for the passcode").fill(SOLICITOR_CODES)
    page.screenshot(path=str(shots / "forward-1.png"), full_page=True)
    _next(page, 1)
    _step(page, 2)
    _next(page, 2)
    _step(page, 2)  # the purpose is required
    page.get_by_label("Why are you forwarding the package?").select_option("legal")
    page.get_by_label("Organisation of the recipient (optional)").fill("Law & Co")
    _next(page, 2)
    _step(page, 3)
    page.get_by_label("Message to the recipient (optional)").fill("For your <b>review</b>.")
    _next(page, 3)
    _step(page, 4)
    note = page.locator("#retention-note")
    expect(note).to_contain_text(f"{SOLICITOR} will be able to view and download")
    expect(note).to_contain_text("UTC")
    finish = page.get_by_role("button", name="Finish")
    agree = page.get_by_label("I approve this transfer")
    expect(page.locator(".fwd-disclaimer")).to_contain_text(
        "you are sending confidential data for the patient listed to the selected recipient")
    expect(finish).to_be_disabled()
    agree.check()
    expect(finish).to_be_enabled()
    agree.uncheck()
    expect(finish).to_be_disabled()
    page.locator('fieldset.fwd-step[data-step="4"]').get_by_role("button", name="Back").click()
    _step(page, 3)
    _next(page, 3)
    agree.check()
    page.screenshot(path=str(shots / "forward-4.png"), full_page=True)
    finish.click()
    page.wait_for_url(f"**/transactions/{public_id}/forwards?done=sent")
    expect(page.get_by_role("status")).to_contain_text("The package has been forwarded.")
    expect(page.locator("#fwd-list")).to_contain_text(SOLICITOR)
    expect(page.locator("#fwd-count")).to_contain_text("Forwarded 1 of 3 times.")


def _solicitor(browser: Browser, inbox: Inbox, copy_id: str, shots: Path) -> None:
    """The solicitor logs in from their mail: the package is there, Forward is not."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    problems = _watch(context)
    page = context.new_page()
    mail = wait_for_mail(inbox, SOLICITOR)
    assert "has forwarded medical images from St Elsewhere NHS Trust" in mail.get_content()
    sign_in(page, link_in(inbox, SOLICITOR), inbox, SOLICITOR_CODES, 1)
    row = page.locator(f"#tx-{copy_id}")
    expect(row.locator("> summary")).to_contain_text("CONNOR, Flake")
    row.locator("> summary").click()
    expect(row.locator(".thread")).to_contain_text("For your <b>review</b>.")
    expect(row.locator(".fwd-panel")).to_contain_text("cannot be forwarded again")
    expect(row.get_by_role("link", name="Forward", exact=True)).to_have_count(0)
    page.screenshot(path=str(shots / "solicitor.png"), full_page=True)
    crafted = page.evaluate("""async (id) => {
        const body = new FormData();
        for (const [k, v] of Object.entries({
            csrf: document.querySelector('input[name=csrf]').value,
            email: 'third@law.example', email_confirm: 'third@law.example',
            first_name: 'T', last_name: 'P', address: 'x', phone: '0113 496 0001',
            channel: 'sms', otp_mobile: '07700 900777', purpose: 'other', agree: 'yes'})) {
            body.append(k, v);
        }
        const r = await fetch(`/transactions/${id}/forward`, {method: 'POST', body,
                                                               redirect: 'manual'});
        return [r.status, await r.text()];
    }""", copy_id)
    assert crafted[0] == 400 and "cannot be forwarded again" in crafted[1]
    assert all(re.search(r"(/forward$)|(status of 400)", p) for p in problems), problems
    context.close()


def _second_and_stale_fourth(patient: BrowserContext, page: Page, public_id: str,
                             shots: Path) -> None:
    """Forward to the solicitor again (known: only the email), then a third person while a
    second tab has the dialog open; that tab's Finish is then the fourth and refused."""
    _open_dialog(page, public_id)
    page.get_by_label("E-mail address of individual").fill(SOLICITOR)
    page.get_by_label("Confirm e-mail address").fill(SOLICITOR)
    expect(page.locator("#known-note")).to_be_visible()
    expect(page.locator("#new-individual")).to_be_hidden()
    _next(page, 1)
    page.get_by_label("Why are you forwarding the package?").select_option("second-opinion")
    _next(page, 2)
    _next(page, 3)
    page.get_by_label("I approve this transfer").check()
    page.get_by_role("button", name="Finish").click()
    page.wait_for_url("**/forwards?done=sent")
    expect(page.locator("#fwd-count")).to_contain_text("Forwarded 2 of 3 times.")

    stale = patient.new_page()  # the dialog opened while one forward is left
    stale.goto(f"{_base(page)}/transactions/{public_id}/forward")
    _open_dialog(page, public_id)
    _fill_new_person(page, "gp@clinic.example")
    page.get_by_role("button", name="Finish").click()
    page.wait_for_url("**/forwards?done=sent")
    expect(page.locator("#fwd-count")).to_contain_text("Forwarded 3 of 3 times.")
    _fill_new_person(stale, "late@law.example")
    stale.get_by_role("button", name="Finish").click()
    expect(stale.locator("h1")).to_have_text("That did not work")
    expect(stale.locator("main")).to_contain_text(
        "This package has been forwarded 3 times already, the most allowed.")
    stale.screenshot(path=str(shots / "fourth-refused.png"), full_page=True)
    stale.close()
    page.goto(f"{_base(page)}/dashboard?tab=all")
    row = page.locator(f"#tx-{public_id}")
    row.locator("> summary").click()
    expect(row.locator(".fwd-panel")).to_contain_text("forwarded 3 times already")
    expect(row.get_by_role("link", name="Forward", exact=True)).to_have_count(0)


def _fill_new_person(page: Page, email: str) -> None:
    page.get_by_label("E-mail address of individual").fill(email)
    page.get_by_label("Confirm e-mail address").fill(email)
    page.get_by_label("Contact first name").fill("Gee")
    page.get_by_label("Contact last name").fill("Pee")
    page.get_by_label("Address", exact=True).fill("2 Clinic Road")
    page.get_by_label("Contact telephone number").fill("+44 113 496 0002")
    page.get_by_label("Mobile number for the passcode").fill("+44 7700 900222")
    _next(page, 1)
    page.get_by_label("Why are you forwarding the package?").select_option("care")
    _next(page, 2)
    _next(page, 3)
    page.get_by_label("I approve this transfer").check()


def _ten_at_once(page: Page, public_id: str) -> list[int]:
    """Ten forward requests sent by the page at once; their HTTP statuses (0: redirect)."""
    _open_dialog(page, public_id)
    return page.evaluate("""async (id) => {
        const csrf = document.querySelector('input[name=csrf]').value;
        const one = (n) => {
            const body = new FormData();
            for (const [k, v] of Object.entries({
                csrf, email: `p${n}@law.example`, email_confirm: `p${n}@law.example`,
                first_name: 'P', last_name: String(n), address: 'Somewhere',
                phone: '0113 496 0003', channel: 'sms', otp_mobile: '07700 900333',
                purpose: 'other', days: 'longest', agree: 'yes'})) {
                body.append(k, v);
            }
            return fetch(`/transactions/${id}/forward`, {method: 'POST', body,
                                                         redirect: 'manual'});
        };
        const answers = await Promise.all([...Array(10).keys()].map(one));
        return answers.map((r) => r.status);
    }""", public_id)


async def test_ten_simultaneous_http_forwards_on_postgresql(tmp_path: Path,
                                                            fresh_postgres_url: str) -> None:
    """The same race over HTTP against two node processes sharing a PostgreSQL index."""
    data_dir = tmp_path / "node"
    database = ["--database-url", fresh_postgres_url]
    run_cli(data_dir, "ae", "add", "TESTSCU", "127.0.0.1", "0", "--allow", "store",
            extra=database)
    files = factory.make_ct_series(tmp_path / "ct", 1, PatientName="Roe^Rick")
    with running_node(data_dir, extra=[*database, "--http-workers", "2"]) as node:
        assert storescu(node, files).returncode == 0
        public_id = run_cli(data_dir, "transfer", "create", "--study",
                            dcmread(files[0]).StudyInstanceUID, "--to", "pat@example.org",
                            "--otp-email", "codes@example.org", extra=database).stdout.strip()
        outbox = data_dir / "outbox"
        token = re.search(r"/t/([A-Za-z0-9_-]+)", read_eml(
            sorted(outbox.glob("*.eml"))[-1]).get_content()).group(1)  # type: ignore[union-attr]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{node.http_port}",
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            client = CookieBrowser(session)
            login = await client.page(f"/t/{token}")
            # Outbox files are named by UTC time: the newest is the passcode just sent.
            code = re.search(r"\b(\d{6})\b", read_eml(
                sorted(outbox.glob("*.eml"))[-1]).get_content()).group(1)  # type: ignore[union-attr]
            response = await client.post(f"/t/{token}/login", data={
                "attempt": field(login, "attempt"), "csrf": field(login, "csrf"), "code": code})
            assert response.status == 303
            csrf = field(await client.page(f"/transactions/{public_id}/forward"), "csrf")
            answers = await asyncio.gather(*(client.post(
                f"/transactions/{public_id}/forward", data={
                    "csrf": csrf, "email": f"p{n}@law.example",
                    "email_confirm": f"p{n}@law.example", "first_name": "P",
                    "last_name": str(n), "address": "Somewhere", "phone": "0113 496 0003",
                    "channel": "sms", "otp_mobile": "07700 900333", "purpose": "other",
                    "agree": "yes"}) for n in range(10)))
            assert sorted(a.status for a in answers) == [303] * 3 + [400] * 7
            listing = await client.page(f"/transactions/{public_id}/forwards")
            assert "Forwarded 3 of 3 times." in listing
            assert len(re.findall(r"@law\.example</td>", listing)) == 3
