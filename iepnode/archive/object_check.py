"""Proving that a candidate object is a whole DICOM instance, without reading it into memory.

:func:`open_object` recognises the object from its first bytes (Part-10, a File Meta
group without preamble, or a raw dataset), maps it (a zip entry is first spooled to
an unnamed temporary file, its bytes counted against the size and expansion limits)
and walks it element by element (:func:`check_complete`), letting the pages behind the
check go.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from iepnode.archive.dataset_check import (
    DEFAULT_MAX_INFLATED,
    LONG_VRS,
    SHORT_VRS,
    check_dataset,
)
from iepnode.archive.import_sources import (
    _HEAD,
    MAX_COMPRESSION_RATIO,
    MAX_OBJECT_SIZE,
    ImportReport,
    Source,
)
from iepnode.archive.ingest import FileMeta, parse_file_meta
from iepnode.archive.limits import inflates_too_far
from iepnode.errors import BadDataset, DatasetMismatch

log = logging.getLogger("iepnode.import")

#: Zip entries are copied out in blocks of this size.
READ_BLOCK = 1 << 20
#: While an object is checked, the pages behind the check are let go every this many bytes.
FORGET_EVERY = 32 << 20
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: File name endings that declare a DICOM file: such a file that is not DICOM is refused.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

_VRS = LONG_VRS | SHORT_VRS


@dataclass(frozen=True)
class _Layout:
    """Where the dataset of a candidate starts and how it is encoded."""

    meta_start: int | None  # offset of the File Meta group, None for a raw dataset
    raw_syntax: str | None = None  # the guessed transfer syntax of a raw dataset

def _named_like_dicom(name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES)


def _classify(head: bytes) -> _Layout | None:
    """Recognise a DICOM object from its first 132 bytes, or return ``None``."""
    if len(head) >= _HEAD and head[128:132] == b"DICM":
        return _Layout(132)
    if len(head) < 8:
        return None
    if head[:4] == b"DICM":
        return _Layout(4)
    if head[:2] == b"\x02\x00" and head[4:6] in _VRS:
        return _Layout(0)
    if head[:2] == b"\x08\x00":
        if head[4:6] in _VRS:
            return _Layout(None, ExplicitVRLittleEndian)
        if struct.unpack_from("<I", head, 4)[0] < (1 << 16):
            return _Layout(None, ImplicitVRLittleEndian)
    if head[:2] == b"\x00\x08" and head[4:6] in _VRS:
        return _Layout(None, ExplicitVRBigEndian)
    return None


def _meta_at(data: bytes | memoryview, start: int) -> tuple[FileMeta, int]:
    """Parse a File Meta group starting at ``start``; return it and the dataset offset."""
    if start == 132:
        return parse_file_meta(data)
    padded = b"\x00" * 128 + b"DICM" + bytes(data[start:start + (1 << 16)])
    meta, offset = parse_file_meta(padded)
    return meta, start + offset - 132


def _raw_syntax(guess: str, hint: str | None) -> str:
    """Pick the transfer syntax of a raw dataset: the DICOMDIR's if it fits the bytes."""
    if not hint:
        return guess
    try:
        h, g = UID(hint), UID(guess)
        if (h.is_implicit_VR, h.is_little_endian) == (g.is_implicit_VR, g.is_little_endian) \
                and h != DeflatedExplicitVRLittleEndian:
            return str(h)
    except ValueError:
        pass
    return guess


#: An explicit/implicit VR little endian label that the bytes contradict, and the
#: syntax that fits them instead (some writers mislabel; readers cope).
_OTHER_VR = {ExplicitVRLittleEndian: ImplicitVRLittleEndian,
             ImplicitVRLittleEndian: ExplicitVRLittleEndian}


def check_complete(stream: bytes | memoryview, transfer_syntax: str, *,
                   max_inflated: int = DEFAULT_MAX_INFLATED,
                   progress: Callable[[int], None] | None = None) -> tuple[str, bool]:
    """Check that an encoded dataset is whole, without decoding any value.

    The same check as every C-STORE (:func:`iepnode.archive.dataset_check.check_dataset`):
    every element's length is followed to the end of the data, through sequences and
    encapsulated pixel data, and native pixel data must fit the image attributes, so
    a file cut short (a copy interrupted, a CD read error) is refused instead of
    stored. One leniency for old media: a dataset labelled Explicit VR Little Endian
    that is whole as Implicit VR (or the reverse) is accepted under the syntax its
    bytes are in, so the node's File Meta then tells the truth.

    Parameters
    ----------
    stream : bytes or memoryview
        The dataset (no File Meta).
    transfer_syntax : str
        Its transfer syntax UID, as labelled.
    max_inflated : int
        Largest inflated size of a deflated dataset (bytes).
    progress : callable, optional
        Called every :data:`FORGET_EVERY` bytes or so with an offset the check is past
        (the bytes before it are not looked at again): a mapped file lets those pages go.

    Returns
    -------
    tuple of (str, bool)
        The transfer syntax the dataset is encoded in, and ``True`` when its
        top-level Pixel Data is encapsulated (compressed).

    Raises
    ------
    BadDataset
        If an element, item or sequence runs past the end, or the structure is broken.
    """
    try:
        return transfer_syntax, check_dataset(stream, transfer_syntax, max_inflated=max_inflated,
                                              progress=progress, every=FORGET_EVERY
                                              ).encapsulated
    except DatasetMismatch:
        raise
    except BadDataset as first:
        other = _OTHER_VR.get(str(transfer_syntax).strip("\x00 "))
        if other is None:
            raise
        try:
            checked = check_dataset(stream, other, progress=progress, every=FORGET_EVERY)
        except BadDataset:
            raise first from None
        log.info("dataset labelled %s is encoded as %s: stored as such",
                 UID(transfer_syntax).name, other.name)
        return str(other), checked.encapsulated


