"""The staff review page of uploads (/admin/uploads), in-process with the aiohttp client.

Values from uploaded files are hostile input: a PatientName carrying markup must be
shown as text. Other people's (unknown) upload IDs answer 404; POSTs need the CSRF token.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from iepnode.services import Services
from storage import registry
from storage.models import AuditEvent, Instance, Upload
from tests.data_factory import make_ct_series
from tests.support.browser import Browser
from tests.test_admin_web import (  # noqa: F401 - fixtures
    admin,
    services,
    settings,
    without_own_scripts,
)
from tests.test_upload_release import make_request, stage, zipped

OWN_SCRIPT = '<script src="/static/upload_review.js" defer></script>'
XSS = '<script>alert("pwn")</script>^<img src=x onerror=alert(1)>'


def sent_upload(services: Services, tmp_path: Path) -> Upload:  # noqa: F811
    request = make_request()
    mine = make_ct_series(tmp_path / "a", 2, PatientID="CD-1", PatientName="Doe^Jane",
                          PatientBirthDate="19800101")
    evil = make_ct_series(tmp_path / "b", 1, PatientID="CD-<b>2</b>", PatientName=XSS,
                          StudyDescription="<iframe src=//evil>")
    upload = stage(services, request, {"cd.zip": zipped(mine, tmp_path),
                                   "<svg onload=alert(2)>.dcm": evil[0].read_bytes()})
    Upload.update(message="Hi <script>alert(3)</script>").where(Upload.id == upload.id).execute()
    services.requests.intake_upload(upload.id)
    return upload


async def test_review_page_escapes_values_from_files(admin: Browser, services: Services,  # noqa: F811
                                                     tmp_path: Path) -> None:
    upload = sent_upload(services, tmp_path)
    listing = await admin.page("/admin/uploads")
    assert f'href="/admin/uploads/{upload.id}"' in listing and "2 flags" in listing
    page = await admin.page(f"/admin/uploads/{upload.id}")
    body = without_own_scripts(page).replace(OWN_SCRIPT, "")
    assert OWN_SCRIPT in page
    assert "<script" not in body and "<img" not in body and "<svg" not in body
    assert "<iframe" not in body and "<b>2</b>" not in body
    assert html.escape("<script>alert(3)</script>") in page  # the message, as text
    assert html.escape("<svg onload=alert(2)>.dcm") in page  # the file name, as text
    assert "2 different patients in one upload" in page
    assert "<img src=x onerror=alert(1)>" in html.unescape(page)


async def test_release_from_the_page_leaves_out_the_flagged_patient(
        admin: Browser, services: Services, tmp_path: Path) -> None:  # noqa: F811
    upload = sent_upload(services, tmp_path)
    page = await admin.page(f"/admin/uploads/{upload.id}")
    checked = re.findall(r'name="exclude" value="([^"]+)" checked', page)
    assert len(checked) == 1  # the mismatching patient is pre-selected for exclusion
    response = await admin.form(f"/admin/uploads/{upload.id}/release",
                                [("exclude", html.unescape(checked[0]))])
    assert response.status == 303
    assert Upload.get_by_id(upload.id).status == "RELEASED"
    assert Instance.select().count() == 2
    done = await admin.page(f"/admin/uploads/{upload.id}?did=released")
    assert "2 stored" in done and "1 left out" in done
    release = AuditEvent.get(AuditEvent.action == "upload-release")
    assert release.actor == "boss" and release.event_code == "110104"


async def test_reject_needs_csrf_and_unknown_ids_are_404(admin: Browser, services: Services,  # noqa: F811
                                                         tmp_path: Path) -> None:
    upload = sent_upload(services, tmp_path)
    refused = await admin.post(f"/admin/uploads/{upload.id}/reject", data={"reason": "x"})
    assert refused.status == 403
    assert Upload.get_by_id(upload.id).status == "SENT"
    response = await admin.form(f"/admin/uploads/{upload.id}/reject", {"reason": "wrong CD"})
    assert response.status == 303
    assert Upload.get_by_id(upload.id).status == "REJECTED"
    again = await admin.form(f"/admin/uploads/{upload.id}/release", {})
    assert again.status == 409
    await admin.page(f"/admin/uploads/{upload.id + 100}", status=404)
    await admin.page("/admin/uploads/abc", status=404)
    assert (await admin.form(f"/admin/uploads/{upload.id + 100}/release", {})).status == 404


async def test_staff_login_required(browser: Browser, services: Services,  # noqa: F811
                                    tmp_path: Path) -> None:
    upload = sent_upload(services, tmp_path)
    response = await browser.get(f"/admin/uploads/{upload.id}")
    assert response.status == 303 and "/admin/login" in response.headers["Location"]


@pytest.mark.parametrize("settings", [{"upload_pacs_ae": "PACS"}], indirect=True)
async def test_unknown_pacs_destination_is_pointed_out(admin: Browser, services: Services,  # noqa: F811
                                                       tmp_path: Path) -> None:
    upload = sent_upload(services, tmp_path)
    page = await admin.page(f"/admin/uploads/{upload.id}")
    assert "not a registered send destination" in page
    registry.add_remote_ae("PACS", "127.0.0.1", 104, set(), send_to=True)
    assert "not a registered send destination" not in await admin.page(
        f"/admin/uploads/{upload.id}")
