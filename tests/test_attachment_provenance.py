"""Attachments belong to the transaction that added them (issue 13), in-process.

The issue's case: a forwarded-copy recipient attaches a PDF titled "Official Radiology
Report - FINAL" to their copy. It must stay theirs, labelled with who added it: not
in the source's reports or download, not in staff DICOMweb of the study, not counted
in the study; in the copy's own list and download (``ATTACHED/``). Staff (an admin or
the hospital contact) may file it into the study, once; a recipient cannot.

The app runs over a real :class:`Services` in ``tmp_path`` (aiohttp test server on
loopback) as in tests/test_reports_web.py; the forward goes through the forward
dialog's POST, the forwarded person signs in from their mail, as in
tests/test_forward_web.py. The end-to-end run against ``iepnode serve`` with dcmtk
peers (C-FIND, a PACS send) is tests/test_attachment_e2e.py.
"""

from __future__ import annotations

import io
import re
import sqlite3
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import EncapsulatedPDFStorage

from iepnode.errors import InvalidRequest
from iepnode.services import Services
from iepnode.viewing import attachments
from iepnode.wiring import build_services
from storage.db import open_database
from storage.models import (
    Attachment,
    AuditEvent,
    Instance,
    Study,
    Transaction,
    TransactionStudy,
)
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_forward_web import copies_of, dialog_csrf, link_token
from tests.test_forward_web import form as forward_form
from tests.test_recipient_web import field, log_in, make_settings, share
from tests.test_reports_web import upload_form

TITLE = "Official Radiology Report - FINAL"
SOLICITOR = "solicitor@law.example"
#: The hospital contact of transactions made by tests.test_recipient_web.share.
CONTACT_EMAIL = "radiology@hospital.example"


@pytest.fixture
def study(services: Services, tmp_path: Path) -> dict[str, Any]:
    """A CT study of two slices with the hospital's own PDF report."""
    ct = factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Jane", PatientID="P1",
                                PatientBirthDate="19800214", PatientSex="F",
                                StudyDate="20240105", StudyDescription="CT HEAD")
    report = factory.make_pdf(tmp_path / "ct", like=ct[0], DocumentTitle="CT head report",
                              pdf=factory.minimal_pdf("The hospital's report"))
    uid = store_files(services, [*ct, report])
    return {"uid": uid, "sop_uids": {str(dcmread(p).SOPInstanceUID) for p in [*ct, report]}}


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id))


def zip_of(body: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(body))


async def forwarded_copy(client: Any, services: Services, uid: str,
                         ) -> tuple[Transaction, Transaction, Browser, Browser]:
    """Share ``uid`` with the patient, who forwards it to the solicitor; both signed in."""
    source, token = share([uid])
    patient = Browser(client)
    await log_in(patient, services, token)
    response = await patient.post(f"/transactions/{source.public_id}/forward",
                                  data=forward_form(await dialog_csrf(patient,
                                                                      source.public_id)))
    assert response.status == 303, await response.text()
    (copy,) = copies_of(source)
    solicitor = Browser(client)
    await log_in(solicitor, services, link_token(services, SOLICITOR))
    return source, copy, patient, solicitor


async def attach(browser: Browser, base: str, pdf: bytes, title: str = TITLE) -> None:
    csrf = field(await browser.page(f"{base}/attachments"), "csrf")
    response = await browser.post(f"{base}/attachments", data=upload_form(
        csrf, pdf, "report.pdf", "application/pdf", title=title))
    assert response.status == 303, await response.text()


async def staff(client: Any, username: str, **kw: Any) -> Browser:
    browser = Browser(client)
    _, secret = make_user(username, **kw)
    assert (await staff_log_in(browser, username, secret)).status == 303
    return browser


