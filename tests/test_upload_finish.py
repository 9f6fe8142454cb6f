"""Finishing an uploaded file (its inspection) and sending an upload, at the domain level."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from iepnode.errors import Gone
from iepnode.services import Services
from iepnode.uploads import review as upload_review
from iepnode.uploads import staging as uploads
from iepnode.uploads.intake import FileVerdict
from storage.models import AuditEvent, Transaction, TransactionMessage, Upload, UploadFile
from tests import data_factory as factory
from tests.test_upload_web import make_request, services  # noqa: F401


def upload_bytes(services: Services, request: Transaction, name: str,  # noqa: F811
                 data: bytes) -> UploadFile:
    """Announce a file and send all of it as one chunk, as the page does."""
    service = services.uploads
    file = service.add_file(request.recipient_id, request.public_id, name, "", len(data))
    chunk = service.open_chunk(request.recipient_id, request.public_id, file.id, 0)
    chunk.write(data)
    return service.close_chunk(chunk)


def ct_bytes(tmp_path: Path) -> bytes:
    path = factory.make_ct_series(tmp_path / "ct", 1, PatientName="Doe^Jane",
                                  PatientID="CD-1")[0]
    return path.read_bytes()


def test_finish_keeps_the_inspection_verdict(services: Services, tmp_path: Path) -> None:  # noqa: F811
    request, _ = make_request()
    file = upload_bytes(services, request, "scan.dcm", ct_bytes(tmp_path))
    assert file.completed_at is not None and file.received == file.size
    assert (file.verdict, file.objects) == ("dicom", 1)
    verdict = FileVerdict.from_dict(json.loads(file.detail))
    assert verdict.kind == "dicom" and [p.patient_id for p in verdict.patients] == ["CD-1"]
    skipped = upload_bytes(services, request, "notes.txt", b"just some text")
    assert skipped.verdict == "skipped" and skipped.reason
    # One set of upload statuses, shared by both sides.
    for name in ("STAGING", "SENT", "RELEASING", "RELEASED", "REJECTED", "CANCELLED"):
        assert getattr(upload_review, name) is getattr(uploads, name) == name


def test_concurrent_finishes_inspect_once(services: Services, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried empty last PATCH while the first is being inspected starts no second scan."""
    request, _ = make_request()
    data = ct_bytes(tmp_path)
    service = services.uploads
    file = service.add_file(request.recipient_id, request.public_id, "scan.dcm", "", len(data))
    chunk = service.open_chunk(request.recipient_id, request.public_id, file.id, 0)
    chunk.write(data)
    scans: list[str] = []
    inside, go_on = threading.Event(), threading.Event()
    real = uploads.inspect_staged_file

    def gated(path: Path, display_name: str, relpath: str = "") -> FileVerdict:
        scans.append(display_name)
        inside.set()
        assert go_on.wait(30)
        return real(path, display_name, relpath)

    monkeypatch.setattr(uploads, "inspect_staged_file", gated)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(service.close_chunk, chunk)
        assert inside.wait(30)
        # The browser's retry: an empty PATCH at offset == size.
        retry = service.open_chunk(request.recipient_id, request.public_id, file.id, len(data))
        claimed = service.close_chunk(retry)
        assert claimed.verdict == uploads.CHECKING and claimed.completed_at is None
        assert claimed.received == len(data)
        go_on.set()
        done = first.result(30)
    assert scans == ["scan.dcm"]
    assert (done.verdict, done.objects) == ("dicom", 1) and done.completed_at is not None
    # Once finished, another finish returns the verdict without scanning.
    assert service.finish(file.id).verdict == "dicom" and scans == ["scan.dcm"]


def test_failed_inspection_can_be_retried(services: Services, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    request, _ = make_request()
    data = ct_bytes(tmp_path)
    service = services.uploads
    file = service.add_file(request.recipient_id, request.public_id, "scan.dcm", "", len(data))
    chunk = service.open_chunk(request.recipient_id, request.public_id, file.id, 0)
    chunk.write(data)
    real = uploads.inspect_staged_file

    def broken(path: Path, display_name: str, relpath: str = "") -> FileVerdict:
        raise OSError("disk went away")

    monkeypatch.setattr(uploads, "inspect_staged_file", broken)
    with pytest.raises(OSError):
        service.close_chunk(chunk)
    assert UploadFile.get_by_id(file.id).verdict == ""  # not left 'checking'
    monkeypatch.setattr(uploads, "inspect_staged_file", real)
    assert service.finish(file.id).verdict == "dicom"


async def test_double_send_sends_once(services: Services, tmp_path: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Sends that both pass the checks (a double click): one audit, message, mail
    and intake; the other is refused."""
    request, _ = make_request()
    upload_bytes(services, request, "scan.dcm", ct_bytes(tmp_path))
    outbox = services.settings.data_dir / "outbox"
    mails = len(list(outbox.glob("*.eml"))) if outbox.exists() else 0
    # Hold both Sends at the write until both have passed every check.
    both_checked = threading.Barrier(2, timeout=30)
    real_write = uploads.write_transaction

    @contextlib.contextmanager
    def together() -> Iterator[None]:
        both_checked.wait()
        with real_write():
            yield

    monkeypatch.setattr(uploads, "write_transaction", together)
    patient = uploads.ConfirmedPatient("Test", "Patient", "01/01/2001", "F")
    results = await asyncio.gather(*(
        services.requests.send_upload(request.recipient_id, request.public_id, patient,
                                      "From my CD")
        for _ in range(2)), return_exceptions=True)
    sent = [r for r in results if isinstance(r, Upload)]
    refused = [r for r in results if isinstance(r, Gone)]
    assert len(sent) == 1 and len(refused) == 1, results
    assert "sent already" in str(refused[0])
    assert Upload.get_by_id(sent[0].id).status == "SENT"

    def events(action: str) -> int:
        return AuditEvent.select().where(AuditEvent.action == action).count()

    assert events("upload-send") == 1 and events("upload-sent") == 1  # Send, intake
    assert TransactionMessage.select().where(
        TransactionMessage.transaction == request.id).count() == 1
    assert len(list(outbox.glob("*.eml"))) - mails == 2  # confirmation + staff notice
