"""CRC-32 of stored files, computed once and kept in the index.

A download zip carries each member's CRC-32 in its local header (see
:mod:`iepnode.sharing.zipstream`), so the CRCs must be known before the first byte is sent,
and a resumed download (HTTP ``Range``) must find the same values. A stored file is
never rewritten under its key, so its CRC is computed once (reading the file in
1 MiB chunks, ~5 GB/s of CPU) and kept in :class:`~storage.models.InstanceChecksum`.
Housekeeping fills the table when a study becomes stable; a download computes what
is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from iepnode.sharing.zipstream import file_crc32
from storage.queries import downloads as queries

log = logging.getLogger("iepnode.checksums")

#: Keys per ``IN (...)`` list (SQLite allows 32766 parameters; stay well below).
_BATCH = 500


def known_crcs(keys: Sequence[str]) -> dict[str, int]:
    """Return the cached CRC-32 of each of ``keys`` that has one."""
    found: dict[str, int] = {}
    for i in range(0, len(keys), _BATCH):
        found.update(queries.cached_crcs(keys[i:i + _BATCH]))
    return found


def crcs_for(files: Sequence[tuple[str, Path]],
             progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Return the CRC-32 of every ``(key, path)``, computing and caching missing ones.

    Parameters
    ----------
    files : sequence of (str, Path)
        File-store keys and their paths.
    progress : callable, optional
        Called with the number of bytes read, as files are checksummed.

    Raises
    ------
    OSError
        If a file without a cached CRC cannot be read.
    """
    crcs = known_crcs([key for key, _ in files])
    missing = [(key, path) for key, path in files if key not in crcs]
    fresh: dict[str, int] = {}
    for key, path in missing:
        fresh[key] = file_crc32(path)
        if progress is not None:
            progress(path.stat().st_size)
    if fresh:
        _remember(fresh)
        log.info("computed the CRC-32 of %d stored files", len(fresh))
    crcs.update(fresh)
    return crcs


def _remember(crcs: dict[str, int]) -> None:
    rows = [{"instance": key, "crc32": crc} for key, crc in crcs.items()]
    for i in range(0, len(rows), _BATCH):
        if not queries.cache_crcs(rows[i:i + _BATCH]):
            # An instance was deleted meanwhile (its key no longer exists): nothing to keep.
            log.info("some checksummed files were deleted meanwhile; not cached")


def cache_study(study_uid: str, path_of: Callable[[str], Path], *,
                exclude: Collection[str] = ()) -> int:
    """Compute and cache the CRC-32 of a study's files that lack one; return how many.

    A file that cannot be read is skipped (the others are still cached): a CRC is
    only worth keeping for a file a package can hold.

    Parameters
    ----------
    study_uid : str
        The study.
    path_of : callable
        The file store's key -> path function.
    exclude : collection of str, optional
        Store keys not to checksum (files already known to be unusable).
    """
    keys = [key for key in queries.instance_keys_of_study(study_uid) if key not in exclude]
    known = known_crcs(keys)
    fresh: dict[str, int] = {}
    for key in keys:
        if key in known:
            continue
        try:
            fresh[key] = file_crc32(path_of(key))
        except OSError as exc:  # removed or unreadable: the next pass sees the new state
            log.info("checksum of file %s of study %s not cached: %s", key, study_uid,
                     exc.strerror or exc)
    if fresh:
        _remember(fresh)
        log.info("computed the CRC-32 of %d stored files", len(fresh))
    return len(fresh)
