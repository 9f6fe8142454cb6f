"""Staff review of a sent upload, its release into the store, or its rejection.

Life of an upload on this side (the upload page itself is :mod:`web.upload`)::

    STAGING --Send--> SENT --intake()--> reviewed (flags) --release()--> RELEASED
                                                         \\--reject()---> REJECTED
    STAGING, untouched for hours --purge_abandoned()--> CANCELLED
    RELEASING for over an hour (the releasing process died) --recover_releases()--> SENT

Nothing reaches the store before release. :func:`intake` checks the upload as a whole
(patients and studies found, flags: more than one patient, a patient whose name or
birth date does not match the request, nothing importable, files incomplete) and
keeps the result in ``Upload.review`` (JSON). :func:`release` walks the staged files
again with the same code that inspected them (:func:`iepnode.uploads.intake.scan_file`),
reconciles every DICOM object to the request's patient
(:mod:`iepnode.archive.reconciliation`, IHE Import Reconciliation Workflow), wraps PDF/JPEG/PNG
documents (:mod:`iepnode.viewing.wrapping`) and ingests through the node's ingest path; staff
may leave out the objects of any original patient. The staging folder is deleted after
release or rejection. Every step is audited as DICOM Instances Transferred (110104).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import peewee

from config.settings import Layout
from iepnode.archive import importer
from iepnode.archive.ingest import Ingester
from iepnode.archive.reconciliation import PatientIdentity, reconcile_stream
from iepnode.errors import (
    BadDataset,
    Gone,
    InvalidRequest,
    NotFound,
    OutOfResources,
    UnknownDestination,
)
from iepnode.outbound import sending
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.uploads.intake import (
    DICOM,
    DICOMDIR,
    DOCUMENT_KINDS,
    FileVerdict,
    FoundObject,
    patient_key,
    scan_file,
)
from iepnode.uploads.staging import CANCELLED, REJECTED, RELEASED, RELEASING, SENT, STAGING
from iepnode.viewing import wrapping
from storage.db import write_transaction
from storage.index import Outcome
from storage.models import Transaction, Upload, UploadFile

log = logging.getLogger("iepnode.upload")

#: Source AE recorded for released objects (File Meta and index).
SOURCE_AE = "UPLOAD"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


@dataclass
class PatientFound:
    """An original patient identity found in an upload, as checked against the request."""

    key: str
    identity: PatientIdentity
    objects: int = 0
    studies: int = 0
    #: What does not match the request: ``["name", "birth date"]``.
    mismatch: list[str] = field(default_factory=list)


@dataclass
class Review:
    """The whole-upload check staff see before release (kept as JSON on the upload)."""

    checked_at: float
    files: int = 0
    accepted_files: int = 0
    skipped_files: int = 0
    incomplete_files: int = 0
    objects: int = 0
    documents: int = 0
    patients: list[PatientFound] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    #: Filled at release/rejection.
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """Whether staff must look before release (auto-release leaves it alone)."""
        return bool(self.flags)

    def to_json(self) -> str:
        """Serialise (the ``Upload.review`` column)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Review | None:
        """Read :meth:`to_json` back; ``None`` when there is none (or it is unreadable)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            patients = [PatientFound(p["key"], PatientIdentity(**p["identity"]), p["objects"],
                                     p["studies"], list(p["mismatch"]))
                        for p in data.pop("patients", [])]
            return cls(**data, patients=patients)
        except (ValueError, TypeError, KeyError):
            return None


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


# -- helpers ---------------------------------------------------------------------------------


def staging_root(data_dir: Path) -> Path:
    """``DATA_DIR/staging``: where uploads are staged, one folder per upload key."""
    return Layout(data_dir).staging


def staging_folder(data_dir: Path, upload: Upload) -> Path:
    """The staging folder of ``upload`` (its key is checked: never a path from outside)."""
    if not _SAFE_NAME.match(upload.key or ""):
        raise InvalidRequest(f"upload {upload.id} has a malformed key")
    return staging_root(data_dir) / upload.key


def _file_path(folder: Path, upload_file: UploadFile) -> Path | None:
    name = upload_file.disk_name or ""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        return None
    return folder / name


def request_identity(transaction: Transaction, default_issuer: str = "") -> PatientIdentity:
    """The hospital's identity of the request's patient: what objects are reconciled to."""
    issuer = getattr(transaction, "patient_id_issuer", "") or default_issuer
    return PatientIdentity(transaction.patient_id.strip(), issuer.strip(),
                           transaction.patient_name.strip(),
                           transaction.patient_birth_date.strip(),
                           transaction.patient_sex.strip())


def _fold(text: str) -> str:
    """Compare names as people write them: no accents, no case, no punctuation."""
    text = unicodedata.normalize("NFKD", text.split("=")[0])
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def names_match(found: str, expected: str) -> bool:
    """Whether a PN value found in a file names the request's patient.

    Family names must be equal, and the first given name too when both have one
    (accents, case and punctuation ignored; ``Doe^Jane`` matches ``DOE^JANE MARY``).
    """
    f_parts = ([*found.split("=")[0].split("^"), ""])[:2]
    e_parts = ([*expected.split("=")[0].split("^"), ""])[:2]
    if _fold(f_parts[0]) != _fold(e_parts[0]):
        return False
    f_given, e_given = _fold(f_parts[1]).split(), _fold(e_parts[1]).split()
    return not (f_given and e_given) or f_given[0] == e_given[0]


def _verdict_of(folder: Path, upload_file: UploadFile, *, fresh: bool) -> FileVerdict | None:
    """The file's inspection: the stored one unless ``fresh``; ``None`` if the file is gone."""
    if not fresh and upload_file.detail:
        try:
            return FileVerdict.from_dict(json.loads(upload_file.detail))
        except (ValueError, TypeError, KeyError):
            pass
    path = _file_path(folder, upload_file)
    if path is None or not path.is_file():
        return None
    return scan_file(path, upload_file.display_name)


