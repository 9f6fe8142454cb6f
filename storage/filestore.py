"""The file store: instance files kept under generated keys.

A file's name on disk is ``objects/<first two key characters>/<key>``; keys are
random, never taken from DICOM values. Writes go to a staging folder on the same
file system, are flushed, then renamed into place, so a reader or a crash never
sees half a file under a key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

_KEY_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def new_key(length: int = 16) -> str:
    """Return a random key of upper-case letters and digits (~82 bits for 16)."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(length))


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if not key or not key.isalnum() or not key.isascii():
            raise ValueError(f"malformed store key {key!r}")
        return self.root / key[:2] / key

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
