"""What the staff pages of uploads show: the list of uploads, and one upload in detail."""

from __future__ import annotations

import json
from dataclasses import dataclass

import peewee

from iepnode.uploads.intake import FileVerdict
from iepnode.uploads.review import Review, get_upload
from iepnode.uploads.staging import SENT
from storage.models import Transaction, Upload, UploadFile


@dataclass(frozen=True)
class UploadRow:
    """One upload in the staff list."""

    upload: Upload
    request: Transaction
    review: Review | None
    files: int


def list_uploads(limit: int = 200) -> list[UploadRow]:
    """Uploads, those waiting for staff first, newest first."""
    counts = dict(UploadFile.select(UploadFile.upload, peewee.fn.COUNT(UploadFile.id))
                  .group_by(UploadFile.upload).tuples())
    waiting = peewee.Case(None, [(Upload.status == SENT, 0)], 1)
    rows = (Upload.select(Upload, Transaction).join(Transaction)
            .order_by(waiting, Upload.created_at.desc()).limit(limit))
    return [UploadRow(u, u.transaction, Review.from_json(u.review), counts.get(u.id, 0))
            for u in rows]


@dataclass(frozen=True)
class UploadDetail:
    """Everything the review page shows about one upload."""

    upload: Upload
    request: Transaction
    review: Review | None
    files: list[tuple[UploadFile, FileVerdict | None]]


def detail(upload_id: int) -> UploadDetail:
    """The upload, its request, review and files with their verdicts.

    Raises
    ------
    NotFound
        No such upload.
    """
    upload = get_upload(upload_id)
    files = []
    for upload_file in upload.files.order_by(UploadFile.id):
        verdict = None
        if upload_file.detail:
            try:
                verdict = FileVerdict.from_dict(json.loads(upload_file.detail))
            except (ValueError, TypeError, KeyError):
                verdict = None
        files.append((upload_file, verdict))
    return UploadDetail(upload, upload.transaction, Review.from_json(upload.review), files)
