"""Requests and the upload protocol (issue 7), in-process: announce, chunks, resume, limits.

The app runs in-process (aiohttp test client) over a :class:`Services` in ``tmp_path``; the
recipient signs in through the emailed link and a passcode read from the outbox.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iepnode.errors import InvalidRequest
from iepnode.people.audit import Actor
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.uploads import image_requests as rq
from iepnode.wiring import build_services
from storage.models import AuditEvent, Transaction, Upload, UploadFile
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.test_recipient_web import field, log_in, make_settings, outbox, read_eml
from web.app import create_app

CONTACT = tx.Contact("Ms Nicky Humphries", "Medical Records", "records@hospital.example",
                     "+441473350314")


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(make_settings(tmp_path, upload_max_file_mb=2, upload_max_total_mb=3))


def make_request(email: str = "pat@example.org", **kw: Any) -> tuple[Transaction, str]:
    values: dict[str, Any] = {"patient_family_name": "Test", "patient_given_name": "Patient",
                              "patient_birth_date": "01/01/2001", "patient_sex": "F",
                              "patient_id": "NTEES000180", "reason": "Follow-up of a fracture",
                              "otp_mobile": "+447700900123", **kw}
    return rq.create_request(rq.NewRequest(email, **values), contact=CONTACT,
                             institution="North Tees Hospital", created_by="staff1")


async def signed_in(browser: Browser, services: Services, **kw: Any) -> tuple[Transaction, str]:
    """Create a request, sign in through its link; return it and the page's CSRF token."""
    request, token = make_request(**kw)
    await log_in(browser, services, token)
    html = await browser.page(f"/transactions/{request.public_id}/upload")
    return request, field(html, "csrf")


async def announce(browser: Browser, public_id: str, csrf: str, name: str, size: int,
                   relpath: str = "", status: int = 201) -> dict[str, Any]:
    response = await browser.post(f"/transactions/{public_id}/upload/files",
                                  data={"csrf": csrf, "name": name, "relpath": relpath,
                                        "size": str(size)})
    body = await response.json()
    assert response.status == status, body
    return body


async def patch(browser: Browser, url: str, csrf: str, offset: int, data: bytes,
                status: int = 200) -> dict[str, Any]:
    response = await browser.request("PATCH", url, data=data, headers={
        "Upload-Offset": str(offset), "X-CSRF-Token": csrf,
        "Content-Type": "application/offset+octet-stream"})
    body = await response.json()
    assert response.status == status, body
    return body


def staged(services: Services) -> list[Path]:
    root = services.settings.staging_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- requests -------------------------------------------------------------------------------


def test_request_rules(services: Services) -> None:
    request, _ = make_request()
    assert (request.kind, request.direction, request.status) == ("REQUEST", "OUT", "NEW")
    assert request.patient_name == "Test^Patient" and request.patient_birth_date == "20010101"
    assert request.request_reason == "Follow-up of a fracture"
    for bad in ({"patient_family_name": ""}, {"patient_birth_date": "31/02/2001"},
                {"patient_birth_date": "01/01/2999"}, {"patient_sex": "X"},
                {"patient_family_name": "Evil^Name"}, {"otp_mobile": ""}):
        with pytest.raises(InvalidRequest):
            make_request(**bad)


def test_request_needs_a_patient_id(services: Services) -> None:
    """Release reconciles to the request's Patient ID, so a request cannot go without one."""
    for missing in ("", "   "):
        with pytest.raises(InvalidRequest, match="Patient ID"):
            make_request(patient_id=missing)
    assert not Transaction.select().where(Transaction.kind == "REQUEST").exists()


async def test_request_email_dashboard_row_and_page(browser: Browser, services: Services) -> None:
    request = await services.requests.create_request(
        rq.NewRequest("pat@example.org", "Aston", "Stephen", "16/10/1970", "M",
                      otp_email="second@example.org", reason="CD from the private clinic",
                      patient_id="NTEES000181"),
        actor=Actor("staff", "nicky"))
    mail = read_eml(outbox(services)[-1])
    assert "please upload images" in str(mail["Subject"])
    assert "Aston" not in mail.get_content()  # no patient details in email
    token = re.search(r"/t/(\S+)", mail.get_content()).group(1)
    await log_in(browser, services, token)
    html = await browser.page("/dashboard?tab=action")
    row = re.search(r'<summary class="tx-cols">(.*?)</summary>', html, re.S).group(1)
    texts = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(
        r'<span data-col="[^"]+"[^>]*>(.*?)</span>\s*(?=<span data-col|$)', row, re.S)]
    assert texts[0] == "Request" and texts[1] == "Out" and "New" in texts[6], texts
    assert f'href="/transactions/{request.public_id}/upload">Open<' in row
    page = await browser.page(f"/transactions/{request.public_id}/upload")
    for text in ("Drop files here or click to browse", "Responding Patient", "Last name",
                 "Are you sure that you have filled in the correct patient details and "
                 "selected the correct image files to upload?", "CD from the private clinic",
                 "ASTON, Stephen", "Send Images", "webkitdirectory"):
        assert text in page, text
    assert AuditEvent.select().where(AuditEvent.action == "request-create").count() == 1


