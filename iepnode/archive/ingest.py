"""Turn received bytes into an indexed, durable instance.

Every dataset is first checked from end to end without decoding values
(:mod:`iepnode.archive.dataset_check`: lengths, sequences, encapsulation, pixel data
length), then only the header (groups up to 0x0020) is parsed; pixel data is never
decoded, and the file is stored exactly as received (no transcoding): preamble,
File Meta Information written by the node, then the dataset bytes as sent.
"""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO, RawIOBase
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian

from iepnode import __version__
from iepnode.archive.dataset_check import DEFAULT_MAX_INFLATED, check_dataset
from iepnode.archive.uids import is_conformant_uid, is_uid_like
from iepnode.errors import BadDataset, DatasetMismatch, OutOfResources
from storage.filestore import FileStore
from storage.index import InstanceRecord, Outcome, instance_exists, record_instance
from storage.queries import DatabaseError, OperationalError

log = logging.getLogger("iepnode.ingest")

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
IMPLEMENTATION_VERSION = f"IEPNODE_{__version__}"[:16]


@dataclass(frozen=True)
class StoreResult:
    """Result of storing one instance."""

    outcome: Outcome
    sop_uid: str
    study_uid: str


def _stop_after_group_0020(tag, vr, length) -> bool:
    return tag.group > 0x0020


