"""Bulk import of a folder, a DICOMDIR or a zip (e.g. a copy of a patient CD).

Imported objects go through the same validation and index as C-STORE. Nothing is
ever written under a name taken from the source: zip entry names are only read,
so ``../`` entries, absolute paths and links cannot write outside the store.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from iepnode.errors import BadDataset, NodeError, OutOfResources
from iepnode.ingest import Ingester, parse_file_meta
from storage.index import Outcome

log = logging.getLogger("iepnode.import")

#: A zip entry expanding more than this many times its compressed size is refused.
MAX_COMPRESSION_RATIO = 200
#: No single object above this size is imported (bytes).
MAX_OBJECT_SIZE = 4 << 30
#: A zip whose entries add up to more than this is refused as a whole (bytes).
MAX_ZIP_TOTAL = 64 << 30
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class ImportReport:
    """What an import did."""

    stored: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped_not_dicom: int = 0

    @property
    def total(self) -> int:
        return self.stored + self.duplicates + len(self.rejected) + self.skipped_not_dicom


@dataclass(frozen=True)
class Source:
    """One candidate object: a display name and a way to read its bytes."""

    name: str
    size: int
    read: Callable[[], bytes]


def _unsafe_member(name: str) -> str | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        return "absolute path"
    if ".." in path.parts:
        return "path escapes the archive ('..')"
    return None


def _zip_sources(archive: zipfile.ZipFile, report: ImportReport) -> Iterator[Source]:
    infos = [i for i in archive.infolist() if not i.is_dir()]
    total = sum(i.file_size for i in infos)
    if total > MAX_ZIP_TOTAL:
        raise BadDataset(f"zip expands to {total} bytes, more than the {MAX_ZIP_TOTAL} limit")
    for info in infos:
        reason = _unsafe_member(info.filename)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            reason = "symbolic link"
        if reason is None and info.file_size > MAX_OBJECT_SIZE:
            reason = f"entry of {info.file_size} bytes exceeds the size limit"
        if reason is None and info.compress_size and (
            info.file_size / info.compress_size > MAX_COMPRESSION_RATIO
            and info.file_size > (1 << 20)
        ):
            reason = (f"compression ratio {info.file_size // info.compress_size}:1 "
                      "looks like a zip bomb")
        if reason is not None:
            report.rejected.append((info.filename, reason))
            log.warning("import: %s refused: %s", info.filename, reason)
            continue

        def read(info: zipfile.ZipInfo = info) -> bytes:
            with archive.open(info) as fh:
                data = fh.read(info.file_size + 1)
            if len(data) > info.file_size:
                raise BadDataset("entry is larger than its header says")
            return data

        yield Source(info.filename, info.file_size, read)


def _file_source(path: Path) -> Source:
    return Source(str(path), path.stat().st_size, path.read_bytes)


def _folder_sources(root: Path) -> Iterator[Source]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield _file_source(path)


def _dicomdir_sources(dicomdir: Path) -> Iterator[Source]:
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(dcmread(dicomdir))
    except Exception as exc:
        raise BadDataset(f"cannot read DICOMDIR {dicomdir}: {exc}") from exc
    root = dicomdir.parent.resolve()
    for instance in fileset:
        path = Path(instance.path).resolve()
        if not path.is_relative_to(root):
            raise BadDataset(f"DICOMDIR references a file outside its folder: {path}")
        yield _file_source(path)


def discover(path: Path, report: ImportReport) -> tuple[list[Source], zipfile.ZipFile | None]:
    """List the candidate objects under ``path`` (folder, DICOMDIR, zip or file)."""
    if path.is_dir():
        dicomdir = path / "DICOMDIR"
        if dicomdir.is_file():
            return list(_dicomdir_sources(dicomdir)), None
        return list(_folder_sources(path)), None
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        return list(_zip_sources(archive, report)), archive
    if path.name.upper() == "DICOMDIR":
        return list(_dicomdir_sources(path)), None
    if path.is_file():
        return [_file_source(path)], None
    raise FileNotFoundError(f"nothing to import at {path}")


def import_one(ingester: Ingester, source: Source, report: ImportReport) -> None:
    """Validate, store and index one object, recording the outcome in ``report``."""
    try:
        data = source.read()
        if len(data) < 132 or data[128:132] != b"DICM":
            report.skipped_not_dicom += 1
            log.info("import: %s skipped: not a DICOM Part-10 file", source.name)
            return
        meta, offset = parse_file_meta(data)
        if meta.sop_class == DICOMDIR_SOP_CLASS:
            report.skipped_not_dicom += 1
            return
        result = ingester.ingest(memoryview(data)[offset:], meta.transfer_syntax,
                                 source_ae="IMPORT")
    except OutOfResources:
        raise
    except (NodeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        report.rejected.append((source.name, str(exc)))
        log.warning("import: %s refused: %s", source.name, exc)
        return
    if result.outcome is Outcome.DUPLICATE_KEPT:
        report.duplicates += 1
    else:
        report.stored += 1


def import_path(
    ingester: Ingester,
    path: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import every DICOM object found at ``path``.

    Parameters
    ----------
    ingester : Ingester
        The node's ingester (same validation and index as C-STORE).
    path : Path
        A folder (recursively), a folder with a DICOMDIR, a DICOMDIR, a zip, or a file.
    progress : callable, optional
        Called as ``progress(done, total)`` after each object.

    Returns
    -------
    ImportReport
        Counts of stored, duplicate, refused and non-DICOM objects.

    Raises
    ------
    OutOfResources
        The store is full or unavailable: the import stops (what was stored stays).
    BadDataset
        The archive as a whole is refused (e.g. it would expand beyond the limit).
    """
    report = ImportReport()
    sources, archive = discover(path, report)
    try:
        for done, source in enumerate(sources, start=1):
            import_one(ingester, source, report)
            if progress is not None:
                progress(done, len(sources))
    finally:
        if archive is not None:
            archive.close()
    return report