async def test_a_forwarded_copy_cannot_write_into_the_source(
        client: Any, services: Services, study: dict[str, Any]) -> None:
    source, copy, patient, solicitor = await forwarded_copy(client, services, study["uid"])
    expected = {r.transaction_id: r.images_expected for r in TransactionStudy.select()}
    before_zip = await (await patient.get(f"/transactions/{source.public_id}/download")).read()
    pdf = factory.minimal_pdf("Fake findings")
    await attach(solicitor, f"/transactions/{copy.public_id}", pdf)
    attachment = Attachment.get()

    # The source knows nothing of it: reports, report URL, download.
    theirs = await patient.page(f"/transactions/{source.public_id}/reports")
    assert TITLE not in theirs and "CT head report" in theirs
    assert "Nothing has been added to this transaction." in theirs
    assert (await patient.get(f"/transactions/{source.public_id}/reports/"
                              f"{attachment.sop_uid}")).status == 404
    source_zip = await (await patient.get(f"/transactions/{source.public_id}/download")).read()
    assert source_zip == before_zip  # byte for byte the package it was
    assert not any(n.startswith("ATTACHED/") for n in zip_of(source_zip).namelist())
    assert pdf not in source_zip

    # The copy holds it and lists it apart from the hospital's reports, with who added it.
    assert attachment.transaction_id == copy.id and attachment.key
    listing = await solicitor.page(f"/transactions/{copy.public_id}/reports")
    hospital, added = listing.split('id="attached"')
    assert "CT head report" in hospital and TITLE not in hospital
    assert f"&#8220;{TITLE}&#8221;" in added and "Not from the hospital" in added
    assert f"Added by the recipient {SOLICITOR} on" in added
    assert "not part of the hospital's record" in added
    opened = await solicitor.get(f"/transactions/{copy.public_id}/reports/{attachment.sop_uid}")
    assert opened.status == 200 and await opened.read() == pdf

    # The copy's own download has it apart, outside the DICOMDIR, with who added it.
    copy_zip = zip_of(await (await solicitor.get(
        f"/transactions/{copy.public_id}/download")).read())
    assert copy_zip.read("ATTACHED/ATT00001.PDF") == pdf
    dicom = [n for n in copy_zip.namelist() if n.startswith("DICOM/")]
    assert len(dicom) == 3  # 2 CT + the hospital's report
    assert all(dcmread(io.BytesIO(copy_zip.read(n))).SOPInstanceUID in study["sop_uids"]
               for n in dicom)
    assert attachment.sop_uid.encode() not in copy_zip.read("DICOMDIR")
    readme = " ".join(copy_zip.read("README.TXT").decode().split())
    assert "ADDED TO THIS TRANSACTION - NOT PART OF THE HOSPITAL'S RECORD" in readme
    day = readme.split(f"\u201c{TITLE}\u201d: added by the recipient {SOLICITOR} on ")[1]
    assert re.match(r"\d{1,2} [A-Z][a-z]{2} \d{4}, not part of the hospital's record", day)
    assert "not part of the hospital&#8217;s record" in copy_zip.read("INDEX.HTM").decode()

    # Not in the study: not indexed, not counted, not in staff DICOMweb of the study.
    assert not Instance.select().where(Instance.sop_uid == attachment.sop_uid).exists()
    assert Study.get(Study.study_uid == study["uid"]).num_instances == 3
    assert {r.transaction_id: r.images_expected for r in TransactionStudy.select()} == expected
    hospital_staff = await staff(client, "drwho", email=CONTACT_EMAIL)
    response = await hospital_staff.get(f"/dicomweb/studies/{study['uid']}/instances")
    assert response.status == 200
    found = {item["00080018"]["Value"][0] for item in await response.json()}
    assert found == study["sop_uids"]
    response = await patient.get(f"/dicomweb/t/{source.public_id}/studies/{study['uid']}"
                                 "/instances")
    assert {item["00080018"]["Value"][0] for item in await response.json()} == found