class _ViewReader(RawIOBase):
    """A read-only file over a buffer that copies only what is read (``BytesIO`` copies
    a memoryview whole: a mapped 400 MB object would be read into memory to parse its
    header)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = max(min(len(buffer), len(self._view) - self._pos), 0)
        buffer[:count] = self._view[self._pos:self._pos + count]
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()


def parse_header(stream: bytes, transfer_syntax: str) -> Dataset:
    """Parse the header of an encoded dataset (no File Meta), stopping before pixels.

    Parameters
    ----------
    stream : bytes
        The dataset as encoded on the wire.
    transfer_syntax : str
        Its transfer syntax UID (from the presentation context).

    Returns
    -------
    pydicom.dataset.Dataset
        Elements up to group 0x0020, values decoded lazily.

    Raises
    ------
    BadDataset
        If the bytes cannot be parsed.
    """
    if UID(transfer_syntax) == DeflatedExplicitVRLittleEndian:
        # The header is in the first MiB inflated; zlib keeps a copy of the input it
        # has not used, so give it a bounded slice, not the whole object.
        try:
            stream = zlib.decompressobj(-zlib.MAX_WBITS).decompress(
                memoryview(stream)[: 4 << 20], 1 << 20)
        except zlib.error as exc:
            raise BadDataset(f"cannot inflate dataset: {exc}") from exc
    return read_header(stream, transfer_syntax)


#: Everything pydicom may raise on bytes it cannot parse; each means "bad dataset". It
#: reads from memory (BytesIO), so its OSError ("No tag to read", an unclosed
#: sequence) is about the data, never about a disk.
_PARSE_ERRORS = (ValueError, TypeError, EOFError, KeyError, AttributeError, NotImplementedError,
                 OverflowError, IndexError, struct.error, MemoryError, RecursionError, OSError)


def read_header(plain: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """Parse the header of a plain (not deflated) dataset, stopping before pixels.

    Parameters
    ----------
    plain : bytes-like
        The dataset; inflated already when its transfer syntax is deflated.
    transfer_syntax : str
        Its transfer syntax UID.

    Returns
    -------
    pydicom.dataset.Dataset
        Elements up to group 0x0020, values decoded lazily.

    Raises
    ------
    BadDataset
        If the bytes cannot be parsed.
    """
    try:
        ts = UID(transfer_syntax)
        source = BytesIO(plain) if isinstance(plain, bytes) else _ViewReader(plain)
        try:
            ds = read_dataset(
                source,
                ts.is_implicit_VR,
                ts.is_little_endian,
                stop_when=_stop_after_group_0020,
            )
        finally:
            source.close()
        ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, None)
    except _PARSE_ERRORS as exc:
        raise BadDataset(f"cannot parse dataset: {exc}") from exc
    return ds


#: VRs whose raw bytes, when plain ASCII, are the value itself (after padding).
_ASCII_TEXT_VRS = frozenset(("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM",
                             "UI", "LT", "ST", "UT", "UC"))


def _raw_ascii(ds: Dataset, keyword: str) -> str | None:
    """Decode a still-raw element directly when it is plain ASCII; ``None`` otherwise.

    Converting values through pydicom costs ~10 µs each on the ingest hot path;
    non-ASCII text (which needs SpecificCharacterSet) takes pydicom's path.
    """
    tag = keyword_dict.get(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    raw = getattr(elem, "value", None)
    if not isinstance(elem, RawDataElement) or not isinstance(raw, bytes):
        return None
    vr = elem.VR or dictionary_VR(tag)
    if vr not in _ASCII_TEXT_VRS or not raw.isascii():
        return None
    return raw.decode("ascii").strip(" \x00")


def _text(ds: Dataset, keyword: str, limit: int = 324) -> str:
    fast = _raw_ascii(ds, keyword)
    if fast is not None and "\x1b" not in fast:
        return fast[:limit]
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def _uid(ds: Dataset, keyword: str) -> str:
    # Not truncated: a UID longer than 64 characters is malformed, not another UID.
    value = _text(ds, keyword, 1024).rstrip("\x00")
    if not value:
        raise BadDataset(f"missing {keyword}")
    if not is_uid_like(value):
        raise BadDataset(f"malformed {keyword} {value!r}")
    if not is_conformant_uid(value):
        log.warning("non-conformant %s %r accepted", keyword, value)
    return value


def record_from_header(ds: Dataset, transfer_syntax: str, source_ae: str) -> InstanceRecord:
    """Build the index record of an instance from its parsed header.

    Raises
    ------
    BadDataset
        If a required UID is missing or malformed.
    """
    try:
        charset = ds.get("SpecificCharacterSet", "")
        if not isinstance(charset, str):
            charset = "\\".join(charset)
        return InstanceRecord(
            sop_uid=_uid(ds, "SOPInstanceUID"),
            sop_class=_uid(ds, "SOPClassUID"),
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            transfer_syntax=transfer_syntax,
            patient_id=_text(ds, "PatientID", 64),
            issuer=_text(ds, "IssuerOfPatientID", 64),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate", 8),
            sex=_text(ds, "PatientSex", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession=_text(ds, "AccessionNumber", 16),
            study_id=_text(ds, "StudyID", 16),
            study_description=_text(ds, "StudyDescription", 64),
            referring_physician=_text(ds, "ReferringPhysicianName"),
            institution=_text(ds, "InstitutionName", 64),
            charset=charset[:128],
            modality=_text(ds, "Modality", 16),
            series_number=_text(ds, "SeriesNumber", 12),
            series_description=_text(ds, "SeriesDescription", 64),
            body_part=_text(ds, "BodyPartExamined", 16),
            instance_number=_text(ds, "InstanceNumber", 12),
            source_ae=source_ae[:16],
        )
    except BadDataset:
        raise
    except (ValueError, TypeError, LookupError, UnicodeError) as exc:
        raise BadDataset(f"cannot read attributes: {exc}") from exc


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """Encode one explicit VR little endian element (File Meta is always this)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Return preamble, ``DICM`` prefix and File Meta Information for a stored file.

    Encoded directly (PS3.10 7.1: explicit VR little endian, group length first);
    the result equals what pydicom's ``write_file_meta_info`` writes, at a fraction
    of the cost on the ingest hot path.
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _padded(sop_class, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _padded(sop_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _padded(PYDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")),
        _element(0x0002, 0x0016, b"AE", _padded(source_ae, b" ")) if source_ae else b"",
    ))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def is_disk_full(exc: BaseException) -> bool:
    """Return ``True`` when ``exc`` means the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    return isinstance(exc, OperationalError) and "full" in str(exc).lower()


class Ingester:
    """Validate, write and index received instances.

    Parameters
    ----------
    store : FileStore
        Where files are written.
    replace_duplicates : bool
        The duplicate policy (see ``Settings.duplicate_policy``).
    on_stored : callable, optional
        Called with each :class:`StoreResult` after a successful store.
    max_inflated : int
        Largest inflated size of a deflated dataset, in bytes
        (``Settings.max_inflated_mb``).
    """

    def __init__(
        self,
        store: FileStore,
        *,
        replace_duplicates: bool = False,
        on_stored: Callable[[StoreResult], None] | None = None,
        max_inflated: int = DEFAULT_MAX_INFLATED,
    ) -> None:
        self.store = store
        self.replace_duplicates = replace_duplicates
        self.on_stored = on_stored
        self.max_inflated = max_inflated

    def ingest(
        self,
        stream: bytes,
        transfer_syntax: str,
        *,
        source_ae: str = "",
        expected_sop_class: str | None = None,
        expected_sop_uid: str | None = None,
    ) -> StoreResult:
        """Store one encoded dataset durably and index it.

        Parameters
        ----------
        stream : bytes
            The dataset as encoded in ``transfer_syntax`` (no File Meta).
        transfer_syntax : str
            Transfer syntax UID of ``stream``.
        source_ae : str, optional
            Calling AE title, kept in the File Meta and the index.
        expected_sop_class, expected_sop_uid : str, optional
            The C-STORE request's Affected SOP Class/Instance UIDs; the dataset
            must carry the same values.

        Returns
        -------
        StoreResult
            What was done. Returns only once the file is fsynced and renamed into
            place and the index row is committed.

        Raises
        ------
        BadDataset, DatasetMismatch
            The dataset is not whole (:func:`iepnode.archive.dataset_check.check_dataset`),
            its pixel data does not fit its image attributes, or it does not match
            the request. Nothing is written.
        OutOfResources
            Writing or indexing failed; nothing is left behind.
        """
        checked = check_dataset(stream, transfer_syntax, max_inflated=self.max_inflated)
        ds = read_header(checked.plain, transfer_syntax)
        rec = record_from_header(ds, transfer_syntax, source_ae)
        if expected_sop_uid is not None and rec.sop_uid != expected_sop_uid.strip("\x00 "):
            raise DatasetMismatch(
                f"dataset SOP Instance UID {rec.sop_uid} differs from the request's "
                f"{expected_sop_uid}"
            )
        if expected_sop_class is not None and rec.sop_class != expected_sop_class.strip("\x00 "):
            raise DatasetMismatch(
                f"dataset SOP Class UID {rec.sop_class} differs from the request's "
                f"{expected_sop_class}"
            )
        try:
            duplicate = not self.replace_duplicates and instance_exists(rec.sop_uid)
        except (DatabaseError, OSError) as exc:
            reason = "disk full" if is_disk_full(exc) else f"index failed: {exc}"
            raise OutOfResources(reason) from exc
        if duplicate:
            log.info("duplicate SOP Instance UID %s from %s: first copy kept", rec.sop_uid,
                     source_ae or "import")
            return StoreResult(Outcome.DUPLICATE_KEPT, rec.sop_uid, rec.study_uid)
        header = file_meta_bytes(rec.sop_class, rec.sop_uid, transfer_syntax, source_ae)
        try:
            key, size = self.store.put((header, stream))
        except OSError as exc:
            reason = "disk full" if is_disk_full(exc) else f"write failed: {exc}"
            raise OutOfResources(reason) from exc
        try:
            result = record_instance(rec, key, size, replace=self.replace_duplicates)
        except (DatabaseError, OSError) as exc:
            self.store.remove(key)
            reason = "disk full" if is_disk_full(exc) else f"index failed: {exc}"
            raise OutOfResources(reason) from exc
        if result.obsolete_key:
            self.store.remove(result.obsolete_key)
        if result.outcome is Outcome.DUPLICATE_KEPT:
            log.info("duplicate SOP Instance UID %s from %s: first copy kept", rec.sop_uid,
                     source_ae or "import")
        stored = StoreResult(result.outcome, rec.sop_uid, rec.study_uid)
        if self.on_stored is not None:
            self.on_stored(stored)
        return stored


@dataclass(frozen=True)
class FileMeta:
    """The parts of a Part-10 File Meta Information the node needs."""

    sop_class: str
    sop_uid: str
    transfer_syntax: str


def parse_file_meta(data: bytes | memoryview) -> tuple[FileMeta, int]:
    """Read the File Meta Information of a Part-10 file held in memory.

    Parameters
    ----------
    data : bytes
        The whole file, starting with the 128-byte preamble.

    Returns
    -------
    tuple of (FileMeta, int)
        The meta values and the offset where the dataset starts.

    Raises
    ------
    BadDataset
        If the preamble, prefix or meta group is missing or malformed.
    """
    from pydicom.filereader import _read_file_meta_info

    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise BadDataset("not a DICOM Part-10 file (no DICM prefix)")
    fp = BytesIO(bytes(data[: min(len(data), 1 << 16)]))
    fp.seek(132)
    try:
        meta = _read_file_meta_info(fp)
        ts = str(meta.TransferSyntaxUID)
        result = FileMeta(
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("MediaStorageSOPInstanceUID", "")),
            ts,
        )
    except Exception as exc:
        raise BadDataset(f"unreadable File Meta Information: {exc}") from exc
    if not is_uid_like(ts):
        raise BadDataset(f"malformed Transfer Syntax UID {ts!r}")
    return result, fp.tell()
