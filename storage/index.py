"""Index verbs: record received instances, remove them, find what to rebuild.

Every verb runs in one transaction. On SQLite the transaction starts with
``BEGIN IMMEDIATE`` (one writer at a time, no lock upgrades that deadlock); on
PostgreSQL a race between two workers creating the same study or series ends in
an ``IntegrityError`` that is retried.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass

import peewee

from storage.db import write_transaction
from storage.filestore import new_key
from storage.models import Instance, Patient, Series, Study, database_proxy
from storage.rawsql import statement

_RETRIES = 5


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one instance (decoded text, no pixel data)."""

    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician: str = ""
    institution: str = ""
    charset: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    body_part: str = ""
    instance_number: str = ""
    source_ae: str = ""


class Outcome(enum.Enum):
    """What :func:`record_instance` did."""

    STORED = "stored"
    DUPLICATE_KEPT = "duplicate-kept"
    REPLACED = "replaced"


@dataclass(frozen=True)
class RecordResult:
    outcome: Outcome
    #: File-store key that is no longer referenced and should be removed.
    obsolete_key: str | None = None


def name_key(name: str) -> str:
    """Return the form of a person name used for case-insensitive matching."""
    return name.upper()


def _get_or_create_patient(rec: InstanceRecord) -> Patient:
    patient = Patient.get_or_none(
        (Patient.patient_id == rec.patient_id) & (Patient.issuer == rec.issuer)
    )
    if patient is None:
        patient = Patient.create(
            patient_id=rec.patient_id,
            issuer=rec.issuer,
            name=rec.patient_name,
            name_key=name_key(rec.patient_name),
            birth_date=rec.birth_date,
            sex=rec.sex,
        )
    return patient


def _get_or_create_study(rec: InstanceRecord, now: float) -> Study:
    study = Study.get_or_none(Study.study_uid == rec.study_uid)
    if study is None:
        patient = _get_or_create_patient(rec)
        study = Study.create(
            study_uid=rec.study_uid,
            patient=patient,
            key=new_key(8),
            study_date=rec.study_date,
            study_time=rec.study_time,
            accession=rec.accession,
            study_id=rec.study_id,
            description=rec.study_description,
            referring_physician=rec.referring_physician,
            institution=rec.institution,
            charset=rec.charset,
            first_received=now,
            last_received=now,
        )
        Patient.update(num_studies=Patient.num_studies + 1).where(
            Patient.id == patient.id
        ).execute()
    return study


def _get_or_create_series(rec: InstanceRecord, study: Study) -> Series:
    series = Series.get_or_none(Series.series_uid == rec.series_uid)
    if series is None:
        series = Series.create(
            series_uid=rec.series_uid,
            study=study,
            modality=rec.modality,
            series_number=rec.series_number,
            description=rec.series_description,
            body_part=rec.body_part,
        )
        modalities = sorted({m for m in study.modalities.split("\\") if m} | {rec.modality} - {""})
        Study.update(
            num_series=Study.num_series + 1, modalities="\\".join(modalities)
        ).where(Study.id == study.id).execute()
    return series


def _insert(rec: InstanceRecord, key: str, size: int, now: float) -> None:
    study = _get_or_create_study(rec, now)
    series = _get_or_create_series(rec, study)
    Instance.insert(
        sop_uid=rec.sop_uid,
        series=series.id,
        sop_class=rec.sop_class,
        instance_number=rec.instance_number,
        transfer_syntax=rec.transfer_syntax,
        key=key,
        size_bytes=size,
        received_at=now,
        source_ae=rec.source_ae,
    ).execute()
    Series.update(
        num_instances=Series.num_instances + 1, size_bytes=Series.size_bytes + size
    ).where(Series.id == series.id).execute()
    Study.update(
        num_instances=Study.num_instances + 1,
        size_bytes=Study.size_bytes + size,
        last_received=now,
    ).where(Study.id == study.id).execute()


