"""Staff review of a sent upload: the whole-upload check kept for staff before release.

Life of an upload on this side (the upload page itself is :mod:`web.upload`)::

    STAGING --Send--> SENT --intake()--> reviewed (flags) --release()--> RELEASED
                                                         \\--reject()---> REJECTED
    STAGING, untouched for hours --purge_abandoned()--> CANCELLED
    RELEASING for over an hour (the releasing process died) --recover_releases()--> SENT

Nothing reaches the store before release. :func:`intake` checks the upload as a whole
(patients and studies found, flags: more than one patient, a patient whose name or
birth date does not match the request, nothing importable, files incomplete) and
keeps the result in ``Upload.review`` (JSON). :func:`iepnode.uploads.release.release`
walks the staged files again with the same code that inspected them
(:func:`iepnode.uploads.intake.scan_file`), reconciles every DICOM object to the request's
patient (:mod:`iepnode.archive.reconciliation`, IHE Import Reconciliation Workflow), wraps
PDF/JPEG/PNG documents (:mod:`iepnode.viewing.wrapping`) and ingests through the node's
ingest path; staff may leave out the objects of any original patient. The staging folder
is deleted after release or rejection. Every step is audited as DICOM Instances
Transferred (110104).

This module holds the check (:class:`Review`, :func:`check`, :func:`intake`) and the
helpers the other steps share (staging folders, the request's identity, name matching);
release and rejection are in :mod:`iepnode.uploads.release`, ``recover_releases`` and
``purge_abandoned`` in :mod:`iepnode.uploads.housekeeping`, the staff lists in
:mod:`iepnode.uploads.listing`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Layout
from iepnode.archive import dicomdir_refs
from iepnode.archive.reconciliation import PatientIdentity
from iepnode.errors import BadDataset, Gone, InvalidRequest, NotFound
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.uploads.intake import DICOMDIR, DOCUMENT_KINDS, FileVerdict, patient_key, scan_file
from iepnode.uploads.staging import (  # noqa: F401 (all six: the life cycle above)
    CANCELLED,
    REJECTED,
    RELEASED,
    RELEASING,
    SENT,
    STAGING,
)
from storage.db import write_transaction
from storage.models import Transaction, Upload, UploadFile

log = logging.getLogger("iepnode.upload")

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




# -- helpers ---------------------------------------------------------------------------------


def staging_root(data_dir: Path) -> Path:
    """``DATA_DIR/staging``: where uploads are staged, one folder per upload key."""
    return Layout(data_dir).staging


def staging_folder(data_dir: Path, upload: Upload) -> Path:
    """The staging folder of ``upload`` (its key is checked: never a path from outside)."""
    if not _SAFE_NAME.match(upload.key or ""):
        raise InvalidRequest(f"upload {upload.id} has a malformed key")
    return staging_root(data_dir) / upload.key


def staged_path(folder: Path, upload_file: UploadFile) -> Path | None:
    """The staged file of ``upload_file`` in ``folder``; ``None`` if its name is malformed."""
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
    path = staged_path(folder, upload_file)
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
    return tuple(dicomdir_refs.iso_name(p) for p in [*parts, name] if p)


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
        path = staged_path(folder, upload_file)
        if path is None or not path.is_file():
            continue
        try:
            refs = dicomdir_refs.read_dicomdir(str(path))
        except BadDataset:
            continue
        base = _path_key(upload_file.relpath, "")
        missing += sum((*base, *(dicomdir_refs.iso_name(p) for p in ref.file_id)) not in uploaded
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

