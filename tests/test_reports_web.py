"""Reports (PDF, SR) and attachments over HTTP, for recipients and staff (issue 4).

The app runs in-process over a real :class:`Services` in ``tmp_path`` (aiohttp test server
on loopback), as in tests/test_recipient_web.py, whose login helpers these tests use;
staff log in with password + TOTP as in tests/test_admin_web.py. Studies are stored
through the node's ingest path.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from iepnode.services import Services
from iepnode.sharing import transactions as tx
from storage.models import (
    Attachment,
    AuditEvent,
    Instance,
    Transaction,
    TransactionMessage,
    TransactionStudy,
)
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import field, log_in, share
from web import middlewares

XSS = '<script>alert("sr")</script><img src=x onerror=alert(1)>'


@pytest.fixture
async def staff_browser(client: Any) -> Browser:
    """A second browser, logged in as staff member ``alice``."""
    browser = Browser(client)
    _, secret = make_user("alice", display_name="Dr Alice")
    assert (await staff_log_in(browser, "alice", secret)).status == 303
    return browser


@pytest.fixture
def study(services: Services, tmp_path: Path) -> dict[str, Any]:
    """A CT study with an Encapsulated PDF report and a Basic Text SR (XSS in its text)."""
    ct = factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Jane", PatientID="P1",
                                PatientBirthDate="19800214", PatientSex="F",
                                StudyDate="20240105", StudyDescription="CT HEAD",
                                AccessionNumber="ACC1")
    pdf = factory.minimal_pdf("Findings: normal") + b" "  # odd length: padded in DICOM
    pdf_path = factory.make_pdf(tmp_path / "reports", pdf=pdf, like=ct[0],
                                DocumentTitle="Radiology report (final)")
    sr_path = factory.make_sr(tmp_path / "reports", text=f"Small nodule. {XSS}", like=ct[0])
    uid = store_files(services, [*ct, pdf_path, sr_path])
    return {"uid": uid, "pdf": pdf, "pdf_uid": str(dcmread(pdf_path).SOPInstanceUID),
            "sr_uid": str(dcmread(sr_path).SOPInstanceUID)}


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id))


def png_bytes(shape: tuple[int, ...] = (40, 50, 3)) -> tuple[bytes, np.ndarray]:
    arr = np.random.default_rng(5).integers(0, 255, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue(), arr


def upload_form(csrf: str, data: bytes, filename: str, content_type: str, *,
                title: str = "", study: str = "") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("csrf", csrf)
    form.add_field("title", title)
    form.add_field("study", study)
    form.add_field("file", data, filename=filename, content_type=content_type)
    return form


async def attachments_csrf(browser: Browser, base: str) -> str:
    return field(await browser.page(f"{base}/attachments"), "csrf")


# -- reports ------------------------------------------------------------------------------


async def test_recipient_lists_reports_opens_pdf_and_readable_sr(
        browser: Browser, services: Services, study: dict[str, Any]) -> None:
    transaction, token = share([study["uid"]])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    details = await browser.page(base)
    assert f'href="{base}/reports">View Report</a>' in details
    assert f'href="{base}/attachments">View/Add Attachments</a>' in details

    listing = await browser.page(f"{base}/reports")
    assert "Radiology report (final)" in listing
    assert f'href="{base}/reports/{study["pdf_uid"]}"' in listing
    assert f'href="{base}/reports/{study["sr_uid"]}"' in listing

    pdf = await browser.get(f"{base}/reports/{study['pdf_uid']}")
    assert pdf.status == 200
    assert pdf.content_type == "application/pdf"
    assert await pdf.read() == study["pdf"]  # the padding byte is not sent
    assert pdf.headers["Content-Disposition"] == (
        'inline; filename="Radiology_report_final.pdf"')
    assert pdf.headers["X-Content-Type-Options"] == "nosniff"
    assert pdf.headers["Content-Security-Policy"].startswith("sandbox")

    sr = await browser.get(f"{base}/reports/{study['sr_uid']}")
    html = await sr.text()
    assert sr.status == 200 and sr.content_type == "text/html"
    assert "Diagnostic Imaging Report" in html  # the document title (concept name)
    assert "Finding" in html and "Small nodule." in html
    assert "Language of Content Item and Descendants" in html and "English" in html
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;sr&#34;)&lt;/script&gt;&lt;img src=x" in html

    opened = events("report-open")
    assert [(e.event_code, e.actor_kind, e.actor, e.transaction_public_id) for e in opened] == [
        ("110103", "recipient", "pat@example.org", transaction.public_id)] * 2
    assert opened[0].detail == f"pdf {study['pdf_uid']}"
    assert events("view-reports")[0].detail == "2 reports listed"


async def test_reports_of_others_are_404_and_closed_ones_410(
        browser: Browser, services: Services, study: dict[str, Any], tmp_path: Path) -> None:
    mine, token = share([study["uid"]], "me@example.org")
    theirs, _ = share([study["uid"]], "them@example.org")
    expired, _ = share([study["uid"]], "me@example.org", now=time.time() - 20 * tx.DAY)
    declined, _ = share([study["uid"]], "me@example.org")
    tx.decline(Transaction.get_by_id(declined.id), "not mine")
    other_path = factory.make_pdf(tmp_path / "other", PatientID="P9")
    store_files(services, [other_path])
    other_pdf = str(dcmread(other_path).SOPInstanceUID)
    anonymous = await browser.get(f"/transactions/{mine.public_id}/reports")
    assert anonymous.status == 303 and anonymous.headers["Location"] == "/signin"
    await log_in(browser, services, token)
    for url in (f"/transactions/{theirs.public_id}/reports",
                f"/transactions/{theirs.public_id}/reports/{study['pdf_uid']}",
                f"/transactions/{theirs.public_id}/attachments",
                f"/transactions/{mine.public_id}/reports/{other_pdf}",  # not in its studies
                f"/transactions/{mine.public_id}/reports/not-a-uid",
                f"/transactions/{mine.public_id}/reports/{study['uid']}"):  # not a report
        response = await browser.get(url)
        assert response.status == 404, url
        assert b"%PDF" not in await response.read()
    for gone in (expired, declined):
        for url in (f"/transactions/{gone.public_id}/reports",
                    f"/transactions/{gone.public_id}/reports/{study['pdf_uid']}"):
            response = await browser.get(url)
            assert response.status == 410, url
            assert b"%PDF" not in await response.read()
    assert (await browser.get(f"/transactions/{mine.public_id}/reports/"
                              f"{study['pdf_uid']}")).status == 200


async def test_tid_1500_measurements_are_read_with_highdicom(
        staff_browser: Browser, services: Services, tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    ct = factory.make_ct_series(tmp_path / "ct", 1, PatientName="Doe^Jane", PatientID="P1")
    source = dcmread(ct[0])
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion <b>1</b>")
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[10.0, 10.0], [15.0, 10.0]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=codes.SCT.Lesion,
        measurements=[hd.sr.Measurement(name=codes.SCT.Diameter, value=12.5,
                                        unit=codes.UCUM.Millimeter)])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name="Who^Doctor"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=[source], content=report[0],
                                 series_instance_uid=generate_uid(), series_number=7,
                                 sop_instance_uid=generate_uid(), instance_number=1,
                                 manufacturer="test")
    path = tmp_path / "sr1500.dcm"
    sr.save_as(path, enforce_file_format=True)
    uid = store_files(services, [*ct, path])
    transaction, _ = share([uid])
    html = await staff_browser.page(
        f"/admin/transactions/{transaction.public_id}/reports/{sr.SOPInstanceUID}")
    assert "Imaging Measurement Report" in html and "<h2>Measurements</h2>" in html
    assert "<td>Lesion</td><td>lesion &lt;b&gt;1&lt;/b&gt;</td><td>Diameter</td>" in html
    assert "12.5 mm" in html
    assert events("report-open")[0].actor_kind == "staff"


# -- attachments --------------------------------------------------------------------------


async def test_recipient_attaches_a_pdf_held_by_the_transaction(
        browser: Browser, services: Services, study: dict[str, Any]) -> None:
    transaction, token = share([study["uid"]])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    before = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    instances = Instance.select().count()
    pdf = factory.minimal_pdf("GP letter")
    response = await browser.post(f"{base}/attachments", data=upload_form(
        await attachments_csrf(browser, base), pdf, "letter from GP.pdf", "application/pdf",
        title="GP letter"))
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == f"{base}/attachments?done=added"

    attachment = Attachment.get()
    assert (attachment.author_kind, attachment.author, attachment.title,
            attachment.original_name, attachment.media_type, attachment.size_bytes) == (
        "recipient", "pat@example.org", "GP letter", "letter from GP.pdf", "application/pdf",
        len(pdf))
    # Held by the transaction: a stored DICOM object, but no instance of the study.
    assert attachment.key and attachment.filed_at is None
    assert Instance.select().count() == instances
    assert not Instance.select().where(Instance.sop_uid == attachment.sop_uid).exists()
    stored = dcmread(services.store.path(attachment.key))
    assert stored.SOPClassUID == EncapsulatedPDFStorage
    assert stored.StudyInstanceUID == study["uid"]
    assert stored.PatientID == "P1" and str(stored.PatientName) == "Doe^Jane"
    assert stored.AccessionNumber == "ACC1"
    assert stored.EncapsulatedDocument[:len(pdf)] == pdf

    page = await browser.page(f"{base}/attachments?done=added")
    assert "The file is attached to this transaction" in page
    assert "letter from GP.pdf" in page and "Added by the recipient pat@example.org on" in page
    assert "not part of the hospital's record" in page
    listing = await browser.page(f"{base}/reports")
    hospital, added = listing.split('id="attached"')
    assert "GP letter" not in hospital and "Radiology report (final)" in hospital
    assert "&#8220;GP letter&#8221;" in added and "Not from the hospital" in added
    opened = await browser.get(f"{base}/reports/{attachment.sop_uid}")
    assert opened.content_type == "application/pdf" and await opened.read() == pdf
    assert opened.headers["Content-Disposition"] == 'inline; filename="Attached_GP_letter.pdf"'
    after = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    assert after.instances == before.instances  # no DICOM file more in the package
    assert after.etag != before.etag  # but ATTACHED/ is new
    row = TransactionStudy.get(TransactionStudy.transaction == transaction.id)
    assert row.images_expected == 4  # 2 CT + PDF + SR, as shared
    message = TransactionMessage.select().order_by(TransactionMessage.id.desc()).first()
    assert message.author_kind == "recipient"
    assert "GP letter" in message.body and "PDF" in message.body
    added_events = events("attachment-add")
    assert [(e.event_code, e.actor_kind, e.study_uid) for e in added_events] == [
        ("110104", "recipient", study["uid"])]


async def test_staff_attach_an_image_and_the_recipient_is_told(
        browser: Browser, staff_browser: Browser, services: Services,
        study: dict[str, Any]) -> None:
    transaction, token = share([study["uid"]])
    base = f"/admin/transactions/{transaction.public_id}"
    assert f'href="{base}/attachments">View/Add Attachments</a>' in await staff_browser.page(base)
    data, arr = png_bytes()
    response = await staff_browser.post(f"{base}/attachments", data=upload_form(
        await attachments_csrf(staff_browser, base), data, "wound.png", "image/png"))
    assert response.status == 303, await response.text()
    attachment = Attachment.get()
    assert (attachment.author_kind, attachment.author, attachment.title) == (
        "staff", "alice", "wound")
    assert not Instance.select().where(Instance.sop_uid == attachment.sop_uid).exists()
    stored = dcmread(services.store.path(attachment.key))
    assert stored.SOPClassUID == SecondaryCaptureImageStorage
    assert np.array_equal(stored.pixel_array, arr)

    await log_in(browser, services, token)
    details = await browser.page(f"/transactions/{transaction.public_id}")
    assert "Dr Alice" in details and "Attached an image: \u201cwound\u201d (PNG" in details
    listing = await browser.page(f"/transactions/{transaction.public_id}/attachments")
    assert "wound.png" in listing and "Added by staff Dr Alice on" in listing
    # The picture opens from the reports page, as a PNG of its pixels.
    picture = await browser.get(f"/transactions/{transaction.public_id}/reports/"
                                f"{attachment.sop_uid}")
    assert picture.status == 200 and picture.content_type == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(await picture.read()))), arr)


async def test_bad_files_are_refused_and_nothing_is_stored(
        browser: Browser, services: Services, study: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    transaction, token = share([study["uid"]])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    csrf = await attachments_csrf(browser, base)
    instances = Instance.select().count()
    messages = TransactionMessage.select().count()
    stored = sorted(services.store.keys())
    for data, name, kind, words in (
            (b"MZ\x90\x00 not a document", "report.pdf", "application/pdf",
             "Only PDF documents and JPEG or PNG images can be attached"),
            (b"GIF89a\x01\x00\x01\x00", "x.gif", "image/gif", "Only PDF documents"),
            (b"\x89PNG\r\n\x1a\n broken", "photo.png", "image/png", "damaged"),
            (b"", "empty.pdf", "application/pdf", "The file is empty")):
        response = await browser.post(f"{base}/attachments",
                                      data=upload_form(csrf, data, name, kind))
        assert response.status == 400, name
        assert words in await response.text(), name
    no_token = await browser.post(f"{base}/attachments", data=upload_form(
        "wrong", factory.minimal_pdf(), "a.pdf", "application/pdf"))
    assert no_token.status == 403

    monkeypatch.setattr(middlewares, "MAX_UPLOAD_BYTES", 100_000)  # the limit upload_limit sets
    big = factory.minimal_pdf() + b"%" * 300_000
    too_big = await browser.post(f"{base}/attachments",
                                 data=upload_form(csrf, big, "big.pdf", "application/pdf"))
    assert too_big.status == 413 and "largest file" in await too_big.text()

    assert Instance.select().count() == instances
    assert sorted(services.store.keys()) == stored
    assert Attachment.select().count() == 0
    assert TransactionMessage.select().count() == messages
    assert events("attachment-add") == []


async def test_several_studies_the_study_must_be_chosen(
        browser: Browser, services: Services, study: dict[str, Any], tmp_path: Path) -> None:
    second = store_files(services, factory.make_ct_series(
        tmp_path / "mr", 1, PatientName="Doe^Jane", PatientID="P1", StudyDescription="MR KNEE"))
    transaction, token = share([study["uid"], second])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    page = await browser.page(f"{base}/attachments")
    assert "Choose the study it belongs to" in page and "MR KNEE" in page
    csrf = field(page, "csrf")
    pdf = factory.minimal_pdf()
    unchosen = await browser.post(f"{base}/attachments",
                                  data=upload_form(csrf, pdf, "a.pdf", "application/pdf"))
    assert unchosen.status == 400 and "choose the study" in await unchosen.text()
    stranger = await browser.post(f"{base}/attachments", data=upload_form(
        csrf, pdf, "a.pdf", "application/pdf", study="1.2.3.4"))
    assert stranger.status == 404
    chosen = await browser.post(f"{base}/attachments", data=upload_form(
        csrf, pdf, "a.pdf", "application/pdf", study=second))
    assert chosen.status == 303
    assert Attachment.get().study_uid == second
    assert dcmread(services.store.path(Attachment.get().key)).StudyInstanceUID == second


async def test_nothing_can_be_attached_to_a_declined_transaction(
        browser: Browser, services: Services, study: dict[str, Any]) -> None:
    transaction, token = share([study["uid"]])
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}"
    csrf = await attachments_csrf(browser, base)
    tx.decline(Transaction.get_by_id(transaction.id), "wrong patient")
    page = await browser.page(f"{base}/attachments")
    assert "You declined this transaction" in page and 'type="file"' not in page
    response = await browser.post(f"{base}/attachments", data=upload_form(
        csrf, factory.minimal_pdf(), "a.pdf", "application/pdf"))
    assert response.status == 410
    assert Attachment.select().count() == 0


async def test_staff_reach_any_transaction_but_not_unknown_or_purged_ones(
        browser: Browser, staff_browser: Browser, services: Services, study: dict[str, Any],
        tmp_path: Path) -> None:
    declined, token = share([study["uid"]])
    tx.decline(Transaction.get_by_id(declined.id), "not mine")
    base = f"/admin/transactions/{declined.public_id}"
    assert "Radiology report (final)" in await staff_browser.page(f"{base}/reports")
    pdf = await staff_browser.get(f"{base}/reports/{study['pdf_uid']}")
    assert pdf.status == 200 and await pdf.read() == study["pdf"]
    assert (await staff_browser.get("/admin/transactions/IEP00000000/reports")).status == 404
    old = store_files(services, factory.make_ct_series(tmp_path / "old", 1, PatientID="P1"))
    purged, _ = share([old], now=time.time() - 20 * tx.DAY)
    services.sharing.purge_expired()
    gone = await staff_browser.get(f"/admin/transactions/{purged.public_id}/attachments")
    assert gone.status == 410
    # A recipient session opens no staff page: it is sent to the staff login.
    await log_in(browser, services, token)
    response = await browser.get(f"{base}/reports")
    assert response.status == 303 and response.headers["Location"].startswith("/admin/login")