def _delete_row(instance: Instance, now: float) -> None:
    series = Series.get_by_id(instance.series_id)
    study = Study.get_by_id(series.study_id)
    instance.delete_instance()
    if series.num_instances <= 1:
        series.delete_instance()
        left = Series.select(Series.modality).where(Series.study == study.id)
        modalities = sorted({s.modality for s in left} - {""})
        Study.update(
            num_series=Study.num_series - 1, modalities="\\".join(modalities)
        ).where(Study.id == study.id).execute()
    else:
        Series.update(
            num_instances=Series.num_instances - 1,
            size_bytes=Series.size_bytes - instance.size_bytes,
        ).where(Series.id == series.id).execute()
    if study.num_instances <= 1:
        patient_id = study.patient_id
        study.delete_instance()
        Patient.update(num_studies=Patient.num_studies - 1).where(
            Patient.id == patient_id
        ).execute()
        # An empty patient goes too: C-FIND must not list a patient without studies.
        Patient.delete().where((Patient.id == patient_id) & (Patient.num_studies <= 0)).execute()
    else:
        Study.update(
            num_instances=Study.num_instances - 1,
            size_bytes=Study.size_bytes - instance.size_bytes,
            last_received=now,
        ).where(Study.id == study.id).execute()


_FAST_SQL = {
    "series": "SELECT id, study_id FROM series WHERE series_uid = ?",
    "insert": (
        "INSERT INTO instance (sop_uid, series_id, sop_class, instance_number, "
        "transfer_syntax, key, size_bytes, received_at, source_ae) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "series_counts": (
        "UPDATE series SET num_instances = num_instances + 1, size_bytes = size_bytes + ? "
        "WHERE id = ?"
    ),
    "study_counts": (
        "UPDATE study SET num_instances = num_instances + 1, size_bytes = size_bytes + ?, "
        "last_received = ? WHERE id = ?"
    ),
    "exists": "SELECT 1 FROM instance WHERE sop_uid = ?",
}


def _sql(name: str) -> str:
    """Return a hot-path statement in the bound database's parameter style."""
    return statement(_FAST_SQL[name])


def _insert_into_known_series(rec: InstanceRecord, key: str, size: int, now: float) -> bool:
    """Insert with precompiled SQL when the series exists (the common case).

    Returns ``False`` (nothing done) when the series is new.
    """
    db = database_proxy.obj
    row = db.execute_sql(_sql("series"), (rec.series_uid,)).fetchone()
    if row is None:
        return False
    series_id, study_id = row
    db.execute_sql(
        _sql("insert"),
        (rec.sop_uid, series_id, rec.sop_class, rec.instance_number, rec.transfer_syntax, key,
         size, now, rec.source_ae),
    )
    db.execute_sql(_sql("series_counts"), (size, series_id))
    db.execute_sql(_sql("study_counts"), (size, now, study_id))
    return True


def record_instance(
    rec: InstanceRecord, key: str, size: int, *, replace: bool = False
) -> RecordResult:
    """Index a stored file, creating patient/study/series rows as needed.

    Parameters
    ----------
    rec : InstanceRecord
        The instance's attributes.
    key, size : str, int
        File-store key and size of the already durable file.
    replace : bool, optional
        Duplicate policy: ``False`` keeps the first copy (the new file is then
        obsolete), ``True`` replaces the indexed copy (the old file is obsolete).

    Returns
    -------
    RecordResult
        What happened and which file-store key, if any, the caller must remove.
    """
    for attempt in range(_RETRIES):
        now = time.time()
        try:
            with write_transaction():
                if not replace:
                    if _insert_into_known_series(rec, key, size, now):
                        return RecordResult(Outcome.STORED)
                    existing = None
                else:
                    existing = Instance.get_or_none(Instance.sop_uid == rec.sop_uid)
                    if existing is not None:
                        _delete_row(existing, now)
                _insert(rec, key, size, now)
                if existing is not None:
                    return RecordResult(Outcome.REPLACED, obsolete_key=existing.key)
                return RecordResult(Outcome.STORED)
        except peewee.IntegrityError:
            if not replace and instance_exists(rec.sop_uid):
                return RecordResult(Outcome.DUPLICATE_KEPT, obsolete_key=key)
            # Another worker created the same study/series concurrently: try again.
            if attempt == _RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def instance_exists(sop_uid: str) -> bool:
    """Return ``True`` when an instance with this SOP Instance UID is indexed."""
    return database_proxy.obj.execute_sql(_sql("exists"), (sop_uid,)).fetchone() is not None