async def test_staff_file_it_into_the_study_once_and_a_recipient_cannot(
        client: Any, services: Services, study: dict[str, Any]) -> None:
    source, copy, patient, solicitor = await forwarded_copy(client, services, study["uid"])
    await attach(solicitor, f"/transactions/{copy.public_id}", factory.minimal_pdf("x"))
    attachment = Attachment.get()
    held_file = services.store.path(attachment.key)
    url = f"/admin/transactions/{copy.public_id}/attachments/{attachment.id}/file"

    # The recipient has no staff page: their session is sent to the staff login.
    csrf = field(await solicitor.page(f"/transactions/{copy.public_id}/attachments"), "csrf")
    response = await solicitor.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert response.status == 303 and response.headers["Location"].startswith("/admin/login")
    # A staff member who is neither an admin nor the hospital contact may not file.
    other = await staff(client, "bob", email="bob@hospital.example")
    page = await other.page(f"/admin/transactions/{copy.public_id}")
    assert f"the recipient {SOLICITOR}," in page and "Held by this transaction" in page
    assert url not in page and "Only an administrator or the hospital contact" in page
    response = await other.post(url, data={"csrf": field(page, "csrf"), "confirm": "yes"})
    assert response.status == 403
    assert Attachment.get_by_id(attachment.id).key == attachment.key

    contact = await staff(client, "drwho", email=CONTACT_EMAIL, display_name="Dr Who")
    page = await contact.page(f"/admin/transactions/{copy.public_id}")
    assert f'action="{url}"' in page and "File into the patient&#8217;s study" in page
    csrf = field(page, "csrf")
    forged = await contact.post(url, data={"csrf": "not-the-token", "confirm": "yes"})
    assert forged.status == 403
    unconfirmed = await contact.post(url, data={"csrf": csrf})
    assert unconfirmed.status == 400 and "Tick the box" in await unconfirmed.text()
    assert events("attachment-file") == []

    filed = await contact.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert filed.status == 303, await filed.text()
    assert filed.headers["Location"] == (
        f"/admin/transactions/{copy.public_id}?done=attachment-filed#attachments")
    row = Attachment.get_by_id(attachment.id)
    assert row.key is None and row.filed_by == "drwho" and row.filed_at
    instance = Instance.get(Instance.sop_uid == attachment.sop_uid)
    assert instance.sop_class == EncapsulatedPDFStorage
    assert instance.series.study.study_uid == study["uid"]
    assert not held_file.exists()  # the study's instance is the one copy now
    (event,) = events("attachment-file")
    assert (event.event_code, event.actor_kind, event.actor, event.transaction_public_id,
            event.study_uid) == ("110104", "staff", "drwho", copy.public_id, study["uid"])
    page = await contact.page(f"/admin/transactions/{copy.public_id}?done=attachment-filed")
    assert "The attachment is filed into the patient&#39;s study" in page
    assert "Filed into the study by staff Dr Who" in page

    # Now it is the study's: in the source's reports too, still saying who added it.
    theirs = await patient.page(f"/transactions/{source.public_id}/reports")
    hospital = theirs.split('id="attached"')[0]
    assert TITLE in hospital and f"Added by the recipient {SOLICITOR}" in hospital
    assert "filed into the patient's study by staff Dr Who" in hospital

    again = await contact.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert again.status == 400
    assert "already filed into the patient&#39;s study (by staff Dr Who)" in await again.text()
    assert Instance.select().where(Instance.sop_uid == attachment.sop_uid).count() == 1
    assert len(events("attachment-file")) == 1
    removed = await contact.post(url.replace("/file", "/remove"),
                                 data={"csrf": csrf, "confirm": "yes"})
    assert removed.status == 400 and Attachment.get_or_none(id=attachment.id) is not None


async def test_an_admin_removes_an_unfiled_attachment(client: Any, services: Services,
                                                      study: dict[str, Any]) -> None:
    transaction, token = share([study["uid"]])
    patient = Browser(client)
    await log_in(patient, services, token)
    await attach(patient, f"/transactions/{transaction.public_id}", factory.minimal_pdf())
    attachment = Attachment.get()
    held_file = services.store.path(attachment.key)
    admin = await staff(client, "root", is_admin=True)
    page = await admin.page(f"/admin/transactions/{transaction.public_id}")
    url = f"/admin/transactions/{transaction.public_id}/attachments/{attachment.id}/remove"
    assert f'action="{url}"' in page
    response = await admin.post(url, data={"csrf": field(page, "csrf"), "confirm": "yes"})
    assert response.status == 303
    assert Attachment.get_or_none(id=attachment.id) is None and not held_file.exists()
    (event,) = events("attachment-remove")
    assert (event.event_code, event.actor, event.transaction_public_id) == (
        "110110", "root", transaction.public_id)
    assert TITLE in event.detail or attachment.sop_uid in event.detail
    listing = await patient.page(f"/transactions/{transaction.public_id}/attachments")
    assert "Nothing has been attached" in listing
    assert "Removed the attachment" in await patient.page(
        f"/transactions/{transaction.public_id}")


async def test_attachments_from_before_are_listed_without_a_key(
        client: Any, services: Services, study: dict[str, Any], tmp_path: Path) -> None:
    """Before issue 13 an attachment was ingested into the study and had no key."""
    old = factory.make_pdf(tmp_path / "old", like=next((tmp_path / "ct").iterdir()),
                           DocumentTitle="Old letter")
    store_files(services, [old])
    transaction, token = share([study["uid"]])
    sop_uid = str(dcmread(old).SOPInstanceUID)
    row = Attachment.create(transaction=transaction.id, study_uid=study["uid"],
                            sop_uid=sop_uid, sop_class=EncapsulatedPDFStorage,
                            title="Old letter", original_name="old.pdf",
                            media_type="application/pdf", size_bytes=100,
                            author_kind="recipient", author="pat@example.org",
                            created_at=time.time())
    patient = Browser(client)
    await log_in(patient, services, token)
    base = f"/transactions/{transaction.public_id}"
    listing = await patient.page(f"{base}/attachments")
    assert "old.pdf" in listing and "stored with the patient's study" in listing
    reports = await patient.page(f"{base}/reports")
    assert "Old letter" in reports.split('id="attached"')[0]
    assert (await patient.get(f"{base}/reports/{sop_uid}")).status == 200
    admin = await staff(client, "root", is_admin=True)
    page = await admin.page(f"/admin{base}")
    assert "In the study (added before filing by staff was needed)" in page
    response = await admin.post(f"/admin{base}/attachments/{row.id}/file",
                                data={"csrf": field(page, "csrf"), "confirm": "yes"})
    assert response.status == 400 and "already part of the patient" in await response.text()


