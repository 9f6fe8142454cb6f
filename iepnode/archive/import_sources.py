"""What a bulk import looks at: its report, its candidate objects, and their discovery.

:func:`discover` lists the candidates in a folder, a DICOMDIR or a zip (see
:mod:`iepnode.archive.importer` for what is read); unsafe zip entries, links and
DICOMDIR references to missing files are recorded in the :class:`ImportReport`
before anything is read. The limits named here are those of
:mod:`iepnode.archive.limits`.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from iepnode.archive.dicomdir_refs import (
    _display,
    _file_id_error,
    _FolderLookup,
    _is_dicomdir_name,
    _iso_name,
    _read_dicomdir,
    _Reference,
)
from iepnode.archive.limits import IMPORT_LIMITS, inflates_too_far
from iepnode.errors import BadDataset

log = logging.getLogger("iepnode.import")

# The limits are those of iepnode.archive.limits (one set for imports and uploads);
# these names say them in the messages below.
#: A zip entry above 1 MiB expanding more than this many times its compressed size
#: is refused as a zip bomb.
MAX_COMPRESSION_RATIO = IMPORT_LIMITS.max_entry_ratio
#: No single object above this size is imported (bytes).
MAX_OBJECT_SIZE = IMPORT_LIMITS.max_entry
#: A zip whose entries add up to more than this is refused as a whole (bytes).
MAX_ZIP_TOTAL = IMPORT_LIMITS.max_total
#: A DICOMDIR larger than this is not read (bytes).
MAX_DICOMDIR_SIZE = IMPORT_LIMITS.max_dicomdir

_SUPPORTED_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                          zipfile.ZIP_LZMA}
_HEAD = 132
_MAX_REASON = 300


@dataclass
class ImportReport:
    """What an import did.

    Attributes
    ----------
    stored, duplicates : int
        Objects stored, and objects already in the index (first copy kept).
    rejected : list of (str, str)
        ``(name, reason)`` of every object or entry refused: nothing was stored for it.
    skipped : list of (str, str)
        ``(name, reason)`` of files that are not DICOM instances (README, DICOMDIR...).
    """

    stored: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped_not_dicom(self) -> int:
        """Number of files skipped because they are not DICOM instances."""
        return len(self.skipped)

    @property
    def total(self) -> int:
        """Number of files and entries looked at."""
        return self.stored + self.duplicates + len(self.rejected) + len(self.skipped)

    def refuse(self, name: str, reason: str) -> None:
        """Record that ``name`` was refused for ``reason`` (and log it)."""
        reason = " ".join(reason.split())[:_MAX_REASON]
        self.rejected.append((name, reason))
        log.warning("import: %s refused: %s", name, reason)

    def skip(self, name: str, reason: str) -> None:
        """Record that ``name`` was skipped for ``reason`` (and log it)."""
        self.skipped.append((name, reason))
        log.info("import: %s skipped: %s", name, reason)


@dataclass(frozen=True)
class Source:
    """One candidate object.

    Attributes
    ----------
    name : str
        Display name (printable; never used to name anything on disk).
    size : int
        Size in bytes, as found by discovery.
    open : callable
        Returns a new binary file object positioned at the start.
    transfer_syntax : str, optional
        Transfer syntax named by a DICOMDIR record, used for a raw dataset.
    path : Path, optional
        The file itself, when the candidate is one (it is mapped, never copied);
        ``None`` for a zip entry (copied to a temporary file first).
    compressed_size : int, optional
        A zip entry's compressed size: its expansion is checked as its bytes come out.
    """

    name: str
    size: int
    open: Callable[[], BinaryIO]
    transfer_syntax: str | None = None
    path: Path | None = None
    compressed_size: int | None = None


# -- discovery -----------------------------------------------------------------------------


def _file_source(path: Path, transfer_syntax: str | None = None) -> Source:
    return Source(_display(str(path)), path.stat().st_size,
                  lambda: open(path, "rb"),
                  transfer_syntax, path=path)


def _folder_sources(root: Path, report: ImportReport) -> list[Source]:
    files: list[Path] = []
    dicomdirs: list[Path] = []

    def unreadable(exc: OSError) -> None:
        report.refuse(_display(str(exc.filename)), f"cannot list folder: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        for dirname in dirnames:
            if (Path(dirpath) / dirname).is_symlink():
                report.refuse(_display(str(Path(dirpath) / dirname)),
                              "symbolic link (not followed)")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                report.refuse(_display(str(path)), "symbolic link (not followed)")
            elif not path.is_file():
                report.skip(_display(str(path)), "not a regular file")
            elif _is_dicomdir_name(name):
                dicomdirs.append(path)
            else:
                files.append(path)

    hints: dict[Path, str | None] = {}
    lookup = _FolderLookup()
    for dicomdir in dicomdirs:
        try:
            refs = _load_dicomdir(dicomdir)
        except BadDataset as exc:
            report.refuse(_display(str(dicomdir)), str(exc))
            continue
        for path, syntax in _dicomdir_targets(dicomdir, refs, lookup, report):
            hints[path.resolve()] = syntax
    sources = []
    for path in files:
        try:
            sources.append(_file_source(path, hints.get(path.resolve())))
        except OSError as exc:
            report.refuse(_display(str(path)), f"cannot read: {exc.strerror}")
    return sources


def _load_dicomdir(dicomdir: Path) -> list[_Reference]:
    """Read a DICOMDIR file; raise :class:`BadDataset` when it cannot be used."""
    try:
        size = dicomdir.stat().st_size
    except OSError as exc:
        raise BadDataset(f"cannot read DICOMDIR: {exc.strerror}") from exc
    if size > MAX_DICOMDIR_SIZE:
        raise BadDataset(f"DICOMDIR larger than {MAX_DICOMDIR_SIZE} bytes")
    return _read_dicomdir(str(dicomdir))


def _dicomdir_targets(
    dicomdir: Path, refs: list[_Reference], lookup: _FolderLookup, report: ImportReport
) -> list[tuple[Path, str | None]]:
    """Return the existing files a DICOMDIR references, each once.

    The DICOMDIR is recorded as skipped (it is no instance); references to missing or
    unsafe files are refused one by one.
    """
    name = _display(str(dicomdir))
    report.skip(name, "DICOMDIR (file-set directory), not an instance")
    targets: dict[Path, tuple[Path, str | None]] = {}
    for ref in refs:
        path, reason = lookup.resolve(dicomdir.parent, ref.file_id)
        if path is None:
            report.refuse(f"{name} -> {ref.text}", reason)
        else:
            targets.setdefault(path.resolve(), (path, ref.transfer_syntax))
    return list(targets.values())


def _dicomdir_sources(dicomdir: Path, report: ImportReport) -> list[Source]:
    try:
        refs = _load_dicomdir(dicomdir)
    except BadDataset as exc:
        raise BadDataset(f"{dicomdir}: {exc}") from exc
    sources = []
    for path, syntax in _dicomdir_targets(dicomdir, refs, _FolderLookup(), report):
        try:
            sources.append(_file_source(path, syntax))
        except OSError as exc:
            report.refuse(_display(str(path)), f"cannot read: {exc.strerror}")
    return sources


def _unsafe_member(name: str) -> str | None:
    """Return why a zip entry name could escape an extraction folder, or ``None``."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        return "absolute path"
    if ".." in path.parts:
        return "path escapes the archive ('..')"
    return None


