"""Damage stored files the ways they go bad in the field (the bad-file tests, issue 13).

Each damage is done in place, as a failing disk, a stray tool or an operator would:
the inode stays, so hard links (file-set members) see it too.

Root reads any file whatever its mode (``CAP_DAC_OVERRIDE``), so the ``unreadable``
damage (``chmod 000``) only shows in a process without that capability:
:func:`without_permission_override` gives the command prefix that starts one
(``setpriv`` dropping ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``), so the
real node and CLI meet a real ``EACCES`` even when the tests run as root.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

#: The damages, in the order the tests apply them.
DAMAGES = ("truncated", "garbage", "empty", "missing", "unreadable")
#: The reason each damage must be reported with, after "the stored file ".
REASONS = {
    "truncated": "is cut short (truncated)",
    "garbage": "is not a DICOM Part-10 file",
    "empty": "is empty (0 bytes)",
    "missing": "is missing",
    "unreadable": "cannot be opened (permission denied)",
}
SETPRIV = Path("/usr/bin/setpriv")


def damage(path: Path, how: str) -> None:
    """Damage the file at ``path`` in place, one of :data:`DAMAGES`."""
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "garbage":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write(random.Random(size).randbytes(size))
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "missing":
        path.unlink()
    elif how == "unreadable":
        path.chmod(0)
    else:
        raise ValueError(how)


def permissions_apply_here() -> bool:
    """Whether this process is refused files by their mode (not root)."""
    return os.geteuid() != 0


def without_permission_override() -> list[str]:
    """Command prefix for a process that file modes apply to, even when run as root."""
    if permissions_apply_here():
        return []
    if not SETPRIV.is_file():
        raise AssertionError(f"{SETPRIV} not found: install util-linux")
    caps = "-dac_override,-dac_read_search"
    return [str(SETPRIV), f"--inh-caps={caps}", f"--bounding-set={caps}"]