def test_purge_removes_held_attachments_with_their_transaction(services: Services,
                                                               study: dict[str, Any]) -> None:
    transaction, _ = share([study["uid"]])
    user, _ = make_user("root", is_admin=True)
    services.reports.add_attachment(transaction.public_id, data=factory.minimal_pdf(),
                        original_name="a.pdf", staff=user)
    held_file = services.store.path(Attachment.get().key)
    Transaction.update(expires_at=time.time() - 1).where(
        Transaction.id == transaction.id).execute()
    services.sharing.purge_expired()
    assert Attachment.select().count() == 0 and not held_file.exists()


def test_old_databases_get_the_new_columns(tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path))
    path = services.settings.data_dir / "index.sqlite3"
    services.close()
    with sqlite3.connect(path) as db:
        db.execute('DROP INDEX "attachment_key"')
        for column in ("key", "filed_at", "filed_by"):
            db.execute(f'ALTER TABLE "attachment" DROP COLUMN "{column}"')
    with sqlite3.connect(path) as db:
        assert "key" not in {r[1] for r in db.execute('PRAGMA table_info("attachment")')}
    open_database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute('PRAGMA table_info("attachment")')}
        indexes = {r[1] for r in db.execute('PRAGMA index_list("attachment")')}
    assert {"key", "filed_at", "filed_by"} <= columns and "attachment_key" in indexes


def test_filing_at_once_from_many_threads_files_once(any_db_services: Services,
                                                     tmp_path: Path) -> None:
    uid = store_files(any_db_services, factory.make_ct_series(tmp_path / "ct", 1, PatientID="P1"))
    transaction, _ = share([uid], now=1e10)  # far in the future: never expired
    admin, _ = make_user("root", is_admin=True)
    row = any_db_services.reports.add_attachment(transaction.public_id, data=factory.minimal_pdf(),
                                  original_name="a.pdf", staff=admin)
    start = threading.Barrier(6)
    outcomes: list[str] = [""] * 6

    def one(n: int) -> None:
        start.wait()
        try:
            any_db_services.reports.file_attachment(transaction.public_id, row.id, staff=admin)
            outcomes[n] = "filed"
        except InvalidRequest:
            outcomes[n] = "refused"
        except Exception as exc:  # any other outcome fails the test
            outcomes[n] = f"{type(exc).__name__}: {exc}"
        finally:
            any_db_services.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["filed"] + ["refused"] * 5, outcomes
    assert Instance.select().where(Instance.sop_uid == row.sop_uid).count() == 1
    assert AuditEvent.select().where(AuditEvent.action == "attachment-file").count() == 1
    assert attachments.state_of(Attachment.get_by_id(row.id)) == attachments.FILED


def test_simultaneous_uploads_stop_at_max_attachments(any_db_services: Services,
                                                      tmp_path: Path) -> None:
    """``[portal] max_attachments`` is decided in the database: eight uploads at once, two
    allowed, two stored; nothing of the refused six is left in the file store."""
    import dataclasses

    # The limit as set before start-up (the services take their settings when built).
    any_db_services = build_services(dataclasses.replace(any_db_services.settings,
                                                         max_attachments=2))
    uid = store_files(any_db_services, factory.make_ct_series(tmp_path / "ct", 1, PatientID="P1"))
    transaction, _ = share([uid], now=1e10)
    admin, _ = make_user("root", is_admin=True)
    stored_before = sorted(any_db_services.store.keys())
    start = threading.Barrier(8)
    outcomes: list[str] = [""] * 8

    def one(n: int) -> None:
        start.wait()
        try:
            any_db_services.reports.add_attachment(transaction.public_id,
                                                   data=factory.minimal_pdf(str(n)),
                                    original_name=f"{n}.pdf", staff=admin)
            outcomes[n] = "added"
        except InvalidRequest as exc:
            outcomes[n] = "refused" if "the most allowed" in str(exc) else str(exc)
        except Exception as exc:  # any other outcome fails the test
            outcomes[n] = f"{type(exc).__name__}: {exc}"
        finally:
            any_db_services.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["added"] * 2 + ["refused"] * 6, outcomes
    held = Attachment.select().where(Attachment.transaction == transaction.id)
    assert held.count() == 2
    assert sorted(any_db_services.store.keys()) == sorted([*stored_before, *(a.key for a in held)])
    view = any_db_services.reports.attachments_view(transaction.public_id, staff=admin)
    assert view.limit_reason.startswith("This transaction has 2 attachments already")