def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Return why a zip entry is refused before reading it, or ``None``."""
    reason = _unsafe_member(info.filename)
    if reason is not None:
        return reason
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted entry"
    if info.compress_type not in _SUPPORTED_ZIP_METHODS:
        method = zipfile.compressor_names.get(info.compress_type, str(info.compress_type))
        return f"unsupported compression method {method}"
    if info.file_size > MAX_OBJECT_SIZE:
        return f"entry of {info.file_size} bytes exceeds the {MAX_OBJECT_SIZE}-byte limit"
    if inflates_too_far(info.file_size, info.compress_size):
        ratio = info.file_size // max(info.compress_size, 1)
        return (f"compression ratio {ratio}:1 (over {MAX_COMPRESSION_RATIO}:1) "
                "looks like a zip bomb")
    return None


def _zip_key(parts: Iterable[str]) -> tuple[str, ...]:
    return tuple(_iso_name(p) for p in parts if p not in ("", "."))


def _zip_sources(archive: zipfile.ZipFile, report: ImportReport) -> list[Source]:
    infos = [i for i in archive.infolist() if not i.is_dir()]
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_TOTAL:
        raise BadDataset(f"zip expands to {total} bytes, more than the {MAX_ZIP_TOTAL}-byte "
                         "limit: refused as a whole")

    def opener(info: zipfile.ZipInfo) -> Callable[[], BinaryIO]:
        return lambda: archive.open(info)

    accepted: list[zipfile.ZipInfo] = []
    for info in infos:
        reason = _entry_problem(info)
        if reason is not None:
            report.refuse(_display(info.filename), reason)
        else:
            accepted.append(info)

    by_key = {_zip_key(i.filename.replace("\\", "/").split("/")): i for i in accepted}
    hints: dict[str, str | None] = {}
    entries = []
    for info in accepted:
        parts = info.filename.replace("\\", "/").split("/")
        if not _is_dicomdir_name(parts[-1]):
            entries.append(info)
            continue
        name = _display(info.filename)
        try:
            if info.file_size > MAX_DICOMDIR_SIZE:
                raise BadDataset(f"DICOMDIR larger than {MAX_DICOMDIR_SIZE} bytes")
            with archive.open(info) as fh:
                refs = _read_dicomdir(BytesIO(fh.read()))
        except (BadDataset, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            report.refuse(name, str(exc))
            continue
        report.skip(name, "DICOMDIR (file-set directory), not an instance")
        for ref in refs:
            reason = _file_id_error(ref.file_id)
            target = by_key.get(_zip_key([*parts[:-1], *ref.file_id])) if not reason else None
            if target is None:
                report.refuse(f"{name} -> {ref.text}",
                              reason or "referenced by the DICOMDIR but not in the zip")
            else:
                hints[target.filename] = ref.transfer_syntax
    return [Source(_display(i.filename), i.file_size, opener(i), hints.get(i.filename),
                   compressed_size=i.compress_size)
            for i in entries]


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_HEAD)
    except OSError:
        return b""


def discover(path: Path, report: ImportReport) -> tuple[list[Source], zipfile.ZipFile | None]:
    """List the candidate objects under ``path``.

    Parameters
    ----------
    path : Path
        A folder, a DICOMDIR, a zip or a single file.
    report : ImportReport
        Receives what is refused or skipped before reading (unsafe zip entries,
        DICOMDIR references to missing files, links).

    Returns
    -------
    tuple of (list of Source, zipfile.ZipFile or None)
        The candidates, and the open archive they read from (the caller closes it).

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``path``.
    BadDataset
        If ``path`` is a DICOMDIR or zip that cannot be used at all.
    """
    if path.is_dir():
        return _folder_sources(path, report), None
    if not path.exists():
        raise FileNotFoundError(f"nothing to import: {path} does not exist")
    if _is_dicomdir_name(path.name):
        return _dicomdir_sources(path, report), None
    if not path.is_file():
        raise BadDataset(f"{path} is neither a file nor a folder")
    head = _head(path)
    if head[128:] != b"DICM" and zipfile.is_zipfile(path):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise BadDataset(f"cannot read zip {path}: {exc}") from exc
        try:
            return _zip_sources(archive, report), archive
        except BaseException:
            archive.close()
            raise
    if head.startswith(b"PK\x03\x04") or path.suffix.lower() == ".zip":
        raise BadDataset(f"{path} looks like a zip but cannot be read (truncated or corrupt)")
    return [_file_source(path)], None

