"""Intake, release, rejection and purge of uploads (iepnode.uploads.review via the services).

The request, upload and staged files are made as the upload page makes them (rows
and files under ``DATA_DIR/staging/<key>/``); release goes through the node's real
ingest path, and delivery to the PACS through a real send job to dcmtk storescp.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread

from config import load_settings
from iepnode.errors import InvalidRequest
from iepnode.people import audit
from iepnode.services import Services
from iepnode.uploads import housekeeping as upload_housekeeping
from iepnode.uploads.intake import inspect_staged_file, patient_key
from iepnode.wiring import build_services
from scp.sender import make_transport
from storage import registry
from storage.models import AuditEvent, Instance, Patient, Recipient, Transaction, Upload, UploadFile
from tests.data_factory import make_ct_series, minimal_pdf
from tests.support.peers import free_port, received, storescp_on

STAFF = audit.Actor("staff", "radiographer", "10.0.0.9")


def make_services(tmp_path: Path, **settings: object) -> Services:
    values = {"data_dir": tmp_path / "data", "fsync": False, **settings}
    return build_services(load_settings(overrides=values, environ={}))


def make_request(patient_id: str = "H0012345", name: str = "Doe^Jane",
                 birth_date: str = "19800101") -> Transaction:
    now = time.time()
    recipient = Recipient.create(email=f"{secrets.token_hex(4)}@example.org", created_at=now)
    return Transaction.create(
        public_id=f"IEP{secrets.token_hex(4).upper()}", kind="REQUEST", direction="OUT",
        recipient=recipient, status="NEW", created_at=now, expires_at=now + 86400,
        patient_name=name, patient_birth_date=birth_date, patient_sex="F",
        patient_id=patient_id, patient_id_issuer="RXH",
        link_token_hash=secrets.token_hex(32))


def stage(services: Services, request: Transaction, files: dict[str, bytes], *,
          status: str = "SENT", inspect: bool = True) -> Upload:
    """An upload holding ``files`` (display name -> bytes), staged as the page does."""
    now = time.time()
    upload = Upload.create(transaction=request, key=secrets.token_hex(16), status=status,
                           uploader=request.recipient.email, message="From my CD",
                           created_at=now, updated_at=now, sent_at=now)
    folder = services.settings.data_dir / "staging" / upload.key
    folder.mkdir(parents=True)
    for number, (name, data) in enumerate(files.items()):
        disk = f"f{number:07d}"
        (folder / disk).write_bytes(data)
        detail = ""
        if inspect:
            detail = json.dumps(inspect_staged_file(folder / disk, name).to_dict())
        UploadFile.create(upload=upload, display_name=name, disk_name=disk, size=len(data),
                          received=len(data), created_at=now, completed_at=now, detail=detail)
    return upload


def zipped(paths: list[Path], tmp_path: Path) -> bytes:
    out = tmp_path / f"{secrets.token_hex(4)}.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for number, path in enumerate(paths):
            zf.write(path, f"DICOM/ST0/IM{number}")
    return out.read_bytes()


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return make_services(tmp_path)


def test_clean_upload_is_reconciled_on_release(services: Services, tmp_path: Path) -> None:
    request = make_request()
    series = make_ct_series(tmp_path / "cd", 3, PatientID="CD-99", PatientName="DOE^JANE",
                            PatientBirthDate="19800101")
    upload = stage(services, request, {"cd.zip": zipped(series, tmp_path),
                                   "letter.pdf": minimal_pdf()})
    review = services.requests.intake_upload(upload.id)
    assert review.objects == 3 and review.documents == 1
    assert review.flags == []
    assert Upload.get_by_id(upload.id).status == "SENT"  # auto-release is off by default
    assert Instance.select().count() == 0  # nothing stored before release

    result = services.requests.release_upload(upload.id, STAFF)
    assert (result.stored, result.documents, result.failed) == (4, 1, [])
    assert Upload.get_by_id(upload.id).status == "RELEASED"
    assert not (services.settings.data_dir / "staging" / upload.key).exists()
    patients = {(p.patient_id, p.issuer) for p in Patient.select()}
    assert patients == {("H0012345", "RXH")}
    originals = {p.read_bytes()[-200:] for p in series}
    for instance in Instance.select():
        ds = dcmread(services.store.path(instance.key))
        assert ds.PatientID == "H0012345" and ds.IssuerOfPatientID == "RXH"
        if ds.Modality == "CT":
            assert ds.OtherPatientIDsSequence[0].PatientID == "CD-99"
            item = ds.OriginalAttributesSequence[0]
            assert item.SourceOfPreviousValues == f"Patient upload {request.public_id}"
            assert item.ModifyingSystem == services.settings.ae_title
            assert services.store.path(instance.key).read_bytes()[-200:] in originals
        else:
            assert ds.Modality == "DOC"
    events = list(AuditEvent.select().where(AuditEvent.transaction_public_id
                                            == request.public_id))
    assert {e.action for e in events} == {"upload-sent", "upload-release"}
    assert all(e.event_code == "110104" for e in events)
    with pytest.raises(InvalidRequest):
        services.requests.release_upload(upload.id, STAFF)  # only once


def test_second_patient_flagged_and_excluded(services: Services, tmp_path: Path) -> None:
    request = make_request()
    mine = make_ct_series(tmp_path / "a", 2, PatientID="CD-1", PatientName="Doe^Jane")
    other = make_ct_series(tmp_path / "b", 1, PatientID="CD-2", PatientName="Roe^Richard",
                           PatientBirthDate="19500505")
    upload = stage(services, request, {"a.zip": zipped(mine, tmp_path),
                                   "IM9": other[0].read_bytes()})
    review = services.requests.intake_upload(upload.id)
    assert "2 different patients in one upload" in review.flags
    assert any("Roe^Richard" in flag for flag in review.flags)
    roe = next(p for p in review.patients if p.identity.patient_id == "CD-2")
    assert roe.mismatch == ["name", "birth date"]
    result = services.requests.release_upload(upload.id, STAFF, exclude=frozenset({roe.key}))
    assert (result.stored, result.excluded) == (2, 1)
    assert Instance.select().count() == 2


def test_auto_release_only_when_unflagged(tmp_path: Path) -> None:
    services = make_services(tmp_path, upload_auto_release=True)
    request = make_request()
    good = stage(services, request, {"IM1": make_ct_series(tmp_path / "g", 1,
                                                       PatientName="Doe^Jane",
                                                       PatientBirthDate="19800101",
                                                       )[0].read_bytes()})
    services.requests.intake_upload(good.id)
    assert Upload.get_by_id(good.id).status == "RELEASED"
    bad = stage(services, request, {"IM1": make_ct_series(tmp_path / "b", 1,
                                                      PatientName="Other^Ann")[0].read_bytes()})
    services.requests.intake_upload(bad.id)
    assert Upload.get_by_id(bad.id).status == "SENT"


def test_reject_deletes_staging_and_stores_nothing(services: Services, tmp_path: Path) -> None:
    request = make_request()
    upload = stage(services, request, {"IM1": make_ct_series(tmp_path / "a", 1)[0].read_bytes()})
    services.requests.intake_upload(upload.id)
    services.requests.reject_upload(upload.id, STAFF, "not the images we asked for")
    row = Upload.get_by_id(upload.id)
    assert row.status == "REJECTED" and row.released_by == "radiographer"
    assert not (services.settings.data_dir / "staging" / upload.key).exists()
    assert Instance.select().count() == 0
    with pytest.raises(InvalidRequest):
        services.requests.release_upload(upload.id, STAFF)


def test_uninspected_files_are_checked_at_intake(services: Services, tmp_path: Path) -> None:
    request = make_request()
    upload = stage(services, request, {"IM1": make_ct_series(tmp_path / "a", 1)[0].read_bytes(),
                                   "notes.dcm": b"plain text", "empty": b""}, inspect=False)
    review = services.requests.intake_upload(upload.id)
    assert (review.accepted_files, review.skipped_files, review.objects) == (1, 2, 1)


def test_abandoned_staging_is_purged(services: Services, tmp_path: Path) -> None:
    request = make_request()
    old = stage(services, request, {"IM1": b"x" * 10}, status="STAGING")
    fresh = stage(services, request, {"IM1": b"x" * 10}, status="STAGING")
    Upload.update(updated_at=time.time() - 3 * 86400).where(Upload.id == old.id).execute()
    orphan = services.settings.data_dir / "staging" / "orphan0000000000"
    orphan.mkdir()
    import os

    os.utime(orphan, (time.time() - 3 * 86400,) * 2)
    assert services.requests.purge_abandoned_uploads() == 2
    assert Upload.get_by_id(old.id).status == "CANCELLED"
    assert Upload.get_by_id(fresh.id).status == "STAGING"
    assert not (services.settings.data_dir / "staging" / old.key).exists()
    assert (services.settings.data_dir / "staging" / fresh.key).exists()
    assert not orphan.exists()


def test_released_study_is_delivered_to_the_pacs(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "pacs"
    services = make_services(tmp_path, upload_pacs_ae="PACS")
    registry.add_remote_ae("PACS", "127.0.0.1", port, set(), send_to=True)
    request = make_request()
    series = make_ct_series(tmp_path / "cd", 2, PatientID="CD-5", PatientName="Doe^Jane")
    upload = stage(services, request, {"cd.zip": zipped(series, tmp_path)})
    services.requests.intake_upload(upload.id)
    result = services.requests.release_upload(upload.id, STAFF)
    assert result.send_job is not None and result.send_error == ""
    with storescp_on(port, out, "PACS"):
        runner = services.sends.job_runner(make_transport(services.settings))
        job = runner.run_one(job_id=result.send_job)
        assert job is not None
    files = received(out)
    assert len(files) == 2
    for path in files:
        ds = dcmread(path)
        assert ds.PatientID == "H0012345"
        assert ds.OtherPatientIDsSequence[0].PatientID == "CD-5"
        original = next(s for s in series if dcmread(s).SOPInstanceUID == ds.SOPInstanceUID)
        assert ds.PixelData == dcmread(original).PixelData
    shutil.rmtree(out)


def test_patient_key_is_stable() -> None:
    from iepnode.archive.reconciliation import PatientIdentity

    a = PatientIdentity("1", "", "doe^jane", "19800101")
    b = PatientIdentity("1", "", "DOE^JANE ", "19800101")
    assert patient_key(a) == patient_key(b)


def test_dicomdir_listing_files_not_uploaded_is_flagged(services: Services, tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    series = make_ct_series(tmp_path / "src", 3, PatientName="Doe^Jane",
                            PatientBirthDate="19800101")
    fs = FileSet()
    for path in series:
        fs.add(path)
    cd = tmp_path / "cd"
    try:
        fs.write(cd)
    finally:
        fs._stage["t"].cleanup()
    tree = sorted(p for p in cd.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    request = make_request()
    files = {"DICOMDIR": (cd / "DICOMDIR").read_bytes()}
    files.update({str(p.relative_to(cd)): p.read_bytes() for p in tree[:2]})  # one left out
    upload = stage(services, request, files)
    for row in UploadFile.select().where(UploadFile.upload == upload):
        folder, _, name = ("CD/" + row.display_name).rpartition("/")
        row.relpath, row.display_name = folder, name
        row.save()
    review = services.requests.intake_upload(upload.id)
    assert review.objects == 2
    assert "The DICOMDIR lists 1 file(s) that were not uploaded (part of the CD may be " \
        "missing)" in review.flags
    whole = {"DICOMDIR": (cd / "DICOMDIR").read_bytes()}
    whole.update({str(p.relative_to(cd)).lower(): p.read_bytes() for p in tree})  # case varies
    complete = stage(services, request, whole)
    for row in UploadFile.select().where(UploadFile.upload == complete):
        folder, _, name = ("CD/" + row.display_name).rpartition("/")
        row.relpath, row.display_name = folder, name
        row.save()
    assert services.requests.intake_upload(complete.id).flags == []


def test_release_stuck_in_releasing_is_recovered(services: Services, tmp_path: Path) -> None:
    """A release whose process died leaves RELEASING; housekeeping puts it back to SENT
    after an hour, and releasing again stores what the first attempt did not."""
    request = make_request()
    series = make_ct_series(tmp_path / "cd", 2, PatientID="CD-7", PatientName="Doe^Jane")
    upload = stage(services, request, {"cd.zip": zipped(series, tmp_path)})
    services.requests.intake_upload(upload.id)
    first = services.requests.release_upload(upload.id, STAFF)
    assert first.stored == 2
    # The same objects again, in an upload whose release "died" 2 hours ago...
    stuck = stage(services, make_request(), {"cd.zip": zipped(series, tmp_path)},
                  status="RELEASING")
    more = make_ct_series(tmp_path / "more", 1, PatientID="CD-8", PatientName="Doe^Jane")
    recent = stage(services, make_request(), {"more.dcm": more[0].read_bytes()},
                   status="RELEASING")
    now = time.time()
    Upload.update(updated_at=now - 2 * 3600).where(Upload.id == stuck.id).execute()
    Upload.update(updated_at=now - 30 * 60).where(Upload.id == recent.id).execute()
    with pytest.raises(InvalidRequest):
        services.requests.release_upload(stuck.id, STAFF)  # stuck: cannot be released
    assert upload_housekeeping.recover_releases() == 1
    assert Upload.get_by_id(stuck.id).status == "SENT"
    assert Upload.get_by_id(recent.id).status == "RELEASING"  # may still be running
    events = AuditEvent.select().where(AuditEvent.action == "upload-release-interrupted")
    assert [e.transaction_public_id for e in events] == [stuck.transaction.public_id]
    assert upload_housekeeping.recover_releases() == 0
    again = services.requests.release_upload(stuck.id, STAFF)
    assert Upload.get_by_id(stuck.id).status == "RELEASED" and again.failed == []
    assert (again.stored, again.duplicates) == (0, 2)  # the first copies are kept