def get_upload(upload_id: int) -> Upload:
    """The upload with its request, or :class:`NotFound`."""
    upload = (Upload.select(Upload, Transaction).join(Transaction)
              .where(Upload.id == upload_id).first())
    if upload is None:
        raise NotFound(f"no upload {upload_id}")
    return upload


# -- intake ----------------------------------------------------------------------------------


def check(upload: Upload, data_dir: Path, *, fresh: bool = False,
          now: float | None = None) -> Review:
    """Check an upload as a whole against its request (reads files, writes nothing).

    Parameters
    ----------
    upload : Upload
        With its request transaction.
    data_dir : Path
        The node's data folder (staging lives below it).
    fresh : bool, optional
        Inspect every file again instead of using the verdicts stored at upload time.
    """
    folder = staging_folder(data_dir, upload)
    request = upload.transaction
    review = Review(checked_at=time.time() if now is None else now)
    patients: dict[str, PatientFound] = {}
    studies: dict[str, dict[str, Any]] = {}
    for upload_file in upload.files.order_by(UploadFile.id):
        review.files += 1
        if upload_file.completed_at is None:
            review.incomplete_files += 1
            continue
        verdict = _verdict_of(folder, upload_file, fresh=fresh)
        if verdict is None or not verdict.accepted:
            review.skipped_files += 1
            continue
        review.accepted_files += 1
        if verdict.kind in DOCUMENT_KINDS:
            review.documents += verdict.objects
            continue
        review.objects += verdict.objects
        for identity in verdict.patients:
            patients.setdefault(patient_key(identity), PatientFound(patient_key(identity),
                                                                    identity))
        for study in verdict.studies:
            seen = studies.setdefault(study.study_uid, {**asdict(study), "objects": 0})
            seen["objects"] += study.objects
    for study in studies.values():
        found = patients.get(study["patient_key"])
        if found is not None:
            found.objects += study["objects"]
            found.studies += 1
    for found in patients.values():
        if not names_match(found.identity.name, request.patient_name):
            found.mismatch.append("name")
        if (request.patient_birth_date and found.identity.birth_date
                and found.identity.birth_date != request.patient_birth_date):
            found.mismatch.append("birth date")
    missing = _missing_from_dicomdirs(upload, folder)
    review.patients = sorted(patients.values(), key=lambda p: -p.objects)
    review.studies = sorted(studies.values(), key=lambda s: (s["study_date"], s["study_uid"]))
    review.flags = _flags(review, upload, request)
    if missing:
        review.flags.append(f"The DICOMDIR lists {missing} file(s) that were not uploaded "
                            "(part of the CD may be missing)")
    return review