# -- the protocol ---------------------------------------------------------------------------


async def test_chunks_resume_send_and_confirmation(browser: Browser, services: Services,
                                                   tmp_path: Path) -> None:
    request, csrf = await signed_in(browser, services)
    base = f"/transactions/{request.public_id}/upload"
    data = factory.make_ct_series(tmp_path / "ct", 1, rows=512, columns=512,
                                  PatientName="Test^Patient")[0].read_bytes()  # 0.5 MB
    body = await announce(browser, request.public_id, csrf, "IM0001.dcm", len(data), "CD/DICOM")
    url = body["url"]
    assert body["offset"] == 0 and not body["complete"] and body["relpath"] == "CD/DICOM"
    first = await patch(browser, url, csrf, 0, data[:300_000])
    assert first["offset"] == 300_000 and not first["complete"]
    # A chunk that does not start at the staged size: 409 with the right offset.
    wrong = await patch(browser, url, csrf, 100, data[100:200], status=409)
    assert wrong["offset"] == 300_000
    head = await browser.request("HEAD", url)
    assert head.headers["Upload-Offset"] == "300000" and head.headers["Upload-Length"] == str(
        len(data))
    # Re-announcing the same file resumes it (a reloaded page).
    again = await announce(browser, request.public_id, csrf, "IM0001.dcm", len(data),
                           "CD/DICOM")
    assert again["id"] == body["id"] and again["offset"] == 300_000
    # Send refuses while a file is incomplete.
    refused = await browser.post(f"{base}/send", data={
        "csrf": csrf, "family_name": "Test", "given_name": "Patient",
        "birth_date": "01/01/2001", "sex": "F"})
    assert refused.status == 400 and "still uploading" in (await refused.json())["error"]
    # Overrunning the announced size is refused and nothing is written.
    await patch(browser, url, csrf, 300_000, data[300_000:] + b"x", status=413)
    done = await patch(browser, url, csrf, 300_000, data[300_000:])
    assert done["complete"] and done["offset"] == len(data)
    assert (done["verdict"], done["objects"]) == ("dicom", 1)  # the inspection's verdict
    text = await announce(browser, request.public_id, csrf, "notes.dcm", 5)
    skipped = await patch(browser, text["url"], csrf, 0, b"hello")
    assert skipped["verdict"] == "skipped" and skipped["reason"]
    path = next(p for p in staged(services) if p.stat().st_size == len(data))
    assert path.read_bytes() == data
    # The staged name is the server's, not the user's.
    assert "IM0001" not in str(path) and "CD" not in path.relative_to(
        services.settings.staging_dir).parts
    response = await browser.post(f"{base}/send", data={
        "csrf": csrf, "family_name": "Test", "given_name": "Patient",
        "birth_date": "01/01/2001", "sex": "F", "message": "One set has my maiden name."})
    assert response.status == 200, await response.text()
    upload = Upload.get()
    assert upload.status == "SENT" and upload.confirmed_name == "Test^Patient"
    assert upload.confirmed_birth_date == "20010101" and upload.message.startswith("One set")
    assert Transaction.get_by_id(request.id).status == "COMPLETE"
    mails = [read_eml(p) for p in outbox(services)]
    confirmation = [m for m in mails if "your upload was received" in str(m["Subject"])]
    assert confirmation and str(confirmation[0]["To"]) == "pat@example.org"
    assert any(str(m["To"]) == CONTACT.email for m in mails)
    assert AuditEvent.select().where((AuditEvent.action == "upload-send")
                                     & (AuditEvent.event_code == "110104")).count() == 1
    # The request takes no more uploads, and the page shows what was sent.
    late = await browser.post(f"{base}/files", data={"csrf": csrf, "name": "x", "size": "1"})
    assert late.status == 410
    assert "Images sent" in await browser.page(base)


