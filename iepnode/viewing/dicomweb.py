"""DICOMweb (PS3.18) for other viewers: QIDO-RS search and WADO-RS retrieve.

Every function works in a :class:`~iepnode.viewing.dicomweb_access.Scope` (who asks and
which studies they may see; tokens and scopes are :mod:`iepnode.viewing.dicomweb_access`).
A study, series or instance outside the scope is :class:`~iepnode.errors.NotFound`.

Search (QIDO-RS)
    Keys are matched by :mod:`iepnode.archive.query` (the C-FIND rules: wildcards, date and
    time ranges, UID lists, case-insensitive names); only attributes the index holds
    can be matched or returned, others are ignored and named in a ``Warning``.

Retrieve (WADO-RS)
    Instances go out as stored (the bytes received, in their transfer syntax): no
    transcoding. Metadata is read from the stored headers; pixel data and other
    values longer than :data:`BULK_THRESHOLD` bytes become ``BulkDataURI`` links.
    Frames are cut from the stored pixel data: native frames as they are,
    compressed frames in their stored compression.

Memory
    Responses are made of :class:`Part` objects whose bytes are read (or rendered)
    only as the response is written: a stored file in :data:`READ_BLOCK` blocks, one
    frame (:class:`PixelData` reads a frame at its offset, never the whole pixel
    data), one rendered image. A request names at most ``max_frames`` frames
    (:func:`parse_frame_list`), repeated ones counted.

Audit
    One event per request (not per instance): PS3.15 Query (110112) for searches,
    DICOM Instances Transferred (110104) when whole instances leave, DICOM Instances
    Accessed (110103) for metadata, frames, bulk data and rendered images.

The parts: this module parses and runs searches and selects the stored instances a
retrieve names (:class:`StoredInstance`); :mod:`iepnode.viewing.dicomweb_frames` streams
stored files, frames and pixel data as :class:`~iepnode.viewing.dicomweb_frames.Part`
objects; :mod:`iepnode.viewing.dicomweb_metadata` gives the DICOM JSON and bulk data;
:mod:`iepnode.viewing.dicomweb_rendered` renders images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from iepnode.archive.query import ATTRIBUTES, Level, Query, condition_for, select_rows
from iepnode.errors import BadQuery, NotFound
from iepnode.people import audit
from iepnode.viewing.dicomweb_access import Scope
from storage.filestore import FileStore
from storage.models import Instance, Patient, Series, Study

#: Largest ``limit`` of a search (and the default when none is given).
MAX_RESULTS = 10_000

#: Attributes returned by default per level (those of PS3.18 Table 10.6.3-3 the index holds).
DEFAULT_KEYS = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                  "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                   "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
                  "InstanceNumber", "AvailableTransferSyntaxUID"),
}


# -- search (QIDO-RS) --------------------------------------------------------------------


def _keyword(key: str) -> str:
    """The keyword of a query key given as keyword or as 8 hex digits.

    Raises
    ------
    BadQuery
        Neither a DICOM keyword nor a tag.
    """
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        keyword = keyword_for_tag(int(key, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(key) is not None:
        return key
    raise BadQuery(f"{key!r} is not a DICOM attribute keyword or tag")


@dataclass(frozen=True)
class Search:
    """A parsed QIDO-RS request."""

    level: Level
    conditions: tuple[peewee.Expression, ...]
    return_keys: tuple[str, ...]
    limit: int
    offset: int
    #: Query keys and included fields the node cannot match or return (for a Warning).
    ignored: tuple[str, ...]
    #: ``fuzzymatching=true`` was asked for (not supported: exact rules apply).
    fuzzy: bool
    #: The study of the resource path (``/studies/{study}/...``), if any.
    study_uid: str = ""


def _available(level: Level) -> list[str]:
    keys = [k for k, a in ATTRIBUTES.items() if a.level <= level]
    if level is Level.IMAGE:
        keys.append("AvailableTransferSyntaxUID")
    return keys


def parse_search(level: Level, params: Sequence[tuple[str, str]],
                 fixed: Mapping[str, str] | None = None) -> Search:
    """Parse QIDO-RS query parameters (PS3.18 8.3.4).

    Parameters
    ----------
    level : Level
        STUDY, SERIES or IMAGE.
    params : sequence of (str, str)
        The query string's pairs, repeated keys included.
    fixed : mapping, optional
        UIDs from the path (``{"StudyInstanceUID": ...}``).

    Raises
    ------
    BadQuery
        An unknown key, a malformed limit/offset/range.
    """
    conditions: list[peewee.Expression] = []
    include: list[str] = list(DEFAULT_KEYS[level])
    ignored: list[str] = []
    limit, offset, fuzzy = MAX_RESULTS, 0, False
    matches: list[tuple[str, str]] = list((fixed or {}).items())
    for key, value in params:
        if key == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    include.extend(_available(level))
                elif item:
                    keyword = _keyword(item)
                    if keyword in ATTRIBUTES and ATTRIBUTES[keyword].level <= level:
                        include.append(keyword)
                    else:
                        ignored.append(keyword)
        elif key in ("limit", "offset"):
            if not value.isdigit():
                raise BadQuery(f"{key} must be a whole number, not {value!r}")
            if key == "limit":
                limit = min(int(value), MAX_RESULTS)
            else:
                offset = int(value)
        elif key == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        else:
            matches.append((_keyword(key), value))
    for keyword, value in matches:
        attr = ATTRIBUTES.get(keyword)
        if attr is None or attr.level > level:
            ignored.append(keyword)
            continue
        include.append(keyword)
        condition = condition_for(keyword, value)
        if condition is not None:
            conditions.append(condition)
    return Search(level, tuple(conditions), tuple(dict.fromkeys(include)), limit, offset,
                  tuple(dict.fromkeys(ignored)), fuzzy, (fixed or {}).get("StudyInstanceUID", ""))


_LEVEL_URL = {
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def resource_url(base_url: str, *uids: str) -> str:
    """``BASE/studies/S/series/SE/instances/I`` for as many UIDs as given."""
    parts = [base_url.rstrip("/")]
    for name, uid in zip(("studies", "series", "instances"), uids, strict=False):
        parts += [name, uid]
    return "/".join(parts)


def search(scope: Scope, query: Search, base_url: str) -> list[dict[str, Any]]:
    """Run a search in ``scope``; return the DICOM JSON objects (PS3.18 F.2).

    Each result carries its Retrieve URL (0008,1190).
    """
    conditions = list(query.conditions)
    if query.study_uid and (not scope.allows(query.study_uid) or not Study.select().where(
            Study.study_uid == query.study_uid).exists()):
        raise NotFound("no such study")
    if scope.study_uids is not None:
        conditions.append(Study.study_uid.in_(sorted(scope.study_uids)))
    keys = [k for k in query.return_keys if k in ATTRIBUTES]
    url_keys = [k for k in _LEVEL_URL[query.level] if k not in keys]
    columns = [ATTRIBUTES[k].column for k in keys + url_keys]
    with_ts = "AvailableTransferSyntaxUID" in query.return_keys
    if with_ts:
        columns.append(Instance.transfer_syntax)
    target = (Patient, Study, Series, Instance)[query.level]
    select = (select_rows(Query(query.level, tuple(conditions), (), ()), columns=columns)
              .order_by(target.id).limit(query.limit).offset(query.offset).tuples())
    tags = [(f"{tag_for_keyword(k):08X}", dictionary_VR(k)) for k in keys]
    out = []
    for row in select.iterator():
        values = dict(zip(keys + url_keys, row, strict=False))
        item = {tag: _json_value(vr, value) for (tag, vr), value in zip(tags, row, strict=False)}
        if with_ts:
            item["00083002"] = _json_value("UI", row[-1])
        url = resource_url(base_url, *(values[k] for k in _LEVEL_URL[query.level]))
        item["00081190"] = _json_value("UR", url)
        if any(isinstance(v, str) and not v.isascii() for v in row):
            item["00080005"] = _json_value("CS", "ISO_IR 192")
        out.append(dict(sorted(item.items())))
    return out


def _json_value(vr: str, value: Any) -> dict[str, Any]:
    """One attribute in DICOM JSON (PS3.18 F.2.2) from an index value.

    The index holds text (multiple values backslash-separated) and counters; an
    empty value is an attribute without ``Value``.
    """
    if value is None or value == "":
        return {"vr": vr}
    if isinstance(value, int):
        return {"vr": vr, "Value": [value]}
    items = str(value).split("\\") if vr not in ("UR", "UT", "LT", "ST") else [str(value)]
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(v) for v in items]}
    if vr in ("IS", "DS"):
        return {"vr": vr, "Value": [_number(v) for v in items]}
    return {"vr": vr, "Value": items}


def _person_name(value: str) -> dict[str, str]:
    """``Yamada^Tarou=山田^太郎=やまだ^たろう`` -> its component groups (PS3.18 F.2.2)."""
    groups = zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("=")[:3], strict=False)
    return {name: text for name, text in groups if text}


def _number(text: str) -> int | float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


# -- retrieve (WADO-RS) ------------------------------------------------------------------


@dataclass(frozen=True)
class StoredInstance:
    """One stored instance selected by a retrieve request."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    patient_id: str
    size: int
    #: The file-store key (names the file; never reused for other bytes).
    key: str = ""


