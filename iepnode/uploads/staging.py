"""Uploads in answer to a request: the staging area and the resumable chunk protocol.

A recipient answers a request (:mod:`iepnode.uploads.image_requests`) with one upload at a
time. Its files arrive in chunks (a tus-like protocol, see :mod:`web.upload`) and are
stored flat in ``DATA_DIR/staging/<upload key>/<disk name>``: both names are random
and chosen here, the browser's file name and folder path are kept in the database for
display and for resolving DICOMDIR references only. The offset of a file is the size
of its staged file: after a dropped connection the bytes that arrived are kept and
the browser asks for the offset (``HEAD``) and goes on from there.

Each file is inspected when its last byte arrives
(:func:`iepnode.uploads.intake.inspect_staged_file`); the verdict is shown on the page.
Nothing reaches the store from here. Send (the uploader's confirmation) marks the
upload ``SENT``; :meth:`iepnode.uploads.service.RequestService.send_upload` then has it
checked for staff (:func:`iepnode.uploads.review.intake`), who release or reject it.
Cancel, or removing a file, deletes its staged bytes at once.

This module holds the statuses, limits and :class:`UploadService`; one chunk is written
by :class:`iepnode.uploads.chunks.ChunkWriter` (with the protocol's errors).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from iepnode.errors import Gone, InvalidRequest, NotFound
from iepnode.people import audit
from iepnode.rules.text import without_control
from iepnode.sharing.transactions import (
    COMPLETE,
    DECLINED,
    REQUEST,
    get_for_recipient,
    is_expired,
)
from iepnode.uploads.chunks import ChunkWriter, OffsetMismatch, TooLarge
from iepnode.uploads.intake import inspect_staged_file
from storage.db import write_transaction
from storage.models import Recipient, Transaction, TransactionMessage, Upload, UploadFile

log = logging.getLogger("iepnode.uploads")

#: Upload statuses (the one set; :mod:`iepnode.uploads.review` imports them).
STAGING, SENT, RELEASING, RELEASED, REJECTED, CANCELLED = (
    "STAGING", "SENT", "RELEASING", "RELEASED", "REJECTED", "CANCELLED")
#: ``UploadFile.verdict`` while a finished file is being inspected (no verdict yet).
CHECKING = "checking"
#: Most files one upload may hold (a CD of single-frame images has a few thousand).
MAX_FILES = 20_000
MAX_MESSAGE = 4000
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Limits of uploads: sizes in bytes, and inspections run at once in this process."""

    max_file: int = 4096 * MIB
    max_total: int = 16384 * MIB
    #: Files inspected at the same time (``[portal] upload_inspections``); more wait.
    inspections: int = 2


@dataclass(frozen=True)
class ConfirmedPatient:
    """The patient details the uploader typed on the page."""

    family_name: str
    given_name: str
    birth_date: str
    sex: str


@dataclass
class UploadPage:
    """What the upload page of a request shows."""

    transaction: Transaction
    upload: Upload | None
    files: list[UploadFile]
    messages: list[TransactionMessage]
    limits: Limits
    sent: list[Upload] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes announced by the files of the current upload."""
        return sum(f.size for f in self.files)


def clean_name(value: str) -> str:
    """A browser's file name for display: last path part, no control characters."""
    name = re.split(r"[/\\]", value)[-1]
    name = without_control(name).strip()
    return name[:255] or "unnamed"


def clean_relpath(value: str) -> str:
    """A browser's folder path for display and DICOMDIR resolution: ``a/b/c``.

    Separators become ``/``; empty, ``.`` and ``..`` parts are dropped, so the path
    never climbs out of the upload (it is never used as a path on disk anyway).
    """
    parts = [without_control(p) for p in re.split(r"[/\\]", value)]
    return "/".join(p for p in parts if p not in ("", ".", ".."))[:1024]


def check_open(transaction: Transaction, now: float | None = None) -> None:
    """Raise :class:`Gone` unless the request still takes uploads."""
    now = time.time() if now is None else now
    if transaction.status == DECLINED:
        raise Gone("This request was declined: it no longer takes uploads.")
    if is_expired(transaction, now):
        raise Gone("This request has expired: it no longer takes uploads. Please contact "
                   "the hospital.")
    if transaction.status == COMPLETE:
        raise Gone("The images for this request have been sent already.")


