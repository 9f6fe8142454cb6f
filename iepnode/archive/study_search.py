"""Staff search of the received studies, with C-FIND matching on the index.

What staff type is turned into C-FIND values (:func:`name_pattern`,
:func:`date_range`) and matched by :mod:`iepnode.archive.query`, the same code the
SCP's C-FIND uses. Searches with criteria are audited as Query events (110112).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from iepnode.archive.query import Root, parse_identifier, select_rows
from iepnode.dicomtext import typed_text
from iepnode.errors import InvalidRequest
from iepnode.people import audit
from iepnode.people.audit import actor_of
from storage.models import Patient, StaffUser, Study
from storage.queries import archive as queries

#: The most studies one search shows.
STUDY_LIMIT = 200

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


@dataclass(frozen=True)
class StudyHit:
    """One received study found by a staff search."""

    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    description: str
    modalities: str
    num_series: int
    num_instances: int


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def name_pattern(text: str) -> str:
    """Turn what staff type into a C-FIND PatientName value.

    ``Doe, Jane`` becomes ``Doe^Jane*``; text without ``*`` or ``?`` matches as a
    prefix; matching is case-insensitive (the index keeps upper-cased names).
    """
    text = typed_text(text)
    if "^" not in text and "," in text:
        family, _, given = text.partition(",")
        text = f"{family.strip()}^{given.strip()}"
    return text if _has_wildcard(text) else f"{text}*"


def parse_date(value: str, label: str) -> str:
    """Return ``YYYYMMDD`` for ``YYYY-MM-DD`` / ``YYYYMMDD`` input ('' stays '').

    Raises
    ------
    InvalidRequest
        Anything else.
    """
    value = value.strip()
    if not value:
        return ""
    match = _DATE.match(value)
    if match is None:
        raise InvalidRequest(f"{label}: give a date as YYYY-MM-DD")
    year, month, day = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and year >= 1900):
        raise InvalidRequest(f"{label}: {value} is not a date")
    return "".join(match.groups())


def date_range(date_from: str, date_to: str) -> str:
    """Return a C-FIND date range (``A-B``, ``A-``, ``-B``) or '' for no range.

    Raises
    ------
    InvalidRequest
        A malformed date, or a range that ends before it starts.
    """
    low, high = parse_date(date_from, "From"), parse_date(date_to, "To")
    if low and high and low > high:
        raise InvalidRequest("the date range ends before it starts")
    if not (low or high):
        return ""
    return low if low == high else f"{low}-{high}"


def _identifier(values: dict[str, str]) -> Dataset:
    """A STUDY level identifier with ``values`` (no pydicom value validation)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), value,
                           validation_mode=dicom_config.IGNORE))
    return ds


_STUDY_COLUMNS = (
    Study.study_uid, Patient.name, Patient.patient_id, Patient.birth_date, Patient.sex,
    Study.study_date, Study.study_time, Study.accession, Study.description, Study.modalities,
    Study.num_series, Study.num_instances,
)


class StudySearch:
    """Find received studies for the staff pages (no dependencies: it reads the index)."""

    def search_studies(self, text: str = "", date_from: str = "", date_to: str = "",
                       user: StaffUser | None = None, source_ip: str = "",
                       limit: int = STUDY_LIMIT) -> list[StudyHit]:
        """Find received studies, newest first, with C-FIND matching.

        ``text`` matches the patient name (case-insensitive; a prefix unless it has
        ``*``/``?``; ``Doe, Jane`` means ``Doe^Jane``), the patient ID or the
        accession number (exact unless wildcards). Searches with criteria are
        audited as Query events.

        Raises
        ------
        InvalidRequest
            A malformed date or date range.
        """
        dates = date_range(date_from, date_to)
        text = typed_text(text)
        common = {"StudyDate": dates} if dates else {}
        if text:
            variants = [{"PatientName": name_pattern(text)}, {"PatientID": text},
                        {"AccessionNumber": text}]
        else:
            variants = [{}]
        hits: dict[str, StudyHit] = {}
        for variant in variants:
            query = parse_identifier(_identifier({**common, **variant}), Root.PATIENT)
            select = (select_rows(query, columns=list(_STUDY_COLUMNS))
                      .order_by(Study.study_date.desc(), Study.study_time.desc(),
                                Study.id.desc())
                      .limit(limit).tuples())
            for row in select:
                hits.setdefault(row[0], StudyHit(*row))
        if user is not None and (text or dates):
            audit.record(audit.QUERY, "study-search", actor_of(user, source_ip),
                         detail=f"text={text!r} dates={dates!r} found={len(hits)}")
        found = sorted(hits.values(), key=lambda h: (h.study_date, h.study_time), reverse=True)
        return found[:limit]

    def studies_by_uid(self, study_uids: list[str]) -> list[StudyHit]:
        """The indexed studies among ``study_uids`` (to show a rejected share form again)."""
        uids = [u for u in study_uids if u][:STUDY_LIMIT]
        if not uids:
            return []
        return [StudyHit(*row) for row in queries.study_rows(uids, _STUDY_COLUMNS)]
