"""Bulk import of a folder, a DICOMDIR or a zip (e.g. a copy of a patient CD).

Imported objects go through the same validation and index as C-STORE. Nothing is
ever written under a name taken from the source: zip entries are never extracted
(each is read through an unnamed temporary file, see below), so ``../`` entries,
absolute paths and links cannot write outside the store (they are refused all the
same, and reported).

Memory: an object is checked without being read into memory. A file is mapped
(pages come in as the check walks its elements and are let go behind it); a zip
entry is first copied, in :data:`READ_BLOCK` blocks, to an unnamed temporary file
(``spool_dir``: the upload's staging folder when an upload is inspected), its bytes
counted as they come out of the decompressor against its size and expansion limits,
and that file is mapped. So a 400 MB entry costs a few MB of memory, not 400.

What is read
------------
folder
    Every regular file below it (symbolic links are not followed). A DICOMDIR met on
    the way is not imported: it supplies transfer-syntax hints for raw datasets and
    its references to missing files are reported.
DICOMDIR
    The files it references (File IDs matched case-insensitively, as CD copies
    often change the case), and only those.
zip
    Every entry, read within size and compression-ratio limits (counted as the
    bytes come out). A DICOMDIR entry is used as in a folder.
file
    That file.

How an object is recognised
---------------------------
A Part-10 file (preamble and ``DICM``), a File Meta group without preamble, or a raw
dataset without any meta (old CDs, ACR-NEMA style: transfer syntax from the
DICOMDIR or guessed from the first element). Before ingest the whole dataset is
walked element by element, so a truncated file is refused instead of stored.
Anything else is skipped as not DICOM; a file named ``*.dcm`` that is not DICOM is
refused, so it shows up in the report.

The parts: :mod:`iepnode.archive.import_sources` (the report, the candidates, their
discovery), :mod:`iepnode.archive.object_check` (recognising and checking one object),
:mod:`iepnode.archive.dicomdir_refs` (CD names, DICOMDIR references); this module
imports the objects one by one through the ingester.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from iepnode.archive.import_sources import ImportReport, Source, discover
from iepnode.archive.ingest import Ingester
from iepnode.archive.object_check import open_object
from iepnode.errors import NodeError, OutOfResources
from storage.index import Outcome

log = logging.getLogger("iepnode.import")


def _import_one(ingester: Ingester, source: Source, report: ImportReport) -> None:
    with open_object(source, report, max_inflated=ingester.max_inflated) as loaded:
        if loaded is None:
            return
        stream, syntax = loaded
        result = ingester.ingest(stream, syntax, source_ae="IMPORT")
    if result.outcome is Outcome.DUPLICATE_KEPT:
        report.duplicates += 1
    else:
        report.stored += 1


def import_one(ingester: Ingester, source: Source, report: ImportReport) -> None:
    """Validate, store and index one object, recording the outcome in ``report``.

    Parameters
    ----------
    ingester : Ingester
        Where the object goes (same validation and index as C-STORE).
    source : Source
        The candidate.
    report : ImportReport
        Receives the outcome: stored, duplicate, refused (with the reason) or skipped.

    Raises
    ------
    OutOfResources
        The store or index failed; the caller stops the import.
    """
    # pydicom warns about oddities of foreign files: they go to the log, not the terminal
    # (and not to pytest's warnings-as-errors). catch_warnings is process-wide: imports
    # run one at a time (the CLI), not beside other threads parsing DICOM.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _import_one(ingester, source, report)
        except OutOfResources:
            raise
        except NodeError as exc:
            report.refuse(source.name, str(exc))
        except zipfile.BadZipFile as exc:
            report.refuse(source.name, f"corrupt zip entry: {exc}")
        except OSError as exc:
            report.refuse(source.name, f"cannot read: {exc.strerror or exc}")
        except (ValueError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
            report.refuse(source.name, f"unreadable: {exc}")
    for warning in caught:
        log.info("import: %s: %s", source.name, warning.message)


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
        A folder (recursively), a DICOMDIR, a zip, or a file.
    progress : callable, optional
        Called as ``progress(done, total)``: once with ``done=0`` when the candidates
        are known, then after each object.

    Returns
    -------
    ImportReport
        Counts of stored and duplicate objects; refused and skipped ones with reasons.

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path``.
    OutOfResources
        The store is full or unavailable: the import stops (what was stored stays).
    BadDataset
        The DICOMDIR or zip as a whole is refused (unreadable, or it would expand
        beyond :data:`MAX_ZIP_TOTAL`); nothing is stored.
    """
    report = ImportReport()
    sources, archive = discover(path, report)
    try:
        if progress is not None:
            progress(0, len(sources))
        for done, source in enumerate(sources, start=1):
            import_one(ingester, source, report)
            if progress is not None:
                progress(done, len(sources))
    finally:
        if archive is not None:
            archive.close()
    log.info("import of %s: %d stored, %d duplicates, %d refused, %d skipped", path,
             report.stored, report.duplicates, len(report.rejected), len(report.skipped))
    return report

