"""C-FIND / C-MOVE / C-GET identifiers translated into index queries.

Matching follows PS3.4 C.2.2.2: single value, universal (empty), wildcard
(``*`` and ``?``), range (dates and times: ``A-B``, ``A-``, ``-B``) and UID list
matching. Person names match case-insensitively. On SQLite, a wildcard with a
literal prefix is also turned into a range on that prefix so the index is used.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from iepnode.archive.uids import is_uid_like
from iepnode.errors import BadQuery
from storage.index import name_key
from storage.models import Instance, Patient, Series, Study
from storage.queries import cfind
from storage.queries.cfind import Column, Condition, RowSelect


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Root(enum.Enum):
    PATIENT = "patient"
    STUDY = "study"


class Match(enum.Enum):
    TEXT = "text"  # single value / wildcard, case-sensitive
    NAME = "name"  # person name: case-insensitive via the *_key column
    UID = "uid"  # list of UIDs
    DATE = "date"  # ranges allowed
    TIME = "time"  # ranges allowed
    MODALITIES = "modalities"  # any of the listed modalities in the study
    RETURN_ONLY = "return"  # counters: returned, never matched


@dataclass(frozen=True)
class Attribute:
    level: Level
    column: Column
    match: Match


ATTRIBUTES: dict[str, Attribute] = {
    "PatientName": Attribute(Level.PATIENT, Patient.name, Match.NAME),
    "PatientID": Attribute(Level.PATIENT, Patient.patient_id, Match.TEXT),
    "IssuerOfPatientID": Attribute(Level.PATIENT, Patient.issuer, Match.TEXT),
    "PatientBirthDate": Attribute(Level.PATIENT, Patient.birth_date, Match.DATE),
    "PatientSex": Attribute(Level.PATIENT, Patient.sex, Match.TEXT),
    "NumberOfPatientRelatedStudies": Attribute(
        Level.PATIENT, Patient.num_studies, Match.RETURN_ONLY
    ),
    "StudyInstanceUID": Attribute(Level.STUDY, Study.study_uid, Match.UID),
    "StudyDate": Attribute(Level.STUDY, Study.study_date, Match.DATE),
    "StudyTime": Attribute(Level.STUDY, Study.study_time, Match.TIME),
    "AccessionNumber": Attribute(Level.STUDY, Study.accession, Match.TEXT),
    "StudyID": Attribute(Level.STUDY, Study.study_id, Match.TEXT),
    "StudyDescription": Attribute(Level.STUDY, Study.description, Match.TEXT),
    "ReferringPhysicianName": Attribute(Level.STUDY, Study.referring_physician, Match.TEXT),
    "InstitutionName": Attribute(Level.STUDY, Study.institution, Match.TEXT),
    "ModalitiesInStudy": Attribute(Level.STUDY, Study.modalities, Match.MODALITIES),
    "NumberOfStudyRelatedSeries": Attribute(Level.STUDY, Study.num_series, Match.RETURN_ONLY),
    "NumberOfStudyRelatedInstances": Attribute(
        Level.STUDY, Study.num_instances, Match.RETURN_ONLY
    ),
    "SeriesInstanceUID": Attribute(Level.SERIES, Series.series_uid, Match.UID),
    "Modality": Attribute(Level.SERIES, Series.modality, Match.TEXT),
    "SeriesNumber": Attribute(Level.SERIES, Series.series_number, Match.TEXT),
    "SeriesDescription": Attribute(Level.SERIES, Series.description, Match.TEXT),
    "BodyPartExamined": Attribute(Level.SERIES, Series.body_part, Match.TEXT),
    "NumberOfSeriesRelatedInstances": Attribute(
        Level.SERIES, Series.num_instances, Match.RETURN_ONLY
    ),
    "SOPInstanceUID": Attribute(Level.IMAGE, Instance.sop_uid, Match.UID),
    "SOPClassUID": Attribute(Level.IMAGE, Instance.sop_class, Match.UID),
    "InstanceNumber": Attribute(Level.IMAGE, Instance.instance_number, Match.TEXT),
}

#: Keys the node handles itself rather than matching.
_CONTROL_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
                 "InstanceAvailability", "TimezoneOffsetFromUTC"}
#: Most UIDs one key may list (PS3.4 C.2.2.2.2): more is refused, not matched.
MAX_UID_LIST = 1000


def _range_condition(column: Column, value: str) -> Condition:
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    if low and high:
        return (column >= low) & (column <= high)
    if low:
        return column >= low
    if high:
        return (column <= high) & (column != "")
    raise BadQuery(f"empty range {value!r}")


def _condition(keyword: str, attr: Attribute, value: str) -> Condition | None:
    value = value.strip()
    if not value or value == "*" or attr.match is Match.RETURN_ONLY:
        return None
    column = attr.column
    if attr.match is Match.UID:
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if len(uids) > MAX_UID_LIST:
            raise BadQuery(f"{keyword}: a list of {len(uids)} UIDs, more than {MAX_UID_LIST}")
        bad = next((u for u in uids if not is_uid_like(u)), None)
        if bad is not None:
            raise BadQuery(f"malformed {keyword} ({len(bad)} characters)" if len(bad) > 64
                           else f"malformed {keyword} {bad!r}")
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if attr.match in (Match.DATE, Match.TIME):
        if "-" in value:
            return _range_condition(column, value)
        return column == value
    if attr.match is Match.MODALITIES:
        modalities = [m.strip() for m in value.split("\\") if m.strip()]
        return cfind.modalities_condition(modalities)
    if attr.match is Match.NAME:
        column = Patient.name_key if column is Patient.name else column
        value = name_key(value) if column is Patient.name_key else value
    if "*" in value or "?" in value:
        return cfind.wildcard_condition(column, value)
    return column == value


@dataclass(frozen=True)
class Query:
    """A parsed identifier: the level, the match conditions and the return keys."""

    level: Level
    conditions: tuple[Condition, ...]
    return_keys: tuple[str, ...]
    unsupported_keys: tuple[str, ...]


def parse_identifier(identifier: Dataset, root: Root) -> Query:
    """Turn a C-FIND/C-MOVE/C-GET identifier into a :class:`Query`.

    Parameters
    ----------
    identifier : pydicom.dataset.Dataset
        The request identifier (decoded with its own SpecificCharacterSet).
    root : Root
        Patient Root or Study Root information model.

    Raises
    ------
    BadQuery
        Missing or invalid QueryRetrieveLevel, or a level the model lacks.
    """
    try:
        level_name = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        level = Level[level_name]
    except KeyError as exc:
        raise BadQuery(f"invalid QueryRetrieveLevel {exc}") from None
    if root is Root.STUDY and level is Level.PATIENT:
        raise BadQuery("the Study Root model has no PATIENT level")
    conditions: list[Condition] = []
    return_keys: list[str] = []
    unsupported: list[str] = []
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in _CONTROL_KEYS:
            continue
        attr = ATTRIBUTES.get(keyword)
        if attr is None or attr.level > level:
            unsupported.append(keyword)
            continue
        return_keys.append(keyword)
        value = elem.value
        if value is None or elem.VR == "SQ":
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        condition = _condition(keyword, attr, str(value))
        if condition is not None:
            conditions.append(condition)
    return Query(level, tuple(conditions), tuple(return_keys), tuple(unsupported))


#: The unique key of each level (PS3.4 C.6): a retrieve must name one at its level.
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}


def parse_retrieve_identifier(identifier: Dataset, root: Root) -> Query:
    """Parse a C-MOVE/C-GET identifier, which must carry its level's unique key.

    Without this check an identifier with no keys would select the whole store.

    Raises
    ------
    BadQuery
        If the level's unique key is missing, empty or a wildcard.
    """
    query = parse_identifier(identifier, root)
    keyword = UNIQUE_KEYS[query.level]
    value = str(identifier.get(keyword, "") or "").strip()
    if not value or "*" in value or "?" in value:
        raise BadQuery(f"a {query.level.name} level retrieve needs a {keyword} value")
    return query


def select_rows(query: Query, *, columns: list[Any] | None = None) -> RowSelect:
    """Build the SELECT over the tables down to the query level."""
    return cfind.select_rows(query.level, query.conditions, columns=columns)


def iter_matches(query: Query) -> Iterator[dict[str, Any]]:
    """Yield one dict of return-key values per matching entity."""
    columns = [ATTRIBUTES[k].column for k in query.return_keys]
    for row in cfind.iter_rows(query.level, query.conditions, columns):
        yield dict(zip(query.return_keys, row, strict=False))


def iter_instance_keys(query: Query) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(file key, SOP class, SOP instance UID, transfer syntax)`` per instance.

    The query may be at any level; every instance below the matched entities is
    returned, in series / instance order.
    """
    yield from cfind.iter_instance_files(Level.IMAGE, query.conditions)


def condition_for(keyword: str, value: str) -> Condition | None:
    """The match condition of one attribute (``None``: universal match or return-only).

    For query interfaces other than C-FIND (DICOMweb QIDO-RS), which get keys and
    values as text rather than in a dataset.

    Raises
    ------
    KeyError
        The attribute is not in the index (:data:`ATTRIBUTES`).
    BadQuery
        A malformed value (an empty range).
    """
    return _condition(keyword, ATTRIBUTES[keyword], value)
