"""A STORED zip whose every byte is known before the first one is sent.

A download package is a zip of files that already exist (the stored instances)
plus a few small generated ones (DICOMDIR, README.TXT, previews). Nothing is
compressed: DICOM pixel data hardly compresses and the recipient's disk, not our
CPU, should be the limit. Because every member's size and CRC-32 are known up
front, the whole archive is laid out before streaming: each local header, each
member's data and the central directory have fixed offsets. That gives

- the exact total size (``Content-Length``, so browsers show progress);
- any byte range without producing the bytes before it (HTTP ``Range`` resumes
  return exactly the bytes the first request would have);
- flat memory: member data is never held, only read (or ``sendfile``-d) in chunks;
- the most widely readable form: CRC and sizes in the local headers (no data
  descriptors, which some streaming unzippers reject for STORED entries), ZIP64
  records (APPNOTE 4.5.3) only where a size or offset needs them.

:class:`ZipLayout` yields *pieces*: ``bytes`` for headers and generated members,
:class:`FileSlice` for data to be read from a file. :func:`iter_bytes` turns
pieces into chunks for writers that want bytes; :func:`iter_batches` joins them into
~1 MiB batches (fewer writes and thread hops for the web server).
"""

from __future__ import annotations

import bisect
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHUNK", "FileSlice", "Member", "ZipLayout", "file_crc32", "iter_batches", "iter_bytes",
    "read_slice",
]

#: Read size for member data (bytes).
CHUNK = 1 << 20
#: A size or offset at or above this is written in a ZIP64 extra field instead.
ZIP64_LIMIT = 0xFFFFFFFF
#: More entries than this need the ZIP64 end records.
ZIP_COUNT_LIMIT = 0xFFFF
_VERSION_DEFAULT = 20  # 2.0: folders, STORED
_VERSION_ZIP64 = 45  # 4.5: ZIP64
_MADE_BY_UNIX = 3 << 8
_FILE_MODE = 0o100644 << 16  # regular file, rw-r--r--
_UTF8_NAMES = 1 << 11


@dataclass(frozen=True)
class FileSlice:
    """``size`` bytes of the file at ``path`` starting at ``offset``.

    ``key`` is the file-store key of that file when it is a stored object (every
    slice of a download package): the download streams it through the store's read
    verbs (:mod:`iepnode.sharing.download_stream`), never by path.
    """

    path: Path
    offset: int
    size: int
    key: str = ""


@dataclass(frozen=True)
class Member:
    """One zip entry: its name, where its bytes come from, and their CRC-32.

    Attributes
    ----------
    name : str
        Path inside the archive with ``/`` separators (no leading ``/``, no ``..``).
    source : bytes or FileSlice
        The content.
    crc32 : int
        CRC-32 of the content (:func:`file_crc32` or :func:`zlib.crc32`).
    """

    name: str
    source: bytes | FileSlice
    crc32: int

    @property
    def size(self) -> int:
        """Content size in bytes."""
        return len(self.source) if isinstance(self.source, bytes) else self.source.size

    @classmethod
    def of_bytes(cls, name: str, data: bytes) -> Member:
        """A member holding ``data`` (its CRC computed here)."""
        return cls(name, data, zlib.crc32(data))


def file_crc32(path: Path, offset: int = 0, size: int | None = None) -> int:
    """CRC-32 of ``size`` bytes of ``path`` from ``offset`` (to the end if ``None``).

    Raises
    ------
    OSError
        If the file cannot be read or is shorter than asked.
    """
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = size
        while left is None or left > 0:
            chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                if left:
                    raise OSError(f"{path} is shorter than expected")
                break
            crc = zlib.crc32(chunk, crc)
            if left is not None:
                left -= len(chunk)
    return crc


def _dos_date_time(epoch: float) -> tuple[int, int]:
    t = time.gmtime(max(epoch, 315532800.0))  # DOS dates start in 1980
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return date, clock


def _check_name(name: str) -> bytes:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or (
        "\\" in name or "\x00" in name
    ):
        raise ValueError(f"unsafe zip member name {name!r}")
    return name.encode("utf-8")