class UploadService:
    """The upload side of requests, for the web views (one per node).

    Parameters
    ----------
    staging_dir : Path
        ``DATA_DIR/staging``.
    limits : Limits
        Size limits.
    """

    def __init__(self, staging_dir: Path, limits: Limits) -> None:
        self.root = staging_dir
        self.limits = limits
        # Several files finishing at once (one upload's parallel files, several uploads)
        # are inspected a few at a time: each reads its whole file and uses a core.
        self._inspections = threading.BoundedSemaphore(limits.inspections)

    # -- paths ---------------------------------------------------------------------------

    def folder(self, upload: Upload) -> Path:
        """The staging folder of an upload."""
        return self.root / upload.key

    def path(self, upload: Upload, file: UploadFile) -> Path:
        """The staged file of one upload file."""
        return self.root / upload.key / file.disk_name

    # -- lookups (every one scoped to the recipient) --------------------------------------

    @staticmethod
    def request_of(recipient_id: int, public_id: str) -> Transaction:
        """One of the recipient's requests.

        Raises
        ------
        NotFound
            No such request, someone else's, or a transaction of another kind.
        """
        transaction = get_for_recipient(Recipient.get_by_id(recipient_id), public_id)
        if transaction.kind != REQUEST:
            raise NotFound(f"no request {public_id}")
        return transaction

    @staticmethod
    def current(transaction: Transaction) -> Upload | None:
        """The upload being staged for a request, if any."""
        return (Upload.select().where((Upload.transaction == transaction.id)
                                      & (Upload.status == STAGING))
                .order_by(Upload.id.desc()).first())

    def page(self, recipient_id: int, public_id: str, source_ip: str = "") -> UploadPage:
        """What the upload page shows (audited as a view of the request)."""
        transaction = self.request_of(recipient_id, public_id)
        upload = self.current(transaction)
        files = list(upload.files.order_by(UploadFile.id)) if upload else []
        sent = list(Upload.select().where((Upload.transaction == transaction.id)
                                          & (Upload.status.in_([SENT, RELEASED, REJECTED])))
                    .order_by(Upload.id))
        messages = list(transaction.messages.order_by(TransactionMessage.created_at,
                                                      TransactionMessage.id))
        audit.record(audit.PATIENT_RECORD, "view-transaction",
                     audit.Actor("recipient", transaction.recipient.email, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail="upload page")
        return UploadPage(transaction, upload, files, messages, self.limits, sent)

    def _file(self, recipient_id: int, public_id: str, file_id: int,
              ) -> tuple[Transaction, Upload, UploadFile]:
        transaction = self.request_of(recipient_id, public_id)
        upload = self.current(transaction)
        file = None if upload is None else UploadFile.get_or_none(
            (UploadFile.id == file_id) & (UploadFile.upload == upload.id))
        if upload is None or file is None:
            raise NotFound(f"no such file in request {public_id}")
        return transaction, upload, file

    def file(self, recipient_id: int, public_id: str, file_id: int) -> UploadFile:
        """One file of the recipient's current upload for a request (any state).

        Raises
        ------
        NotFound
            No such file in this recipient's current upload.
        """
        return self._file(recipient_id, public_id, file_id)[2]

    def offset(self, recipient_id: int, public_id: str, file_id: int) -> tuple[int, int]:
        """``(bytes staged, announced size)`` of a file: where its upload goes on."""
        _, upload, file = self._file(recipient_id, public_id, file_id)
        try:
            staged = self.path(upload, file).stat().st_size
        except FileNotFoundError:
            raise NotFound("the file was removed") from None
        return staged, file.size

    # -- the protocol --------------------------------------------------------------------

    def add_file(self, recipient_id: int, public_id: str, name: str, relpath: str,
                 size: int) -> UploadFile:
        """Announce a file; return it (an unfinished file of the same name, folder and
        size is returned instead, so a re-dropped file resumes where it stopped).

        Raises
        ------
        NotFound
            Not the recipient's request.
        Gone
            The request no longer takes uploads.
        TooLarge
            Over the per-file or per-upload limit, or too many files.
        """
        transaction = self.request_of(recipient_id, public_id)
        check_open(transaction)
        if size < 0:
            raise InvalidRequest("a file size cannot be negative")
        if size > self.limits.max_file:
            raise TooLarge(f"files are limited to {self.limits.max_file // MIB} MB")
        name, relpath = clean_name(name), clean_relpath(relpath)
        now = time.time()
        with write_transaction():
            upload = self.current(transaction)
            if upload is None:
                upload = Upload.create(transaction=transaction, key=secrets.token_hex(16),
                                       status=STAGING, uploader=transaction.recipient.email,
                                       created_at=now, updated_at=now)
            again = (UploadFile.select().where(
                (UploadFile.upload == upload.id) & (UploadFile.display_name == name)
                & (UploadFile.relpath == relpath) & (UploadFile.size == size)
                & UploadFile.completed_at.is_null()).first())
            if again is not None:
                return again
            files = upload.files.count()
            total = sum(f.size for f in upload.files.select(UploadFile.size))
            if files >= MAX_FILES:
                raise TooLarge(f"an upload holds at most {MAX_FILES} files")
            if total + size > self.limits.max_total:
                raise TooLarge(f"an upload is limited to {self.limits.max_total // MIB} MB")
            file = UploadFile.create(upload=upload, display_name=name, relpath=relpath,
                                     disk_name=secrets.token_hex(12), size=size,
                                     created_at=now)
            upload.total_bytes = total + size
            upload.updated_at = now
            upload.save()
            folder = self.folder(upload)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(folder / file.disk_name,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
        if size == 0:
            return self.finish(file.id)
        return file

    def open_chunk(self, recipient_id: int, public_id: str, file_id: int,
                   offset: int) -> ChunkWriter:
        """Open a file for one chunk; give the writer back to :meth:`close_chunk`.

        Raises
        ------
        NotFound, Gone
            Not the recipient's file, or the request no longer takes uploads.
        FileBusy, OffsetMismatch
            See :class:`ChunkWriter` (a finished file is a mismatch at its size).
        """
        transaction, upload, file = self._file(recipient_id, public_id, file_id)
        check_open(transaction)
        if file.completed_at is not None:
            raise OffsetMismatch(file.size)
        try:
            chunk = ChunkWriter(self.path(upload, file), file.size, offset)
        except FileNotFoundError:
            raise NotFound("the file was removed") from None
        chunk.file_id = file.id
        return chunk

    def close_chunk(self, chunk: ChunkWriter) -> UploadFile:
        """Close a chunk (whatever arrived of it is kept); finish the file when complete.

        Raises
        ------
        NotFound
            The file was removed (or the upload cancelled) while the chunk arrived.
        """
        complete = chunk.close()
        if complete:
            return self.finish(chunk.file_id)
        UploadFile.update(received=chunk.position).where(
            UploadFile.id == chunk.file_id).execute()
        file = UploadFile.get_or_none(UploadFile.id == chunk.file_id)
        if file is None:
            raise NotFound("the file was removed")
        return file

    def finish(self, file_id: int) -> UploadFile:
        """Mark a fully received file complete and inspect it (verdict for the page).

        The file is claimed first (verdict :data:`CHECKING`), so a retried last chunk
        that arrives while the file is being inspected gets the claimed row back
        instead of starting a second inspection; the page polls until the verdict is in.

        Raises
        ------
        NotFound
            The file was removed (or the upload cancelled) meanwhile.
        """
        file = UploadFile.get_or_none(UploadFile.id == file_id)
        if file is None or not self.path(file.upload, file).exists():
            raise NotFound("the file was removed")
        claimed = (UploadFile.update(verdict=CHECKING, received=file.size)
                   .where((UploadFile.id == file_id) & UploadFile.completed_at.is_null()
                          & (UploadFile.verdict == "")).execute())
        if not claimed:  # finished already, or another request is inspecting it
            file = UploadFile.get_or_none(UploadFile.id == file_id)
            if file is None:
                raise NotFound("the file was removed")
            return file
        try:
            with self._inspections:
                found = inspect_staged_file(self.path(file.upload, file), file.display_name,
                                            file.relpath)
        except BaseException:  # let a retry inspect it again
            UploadFile.update(verdict="").where((UploadFile.id == file_id)
                                                & (UploadFile.verdict == CHECKING)).execute()
            raise
        changed = (UploadFile.update(
            received=file.size, completed_at=time.time(), verdict=found.kind,
            reason=found.reason[:2000], objects=found.objects,
            detail=json.dumps(found.to_dict(), default=str))
            .where((UploadFile.id == file_id) & (UploadFile.verdict == CHECKING)).execute())
        file = UploadFile.get_or_none(UploadFile.id == file_id)
        if not changed or file is None:  # removed while it was inspected
            raise NotFound("the file was removed")
        return file

    def remove_file(self, recipient_id: int, public_id: str, file_id: int) -> None:
        """Remove a file from the current upload; its staged bytes are deleted."""
        transaction, upload, file = self._file(recipient_id, public_id, file_id)
        check_open(transaction)
        with write_transaction():
            file.delete_instance()
            upload.total_bytes = max(0, upload.total_bytes - file.size)
            upload.updated_at = time.time()
            upload.save()
        self.path(upload, file).unlink(missing_ok=True)

    def cancel(self, recipient_id: int, public_id: str, source_ip: str = "") -> None:
        """Cancel the current upload: every staged byte is deleted (audited).

        The request stays open: the recipient may start again.
        """
        transaction = self.request_of(recipient_id, public_id)
        upload = self.current(transaction)
        if upload is None:
            return
        with write_transaction():
            upload.status = CANCELLED
            upload.updated_at = time.time()
            upload.save()
            UploadFile.delete().where(UploadFile.upload == upload.id).execute()
        shutil.rmtree(self.folder(upload), ignore_errors=True)
        audit.record(audit.INSTANCES_TRANSFERRED, "upload-cancel",
                     audit.Actor("recipient", transaction.recipient.email, source_ip),
                     outcome=audit.SUCCESS, patient_id=transaction.patient_id,
                     transaction=public_id, detail="staged files deleted")

    def send(self, recipient_id: int, public_id: str, patient: ConfirmedPatient,
             message: str, source_ip: str = "") -> Upload:
        """The uploader confirms: the upload goes to staff for review (audited).

        Raises
        ------
        NotFound, Gone
            Not the recipient's request, or it no longer takes uploads (also when the
            upload was sent meanwhile: a second Send changes nothing).
        InvalidRequest
            No files, files still arriving, nothing acceptable, or missing or invalid
            patient details.
        """
        from iepnode.uploads.image_requests import SEXES, parse_birth_date, person_name

        transaction = self.request_of(recipient_id, public_id)
        check_open(transaction)
        name = person_name(patient.family_name, patient.given_name)
        if not patient.given_name.strip():
            raise InvalidRequest("give the patient's first name")
        if not patient.birth_date.strip():
            raise InvalidRequest("give the patient's date of birth")
        birth_date = parse_birth_date(patient.birth_date)
        sex = patient.sex.strip().upper()[:1]
        if sex not in SEXES or not sex:
            raise InvalidRequest("choose the patient's gender")
        message = message.strip()
        if len(message) > MAX_MESSAGE:
            raise InvalidRequest(f"messages are limited to {MAX_MESSAGE} characters")
        upload = self.current(transaction)
        if upload is None:  # sent meanwhile (a second click)? Then say so.
            check_open(Transaction.get_by_id(transaction.id))
        files = list(upload.files) if upload else []
        if not files:
            raise InvalidRequest("add the files to upload first")
        waiting = [f for f in files if f.completed_at is None]
        if waiting:
            raise InvalidRequest(f"{len(waiting)} file{'s are' if len(waiting) != 1 else ' is'}"
                                 " still uploading: wait until every file has a check mark")
        if all(f.verdict == "skipped" for f in files):
            raise InvalidRequest("none of the files can be used: add DICOM images, zip "
                                 "files of them, PDF or JPEG/PNG documents")
        now = time.time()
        assert upload is not None
        with write_transaction():
            # Only one Send wins (a double click, two tabs): the others change no row.
            changed = (Upload.update(status=SENT, sent_at=now, updated_at=now, message=message,
                                     confirmed_name=name, confirmed_birth_date=birth_date,
                                     confirmed_sex=sex)
                       .where((Upload.id == upload.id) & (Upload.status == STAGING))
                       .execute())
            if not changed:
                raise Gone("The images for this request have been sent already.")
            upload = Upload.get_by_id(upload.id)
            transaction.status = COMPLETE
            transaction.save()
            if message:
                TransactionMessage.create(transaction=transaction, author_kind="recipient",
                                          author=transaction.recipient.email, body=message,
                                          created_at=now, read_by_recipient=True)
        audit.record(audit.INSTANCES_TRANSFERRED, "upload-send",
                     audit.Actor("recipient", transaction.recipient.email, source_ip),
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=f"upload {upload.id}: {len(files)} files, "
                            f"{sum(f.size for f in files)} bytes staged for review")
        return upload
