"""End to end with real peers: dcmtk storescu -> iepnode serve -> SMTP (aiosmtpd) -> Chromium.

A synthetic CT study is sent with dcmtk's ``storescu`` to a running ``iepnode
serve``; ``iepnode transfer create`` shares it and mails the link to an aiosmtpd
server; headless Chromium (Playwright, ``/usr/bin/chromium``) opens the link, the
passcode is read from the second email, typed in, and the dashboard must show the
transaction with the right details. Screenshots are written to ``tmp_path``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from pydicom import dcmread

from tests import data_factory as factory
from tests.support.chromium import (
    CHROMIUM,
    CHROMIUM_ARGS,
    console_problem,
    portal_environment,
    require_chromium,
)
from tests.support.mail import Inbox, wait_for_mail
from tests.support.node import add_staff_user, run_cli, running_node
from tests.support.scu import storescu

INSTITUTION = "St Elsewhere NHS Trust"


def test_study_sent_by_storescu_reaches_the_recipient_in_chromium(
    tmp_path: Path, smtp: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_chromium()
    inbox, smtp_port = smtp, smtp.port
    http_port = portal_environment(monkeypatch, smtp_port, INSTITUTION)
    files = factory.make_ct_series(
        tmp_path / "ct", 3, PatientName="Doe^Jane", PatientID="P1", PatientBirthDate="19800214",
        PatientSex="F", StudyDate="20240105", StudyDescription="CT HEAD")
    study_uid = dcmread(files[0]).StudyInstanceUID
    data_dir = tmp_path / "node"
    # ``extra`` goes to every CLI command of the node, and only ``serve`` knows --http-port:
    # register the AE and create the transfer with run_cli instead of node.cli.
    run_cli(data_dir, "ae", "add", "TESTSCU", "127.0.0.1", "0", "--allow", "store")
    add_staff_user(data_dir, "drwho", "--name", "Dr Who", "--department", "Radiology",
                   "--email", "radiology@hospital.example", "--phone", "+441234567890")
    with running_node(data_dir, extra=["--http-port", str(http_port)]) as node:
        assert node.http_port == http_port
        sent = storescu(node, files)
        assert sent.returncode == 0, sent.stderr
        public_id = run_cli(data_dir, "transfer", "create", "--study", study_uid, "--to",
                             "pat@example.org", "--otp-email", "code@example.org",
                             "--message", "Your CT from Monday.", "--as-user", "drwho",
                             ).stdout.strip()
        assert re.fullmatch(r"IEP\d{8}", public_id), public_id
        link_mail = wait_for_mail(inbox, "pat@example.org")
        link = re.search(r"http://127\.0\.0\.1:\d+/t/[A-Za-z0-9_-]+", link_mail.get_content())
        assert link, link_mail.get_content()

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                problems: list[str] = []
                page.on("console", lambda m: console_problem(m, problems))
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on("response", lambda r: r.status >= 400 and problems.append(
                    f"HTTP {r.status} for {r.url}"))
                _walk_through(page, link.group(0), inbox, public_id, tmp_path)
                cookies = {c["name"]: c for c in context.cookies()}
                session = cookies["__Host-iepnode"]
                assert (session["secure"], session["httpOnly"], session["sameSite"],
                        session["path"]) == (True, True, "Lax", "/")
                assert page.evaluate("document.cookie") == ""
                assert problems == []
            finally:
                browser.close()


def _walk_through(page: Page, link: str, inbox: Inbox, public_id: str, shots: Path) -> None:
    page.goto(link)
    expect(page.locator("h1")).to_have_text("Sign in to see your images")
    expect(page.get_by_role("status").first).to_contain_text("c•••@example.org")
    passcode_mail = wait_for_mail(inbox, "code@example.org")
    code = re.search(r"\b(\d{6})\b", passcode_mail.get_content())
    assert code, passcode_mail.get_content()
    page.screenshot(path=str(shots / "login.png"), full_page=True)
    page.get_by_label("Passcode").fill(code.group(1))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dashboard")

    row = page.locator(f"#tx-{public_id}")
    summary = row.locator("> summary")
    expect(summary).to_contain_text("DOE, Jane")
    expect(summary).to_contain_text(INSTITUTION)
    expect(summary).to_contain_text("New")
    expect(summary).to_contain_text("1 new")
    expect(page.locator(".tx-head")).to_have_text(re.compile(
        r"Type\s*Dir\.\s*Date\s*Patient name\s*Institution\s*Messages\s*Status\s*Actions"))
    studies = row.locator("table.studies")
    expect(studies).not_to_be_visible()
    summary.click()
    expect(studies).to_be_visible()
    expect(studies.locator("tbody tr")).to_have_count(1)
    expect(studies.locator("tbody tr")).to_contain_text("CT")
    expect(studies.locator("tbody tr")).to_contain_text("5 Jan 2024")
    expect(studies.locator("tbody tr")).to_contain_text("CT HEAD")
    expect(studies.locator("tbody tr")).to_contain_text("3 / 3")
    mailto = row.locator('a[href^="mailto:"]')
    expect(mailto).to_have_attribute("href", "mailto:radiology@hospital.example")
    expect(mailto).to_be_visible()
    expect(row.locator(".contact")).to_contain_text("Dr Who")
    expect(row.locator(".thread")).to_contain_text("Your CT from Monday.")
    page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

    row.get_by_label("Write to the hospital").fill("Thank you, <b>received</b>.")
    row.get_by_role("button", name="Send message").click()
    page.wait_for_url(f"**/dashboard?tab=action&open={public_id}*")
    row = page.locator(f"#tx-{public_id}")
    expect(row.locator("table.studies")).to_be_visible()
    expect(row.locator(".msg.mine")).to_have_text(re.compile(r"Thank you, <b>received</b>\."))
    page.screenshot(path=str(shots / "message.png"), full_page=True)
