"""Finishing an uploaded file (its inspection) and sending an upload, at the domain level."""

from __future__ import annotations

import json
from pathlib import Path

from iepnode import upload_review, uploads
from iepnode.node import Node
from iepnode.upload_intake import FileVerdict
from storage.models import Transaction, UploadFile
from tests import data_factory as factory
from tests.test_upload_web import make_request, node  # noqa: F401


def upload_bytes(node: Node, request: Transaction, name: str,  # noqa: F811
                 data: bytes) -> UploadFile:
    """Announce a file and send all of it as one chunk, as the page does."""
    service = node.uploads
    file = service.add_file(request.recipient_id, request.public_id, name, "", len(data))
    chunk = service.open_chunk(request.recipient_id, request.public_id, file.id, 0)
    chunk.write(data)
    return service.close_chunk(chunk)


def ct_bytes(tmp_path: Path) -> bytes:
    path = factory.make_ct_series(tmp_path / "ct", 1, PatientName="Doe^Jane",
                                  PatientID="CD-1")[0]
    return path.read_bytes()


def test_finish_keeps_the_inspection_verdict(node: Node, tmp_path: Path) -> None:  # noqa: F811
    request, _ = make_request()
    file = upload_bytes(node, request, "scan.dcm", ct_bytes(tmp_path))
    assert file.completed_at is not None and file.received == file.size
    assert (file.verdict, file.objects) == ("dicom", 1)
    verdict = FileVerdict.from_dict(json.loads(file.detail))
    assert verdict.kind == "dicom" and [p.patient_id for p in verdict.patients] == ["CD-1"]
    skipped = upload_bytes(node, request, "notes.txt", b"just some text")
    assert skipped.verdict == "skipped" and skipped.reason
    # One set of upload statuses, shared by both sides.
    for name in ("STAGING", "SENT", "RELEASING", "RELEASED", "REJECTED", "CANCELLED"):
        assert getattr(upload_review, name) is getattr(uploads, name) == name