def delete_instance(sop_uid: str) -> str | None:
    """Remove an instance row (and empty parents); return its file-store key."""
    with write_transaction():
        instance = Instance.get_or_none(Instance.sop_uid == sop_uid)
        if instance is None:
            return None
        _delete_row(instance, time.time())
        return instance.key


def studies_due_for_fileset(stable_age: float, now: float | None = None) -> list[Study]:
    """Return studies that changed since their file-set was built and are stable.

    A study whose last build failed is left out until its retry time.

    Parameters
    ----------
    stable_age : float
        Seconds without a new instance before a study counts as stable.
    now : float, optional
        The current time (default ``time.time()``).
    """
    now = time.time() if now is None else now
    return list(
        Study.select().where(
            (Study.last_received <= now - stable_age)
            & (
                Study.fileset_built_from.is_null()
                | (Study.fileset_built_from != Study.last_received)
            )
            & (Study.fileset_retry_at.is_null() | (Study.fileset_retry_at <= now))
        )
    )


def claim_fileset_build(study: Study, now: float, retry_after: float) -> int | None:
    """Take the study's next file-set build attempt; return its number, or ``None``.

    The attempt is counted and the next one put ``retry_after`` seconds away before
    the build starts, in one conditional ``UPDATE``: of two processes that saw the
    same row, one gets the attempt; a build that fails, or a process that dies while
    building, leaves the study waiting for its retry time.

    Parameters
    ----------
    study : Study
        The row as read by :func:`studies_due_for_fileset`.
    now : float
        The current time.
    retry_after : float
        Seconds until another attempt may start if this one fails.
    """
    with write_transaction():
        claimed = Study.update(
            fileset_attempts=study.fileset_attempts + 1, fileset_retry_at=now + retry_after,
        ).where(
            (Study.id == study.id)
            & (Study.fileset_attempts == study.fileset_attempts)
            & (Study.fileset_retry_at.is_null() | (Study.fileset_retry_at <= now))
        ).execute()
    return study.fileset_attempts + 1 if claimed == 1 else None


def record_fileset_failure(study_id: int, error: str) -> None:
    """Keep why the study's last file-set build failed (its retry time is already set)."""
    Study.update(fileset_error=error[:2000]).where(Study.id == study_id).execute()


def mark_fileset_built(study_id: int, built_from: float) -> None:
    """Record that the study's file-set reflects its state at ``built_from``.

    A success ends any back-off of earlier failed attempts.
    """
    Study.update(fileset_built_from=built_from, fileset_attempts=0, fileset_retry_at=None,
                 fileset_error="").where(Study.id == study_id).execute()


def study_files(study: Study) -> Iterator[Instance]:
    """Yield the study's instances in series / instance-number order."""
    return iter(
        Instance.select(Instance, Series)
        .join(Series)
        .where(Series.study == study.id)
        .order_by(Series.id, Instance.id)
    )


def delete_study(study_uid: str) -> list[str]:
    """Remove a study's instance rows (and the emptied parents); return their file keys."""
    rows = list(
        Instance.select(Instance.key, Instance.sop_uid)
        .join(Series)
        .join(Study)
        .where(Study.study_uid == study_uid)
    )
    for row in rows:
        delete_instance(row.sop_uid)
    return [row.key for row in rows]