async def test_zero_byte_names_limits_remove_and_cancel(browser: Browser,
                                                        services: Services) -> None:
    request, csrf = await signed_in(browser, services)
    base = f"/transactions/{request.public_id}/upload"
    empty = await announce(browser, request.public_id, csrf, "empty.dcm", 0)
    assert empty["complete"]
    evil = '<img src=x onerror=alert(1)>.dcm'
    odd = await announce(browser, request.public_id, csrf, evil, 10, "../../etc/Ünïcødé 検査")
    assert odd["name"] == evil and odd["relpath"] == "etc/Ünïcødé 検査"
    await patch(browser, odd["url"], csrf, 0, b"0123456789")
    html = await browser.page(base)
    assert evil not in html and "\\u003cimg src=x" in html  # JSON data block, escaped
    assert "Ünïcødé 検査" in json.loads(re.search(
        r'<script type="application/json" id="upload-state">(.*?)</script>', html,
        re.S).group(1))[1]["relpath"]
    # Limits: 2 MiB a file, 3 MiB an upload.
    await announce(browser, request.public_id, csrf, "big", 3 << 20, status=413)
    await announce(browser, request.public_id, csrf, "a", 2 << 20)
    await announce(browser, request.public_id, csrf, "b", 2 << 20, status=413)
    # PATCH and DELETE need the CSRF header; POST the form token.
    no_token = await browser.request("DELETE", odd["url"])
    assert no_token.status == 403
    bad = await browser.post(f"{base}/files", data={"name": "x", "size": "1"})
    assert bad.status == 403
    removed = await browser.request("DELETE", odd["url"], headers={"X-CSRF-Token": csrf})
    assert removed.status == 204 and UploadFile.get_or_none(UploadFile.id == odd["id"]) is None
    assert len(staged(services)) == 2
    cancelled = await browser.post(f"{base}/cancel", data={"csrf": csrf})
    assert cancelled.status == 303
    assert staged(services) == [] and not any(services.settings.staging_dir.iterdir())
    assert Upload.get().status == "CANCELLED" and UploadFile.select().count() == 0
    assert services.archive.counts()["instances"] == 0
    # The request is still open: a new upload starts.
    fresh = await announce(browser, request.public_id, csrf, "again.dcm", 5)
    assert fresh["id"] != odd["id"]


async def test_other_recipients_and_closed_requests(browser: Browser, services: Services) -> None:
    mine, csrf = await signed_in(browser, services)
    file = await announce(browser, mine.public_id, csrf, "a.dcm", 4)
    theirs, _ = make_request("other@example.org")
    transfer = Transaction.create(**{**Transaction.get_by_id(mine.id).__data__,
                                     "id": None, "public_id": "IEP99999999", "kind": "TRANSFER",
                                     "link_token_hash": "x" * 64})
    for public_id in (theirs.public_id, transfer.public_id, "IEP00000000"):
        assert (await browser.get(f"/transactions/{public_id}/upload")).status == 404
        response = await browser.post(f"/transactions/{public_id}/upload/files",
                                      data={"csrf": csrf, "name": "a", "size": "1"})
        assert response.status == 404
    # Someone else's file ID under my request, and my file under theirs: 404.
    their_upload = Upload.create(transaction=theirs, key="k" * 32, status="STAGING",
                                 created_at=0, updated_at=0)
    their_file = UploadFile.create(upload=their_upload, display_name="x", disk_name="d",
                                   size=1, created_at=0)
    url = f"/transactions/{mine.public_id}/upload/files/{their_file.id}"
    assert (await browser.request("HEAD", url)).status == 404
    await patch(browser, url, csrf, 0, b"x", status=404)
    await patch(browser, f"/transactions/{theirs.public_id}/upload/files/{file['id']}", csrf,
                0, b"x", status=404)
    # Declined / expired requests take no uploads: 410.
    Transaction.update(status="DECLINED").where(Transaction.id == mine.id).execute()
    await patch(browser, file["url"], csrf, 0, b"abcd", status=410)
    assert (await browser.get(f"/transactions/{mine.public_id}/upload")).status == 410
    Transaction.update(status="NEW", expires_at=1.0).where(Transaction.id == mine.id).execute()
    await announce(browser, mine.public_id, csrf, "b.dcm", 4, status=410)


# -- staff: the request form and the CLI ------------------------------------------------------