def _path_key(relpath: str, name: str) -> tuple[str, ...]:
    parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".")]
    return tuple(importer.iso_name(p) for p in [*parts, name] if p)


def _missing_from_dicomdirs(upload: Upload, folder: Path) -> int:
    """How many files the upload's DICOMDIRs reference that were not uploaded with them.

    A DICOMDIR's File IDs are relative to its own folder; the uploaded files are matched
    by their folder path and name as the browser sent them (case and ISO 9660 ``;1``
    ignored). Only whole, uploaded folders can be checked this way.
    """
    files = list(upload.files)
    uploaded = {_path_key(f.relpath, f.display_name) for f in files
                if f.completed_at is not None}
    missing = 0
    for upload_file in files:
        if upload_file.verdict != DICOMDIR and not (
                upload_file.detail and '"kind": "dicomdir"' in upload_file.detail):
            continue
        path = _file_path(folder, upload_file)
        if path is None or not path.is_file():
            continue
        try:
            refs = importer.read_dicomdir(str(path))
        except BadDataset:
            continue
        base = _path_key(upload_file.relpath, "")
        missing += sum((*base, *(importer.iso_name(p) for p in ref.file_id)) not in uploaded
                       for ref in refs)
    return missing


def _flags(review: Review, upload: Upload, request: Transaction) -> list[str]:
    flags = []
    if len(review.patients) > 1:
        flags.append(f"{len(review.patients)} different patients in one upload")
    for found in review.patients:
        if found.mismatch:
            flags.append(f"{' and '.join(found.mismatch).capitalize()} of "
                         f"{found.identity.name or '(no name)'} "
                         f"(ID {found.identity.patient_id or '—'}) differ from the request")
    if review.objects + review.documents == 0:
        flags.append("Nothing to import: no DICOM object or document was accepted")
    if review.incomplete_files:
        flags.append(f"{review.incomplete_files} file(s) did not finish uploading")
    confirmed = getattr(upload, "confirmed_name", "")
    if confirmed and not names_match(confirmed, request.patient_name):
        flags.append("The uploader confirmed another patient name than the request's")
    confirmed_dob = getattr(upload, "confirmed_birth_date", "")
    if confirmed_dob and request.patient_birth_date and \
            confirmed_dob != request.patient_birth_date:
        flags.append("The uploader confirmed another birth date than the request's")
    if not request.patient_id.strip():
        flags.append("The request has no Patient ID to reconcile to")
    return flags


def intake(upload_id: int, data_dir: Path, *, actor: Actor | None = None,
           fresh: bool = False) -> Review:
    """Check a sent upload and keep the result for staff (audited); nothing is stored.

    Called by the upload page when the uploader confirms **Send**, and by staff to
    re-check. See :func:`check`.

    Raises
    ------
    NotFound
        No such upload.
    Gone
        It was already released, rejected or cancelled.
    """
    upload = get_upload(upload_id)
    if upload.status not in (STAGING, SENT):
        raise Gone(f"upload {upload_id} is {upload.status.lower()}")
    review = check(upload, data_dir, fresh=fresh)
    with write_transaction():
        Upload.update(review=review.to_json()).where(Upload.id == upload.id).execute()
        audit.record(audit.INSTANCES_TRANSFERRED, "upload-recheck" if fresh else "upload-sent",
                     actor or Actor("recipient", upload.uploader),
                     outcome=audit.MINOR_FAILURE if review.flagged else audit.SUCCESS,
                     patient_id=upload.transaction.patient_id,
                     transaction=upload.transaction.public_id,
                     detail=_summary(review)[:1000])
    return review


