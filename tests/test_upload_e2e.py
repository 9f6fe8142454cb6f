"""End to end: a patient answers a request for images in Chromium, on a running node.

``iepnode request create`` asks the patient for images through a real SMTP server
(aiosmtpd). Headless Chromium signs in from the mail, finds ``Request | Out | New``
with Open, sees the hospital contact on hover, drops several files (a hostile and a
non-ASCII name among them) and a zip of a CD folder on the drop zone, picks a large
file with the file dialog (progress must move through intermediate values), fills
in the patient, says No and then Yes to the confirmation, and the confirmation email
arrives; the big file's second chunk is cut (the page resumes from the server's
offset). Before that, an upload is cut mid-chunk on a raw socket and resumed from the
server's offset. A folder is picked for a second request, then cancelled: nothing stays
staged, nothing reaches the store.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import socket
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

from tests import data_factory as factory
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS, portal_environment, require_chromium
from tests.support.mail import Inbox, wait_for_mail
from tests.support.node import RunningNode, add_staff_user, run_cli, running_node, wait_for
from tests.test_forward_e2e import _base, _watch, link_in, sign_in

INSTITUTION = "North Tees Hospital"
PATIENT = "pat@example.org"
CODES = "pat-codes@example.org"
XSS_NAME = "<img src=x onerror=alert(1)>.dcm"
UNICODE_NAME = "Ünïcødé 検査 слой.dcm"


def staged(data_dir: Path) -> dict[str, str]:
    """Staged files: path -> SHA-256 of the content."""
    root = data_dir / "staging"
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class RawClient:
    """Plain HTTP to the node with the browser's session cookie (for cutting connections)."""

    def __init__(self, port: int, cookie: str, csrf: str) -> None:
        self.port, self.cookie, self.csrf = port, cookie, csrf

    def _send(self, method: str, url: str, body: bytes | str | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, url, body, {"Cookie": self.cookie, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def announce(self, public_id: str, name: str, size: int) -> str:
        body = urllib.parse.urlencode({"csrf": self.csrf, "name": name, "size": size})
        status, headers, text = self._send(
            "POST", f"/transactions/{public_id}/upload/files", body,
            {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 201, text
        return headers["Location"]

    def offset(self, url: str) -> int:
        status, headers, _ = self._send("HEAD", url)
        assert status == 200
        return int(headers["Upload-Offset"])

    def patch(self, url: str, offset: int, data: bytes) -> int:
        return self._send("PATCH", url, data, {
            "X-CSRF-Token": self.csrf, "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream"})[0]

    def patch_and_cut(self, url: str, offset: int, announced: int, data: bytes) -> None:
        """Announce ``announced`` bytes, send only ``data``, and drop the connection."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            head = (f"PATCH {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {self.cookie}\r\n"
                    f"X-CSRF-Token: {self.csrf}\r\nUpload-Offset: {offset}\r\n"
                    f"Content-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {announced}\r\n\r\n")
            sock.sendall(head.encode() + data)
            sock.shutdown(socket.SHUT_RDWR)


def drop(page: Page, files: list[tuple[str, bytes]]) -> None:
    """Drop files on the drop zone with a DataTransfer, as a drag from the desktop does."""
    handle = page.evaluate_handle(
        """(files) => { const dt = new DataTransfer();
             for (const f of files) {
               const bytes = Uint8Array.from(atob(f.b64), c => c.charCodeAt(0));
               dt.items.add(new File([bytes], f.name));
             }
             return dt; }""",
        [{"name": n, "b64": base64.b64encode(b).decode()} for n, b in files])
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": handle})
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": handle})


def wait_all_done(page: Page, count: int) -> None:
    expect(page.locator("#file-total")).to_have_text(str(count), timeout=60_000)
    page.wait_for_function(
        """(n) => { const rows = document.querySelectorAll('#file-rows tr');
                    return rows.length === n && [...rows].every(
                      r => r.dataset.state === 'done' || r.dataset.state === 'skipped'); }""",
        arg=count, timeout=120_000)


def test_request_upload_in_chromium(tmp_path: Path, smtp: Inbox,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    require_chromium()
    inbox, smtp_port = smtp, smtp.port
    http_port = portal_environment(monkeypatch, smtp_port, INSTITUTION)
    data_dir = tmp_path / "node"
    slices = [p.read_bytes() for p in factory.make_ct_series(
        tmp_path / "ct", 6, PatientName="Test^Patient", PatientID="CD123",
        PatientBirthDate="20010101", PatientSex="F")]
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("CD/DICOM/ST000/IM0001", slices[3])
        archive.writestr("CD/DICOM/ST000/IM0002", slices[4])
    # 40 MB (4480 x 4480 x 16 bit): three chunks of 16 MiB.
    big = factory.make_ct_series(tmp_path / "big", 1, rows=4480, columns=4480,
                                 PatientName="Test^Patient", PatientID="CD123")[0]
    big = big.rename(tmp_path / "big scan.dcm")
    resumed = bytes(range(256)) * 1200

    def request(reason: str) -> str:
        return run_cli(data_dir, "request", "create", "--to", PATIENT, "--otp-email", CODES,
                       "--last-name", "Test", "--first-name", "Patient", "--birth-date",
                       "01/01/2001", "--sex", "F", "--patient-id", "NTEES000180",
                       "--reason", reason,
                       "--as-user", "nicky").stdout.strip()

    add_staff_user(data_dir, "nicky", "--name", "Ms Nicky Humphries", "--department",
                   "Medical Records", "--email", "ni-hum@hospital.example", "--phone",
                   "+441473350314")
    with running_node(data_dir, extra=["--http-port", str(http_port)]) as node:
        first = request("Images from your CD")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                problems = _watch(context)
                page = context.new_page()
                page.on("dialog", lambda d: (problems.append(f"JS dialog {d.message}"),
                                             d.dismiss()))
                sign_in(page, link_in(inbox, PATIENT, 1), inbox, CODES, 1)
                _dashboard_row(page, first)
                page.get_by_role("link", name="Open").first.click()
                page.wait_for_url(f"**/transactions/{first}/upload")
                page.hover(".contact-hover")
                expect(page.locator(".contact-card")).to_be_visible()
                expect(page.locator(".contact-card")).to_contain_text("ni-hum@hospital.example")
                expect(page.locator("#no-files")).to_be_visible()

                cookie = next(c for c in context.cookies() if c["name"] == "__Host-iepnode")
                raw = RawClient(http_port, f"__Host-iepnode={cookie['value']}",
                                page.locator("#upload-app").get_attribute("data-csrf") or "")
                _cut_and_resume(raw, first, resumed, data_dir)

                page.reload()  # the resumed file is listed, complete
                expect(page.locator("#file-total")).to_have_text("1")
                page.evaluate("""() => { window.seen = [];
                    new MutationObserver(() => { const p = document.getElementById(
                      'overall-progress'); window.seen.push([p.value, p.max]); })
                    .observe(document.getElementById('overall-progress'),
                             {attributes: true}); }""")
                # The connection drops under the big file's second chunk: the page asks the
                # server for the offset (HEAD) and goes on from there.
                cut: list[str] = []

                def drop_second_chunk(route: Route) -> None:
                    if (route.request.method == "PATCH" and not cut and
                            route.request.headers.get("upload-offset") == str(16 << 20)):
                        cut.append(route.request.url)
                        route.abort("connectionreset")
                    else:
                        route.continue_()

                page.route("**/upload/files/*", drop_second_chunk)
                drop(page, [("IM0001.dcm", slices[0]), (XSS_NAME, slices[1]),
                            ("cd.zip", zipped.getvalue()), (UNICODE_NAME, slices[5])])
                page.set_input_files("#file-input", str(big))
                wait_all_done(page, 6)
                assert len(cut) == 1
                page.unroute("**/upload/files/*")
                problems[:] = [p for p in problems if "ERR_CONNECTION_RESET" not in p]
                seen = page.evaluate("window.seen")
                assert any(0 < value < top for value, top in seen), seen[:20]
                overall = page.locator("#overall-progress")
                assert overall.evaluate("p => p.value === p.max && p.max > 40e6")
                expect(page.locator("#file-rows")).to_contain_text(XSS_NAME)
                expect(page.locator("#file-rows")).to_contain_text(UNICODE_NAME)
                assert page.locator("#file-rows img").count() == 0
                # The inspection's verdicts: the resumed file (not DICOM) is skipped.
                expect(page.locator(".file-ok")).to_have_count(5)
                skipped = page.locator('#file-rows tr[data-state="skipped"]')
                expect(skipped).to_contain_text("resume me.dcm")
                expect(skipped).to_contain_text("skipped: ")
                expect(page.locator("#file-rows tr", has_text="cd.zip")).to_contain_text(
                    "2 DICOM objects")

                page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
                # Send is refused in the page until the patient is filled in.
                page.get_by_role("button", name="Send Images").click()
                expect(page.locator("#upload-error")).to_contain_text("last name")
                page.fill("#family_name", "Test")
                page.fill("#given_name", "Patient")
                page.fill("#birth_date", "01/01/2001")
                page.select_option("#sex", "F")
                page.fill("#message", "These are the images requested, one set has the "
                                      "patient maiden name.")
                page.get_by_role("button", name="Send Images").click()
                dialog = page.locator("#confirm-dialog")
                expect(dialog).to_be_visible()
                expect(dialog).to_contain_text("Are you sure that you have filled in the "
                                               "correct patient details and selected the "
                                               "correct image files to upload?")
                dialog.get_by_role("button", name="No").click()
                expect(dialog).to_be_hidden()
                page.get_by_role("button", name="Send Images").click()
                dialog.get_by_role("button", name="Yes").click()
                expect(page.locator("#upload-sent h1")).to_have_text("Images sent")

                confirmation = wait_for_mail(inbox, PATIENT, 2)
                assert "your upload was received" in str(confirmation["Subject"])
                assert "ni-hum@hospital.example" in confirmation.get_content()
                notice = wait_for_mail(inbox, "ni-hum@hospital.example", 1)
                assert first in notice.get_content()
                kept = staged(data_dir)
                for content in (slices[0], slices[1], zipped.getvalue(), slices[5],
                                big.read_bytes(), resumed):
                    assert hashlib.sha256(content).hexdigest() in kept.values()
                assert len(kept) == 6 and node.object_files() == []

                _cancelled(page, request("A second CD"), slices, data_dir, node)
                assert problems == [], problems
            finally:
                browser.close()


def _dashboard_row(page: Page, public_id: str) -> None:
    """Action Required lists ``Request | Out | ... | New`` with an Open button."""
    page.goto(_base(page) + "/dashboard?tab=action")
    row = page.locator(f"#tx-{public_id} > summary")
    expect(row.locator('[data-col="Type"]')).to_have_text("Request")
    expect(row.locator('[data-col="Dir."]')).to_have_text("Out")
    expect(row.locator('[data-col="Status"]')).to_have_text("New")
    expect(row.get_by_role("link", name="Open")).to_be_visible()


def _cut_and_resume(raw: RawClient, public_id: str, content: bytes, data_dir: Path) -> None:
    """Cut a chunk mid-way on a raw socket; resume from the offset the server reports."""
    url = raw.announce(public_id, "resume me.dcm", len(content))
    half = len(content) // 2
    raw.patch_and_cut(url, 0, len(content), content[:half])
    # The bytes that arrived before the cut are kept (maybe all of them, once the server
    # has read them): the offset settles at what the socket delivered.
    wait_for(lambda: raw.offset(url) == half, timeout=30, what="the offset after the cut")
    assert raw.patch(url, 0, content) == 409  # not from the start: from the server's offset
    offset = raw.offset(url)
    assert raw.patch(url, offset, content[offset:]) == 200
    assert raw.offset(url) == len(content)
    assert hashlib.sha256(content).hexdigest() in staged(data_dir).values()


def _cancelled(page: Page, public_id: str, slices: list[bytes], data_dir: Path,
               node: RunningNode) -> None:
    """A folder and a file for a second request, then Cancel: nothing stays."""
    before = set(staged(data_dir))
    _dashboard_row(page, public_id)
    page.get_by_role("link", name="Open").first.click()
    page.wait_for_url(f"**/transactions/{public_id}/upload")
    folder = data_dir.parent / "picked" / "MYCD"
    (folder / "DICOM" / "ST0").mkdir(parents=True)
    (folder / "DICOM" / "ST0" / "IM1").write_bytes(slices[4])
    (folder / "DICOM" / "ST0" / "IM2").write_bytes(slices[5])
    page.set_input_files("#folder-input", str(folder))  # a whole folder (webkitdirectory)
    drop(page, [("a.dcm", slices[0] + b"a")])
    wait_all_done(page, 3)
    expect(page.locator("#file-rows tr", has_text="IM2")).to_contain_text("MYCD/DICOM/ST0")
    assert len(staged(data_dir)) == len(before) + 3
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_load_state()
    expect(page.locator("#no-files")).to_be_visible()
    assert set(staged(data_dir)) == before and node.object_files() == []
