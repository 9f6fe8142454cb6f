"""Archive queries: studies, file-set folders, index counts, staff study lookups."""

from __future__ import annotations

from collections.abc import Sequence

import peewee

from storage.models import Instance, Patient, Study


def study_with_uid(study_uid: str) -> Study | None:
    """The indexed study with this Study Instance UID, or ``None``."""
    return Study.get_or_none(Study.study_uid == study_uid)


def known_study_keys(keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` that are the storage key of an indexed study."""
    return {s.key for s in Study.select(Study.key).where(Study.key.in_(list(keys)))}


def index_counts() -> dict[str, int]:
    """How many patients, studies and instances are indexed."""
    return {
        "patients": Patient.select().count(),
        "studies": Study.select().count(),
        "instances": Instance.select().count(),
    }


def study_rows(study_uids: Sequence[str], columns: Sequence[peewee.Field]) -> list[tuple]:
    """``columns`` (of Study and Patient) of the indexed studies among ``study_uids``."""
    return list(Study.select(*columns).join(Patient)
                .where(Study.study_uid.in_(list(study_uids))).tuples())
