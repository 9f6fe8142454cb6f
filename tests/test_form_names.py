"""Multipart forms whose part headers carry control characters: 400, never 500 (issue 13).

A file name with CR/LF breaks the part's header block (aiohttp raises while parsing);
a NUL or ESC is refused by its header parser; the RFC 5987 form (``filename*=``) gets
them through the parser into the name itself. Each is refused by the one form reader
every POST goes through (:func:`web.middlewares.read_form`, called by the CSRF check),
so every form route answers 400 with a clear message and nothing is stored. The
bodies are built by hand, byte by byte, and sent to the app on a loopback test server.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from iepnode.services import Services
from storage.models import Attachment, Instance, RemoteAE, TransactionMessage
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import field, log_in, share

BOUNDARY = "iepnodeTestBoundary7MA4YWxkTrZu0gW"
PDF = factory.minimal_pdf("letter")

#: (what, Content-Disposition parameters of the file part) -> each must be a 400.
HOSTILE_FILES = {
    "CRLF in filename": b'name="file"; filename="letter\r\nX-Injected: 1.pdf"',
    "LF in filename": b'name="file"; filename="letter\n.pdf"',
    "NUL in filename": b'name="file"; filename="letter\x00.pdf"',
    "ESC in filename": b'name="file"; filename="letter\x1b[31m.pdf"',
    "CRLF in filename* (RFC 5987)": b"name=\"file\"; filename*=UTF-8''letter%0D%0A.pdf",
    "NUL in filename* (RFC 5987)": b"name=\"file\"; filename*=UTF-8''letter%00.pdf",
    "CRLF in the field name": b'name="fi\r\nle"; filename="letter.pdf"',
    "LF in name* (RFC 5987)": b"name*=UTF-8''fi%0Ale; filename=\"letter.pdf\"",
    "not UTF-8": b'name="file"; filename="letter\xff\xfe.pdf"',
}


def body(csrf: str, disposition: bytes, fields: dict[str, str] | None = None,
         content: bytes = PDF) -> bytes:
    """A multipart/form-data body: the csrf field, other fields, one file part."""
    out = bytearray()
    for name, value in {"csrf": csrf, **(fields or {})}.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; ".encode() + disposition
            + b"\r\nContent-Type: application/pdf\r\n\r\n" + content + b"\r\n")
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store_files(services, factory.make_ct_series(
        tmp_path / "ct", 1, PatientName="Doe^Jane", PatientID="P1", StudyDate="20240105"))


async def refused(browser: Browser, url: str, data: bytes) -> str:
    response = await browser.post(url, data=data, headers=HEADERS)
    text = await response.text()
    assert response.status == 400, (url, response.status, text[:300])
    assert "Malformed form" in text, text[:300]
    return text


async def test_attachment_upload_with_a_control_character_in_a_name_is_a_400(
        client: Any, services: Services, study: str) -> None:
    browser = Browser(client)
    transaction, token = share([study])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    csrf = field(await browser.page(f"{base}/attachments"), "csrf")
    instances, messages = Instance.select().count(), TransactionMessage.select().count()
    for what, disposition in HOSTILE_FILES.items():
        text = await refused(browser, f"{base}/attachments",
                             body(csrf, disposition, {"title": what}))
        assert "X-Injected" not in text
    assert Attachment.select().count() == 0
    assert Instance.select().count() == instances
    assert TransactionMessage.select().count() == messages

    # The same form with a plain name is taken (the check is on names, not the route).
    ok = await browser.post(f"{base}/attachments", headers=HEADERS, data=body(
        csrf, b'name="file"; filename="letter.pdf"', {"title": "GP letter"}))
    assert ok.status == 303, await ok.text()
    assert Attachment.get().original_name == "letter.pdf"


async def test_staff_forms_with_a_control_character_in_a_name_are_a_400(
        client: Any, services: Services, study: str) -> None:
    # The login form, before any session (double-submit CSRF cookie).
    anonymous = Browser(client)
    page = await anonymous.page("/admin/login")
    for what, disposition in HOSTILE_FILES.items():
        await refused(anonymous, "/admin/login", body(field(page, "csrf"), disposition, {
            "username": "alice", "password": what, "code": "000000"}))

    # A signed-in admin's forms: registering a remote AE and a staff attachment.
    _, secret = make_user("alice", is_admin=True)
    staff = Browser(client)
    assert (await staff_log_in(staff, "alice", secret)).status == 303
    csrf = field(await staff.page("/admin/aes"), "csrf")
    for disposition in HOSTILE_FILES.values():
        await refused(staff, "/admin/aes", body(csrf, disposition, {
            "ae_title": "EVIL", "host": "127.0.0.1", "port": "104", "allow": "store"}))
    assert RemoteAE.select().where(RemoteAE.ae_title == "EVIL").count() == 0
    transaction, _ = share([study])
    base = f"/admin/transactions/{transaction.public_id}"
    csrf = field(await staff.page(f"{base}/attachments"), "csrf")
    for disposition in HOSTILE_FILES.values():
        await refused(staff, f"{base}/attachments", body(csrf, disposition))
    assert Attachment.select().count() == 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_body_that_is_no_form_is_a_400_not_a_500(client: Any, services: Services) -> None:
    # aiohttp drops the temporary file of a file part read before the error without
    # closing it (the garbage collector does, with a ResourceWarning): collected below.
    browser = Browser(client)
    page = await browser.page("/admin/login")
    csrf = field(page, "csrf")
    good = body(csrf, b'name="file"; filename="a.pdf"')
    for content_type, data in (
            (f"multipart/form-data; boundary={BOUNDARY}", good[: len(good) // 2]),  # cut
            (f"multipart/form-data; boundary={BOUNDARY}", b"no boundary at all"),
            ("multipart/form-data", good),  # no boundary parameter
            (f"multipart/form-data; boundary={BOUNDARY}", good.replace(  # the csrf field's
                b'name="csrf"\r\n', b'name="csrf"\r\nContent-Type: text/plain; charset=nope\r\n')),
            (f"multipart/form-data; boundary={BOUNDARY}", good.replace(
                b"Content-Type: application/pdf", b"Content-Transfer-Encoding: rot13")),
            ("application/x-www-form-urlencoded", b"csrf=\xff\xfe")):
        response = await browser.post("/admin/login", data=data,
                                      headers={"Content-Type": content_type})
        assert response.status == 400, (content_type, data[:60], await response.text())
    del response
    gc.collect()