def select_instances(scope: Scope, paths: Callable[[str], Path], study_uid: str,
                     series_uid: str = "", sop_uid: str = "") -> list[StoredInstance]:
    """The stored instances of a study, series or instance inside the scope.

    Raises
    ------
    NotFound
        Outside the scope, or not stored.
    """
    if not scope.allows(study_uid):
        raise NotFound("no such study")
    query = (Instance.select(Instance.key, Instance.sop_uid, Instance.sop_class,
                             Instance.transfer_syntax, Instance.size_bytes, Series.series_uid,
                             Patient.patient_id)
             .join(Series).join(Study).join(Patient)
             .where(Study.study_uid == study_uid))
    if series_uid:
        query = query.where(Series.series_uid == series_uid)
    if sop_uid:
        query = query.where(Instance.sop_uid == sop_uid)
    rows = [StoredInstance(paths(key), study_uid, se, sop, cls, ts, pid, size, key)
            for key, sop, cls, ts, size, se, pid in
            query.order_by(Series.id, Instance.id).tuples()]
    if not rows:
        raise NotFound("no such study, series or instance")
    return rows


class DicomWebService:
    """DICOMweb's way to the stored files: the web asks it, never the file store.

    Parameters
    ----------
    store : FileStore
        The node's file store.
    """

    def __init__(self, store: FileStore) -> None:
        self._store = store

    def select(self, scope: Scope, study_uid: str, series_uid: str = "",
               sop_uid: str = "") -> list[StoredInstance]:
        """The stored instances of a study, series or instance inside ``scope``.

        Raises
        ------
        NotFound
            Outside the scope, or not stored (see :func:`select_instances`).
        """
        return select_instances(scope, self._store.path, study_uid, series_uid, sop_uid)


def record(scope: Scope, event: tuple[str, str], action: str, study_uids: Sequence[str],
           detail: str, outcome: int = audit.SUCCESS) -> None:
    """Audit one DICOMweb request (one event, whatever the number of instances)."""
    uids = list(dict.fromkeys(study_uids))
    text = "; ".join(x for x in (detail, f"studies={','.join(uids)}" if len(uids) > 1 else "")
                     if x)
    audit.record(event, action, scope.actor, outcome=outcome, patient_id=scope.patient_id,
                 study_uid=uids[0] if uids else "", transaction=scope.public_id, detail=text)


__all__ = [
    "Search",
    "StoredInstance",
    "parse_search",
    "record",
    "resource_url",
    "search",
    "select_instances",
]