async def test_admin_request_form(aiohttp_client: Any, services: Services) -> None:
    from tests import test_admin_web as adm

    staff = adm.Browser(await aiohttp_client(create_app(services.settings, services),
                                             cookie_jar=aiohttp.DummyCookieJar()))
    services.admin.logins.failure_delay = 0.0
    _, secret = adm.make_user("nicky", display_name="Ms Nicky Humphries",
                              email="ni-hum@hospital.example", phone="+441473350314")
    assert (await adm.log_in(staff, "nicky", secret)).status == 303
    home = await staff.page("/admin")
    assert 'href="/admin/requests/new"' in home
    form = await staff.page("/admin/requests/new")
    assert 'action="/admin/requests"' in form
    values = {"recipient_email": "pat@example.org", "channel": "email",
              "otp_email": "other@example.org", "family_name": "<b>Aston</b>",
              "given_name": "Stephen", "birth_date": "16/10/1970", "sex": "M",
              "patient_id": "NT123", "issuer": "NTH", "reason": "CD from elsewhere",
              "priority": "NORMAL", "expiry_days": "7"}
    assert re.search(r'<input id="patient_id"[^>]* required', form)
    no_id = await staff.form("/admin/requests", {**values, "patient_id": ""})
    assert no_id.status == 400 and "Patient ID" in await no_id.text()
    bad = await staff.form("/admin/requests", {**values, "birth_date": "32/13/1970"})
    page = await bad.text()
    assert bad.status == 400 and "date of birth" in page and "&lt;b&gt;Aston" in page
    assert (await staff.post("/admin/requests", data=values)).status == 403  # no CSRF token
    created = await staff.form("/admin/requests", values)
    assert created.status == 303, await created.text()
    public_id = created.headers["Location"].split("/")[-1].split("?")[0]
    request = Transaction.get(Transaction.public_id == public_id)
    assert (request.kind, request.patient_id, request.patient_id_issuer) == ("REQUEST", "NT123",
                                                                            "NTH")
    assert request.contact_name == "Ms Nicky Humphries" and request.request_reason
    assert "<b>Aston</b>" not in await staff.page(f"/admin/transactions/{public_id}")
    mail = read_eml(outbox(services)[-1])
    assert str(mail["To"]) == "pat@example.org" and "/t/" in mail.get_content()


def test_cli_request_create(tmp_path: Path) -> None:
    from tests.support.node import run_cli

    data = tmp_path / "data"
    out = run_cli(data, "request", "create", "--to", "pat@example.org", "--otp-mobile",
                  "+447700900123", "--last-name", "Ünïcødé", "--first-name", "Zoë",
                  "--birth-date", "01/02/1990", "--sex", "F", "--patient-id", "P9",
                  "--reason", "Images from abroad").stdout.strip()
    assert re.fullmatch(r"IEP\d{8}", out)
    build_services(make_settings(tmp_path))
    request = Transaction.get(Transaction.public_id == out)
    assert request.patient_name == "Ünïcødé^Zoë" and request.patient_birth_date == "19900201"
    assert len(list((data / "outbox").glob("*.eml"))) == 1
    failed = run_cli(data, "request", "create", "--to", "pat@example.org", "--otp-mobile",
                     "+447700900123", "--last-name", "X", "--birth-date", "2/30/1990",
                     "--patient-id", "P9", check=False)
    assert failed.returncode == 1 and "date of birth" in failed.stderr
    no_id = run_cli(data, "request", "create", "--to", "pat@example.org", "--otp-mobile",
                    "+447700900123", "--last-name", "X", check=False)
    assert no_id.returncode == 2 and "--patient-id" in no_id.stderr
    assert len(list((data / "outbox").glob("*.eml"))) == 1


def test_file_removed_while_its_chunk_arrives(services: Services) -> None:
    from iepnode.errors import NotFound
    from iepnode.uploads.chunks import FileBusy

    request, _ = make_request()
    recipient = request.recipient_id
    file = services.uploads.add_file(recipient, request.public_id, "a.dcm", "", 10)
    chunk = services.uploads.open_chunk(recipient, request.public_id, file.id, 0)
    with pytest.raises(FileBusy):  # one writer per file, whatever the process
        services.uploads.open_chunk(recipient, request.public_id, file.id, 0)
    chunk.write(b"01234")
    services.uploads.remove_file(recipient, request.public_id, file.id)
    chunk.write(b"56789")
    with pytest.raises(NotFound):
        services.uploads.close_chunk(chunk)
    assert staged(services) == [] and UploadFile.select().count() == 0