def _summary(review: Review) -> str:
    parts = [f"{review.objects} DICOM objects", f"{review.documents} documents",
             f"{len(review.studies)} studies", f"{len(review.patients)} original patients "
             + ", ".join(f"ID {p.identity.patient_id}" for p in review.patients)]
    if review.flags:
        parts.append("flags: " + "; ".join(review.flags))
    return "; ".join(parts)


# -- release / reject ------------------------------------------------------------------------


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
        self.documents_study = wrapping.StudyInfo(
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
                    wrapping.PatientInfo(self.target.name, self.target.patient_id,
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
            path = _file_path(folder, upload_file)
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


#: A release still ``RELEASING`` after this long was interrupted (its process died).
RELEASE_STUCK_SECONDS = 3600.0


def recover_releases(*, now: float | None = None,
                     max_age_seconds: float = RELEASE_STUCK_SECONDS) -> int:
    """Put uploads whose release began over ``max_age_seconds`` ago back to ``SENT``.

    A release that dies with its process (crash, kill, power loss) leaves the upload
    ``RELEASING`` for good. Staff may release it again: the objects stored the first
    time come back as duplicates and the rest are stored. Audited per upload.

    Returns
    -------
    int
        Uploads put back to ``SENT``.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_seconds
    recovered = 0
    stuck = list(Upload.select(Upload, Transaction).join(Transaction)
                 .where((Upload.status == RELEASING) & (Upload.updated_at < cutoff)))
    for upload in stuck:
        with write_transaction():  # release() sets updated_at when it claims the upload
            changed = (Upload.update(status=SENT, updated_at=now)
                       .where((Upload.id == upload.id) & (Upload.status == RELEASING)
                              & (Upload.updated_at < cutoff)).execute())
            if changed:
                audit.record(audit.INSTANCES_TRANSFERRED, "upload-release-interrupted",
                             Actor("system", "housekeeping"), outcome=audit.MINOR_FAILURE,
                             patient_id=upload.transaction.patient_id,
                             transaction=upload.transaction.public_id,
                             detail=f"release began {(now - upload.updated_at) / 60:.0f} min "
                                    "ago and never finished: the upload is back for release")
        if changed:
            log.warning("upload %s was stuck releasing: back to SENT", upload.id)
            recovered += 1
    return recovered


def purge_abandoned(data_dir: Path, max_age_seconds: float, *,
                    now: float | None = None) -> int:
    """Delete staged files of uploads left unsent for ``max_age_seconds`` (audited).

    Such uploads become ``CANCELLED``. Staging folders that belong to no upload, or
    to one already released, rejected or cancelled, go too once that old.

    Returns
    -------
    int
        Staging folders deleted.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_seconds
    removed = 0
    stale = list(Upload.select(Upload, Transaction).join(Transaction)
                 .where((Upload.status == STAGING) & (Upload.updated_at < cutoff)))
    for upload in stale:
        with write_transaction():
            changed = (Upload.update(status=CANCELLED, updated_at=now)
                       .where((Upload.id == upload.id) & (Upload.status == STAGING)
                              & (Upload.updated_at < cutoff)).execute())
            if changed:
                audit.record(audit.INSTANCES_TRANSFERRED, "upload-abandoned",
                             Actor("system", "housekeeping"), outcome=audit.MINOR_FAILURE,
                             patient_id=upload.transaction.patient_id,
                             transaction=upload.transaction.public_id,
                             detail=f"upload never sent; staged files deleted after "
                                    f"{max_age_seconds / 3600:g} h")
        if changed:
            with contextlib.suppress(InvalidRequest):
                shutil.rmtree(staging_folder(data_dir, upload), ignore_errors=True)
            removed += 1
    root = staging_root(data_dir)
    if root.is_dir():
        live = {u.key for u in Upload.select(Upload.key).where(
            Upload.status.in_([STAGING, SENT, RELEASING]))}
        for folder in root.iterdir():
            if folder.name in live or not folder.is_dir() or folder.is_symlink():
                continue
            try:
                if folder.stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


# -- listing ---------------------------------------------------------------------------------


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
