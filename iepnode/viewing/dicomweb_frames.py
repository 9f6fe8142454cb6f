"""DICOMweb (WADO-RS) responses streamed: stored files, frames and pixel data as parts.

Responses are made of :class:`Part` objects whose bytes are read only as the response
is written: a stored file in :data:`READ_BLOCK` blocks, one frame (:class:`PixelData`
reads a frame at its offset, never the whole pixel data). A request names at most
``max_frames`` frames (:func:`parse_frame_list`), repeated ones counted.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from iepnode.errors import BadDataset, BadQuery, NotFound
from iepnode.viewing.dicomweb import StoredInstance, resource_url

PIXEL_DATA = 0x7FE00010

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


__all__ = [
    "FRAME_MEDIA_TYPES",
    "MAX_FRAMES",
    "READ_BLOCK",
    "Part",
    "PixelData",
    "instance_parts",
    "parse_frame_list",
    "read_blocks",
]
