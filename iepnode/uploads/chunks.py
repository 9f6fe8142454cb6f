"""One chunk of an upload file: appended under an exclusive lock, and the protocol's errors.

The resumable chunk protocol (:mod:`iepnode.uploads.staging`, :mod:`web.upload`) writes
each chunk through a :class:`ChunkWriter`; a chunk that does not start where the staged
file ends, overruns its file, or meets another writer of the same file is refused with
one of the exceptions below (each an HTTP 409 or 413 at the edge).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from iepnode.errors import InvalidRequest


class OffsetMismatch(InvalidRequest):
    """A chunk does not start where the staged file ends (HTTP 409); see ``offset``."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"the file continues at byte {offset}")
        self.offset = offset


class TooLarge(InvalidRequest):
    """A file or upload is over the configured limits, or a chunk overruns its file."""


class FileBusy(InvalidRequest):
    """Another request is writing this file right now (HTTP 409; try again)."""


class ChunkWriter:
    """Appends one chunk to a staged file, holding an exclusive lock on it.

    Parameters
    ----------
    path : Path
        The staged file (created when the file was announced).
    size : int
        The file's announced size: writing past it raises :class:`TooLarge`.
    offset : int
        Where the client says its chunk starts; must equal the staged size.

    Raises
    ------
    FileBusy
        Another request holds the file's lock.
    OffsetMismatch
        ``offset`` is not the staged size (the client should ask for it and resume).
    """

    def __init__(self, path: Path, size: int, offset: int) -> None:
        self.size = size
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise FileBusy("this file is being written by another request") from None
        current = os.fstat(self._fd).st_size
        if current != offset:
            os.close(self._fd)
            raise OffsetMismatch(current)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self.position = offset
        self.file_id = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (all of it, or :class:`TooLarge` and nothing)."""
        if self.position + len(data) > self.size:
            raise TooLarge(f"more bytes than the {self.size} announced for this file")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.position += written

    def close(self) -> bool:
        """Release the file; return whether it is complete (then it is fsynced first)."""
        complete = self.position == self.size
        try:
            if complete:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return complete
