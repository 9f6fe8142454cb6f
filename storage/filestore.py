"""The file store: instance files kept under generated keys.

A file's name on disk is ``objects/<first two key characters>/<key>``; keys are
random, never taken from DICOM values. Writes go to a staging folder on the same
file system, are flushed, then renamed into place, so a reader or a crash never
sees half a file under a key.

Readers use the verbs, by key: :meth:`FileStore.open` (a binary file object),
:meth:`FileStore.read_range`, :meth:`FileStore.size`, :meth:`FileStore.stream`
(chunks of a byte range) and :meth:`FileStore.reader` (a :class:`RangeReader` that
fills caller's buffers with ``preadv``, asking the page cache first without
waiting for the disk: what the zip download streams with). :meth:`FileStore.path`
remains for code inside ``storage`` and ``iepnode`` that still hands paths to
libraries; ``web`` and ``scp`` never see a path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

_KEY_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Default chunk of :meth:`FileStore.stream` (bytes).
CHUNK = 1 << 20
#: ``preadv(RWF_NOWAIT)``: read only what the page cache holds, never wait for the disk
#: (``None`` where the platform or, once found out, the file system lacks it).
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def new_key(length: int = 16) -> str:
    """Return a random key of upper-case letters and digits (~82 bits for 16)."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(length))


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShortFile(OSError):
    """A stored file ends before the bytes asked for (cut short since it was planned)."""


class RangeReader:
    """Positional reads of one stored object into caller's buffers (no copies).

    Got from :meth:`FileStore.reader`; use it as a context manager (it holds one
    open file descriptor). Safe to use from several threads for distinct buffers.

    Parameters
    ----------
    path : str
        The object's file.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``, waiting for the disk if need be.

        Raises
        ------
        ShortFile
            If the file ends before ``view`` is full.
        OSError
            If reading fails.
        """
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise ShortFile("a stored file is shorter than planned")
            done += got

    def readinto_cached(self, view: memoryview, offset: int) -> int:
        """Fill what of ``view`` the page cache holds now, never waiting for the disk.

        Returns
        -------
        int
            Bytes placed at the start of ``view`` (``0`` when nothing is cached or
            the platform cannot tell; then :meth:`readinto` the rest, off the loop).
        """
        global _NOWAIT
        if _NOWAIT is None:
            return 0
        try:
            return os.preadv(self._fd, [view], offset, _NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:  # RWF_NOWAIT unsupported here: always wait from now on
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _NOWAIT = None
            return 0


class FileStore:
    """Put, open and remove files by generated key.

    Parameters
    ----------
    root : Path
        Folder of the stored objects.
    staging : Path
        Folder for files being written; must be on the same file system as ``root``.
    durable : bool, optional
        ``fsync`` each file and its folder before :meth:`put` returns (default ``True``).
    """

    def __init__(self, root: Path, staging: Path, *, durable: bool = True) -> None:
        self.root = root
        self.staging = staging
        self.durable = durable
        self._root, self._staging = os.fspath(root), os.fspath(staging)
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """Return the path of the object stored under ``key``."""
        return Path(self._file(key))

    def _file(self, key: str) -> str:
        """The object's file name as a plain string (no pathlib: once per member read)."""
        if not key or not key.isalnum() or not key.isascii():
            raise ValueError(f"malformed store key {key!r}")
        return os.path.join(self._root, key[:2], key)

    def open(self, key: str) -> BinaryIO:
        """Open the object under ``key`` for reading (a binary file object; close it).

        Raises
        ------
        ValueError
            If ``key`` is malformed.
        OSError
            If there is no such object or it cannot be read.
        """
        return open(self._file(key), "rb")

    def size(self, key: str) -> int:
        """Return the size in bytes of the object under ``key`` (``OSError`` if none)."""
        return os.stat(self._file(key)).st_size

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the object under ``key`` from ``offset``.

        Raises
        ------
        ShortFile
            If the object ends before ``offset + length``.
        OSError
            If there is no such object or it cannot be read.
        """
        buffer = bytearray(length)
        with self.reader(key) as reader:
            reader.readinto(memoryview(buffer), offset)
        return bytes(buffer)

    def stream(self, key: str, offset: int = 0, length: int | None = None,
               chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield the object's bytes from ``offset`` (``length`` of them, else to the end).

        Chunks are at most ``chunk`` bytes; the file is opened at the first ``next``.

        Raises
        ------
        ShortFile
            If the object ends before ``offset + length``.
        OSError
            If there is no such object or it cannot be read.
        """
        with self.open(key) as fh:
            fh.seek(offset)
            left = length
            while left is None or left > 0:
                data = fh.read(chunk if left is None else min(chunk, left))
                if not data:
                    if left:
                        raise ShortFile(f"stored object {key} is shorter than asked")
                    return
                if left is not None:
                    left -= len(data)
                yield data

    def reader(self, key: str) -> RangeReader:
        """A :class:`RangeReader` of the object under ``key`` (a context manager).

        Raises
        ------
        OSError
            If there is no such object or it cannot be opened.
        """
        return RangeReader(self._file(key))

    def put(self, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
        """Write ``chunks`` as one new object.

        Parameters
        ----------
        chunks : iterable of bytes
            The file's content, in order.

        Returns
        -------
        tuple of (str, int)
            The new key and the number of bytes written.

        Raises
        ------
        OSError
            If writing fails (e.g. ``ENOSPC``); nothing is left behind.
        """
        key = new_key()
        # Plain strings, not pathlib: this runs once per received instance.
        staged = os.path.join(self._staging, key + ".part")
        folder = os.path.join(self._root, key[:2])
        final = os.path.join(folder, key)
        size = 0
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        size += written
                        view = view[written:]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(staged, final)
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
                os.rename(staged, final)
            if self.durable:
                _fsync_dir(folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise
        return key, size

    def adopt(self, source: Path) -> tuple[str, int]:
        """Copy an existing file into the store (used by bulk import).

        Parameters
        ----------
        source : Path
            File to copy; it is read in 1 MiB chunks.

        Returns
        -------
        tuple of (str, int)
            The new key and the size in bytes.
        """
        with open(source, "rb") as fh:
            return self.put(iter(lambda: fh.read(1 << 20), b""))

    def remove(self, key: str) -> None:
        """Delete the object under ``key``; a missing object is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def exists(self, key: str) -> bool:
        """Return ``True`` when an object is stored under ``key``."""
        return self.path(key).is_file()

    def keys(self) -> Iterable[str]:
        """Yield every stored key (for consistency checks)."""
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for entry in sorted(sub.iterdir()):
                    yield entry.name

    def clear_staging(self) -> int:
        """Remove files left in staging by a crash; return how many were removed."""
        removed = 0
        for entry in self.staging.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        return removed