class _Mapped:
    """An object's bytes, mapped read-only from a file: pages come in when read and can
    be let go (:meth:`forget`), so checking a large object costs little memory."""

    def __init__(self, handle: BinaryIO) -> None:
        size = os.fstat(handle.fileno()).st_size
        self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def forget(self, upto: int) -> None:
        """Let go of the pages before ``upto`` (read again from the file if needed)."""
        whole = upto - upto % mmap.PAGESIZE
        if self._map is not None and whole > 0 and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, 0, min(whole, len(self._map)))

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller kept a view: the collector unmaps it later
                log.debug("mapping still in use; left to the garbage collector")


def _spool(handle: BinaryIO, head: bytes, source: Source, directory: Path | None) -> BinaryIO:
    """Copy the rest of ``handle`` (after ``head``) to an unnamed temporary file.

    The bytes are counted as they come out (declared sizes are not trusted): more than
    the declared size, than :data:`MAX_OBJECT_SIZE`, or (above 1 MiB) more than
    :data:`MAX_COMPRESSION_RATIO` times the compressed size is refused at once.

    Raises
    ------
    BadDataset
        Over one of those limits.
    OSError
        The temporary file cannot be written (disk full).
    """
    spool = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - returned to the caller
    try:
        spool.write(head)
        total = len(head)
        while block := handle.read(READ_BLOCK):
            total += len(block)
            if total > source.size:
                raise BadDataset(f"expands beyond its declared {source.size} bytes")
            if total > MAX_OBJECT_SIZE:
                raise BadDataset(f"larger than the {MAX_OBJECT_SIZE}-byte limit")
            packed = source.compressed_size
            if inflates_too_far(total, packed):
                raise BadDataset(f"expands over {MAX_COMPRESSION_RATIO} times its compressed "
                                 "size: looks like a zip bomb")
            spool.write(block)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return spool


@contextlib.contextmanager
def _mapped(source: Source, directory: Path | None) -> Iterator[tuple[_Mapped | None, bytes]]:
    """The candidate's bytes mapped (``None`` when it is not DICOM), and its first bytes."""
    with source.open() as handle:
        head = handle.read(_HEAD)
        if _classify(head) is None:
            yield None, head
            return
        # A zip entry goes out to a temporary file first; a file is mapped itself.
        backing = _spool(handle, head, source, directory) if source.path is None else handle
        try:
            mapped = _Mapped(backing)
        finally:
            if backing is not handle:
                backing.close()  # the mapping keeps the pages reachable
    try:
        yield mapped, head
    finally:
        mapped.close()


@contextlib.contextmanager
def open_object(source: Source, report: ImportReport, spool_dir: Path | None = None, *,
                max_inflated: int = DEFAULT_MAX_INFLATED,
                ) -> Iterator[tuple[memoryview, str] | None]:
    """Open one candidate and prove it is a whole DICOM instance, without reading it
    into memory.

    Use as ``with open_object(source, report) as loaded:``; the view is valid inside
    the block only (do not keep it, or slices of it, beyond).

    Parameters
    ----------
    source : Source
        The candidate.
    report : ImportReport
        Receives why the candidate is skipped (not DICOM, a DICOMDIR) or refused.
    spool_dir : Path, optional
        Where a zip entry's temporary copy goes (default: the system's temporary folder).
    max_inflated : int
        Largest inflated size of a deflated dataset (bytes).

    Yields
    ------
    tuple of (memoryview, str) or None
        The encoded dataset (no File Meta) and the transfer syntax it is encoded in
        (see :func:`check_complete`); ``None`` when the candidate was skipped or
        refused (recorded in ``report``).

    Raises
    ------
    BadDataset
        The object is DICOM but malformed or truncated, or over a size limit.
    OSError, zipfile.BadZipFile
        It cannot be read.
    """
    if source.size > MAX_OBJECT_SIZE:
        report.refuse(source.name, f"{source.size} bytes exceeds the {MAX_OBJECT_SIZE}-byte "
                                   "limit")
        yield None
        return
    with _mapped(source, spool_dir) as (mapped, head):
        layout = _classify(head)
        if mapped is None or layout is None:
            reason = "empty file" if source.size == 0 else "not DICOM (no DICM prefix, no dataset)"
            if _named_like_dicom(source.name):
                report.refuse(source.name, f"named like DICOM but {reason}")
            else:
                report.skip(source.name, reason)
            yield None
            return
        data = mapped.view
        if len(data) > source.size:
            raise BadDataset("the object is larger than its declared size")
        if layout.meta_start is not None:
            meta, offset = _meta_at(data, layout.meta_start)
            if meta.sop_class == DICOMDIR_SOP_CLASS:
                report.skip(source.name, "DICOMDIR (file-set directory), not an instance")
                yield None
                return
            syntax = meta.transfer_syntax
        else:
            offset = 0
            syntax = _raw_syntax(str(layout.raw_syntax), source.transfer_syntax)
        stream = data[offset:]
        try:
            syntax, encapsulated = check_complete(
                stream, syntax, max_inflated=max_inflated,
                progress=lambda pos: mapped.forget(offset + pos))
            if layout.meta_start is None and encapsulated and not UID(syntax).is_compressed:
                raise BadDataset("raw dataset with compressed pixel data and no known "
                                 "transfer syntax")
            yield stream, syntax
        finally:
            stream.release()

