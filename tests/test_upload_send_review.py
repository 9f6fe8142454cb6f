"""Send on the upload page puts the upload before staff: checked, flagged, audited.

Uses the upload page's own protocol (helpers of tests/test_upload_web.py): announce,
PATCH the bytes, Send; then the review the staff page shows is there.
"""

from __future__ import annotations

from pathlib import Path

from iepnode.services import Services
from iepnode.uploads.review import Review
from storage.models import AuditEvent, Instance, Upload
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.test_upload_web import announce, patch, services, signed_in  # noqa: F401


async def test_send_checks_the_upload_for_staff(browser: Browser, services: Services,  # noqa: F811
                                                tmp_path: Path) -> None:
    request, csrf = await signed_in(browser, services)
    mine = factory.make_ct_series(tmp_path / "a", 1, PatientName="TEST^PATIENT",
                                  PatientBirthDate="20010101")[0].read_bytes()
    other = factory.make_ct_series(tmp_path / "b", 1, PatientName="Other^Person",
                                   PatientID="X9")[0].read_bytes()
    for name, data in (("IM1.dcm", mine), ("IM2.dcm", other)):
        body = await announce(browser, request.public_id, csrf, name, len(data))
        assert (await patch(browser, body["url"], csrf, 0, data))["complete"]
    response = await browser.post(f"/transactions/{request.public_id}/upload/send", data={
        "csrf": csrf, "family_name": "Test", "given_name": "Patient",
        "birth_date": "01/01/2001", "sex": "F"})
    assert response.status == 200, await response.text()
    upload = Upload.get()
    review = Review.from_json(upload.review)
    assert review is not None and review.objects == 2
    assert "2 different patients in one upload" in review.flags
    assert upload.status == "SENT" and Instance.select().count() == 0
    assert AuditEvent.select().where(AuditEvent.action == "upload-sent").count() == 1
