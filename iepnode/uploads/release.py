"""Release of a sent upload into the store, or its rejection (both audited).

:func:`release` walks the staged files again with the same code that inspected them
(:func:`iepnode.uploads.intake.scan_file`), reconciles every DICOM object to the
request's patient (:mod:`iepnode.archive.reconciliation`), wraps PDF/JPEG/PNG
documents (:mod:`iepnode.viewing.wrapping`), ingests through the node's ingest path and
queues the delivery to the PACS; :func:`reject` deletes the staged files. The life of
an upload is drawn in :mod:`iepnode.uploads.review`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from iepnode.archive.ingest import Ingester
from iepnode.archive.reconciliation import PatientIdentity, reconcile_stream
from iepnode.errors import BadDataset, InvalidRequest, OutOfResources, UnknownDestination
from iepnode.outbound import sending
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.uploads.intake import DICOM, FoundObject, patient_key, scan_file
from iepnode.uploads.review import (
    Review,
    get_upload,
    request_identity,
    staged_path,
    staging_folder,
)
from iepnode.uploads.staging import REJECTED, RELEASED, RELEASING, SENT
from iepnode.viewing import wrapped_object, wrapping
from storage.db import write_transaction
from storage.index import Outcome
from storage.models import Upload, UploadFile

log = logging.getLogger("iepnode.upload")

#: Source AE recorded for released objects (File Meta and index).
SOURCE_AE = "UPLOAD"


@dataclass(frozen=True)
class ReleaseResult:
    """What a release did."""

    stored: int
    duplicates: int
    excluded: int
    failed: list[tuple[str, str]]
    documents: int
    study_uids: list[str]
    send_job: int | None
    send_error: str


def _claim(upload: Upload, to: str) -> None:
    """Move a SENT upload to ``to`` atomically (one staff member wins a double click)."""
    with write_transaction():
        changed = (Upload.update(status=to, updated_at=time.time())
                   .where((Upload.id == upload.id) & (Upload.status == SENT)).execute())
    if not changed:
        current = Upload.get_by_id(upload.id).status
        raise InvalidRequest(f"this upload is {current.lower()}: only a sent upload can be "
                             "released or rejected")


class _Releaser:
    """Reconciles and ingests the objects of one upload."""

    def __init__(self, upload: Upload, ingester: Ingester, target: PatientIdentity,
                 exclude: set[str], modifying_system: str) -> None:
        self.upload = upload
        self.ingester = ingester
        self.target = target
        self.exclude = exclude
        self.modifying_system = modifying_system
        self.source = f"Patient upload {upload.transaction.public_id}"[:64]
        self.stored = self.duplicates = self.excluded = self.documents = 0
        self.failed: list[tuple[str, str]] = []
        self.studies: dict[str, None] = {}
        self.documents_study = wrapped_object.StudyInfo(
            _new_uid(), date.today().strftime("%Y%m%d"), time.strftime("%H%M%S"),
            description="Documents uploaded by the patient")

    def __call__(self, obj: FoundObject, payload: memoryview, syntax: str) -> None:
        try:
            if obj.kind == DICOM:
                if patient_key(obj.patient) in self.exclude:
                    self.excluded += 1
                    return
                result = reconcile_stream(payload, syntax, self.target, source=self.source,
                                          modifying_system=self.modifying_system)
                stream, syntax = result.stream, result.transfer_syntax
            else:
                ds = wrapping.wrap_file(
                    bytes(payload),
                    wrapped_object.PatientInfo(self.target.name, self.target.patient_id,
                                         self.target.issuer, self.target.birth_date,
                                         self.target.sex),
                    study=self.documents_study, original_name=obj.name)
                stream, syntax = wrapping.encode_dataset(ds)
                self.documents += 1
            stored = self.ingester.ingest(stream, syntax, source_ae=SOURCE_AE)
        except OutOfResources:
            raise
        except (BadDataset, InvalidRequest) as exc:
            self.failed.append((obj.name, str(exc)[:300]))
            log.warning("upload %s: %s not released: %s", self.upload.id, obj.name, exc)
            return
        self.studies.setdefault(stored.study_uid)
        if stored.outcome is Outcome.DUPLICATE_KEPT:
            self.duplicates += 1
        else:
            self.stored += 1


def _new_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def release(
    upload_id: int,
    *,
    data_dir: Path,
    ingester: Ingester,
    actor: Actor,
    exclude: set[str] | frozenset[str] = frozenset(),
    modifying_system: str = "IEPNODE",
    default_issuer: str = "",
    pacs_ae: str = "",
) -> ReleaseResult:
    """Reconcile and store a sent upload; queue its delivery to the PACS (audited).

    Parameters
    ----------
    upload_id : int
        The upload (status ``SENT``).
    data_dir : Path
        The node's data folder.
    ingester : Ingester
        The node's ingest path.
    actor : Actor
        Who releases (staff, or ``system`` for automatic release).
    exclude : set of str
        :func:`iepnode.uploads.intake.patient_key` of original patients whose objects
        are left out.
    modifying_system : str
        Modifying System in Original Attributes Sequence (the node's AE title).
    default_issuer : str
        Issuer of Patient ID when the request names none.
    pacs_ae : str
        Send the released studies there (a registered send destination); empty: no send.

    Raises
    ------
    NotFound
        No such upload.
    InvalidRequest
        It is not waiting for release, or its request has no Patient ID.
    OutOfResources
        The store failed: the upload goes back to ``SENT`` (what was stored stays;
        releasing again keeps the first copies).
    """
    upload = get_upload(upload_id)
    target = request_identity(upload.transaction, default_issuer)
    if not target.patient_id:
        raise InvalidRequest("the request has no Patient ID: the images cannot be reconciled")
    _claim(upload, RELEASING)
    folder = staging_folder(data_dir, upload)
    releaser = _Releaser(upload, ingester, target, set(exclude), modifying_system)
    try:
        for upload_file in upload.files.order_by(UploadFile.id):
            path = staged_path(folder, upload_file)
            if upload_file.completed_at is None or path is None or not path.is_file():
                continue
            scan_file(path, upload_file.display_name, on_object=releaser)
    except BaseException:
        with write_transaction():
            Upload.update(status=SENT).where(Upload.id == upload.id).execute()
        raise
    study_uids = list(releaser.studies)
    job_id, send_error = None, ""
    if pacs_ae and study_uids:
        try:
            job_id = sending.queue_job(study_uids, pacs_ae, actor,
                                       transaction=upload.transaction.public_id).id
        except (InvalidRequest, UnknownDestination) as exc:
            send_error = str(exc)
            log.error("upload %s released but not sent to %s: %s", upload.id, pacs_ae, exc)
    result = ReleaseResult(releaser.stored, releaser.duplicates, releaser.excluded,
                           releaser.failed, releaser.documents, study_uids, job_id, send_error)
    review = Review.from_json(upload.review) or Review(checked_at=time.time())
    review.outcome = {"action": "released", "by": actor.name, **asdict(result)}
    now = time.time()
    with write_transaction():
        Upload.update(status=RELEASED, released_at=now, updated_at=now,
                      released_by=actor.name[:64], review=review.to_json()
                      ).where(Upload.id == upload.id).execute()
        detail = (f"{result.stored} stored, {result.duplicates} already stored, "
                  f"{result.excluded} excluded, {len(result.failed)} failed, "
                  f"{result.documents} documents; reconciled to {target.patient_id}"
                  f"{'/' + target.issuer if target.issuer else ''}; originals: "
                  + ", ".join(p.identity.patient_id for p in review.patients))
        for uid in study_uids or [""]:
            audit.record(audit.INSTANCES_TRANSFERRED, "upload-release", actor,
                         outcome=audit.MINOR_FAILURE if result.failed else audit.SUCCESS,
                         patient_id=target.patient_id, study_uid=uid,
                         transaction=upload.transaction.public_id, detail=detail[:1000])
    shutil.rmtree(folder, ignore_errors=True)
    log.info("upload %s released by %s: %s", upload.id, actor.name, detail)
    return result


def reject(upload_id: int, *, data_dir: Path, actor: Actor, reason: str = "") -> None:
    """Refuse a sent upload: its staged files are deleted, nothing is stored (audited).

    Raises
    ------
    NotFound
        No such upload.
    InvalidRequest
        It is not waiting for release.
    """
    upload = get_upload(upload_id)
    _claim(upload, REJECTED)
    review = Review.from_json(upload.review) or Review(checked_at=time.time())
    review.outcome = {"action": "rejected", "by": actor.name, "reason": reason[:1000]}
    now = time.time()
    with write_transaction():
        Upload.update(released_at=now, updated_at=now, released_by=actor.name[:64],
                      review=review.to_json()).where(Upload.id == upload.id).execute()
        audit.record(audit.INSTANCES_TRANSFERRED, "upload-reject", actor,
                     patient_id=upload.transaction.patient_id,
                     transaction=upload.transaction.public_id,
                     detail=f"rejected, staged files deleted: {reason}"[:1000])
    shutil.rmtree(staging_folder(data_dir, upload), ignore_errors=True)