class ZipLayout:
    """The byte layout of a STORED zip of ``members``.

    Parameters
    ----------
    members : sequence of Member
        Entries in archive order; names must be unique.
    mtime : float
        Modification time written for every entry (Unix time, as UTC). A fixed
        value keeps the archive's bytes the same whenever it is produced.
    zip64_limit : int, optional
        Threshold for ZIP64 fields; lower it only to test ZIP64 with small data.

    Attributes
    ----------
    size : int
        Total size of the archive in bytes.
    mtime : float
        The entries' modification time.
    entry_offsets : list of int
        Offset of each member's local header.
    """

    def __init__(self, members: Sequence[Member], mtime: float, *,
                 zip64_limit: int = ZIP64_LIMIT) -> None:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError("duplicate zip member names")
        self.members = list(members)
        self.mtime = mtime
        self._limit = zip64_limit
        date, clock = _dos_date_time(mtime)
        starts: list[int] = []
        pieces: list[bytes | FileSlice] = []
        central: list[bytes] = []
        self.entry_offsets: list[int] = []
        position = 0
        for member in self.members:
            header, entry = self._headers(member, position, date, clock)
            self.entry_offsets.append(position)
            starts.append(position)
            pieces.append(header)
            position += len(header)
            if member.size:
                starts.append(position)
                pieces.append(member.source)
                position += member.size
            central.append(entry)
        directory = b"".join(central)
        tail = directory + self._end_records(len(self.members), position, len(directory))
        starts.append(position)
        pieces.append(tail)
        self.central_directory_offset = position
        self.size = position + len(tail)
        self._starts = starts
        self._pieces = pieces

    def _headers(self, member: Member, offset: int, date: int, clock: int) -> tuple[bytes, bytes]:
        """The local header and the central directory entry of ``member``."""
        name = _check_name(member.name)
        flags = 0 if member.name.isascii() else _UTF8_NAMES
        size = member.size
        big_size = size >= self._limit
        big_offset = offset >= self._limit
        version = _VERSION_ZIP64 if big_size or big_offset else _VERSION_DEFAULT
        crc = member.crc32 & 0xFFFFFFFF

        local_extra = struct.pack("<HHQQ", 1, 16, size, size) if big_size else b""
        stored_size = ZIP64_LIMIT if big_size else size
        local = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, flags, 0, clock, date, crc,
            stored_size, stored_size, len(name), len(local_extra),
        ) + name + local_extra

        fields: list[int] = []
        if big_size:
            fields += [size, size]
        if big_offset:
            fields.append(offset)
        central_extra = (struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
                         if fields else b"")
        entry = struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, _MADE_BY_UNIX | version, version, flags, 0,
            clock, date, crc, stored_size, stored_size, len(name), len(central_extra), 0, 0,
            0, _FILE_MODE, ZIP64_LIMIT if big_offset else offset,
        ) + name + central_extra
        return local, entry

    def _end_records(self, count: int, cd_offset: int, cd_size: int) -> bytes:
        """ZIP64 end record and locator when needed, then the end of central directory."""
        zip64 = (count >= ZIP_COUNT_LIMIT or cd_offset >= self._limit
                 or cd_size >= self._limit)
        out = b""
        if zip64:
            zip64_end_offset = cd_offset + cd_size
            out += struct.pack(
                "<IQHHIIQQQQ", 0x06064B50, 44, _MADE_BY_UNIX | _VERSION_ZIP64, _VERSION_ZIP64,
                0, 0, count, count, cd_size, cd_offset,
            )
            out += struct.pack("<IIQI", 0x07064B50, 0, zip64_end_offset, 1)
        # As Python's zipfile does: values that fit stay, others read -1 (APPNOTE 4.4.1.4).
        out += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(count, ZIP_COUNT_LIMIT),
            min(count, ZIP_COUNT_LIMIT), min(cd_size, ZIP64_LIMIT),
            min(cd_offset, ZIP64_LIMIT), 0,
        )
        return out

    def pieces(self, start: int = 0, stop: int | None = None) -> Iterator[bytes | FileSlice]:
        """Yield the pieces covering bytes ``start`` to ``stop`` (exclusive).

        Only the pieces that overlap the range are visited: a range near the end
        costs nothing for the bytes before it.

        Raises
        ------
        ValueError
            If the range lies outside the archive.
        """
        stop = self.size if stop is None else stop
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"range {start}-{stop} outside 0-{self.size}")
        if start == stop:
            return
        index = bisect.bisect_right(self._starts, start) - 1
        while index < len(self._pieces):
            piece_start = self._starts[index]
            if piece_start >= stop:
                return
            piece = self._pieces[index]
            length = len(piece) if isinstance(piece, bytes) else piece.size
            lo = max(start, piece_start) - piece_start
            hi = min(stop, piece_start + length) - piece_start
            if hi > lo:
                if isinstance(piece, bytes):
                    yield piece[lo:hi]
                else:
                    yield FileSlice(piece.path, piece.offset + lo, hi - lo, piece.key)
            index += 1


def read_slice(piece: FileSlice, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the bytes of ``piece`` in chunks of at most ``chunk`` bytes.

    Raises
    ------
    OSError
        If the file is gone or shorter than the slice (it changed since planning).
    """
    with open(piece.path, "rb") as fh:
        fh.seek(piece.offset)
        left = piece.size
        while left:
            data = fh.read(min(chunk, left))
            if not data:
                raise OSError(f"{piece.path} is shorter than planned")
            left -= len(data)
            yield data


def iter_batches(layout: ZipLayout, start: int = 0, stop: int | None = None,
                 size: int = CHUNK) -> Iterator[bytes]:
    """Yield the archive's bytes in batches of about ``size`` bytes (at most ~2x ``size``).

    Small pieces (headers, small files) are joined with their neighbours, so a
    writer makes one call per batch instead of two per member; file data is read in
    chunks of at most ``size``. Memory held: one batch.
    """
    buffer: list[bytes] = []
    held = 0
    for piece in layout.pieces(start, stop):
        chunks = [piece] if isinstance(piece, bytes) else read_slice(piece, size)
        for chunk in chunks:
            buffer.append(chunk)
            held += len(chunk)
            if held >= size:
                yield buffer[0] if len(buffer) == 1 else b"".join(buffer)
                buffer, held = [], 0
    if buffer:
        yield b"".join(buffer)


def iter_bytes(layout: ZipLayout, start: int = 0, stop: int | None = None,
               chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the archive's bytes from ``start`` to ``stop`` in chunks (files read lazily)."""
    for piece in layout.pieces(start, stop):
        if isinstance(piece, bytes):
            yield piece
        else:
            yield from read_slice(piece, chunk)
