"""Archive limits: what a zip, or one file in it, may be before it is refused as a bomb.

One set of limits for every way archives come in: staff imports (:mod:`.importer`,
``iepnode import``) and recipients' uploads (:mod:`iepnode.uploads.intake`, which
checks the whole archive with :func:`archive_problem` and then reads it with the
importer). Sizes are what the zip declares; the importer also counts the bytes as
they come out (declared sizes are not trusted) against the same limits.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ZipLimits:
    """What a zip may hold before it, or one of its entries, is refused.

    Attributes
    ----------
    max_entries : int
        Entries (files and folders) in the archive.
    max_total : int
        Sum of the entries' expanded sizes (bytes), as the archive declares them.
    max_ratio : float
        Expanded total over archive size, for archives expanding beyond ``ratio_floor``.
    ratio_floor : int
        Below this expanded total (bytes) the overall ratio is not checked.
    max_entry : int
        Largest single entry, and largest single object of any import (bytes).
    max_entry_ratio : int
        An entry above ``entry_ratio_floor`` expanding more than this many times its
        compressed size is refused as a zip bomb.
    entry_ratio_floor : int
        Below this size (bytes) an entry's ratio is not checked.
    max_dicomdir : int
        A DICOMDIR larger than this is not read (bytes).
    """

    max_entries: int = 50_000
    max_total: int = 16 << 30
    max_ratio: float = 100.0
    ratio_floor: int = 64 << 20
    max_entry: int = 4 << 30
    max_entry_ratio: int = 200
    entry_ratio_floor: int = 1 << 20
    max_dicomdir: int = 64 << 20


#: The limits of uploads (one person's CD or zip).
DEFAULT_LIMITS = ZipLimits()
#: The limits of ``iepnode import`` (staff importing a hospital's bulk zip): the same
#: rules, with room for a larger whole archive (64 GiB, as before the rules were joined).
IMPORT_LIMITS = replace(DEFAULT_LIMITS, max_total=64 << 30)


def inflates_too_far(expanded: int, packed: int | None,
                     limits: ZipLimits = DEFAULT_LIMITS) -> bool:
    """Whether ``expanded`` bytes out of ``packed`` compressed ones look like a zip bomb.

    Parameters
    ----------
    expanded : int
        Bytes the entry expands to (declared, or counted so far).
    packed : int or None
        Its compressed size; ``None`` for a file that is not in an archive.
    limits : ZipLimits, optional
        The limits (``max_entry_ratio`` above ``entry_ratio_floor``).
    """
    if packed is None or expanded <= limits.entry_ratio_floor:
        return False
    return packed == 0 or expanded / packed > limits.max_entry_ratio


def archive_problem(infos: Sequence[zipfile.ZipInfo], archive_size: int,
                    limits: ZipLimits = DEFAULT_LIMITS) -> str | None:
    """Why a whole zip is refused before any entry is read, or ``None``.

    Parameters
    ----------
    infos : sequence of zipfile.ZipInfo
        Every entry of the archive (its central directory).
    archive_size : int
        The archive's own size on disk (bytes).
    limits : ZipLimits, optional
        The limits (tests lower them).
    """
    if len(infos) > limits.max_entries:
        return f"zip has {len(infos)} entries, more than the limit of {limits.max_entries}"
    total = sum(i.file_size for i in infos)
    if total > limits.max_total:
        return (f"zip expands to {total} bytes, more than the limit of {limits.max_total} "
                "(zip bomb?)")
    size = max(archive_size, 1)
    if total > limits.ratio_floor and total / size > limits.max_ratio:
        return (f"zip expands {total // size} times its size (over {limits.max_ratio:g}:1): "
                "looks like a zip bomb")
    big = [i for i in infos if i.file_size > limits.max_entry]
    if big:
        return f"zip entry of {big[0].file_size} bytes exceeds the {limits.max_entry}-byte limit"
    return None
