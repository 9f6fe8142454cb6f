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
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import peewee
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from iepnode.archive.query import ATTRIBUTES, Level, Query, condition_for, select_rows
from iepnode.errors import BadDataset, BadQuery, NodeError, NotFound
from iepnode.people import audit
from iepnode.viewing.dicomweb_access import Scope
from storage.filestore import FileStore
from storage.models import Instance, Patient, Series, Study

#: Binary values longer than this (bytes) are sent as BulkDataURI links in metadata.
BULK_THRESHOLD = 1024
#: Largest ``limit`` of a search (and the default when none is given).
MAX_RESULTS = 10_000

PIXEL_DATA = 0x7FE00010
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: Transfer syntax -> the media type of its compressed frames (PS3.18 Table 8.7.4-1).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
}
#: Transfer syntaxes whose pixel data is native (little endian) and can be cut into frames.
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
EXPLICIT_LE = "1.2.840.10008.1.2.1"

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


def instance_metadata(item: StoredInstance, base_url: str,
                      threshold: int = BULK_THRESHOLD) -> dict[str, Any]:
    """The DICOM JSON of one stored instance, large binary values as BulkDataURIs.

    Only top-level values are linked (nested large values stay inline); pixel data
    always is.
    """
    ds = dcmread(item.path, stop_before_pixels=True)
    url = resource_url(base_url, item.study_uid, item.series_uid, item.sop_uid)
    out: dict[str, Any] = {}
    for elem in ds:
        tag = f"{elem.tag:08X}"
        if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > threshold:
            out[tag] = {"vr": elem.VR, "BulkDataURI": f"{url}/bulkdata/{tag}"}
        else:
            out[tag] = elem.to_json_dict(None, 10 ** 12)
    has_pixels = "Rows" in ds and ("BitsAllocated" in ds)
    if has_pixels:
        encapsulated = item.transfer_syntax not in NATIVE
        vr = "OB" if encapsulated or int(ds.BitsAllocated) <= 8 else "OW"
        out["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    # The file meta's transfer syntax, as AvailableTransferSyntaxUID (0008,3002).
    out.setdefault("00083002", {"vr": "UI", "Value": [item.transfer_syntax]})
    return dict(sorted(out.items()))


#: Stands for the request's base URL inside cached metadata (never in DICOM text:
#: JSON writes the NUL characters as ``\u0000``).
_BASE = "\u0000base\u0000"
_BASE_JSON = json.dumps(_BASE)[1:-1]


class MetadataCache:
    """DICOM JSON of stored instances, by file-store key, within a byte budget (LRU).

    A key's file never changes (a replaced instance gets a new key), so entries
    never go stale; they only age out. Entries hold the JSON text with a
    placeholder for the base URL, so one entry serves every base URL.
    """

    def __init__(self, budget: int = 64 << 20) -> None:
        self.budget = budget
        self.size = 0
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def text(self, item: StoredInstance, key: str) -> str:
        """The JSON text of one instance, with the base-URL placeholder."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        text = json.dumps(instance_metadata(item, _BASE), ensure_ascii=False)
        with self._lock:
            if key not in self._entries and len(text) < self.budget:
                self._entries[key] = text
                self.size += len(text)
                while self.size > self.budget:
                    _, old = self._entries.popitem(last=False)
                    self.size -= len(old)
        return text

    def blocks(self, items: Iterable[StoredInstance], base_url: str) -> Iterator[bytes]:
        """The metadata response body (a JSON array) of ``items`` under ``base_url``,
        one instance at a time (blocking reads: iterate in a worker thread)."""
        base = json.dumps(base_url)[1:-1]
        yield b"["
        for number, item in enumerate(items):
            text = self.text(item, item.key).replace(_BASE_JSON, base)
            yield (text if number == 0 else "," + text).encode()
        yield b"]"

    def body(self, items: Sequence[StoredInstance], base_url: str) -> bytes:
        """The whole metadata response body of ``items`` (see :meth:`blocks`)."""
        return b"".join(self.blocks(items, base_url))


# -- frames and bulk data, streamed ----------------------------------------------------------

#: Stored files and native pixel data go out in blocks of this many bytes.
READ_BLOCK = 1 << 20
#: Most frame numbers one request may list, duplicates counted (the default of
#: ``[http] dicomweb_max_frames``).
MAX_FRAMES = 100


@dataclass(frozen=True)
class Part:
    """One part of a ``multipart/related`` response.

    ``blocks`` yields the part's bytes in order and reads them only as it is iterated
    (blocking reads or renders: iterate it in a worker thread), so a response holds one
    block, frame or image at a time, never the whole body.
    """

    content_type: str
    blocks: Iterable[bytes]
    location: str = ""


def read_blocks(path: Path, start: int = 0, length: int | None = None,
                block: int = READ_BLOCK) -> Iterator[bytes]:
    """The bytes of ``path`` from ``start`` (``length`` of them, else to the end), in blocks."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = length
        while left is None or left > 0:
            data = handle.read(block if left is None else min(block, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def instance_parts(items: Iterable[StoredInstance], base_url: str) -> Iterator[Part]:
    """The stored files of ``items`` as ``application/dicom`` parts (WADO-RS retrieve)."""
    for item in items:
        yield Part(f"application/dicom; transfer-syntax={item.transfer_syntax}",
                   read_blocks(item.path),
                   resource_url(base_url, item.study_uid, item.series_uid, item.sop_uid))


def parse_frame_list(text: str, max_frames: int = MAX_FRAMES) -> list[int]:
    """``"1,3,2"`` -> ``[1, 3, 2]`` (1-based, as in the URL).

    Parameters
    ----------
    text : str
        The ``{frames}`` of the URL.
    max_frames : int, optional
        Most numbers the list may hold, repeated ones counted (each is read and sent).

    Raises
    ------
    BadQuery
        Not a comma-separated list of positive numbers, or longer than ``max_frames``.
    """
    items = text.split(",")
    if len(items) > max_frames:
        raise BadQuery(f"the frame list names {len(items)} frames; a request may name at "
                       f"most {max_frames} (ask for the others in further requests)")
    if not text or not all(i.isdigit() and len(i) <= 9 and int(i) > 0 for i in items):
        raise BadQuery(f"frame list {text[:100]!r}: comma-separated frame numbers from 1")
    return [int(i) for i in items]


class PixelData:
    """The Pixel Data of one stored instance, read from its file a frame at a time.

    Opening reads the header up to the Pixel Data element and no further; each frame
    is then read on its own (a native frame by its offset, a compressed one through
    the offset table or its fragments), so memory holds one frame whatever the size
    of the object. (A deflated file cannot be read at an offset: it is inflated
    whole, as before.) Close it when done (or use it in a ``with`` block).

    Attributes
    ----------
    frames : int
        Number of Frames (1 when absent).
    media_type : str
        ``application/octet-stream`` for native frames, else the compressed media type.
    transfer_syntax : str
        The frames' transfer syntax (native ones go out as Explicit VR Little Endian).

    Raises
    ------
    NotFound
        The instance has no pixel data.
    BadQuery
        Pixel data that cannot be cut into frames here (big endian, 1-bit multi-frame).
    """

    def __init__(self, item: StoredInstance) -> None:
        self._file: BinaryIO | None = open(item.path, "rb")  # noqa: SIM115 - see close()
        try:
            self._open(item)
        except BaseException:
            self.close()
            raise

    def _open(self, item: StoredInstance) -> None:
        assert self._file is not None
        ds = dcmread(self._file, stop_before_pixels=True)
        ts = str(ds.file_meta.get("TransferSyntaxUID", item.transfer_syntax))
        self.frames = max(int(ds.get("NumberOfFrames") or 1), 1)
        self._in_memory: bytes | None = None
        self._extended: tuple[bytes, bytes] | None = None
        if ts == DeflatedExplicitVRLittleEndian:
            full = dcmread(item.path)
            if "PixelData" not in full:
                raise NotFound("this instance has no pixel data")
            self._in_memory = bytes(full.PixelData)
            self._start, self._length = 0, len(self._in_memory)
        else:
            self._start, self._length = self._value_position(UID(ts))
        self.transfer_syntax = ts
        self.native = ts in NATIVE
        if self.native:
            bits = int(ds.BitsAllocated)
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
            if bits == 1 and self.frames > 1 and size % 8:
                raise BadQuery("1-bit frames that are not byte-aligned cannot be sent")
            self._frame_size = size * bits // 8
            self.media_type, self.transfer_syntax = "application/octet-stream", EXPLICIT_LE
            return
        if not UID(ts).is_encapsulated:
            raise BadQuery(f"frames of transfer syntax {ts} cannot be sent")
        self.media_type = FRAME_MEDIA_TYPES.get(ts, "application/octet-stream")
        offsets, lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        if offsets and lengths:
            self._extended = (bytes(offsets), bytes(lengths))

    def _value_position(self, ts: UID) -> tuple[int, int]:
        """Where the top-level Pixel Data value starts, and its length (or undefined)."""
        assert self._file is not None
        order = "<" if ts.is_little_endian else ">"
        head = self._file.read(8)
        if len(head) < 8 or struct.unpack(f"{order}HH", head[:4]) != (0x7FE0, 0x0010):
            raise NotFound("this instance has no pixel data")
        if ts.is_implicit_VR:
            return self._file.tell(), struct.unpack(f"{order}I", head[4:])[0]
        long = self._file.read(4)
        if len(long) < 4:
            raise NotFound("this instance has no pixel data")
        return self._file.tell(), struct.unpack(f"{order}I", long)[0]

    def __enter__(self) -> PixelData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def check(self, numbers: Sequence[int]) -> None:
        """Raise :class:`NotFound` if a frame number is beyond the instance's frames."""
        if any(n > self.frames for n in numbers):
            raise NotFound(f"this instance has {self.frames} frames")

    def frame(self, number: int) -> bytes:
        """Frame ``number`` (1-based) as stored (native: its bytes; else its fragments).

        Raises
        ------
        BadDataset
            The compressed pixel data's items are broken.
        """
        if self.native:
            first = (number - 1) * self._frame_size
            size = max(min(self._frame_size, self._length - first), 0)
            if self._in_memory is not None:
                return self._in_memory[first:first + size]
            return self._read(self._start + first, size)
        source: Any = self._in_memory
        if source is None:
            assert self._file is not None
            source = self._file
            source.seek(self._start)
        try:
            return get_frame(source, number - 1, number_of_frames=self.frames,
                             extended_offsets=self._extended)
        except (ValueError, EOFError, struct.error) as exc:
            raise BadDataset(f"frame {number} cannot be read: {exc}") from exc

    def _read(self, start: int, size: int) -> bytes:
        assert self._file is not None
        self._file.seek(start)
        return self._file.read(size)

    def frame_parts(self, numbers: Iterable[int]) -> Iterator[Part]:
        """One part per frame number (``check`` them first), each read when reached
        (iterate in a worker thread)."""
        content_type = f"{self.media_type}; transfer-syntax={self.transfer_syntax}"
        for number in numbers:
            yield Part(content_type, (self.frame(number),))

    def value_parts(self) -> Iterator[Part]:
        """The whole value as a BulkDataURI target: native pixel data as one part (in
        blocks), compressed pixel data as one part per frame."""
        if not self.native:
            yield from self.frame_parts(range(1, self.frames + 1))
            return
        content_type = f"{self.media_type}; transfer-syntax={self.transfer_syntax}"
        yield Part(content_type, self._value_blocks())

    def _value_blocks(self) -> Iterator[bytes]:
        if self._in_memory is not None:
            for first in range(0, self._length, READ_BLOCK):
                yield self._in_memory[first:first + READ_BLOCK]
            return
        left, position = self._length, self._start
        while left > 0:
            data = self._read(position, min(READ_BLOCK, left))
            if not data:
                return
            left -= len(data)
            position += len(data)
            yield data


def bulk_tag(tag_text: str) -> Tag:
    """The tag of a ``/bulkdata/{tag}`` URL (8 hex digits).

    Raises
    ------
    NotFound
        Not a tag.
    """
    try:
        if len(tag_text) == 8:
            return Tag(int(tag_text, 16))
    except ValueError:
        pass
    raise NotFound("no such bulk data")


def read_bulk_value(item: StoredInstance, tag: Tag) -> tuple[bytes, str]:
    """A top-level binary value other than Pixel Data, and its media type.

    An Encapsulated Document has its own MIME type (MIME Type of Encapsulated
    Document); anything else is ``application/octet-stream``.

    Raises
    ------
    NotFound
        No such tag, or not a binary value.
    """
    ds = dcmread(item.path, stop_before_pixels=True)
    elem = ds.get(tag)
    if elem is None or elem.VR not in _BINARY_VRS or elem.value is None:
        raise NotFound("no such bulk data")
    media = "application/octet-stream"
    if tag == 0x00420011:  # Encapsulated Document
        media = str(ds.get("MIMETypeOfEncapsulatedDocument", "") or media).strip().lower()
        length = ds.get("EncapsulatedDocumentLength")
        value = bytes(elem.value)
        return (value[:int(length)] if length else value), media
    return bytes(elem.value), media


@dataclass(frozen=True)
class Rendering:
    """Parsed ``/rendered`` query parameters (PS3.18 8.3.5.1)."""

    media_type: str
    center: float | None = None
    width: float | None = None
    size: tuple[int, int] | None = None
    quality: int = 90
    #: Parameters understood but not applied (for a Warning header).
    ignored: tuple[str, ...] = ()


def parse_rendering(params: Mapping[str, str], accept: Sequence[str]) -> Rendering:
    """Media type (``accept`` query parameter, else the Accept header), window, viewport.

    ``window=center,width[,function]`` (``linear`` only), ``viewport=vw,vh`` (a box the
    image is fitted in; source cropping ``sx,sy,sw,sh`` is ignored), ``quality=1-100``
    (JPEG). ``annotation`` is ignored.

    Raises
    ------
    BadQuery
        A malformed value.
    NotAcceptableMedia
        Neither JPEG nor PNG is acceptable.
    """
    from iepnode.viewing.rendering import MEDIA_TYPES

    wanted = [m.strip().split(";")[0].lower() for m in params.get("accept", "").split(",")
              if m.strip()] or [m.lower() for m in accept] or ["image/jpeg"]
    media = next((m for m in wanted if m in MEDIA_TYPES), None)
    if media is None and any(m in ("*/*", "image/*") for m in wanted):
        media = "image/jpeg"
    if media is None:
        raise NotAcceptableMedia(f"rendered images are {' or '.join(MEDIA_TYPES)}")
    center = width = None
    size = None
    quality = 90
    ignored: list[str] = []
    try:
        if "window" in params:
            parts = params["window"].split(",")
            if len(parts) not in (2, 3) or (len(parts) == 3 and
                                            parts[2].strip().lower() != "linear"):
                raise ValueError("window=center,width[,linear]")
            center, width = float(parts[0]), float(parts[1])
            if width <= 0:
                raise ValueError("window width must be positive")
        if "viewport" in params:
            parts = params["viewport"].split(",")
            if len(parts) not in (2, 6):
                raise ValueError("viewport=vw,vh[,sx,sy,sw,sh]")
            size = (int(parts[0]), int(parts[1]))
            if not (0 < size[0] <= 4096 and 0 < size[1] <= 4096):
                raise ValueError("viewport sides must be 1-4096")
            if len(parts) == 6:
                ignored.append("viewport source region")
        if "quality" in params:
            quality = int(params["quality"])
            if not 1 <= quality <= 100:
                raise ValueError("quality must be 1-100")
    except ValueError as exc:
        raise BadQuery(str(exc)) from None
    if "annotation" in params:
        ignored.append("annotation")
    return Rendering(media, center, width, size, quality, tuple(ignored))


class NotAcceptableMedia(NodeError):
    """The client accepts no media type the node can give (HTTP 406)."""


def render_image(item: StoredInstance, frame: int, how: Rendering) -> bytes:
    """Frame ``frame`` (1-based) of an instance rendered as asked.

    Raises
    ------
    NotFound
        No image, or no such frame (the rendering module's ``RenderError``).
    """
    from iepnode.viewing.rendering import RenderError, render_bytes

    try:
        return render_bytes(item.path, frame - 1, media_type=how.media_type, center=how.center,
                            width=how.width, size=how.size, quality=how.quality)
    except RenderError as exc:
        raise NotFound(str(exc)) from exc


def frame_count(item: StoredInstance) -> int:
    """Number of frames of an image instance (for checking a frame list before rendering).

    Raises
    ------
    NotFound
        No image.
    """
    from iepnode.viewing.rendering import RenderError, read_info

    try:
        return read_info(item.path).frames
    except RenderError as exc:
        raise NotFound(str(exc)) from exc


def rendered_frame_parts(item: StoredInstance, numbers: Iterable[int],
                         how: Rendering) -> Iterator[Part]:
    """Frames of one instance rendered as asked, a part each (rendered when reached)."""
    for number in numbers:
        yield Part(how.media_type, (render_image(item, number, how),))


def rendered_parts(items: Iterable[StoredInstance], how: Rendering) -> Iterator[Part]:
    """The first frame of each instance that has an image, rendered, one at a time.

    Instances without an image (reports, documents) are passed over.
    """
    for item in items:
        try:
            image = render_image(item, 1, how)
        except NotFound:
            continue
        yield Part(how.media_type, (image,))


#: The process's metadata cache.
METADATA = MetadataCache()


__all__ = [
    "BULK_THRESHOLD",
    "FRAME_MEDIA_TYPES",
    "MAX_FRAMES",
    "METADATA",
    "READ_BLOCK",
    "MetadataCache",
    "NotAcceptableMedia",
    "Part",
    "PixelData",
    "Rendering",
    "Search",
    "StoredInstance",
    "bulk_tag",
    "frame_count",
    "instance_metadata",
    "instance_parts",
    "parse_frame_list",
    "parse_rendering",
    "parse_search",
    "read_blocks",
    "read_bulk_value",
    "record",
    "render_image",
    "rendered_frame_parts",
    "rendered_parts",
    "resource_url",
    "search",
    "select_instances",
]
