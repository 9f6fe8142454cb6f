"""End to end in Chromium: View Report opens the PDF; an attachment is added through the page.

dcmtk ``storescu`` sends a CT with an Encapsulated PDF report to ``iepnode serve``;
``iepnode transfer create`` shares it (link and passcode read from the outbox); headless
Chromium (Playwright, ``/usr/bin/chromium``) signs in, clicks View Report, and the PDF
must come back as ``application/pdf`` with the report's bytes and open in the browser's
viewer; then a PNG is attached through the attachments page and must be stored as a
Secondary Capture of the study, held by the transaction: the reports page lists it
apart from the hospital's report, labelled with who added it (issue 13).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Frame, Page, expect, sync_playwright
from pydicom import dcmread

from tests import data_factory as factory
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.support.node import running_node
from tests.support.scu import storescu
from tests.test_download import outbox_text

#: Chromium's built-in PDF viewer extension.
PDF_VIEWER = "chrome-extension://mhjfbmdgcfjbbpaeojofohoefgiehjai/"


def test_view_report_opens_the_pdf_and_an_attachment_is_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_chromium()
    monkeypatch.setenv("IEPNODE_FSYNC", "false")
    ct = factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Jane", PatientID="P1",
                                StudyDate="20240105", StudyDescription="CT HEAD")
    pdf = factory.minimal_pdf("Report of the CT head")
    files = [*ct, factory.make_pdf(tmp_path / "ct", like=ct[0], pdf=pdf,
                                   DocumentTitle="CT head report")]
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    png = tmp_path / "wound photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8)
                    ).save(png)
    data_dir = tmp_path / "node"

    with running_node(data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store")]) as node:
        sent = storescu(node, files)
        assert sent.returncode == 0, sent.stderr
        public_id = node.cli("transfer", "create", "--study", study_uid, "--to",
                             "pat@example.org", "--otp-mobile", "+447700900123",
                             ).stdout.strip()
        token = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        assert token
        origin = f"http://127.0.0.1:{node.http_port}"

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.goto(f"{origin}/t/{token.group(1)}")
                code = re.search(r"\b(\d{6})\b", outbox_text(data_dir, "sms:"))
                assert code
                page.get_by_label("Passcode").fill(code.group(1))
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url("**/dashboard")

                page.goto(f"{origin}/transactions/{public_id}")
                page.get_by_role("link", name="View Report").click()
                page.wait_for_url(f"**/transactions/{public_id}/reports")
                expect(page.locator("table.reports")).to_contain_text("CT head report")
                # The report opens in a new tab (target=_blank): its response is the context's.
                with context.expect_page() as opened, context.expect_event(
                        "response", lambda r: bool(re.search(r"/reports/[0-9.]+$", r.url)),
                ) as answer:
                    page.get_by_role("link", name="View Report").click()
                response = answer.value
                assert response.status == 200
                assert response.header_value("content-type") == "application/pdf"
                # Chromium hands the PDF to its viewer (the body Playwright sees is the
                # viewer's wrapper page): fetch the bytes again with the page's cookies.
                again = context.request.get(response.url)
                assert again.status == 200 and again.body() == pdf
                assert again.headers["content-type"] == "application/pdf"
                assert response.header_value("content-disposition") == (
                    'inline; filename="CT_head_report.pdf"')
                viewer = opened.value
                viewer.wait_for_load_state()
                assert re.search(r"/reports/[0-9.]+$", viewer.url)
                # Chromium opened the document as a PDF (not a download) and its PDF viewer
                # (a built-in extension frame) rendered it: its toolbar shows the file name.
                assert viewer.evaluate("document.contentType") == "application/pdf"
                pdf_viewer = next(f for f in _wait_frames(viewer)
                                  if f.url.startswith(PDF_VIEWER))
                expect(pdf_viewer.get_by_text("CT_head_report.pdf")).to_be_visible()
                viewer.screenshot(path=str(tmp_path / "report.png"))
                viewer.close()

                page.goto(f"{origin}/transactions/{public_id}/attachments")
                page.get_by_label("Title (optional)").fill("Wound, day 3")
                page.get_by_label("File (PDF, JPEG or PNG)").set_input_files(str(png))
                page.get_by_role("button", name="Attach").click()
                page.wait_for_url("**/attachments?done=added")
                expect(page.get_by_role("status")).to_contain_text("The file is attached")
                expect(page.locator("table.attachments")).to_contain_text("wound photo.png")
                expect(page.locator("table.attachments")).to_contain_text("Wound, day 3")
                expect(page.locator("table.attachments")).to_contain_text(
                    "Added by the recipient pat@example.org on")
                page.screenshot(path=str(tmp_path / "attachments.png"), full_page=True)
                # The reports page keeps it apart from the hospital's report, labelled.
                page.goto(f"{origin}/transactions/{public_id}/reports")
                expect(page.locator("table.reports")).not_to_contain_text("Wound, day 3")
                added = page.locator("#attached")
                expect(added.get_by_role("heading")).to_contain_text("Not from the hospital")
                expect(added.locator("table")).to_contain_text("\u201cWound, day 3\u201d")
                expect(added.locator("table")).to_contain_text(
                    "Added by the recipient pat@example.org on")
                expect(added.locator("table")).to_contain_text(
                    "not part of the hospital's record")
                with context.expect_page() as tab, context.expect_event(
                        "response", lambda r: "/reports/" in r.url) as shown:
                    added.get_by_role("link", name="View attachment").click()
                assert shown.value.status == 200
                assert shown.value.header_value("content-type") == "image/png"
                picture = tab.value
                picture.wait_for_load_state()
                # Chromium shows the picture (the sandbox CSP does not block it): 40x30.
                assert picture.evaluate(
                    "() => [document.images.length, document.images[0].naturalWidth,"
                    " document.images[0].naturalHeight]") == [1, 40, 30]
                picture.close()
                page.screenshot(path=str(tmp_path / "reports.png"), full_page=True)
                assert problems == []
            finally:
                browser.close()
    stored = [dcmread(p, stop_before_pixels=True) for p in (data_dir / "objects").rglob("*")
              if p.is_file()]
    sc = [ds for ds in stored if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(sc) == 1 and sc[0].StudyInstanceUID == study_uid
    assert sc[0].SeriesDescription == "Wound, day 3"


def _wait_frames(page: Page) -> list[Frame]:
    """The page's frames once the PDF viewer's extension frame is there."""
    for _ in range(100):
        if any(f.url.startswith(PDF_VIEWER) for f in page.frames):
            break
        page.wait_for_timeout(100)
    return page.frames
