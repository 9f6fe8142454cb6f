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
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from iepnode.archive.dataset_check import (
    DEFAULT_MAX_INFLATED,
    LONG_VRS,
    SHORT_VRS,
    check_dataset,
)
from iepnode.archive.ingest import FileMeta, Ingester, parse_file_meta
from iepnode.archive.limits import IMPORT_LIMITS, inflates_too_far
from iepnode.errors import BadDataset, DatasetMismatch, NodeError, OutOfResources
from storage.index import Outcome

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
#: Zip entries are copied out in blocks of this size.
READ_BLOCK = 1 << 20
#: While an object is checked, the pages behind the check are let go every this many bytes.
FORGET_EVERY = 32 << 20
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: File name endings that declare a DICOM file: such a file that is not DICOM is refused.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

_SUPPORTED_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                          zipfile.ZIP_LZMA}
_HEAD = 132
_VRS = LONG_VRS | SHORT_VRS
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


@dataclass(frozen=True)
class _Layout:
    """Where the dataset of a candidate starts and how it is encoded."""

    meta_start: int | None  # offset of the File Meta group, None for a raw dataset
    raw_syntax: str | None = None  # the guessed transfer syntax of a raw dataset


def _display(name: str) -> str:
    """Return ``name`` with control characters escaped, safe to print on a terminal."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in name)


def _iso_name(name: str) -> str:
    """Normalise a file name as CD copies vary it: case, ISO 9660 ``;1``, trailing dot."""
    name = name.upper()
    if ";" in name:
        name = name.split(";", 1)[0]
    return name.rstrip(".")


def _is_dicomdir_name(name: str) -> bool:
    return _iso_name(name) == "DICOMDIR"


def _named_like_dicom(name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES)


# -- DICOMDIR ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    """A DICOMDIR record's Referenced File ID and transfer syntax."""

    file_id: tuple[str, ...]
    transfer_syntax: str | None

    @property
    def text(self) -> str:
        return _display("\\".join(self.file_id))


def _read_dicomdir(source: str | BinaryIO) -> list[_Reference]:
    """Return the file references of a DICOMDIR (every record, orphans included).

    Raises
    ------
    BadDataset
        If it cannot be read or is not a Media Storage Directory.
    """
    from pydicom import dcmread

    try:
        ds = dcmread(source, force=True)
        records = ds.get("DirectoryRecordSequence")
        if records is None:
            raise BadDataset("not a DICOMDIR (no Directory Record Sequence)")
        refs = []
        for record in records:
            value = record.get("ReferencedFileID")
            if not value:
                continue
            values = [value] if isinstance(value, str) else list(value)
            # Some writers put "DICOM/IM1" in one value instead of DICOM\IM1: split it.
            parts = tuple(part.strip() for v in values for part in str(v).split("/"))
            syntax = record.get("ReferencedTransferSyntaxUIDInFile")
            refs.append(_Reference(parts, str(syntax).strip("\x00 ") if syntax else None))
    except BadDataset:
        raise
    except Exception as exc:  # pydicom raises many kinds on a malformed file
        raise BadDataset(f"unreadable DICOMDIR: {exc}") from exc
    return refs


def _file_id_error(parts: Sequence[str]) -> str | None:
    """Return why a File ID is unsafe or malformed, or ``None`` if it is fine."""
    if not parts:
        return "empty File ID"
    for part in parts:
        if not part or part in (".", "..") or any(c in part for c in "/\\:\x00"):
            return "File ID escapes the file-set or is malformed"
    return None


class _FolderLookup:
    """Case-insensitive lookup of DICOMDIR File IDs under a folder (listings cached)."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, Path]] = {}

    def _child(self, folder: Path, name: str) -> Path | None:
        listing = self._listings.get(folder)
        if listing is None:
            listing = {}
            try:
                for entry in sorted(folder.iterdir()):
                    listing.setdefault(_iso_name(entry.name), entry)
            except OSError:
                pass
            self._listings[folder] = listing
        return listing.get(_iso_name(name))

    def resolve(self, root: Path, parts: Sequence[str]) -> tuple[Path | None, str]:
        """Return the file a File ID names under ``root``, or ``None`` and why not."""
        reason = _file_id_error(parts)
        if reason is not None:
            return None, reason
        current = root
        for part in parts:
            exact = current / part
            child = exact if exact.exists() else self._child(current, part)
            if child is None:
                return None, "referenced by the DICOMDIR but missing"
            current = child
        if current.is_symlink() or not current.resolve().is_relative_to(root.resolve()):
            return None, "referenced file is a link or lies outside the file-set"
        if not current.is_file():
            return None, "referenced by the DICOMDIR but not a file"
        return current, ""


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


# -- validation ----------------------------------------------------------------------------


def _classify(head: bytes) -> _Layout | None:
    """Recognise a DICOM object from its first 132 bytes, or return ``None``."""
    if len(head) >= _HEAD and head[128:132] == b"DICM":
        return _Layout(132)
    if len(head) < 8:
        return None
    if head[:4] == b"DICM":
        return _Layout(4)
    if head[:2] == b"\x02\x00" and head[4:6] in _VRS:
        return _Layout(0)
    if head[:2] == b"\x08\x00":
        if head[4:6] in _VRS:
            return _Layout(None, ExplicitVRLittleEndian)
        if struct.unpack_from("<I", head, 4)[0] < (1 << 16):
            return _Layout(None, ImplicitVRLittleEndian)
    if head[:2] == b"\x00\x08" and head[4:6] in _VRS:
        return _Layout(None, ExplicitVRBigEndian)
    return None


def _meta_at(data: bytes | memoryview, start: int) -> tuple[FileMeta, int]:
    """Parse a File Meta group starting at ``start``; return it and the dataset offset."""
    if start == 132:
        return parse_file_meta(data)
    padded = b"\x00" * 128 + b"DICM" + bytes(data[start:start + (1 << 16)])
    meta, offset = parse_file_meta(padded)
    return meta, start + offset - 132


def _raw_syntax(guess: str, hint: str | None) -> str:
    """Pick the transfer syntax of a raw dataset: the DICOMDIR's if it fits the bytes."""
    if not hint:
        return guess
    try:
        h, g = UID(hint), UID(guess)
        if (h.is_implicit_VR, h.is_little_endian) == (g.is_implicit_VR, g.is_little_endian) \
                and h != DeflatedExplicitVRLittleEndian:
            return str(h)
    except ValueError:
        pass
    return guess


#: An explicit/implicit VR little endian label that the bytes contradict, and the
#: syntax that fits them instead (some writers mislabel; readers cope).
_OTHER_VR = {ExplicitVRLittleEndian: ImplicitVRLittleEndian,
             ImplicitVRLittleEndian: ExplicitVRLittleEndian}


def check_complete(stream: bytes | memoryview, transfer_syntax: str, *,
                   max_inflated: int = DEFAULT_MAX_INFLATED,
                   progress: Callable[[int], None] | None = None) -> tuple[str, bool]:
    """Check that an encoded dataset is whole, without decoding any value.

    The same check as every C-STORE (:func:`iepnode.archive.dataset_check.check_dataset`):
    every element's length is followed to the end of the data, through sequences and
    encapsulated pixel data, and native pixel data must fit the image attributes, so
    a file cut short (a copy interrupted, a CD read error) is refused instead of
    stored. One leniency for old media: a dataset labelled Explicit VR Little Endian
    that is whole as Implicit VR (or the reverse) is accepted under the syntax its
    bytes are in, so the node's File Meta then tells the truth.

    Parameters
    ----------
    stream : bytes or memoryview
        The dataset (no File Meta).
    transfer_syntax : str
        Its transfer syntax UID, as labelled.
    max_inflated : int
        Largest inflated size of a deflated dataset (bytes).
    progress : callable, optional
        Called every :data:`FORGET_EVERY` bytes or so with an offset the check is past
        (the bytes before it are not looked at again): a mapped file lets those pages go.

    Returns
    -------
    tuple of (str, bool)
        The transfer syntax the dataset is encoded in, and ``True`` when its
        top-level Pixel Data is encapsulated (compressed).

    Raises
    ------
    BadDataset
        If an element, item or sequence runs past the end, or the structure is broken.
    """
    try:
        return transfer_syntax, check_dataset(stream, transfer_syntax, max_inflated=max_inflated,
                                              progress=progress, every=FORGET_EVERY
                                              ).encapsulated
    except DatasetMismatch:
        raise
    except BadDataset as first:
        other = _OTHER_VR.get(str(transfer_syntax).strip("\x00 "))
        if other is None:
            raise
        try:
            checked = check_dataset(stream, other, progress=progress, every=FORGET_EVERY)
        except BadDataset:
            raise first from None
        log.info("dataset labelled %s is encoded as %s: stored as such",
                 UID(transfer_syntax).name, other.name)
        return str(other), checked.encapsulated


class _Mapped:
    """An object's bytes, mapped read-only from a file: pages come in when read and can
    be let go (:meth:`forget`), so checking a large object costs little memory."""

    def __init__(self, handle: BinaryIO) -> None:
        size = os.fstat(handle.fileno()).st_size
        self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def forget(self, upto: int) -> None:
        """Let go of the pages before ``upto`` (read again from the file if needed)."""
        whole = upto - upto % mmap.PAGESIZE
        if self._map is not None and whole > 0 and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, 0, min(whole, len(self._map)))

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller kept a view: the collector unmaps it later
                log.debug("mapping still in use; left to the garbage collector")


def _spool(handle: BinaryIO, head: bytes, source: Source, directory: Path | None) -> BinaryIO:
    """Copy the rest of ``handle`` (after ``head``) to an unnamed temporary file.

    The bytes are counted as they come out (declared sizes are not trusted): more than
    the declared size, than :data:`MAX_OBJECT_SIZE`, or (above 1 MiB) more than
    :data:`MAX_COMPRESSION_RATIO` times the compressed size is refused at once.

    Raises
    ------
    BadDataset
        Over one of those limits.
    OSError
        The temporary file cannot be written (disk full).
    """
    spool = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - returned to the caller
    try:
        spool.write(head)
        total = len(head)
        while block := handle.read(READ_BLOCK):
            total += len(block)
            if total > source.size:
                raise BadDataset(f"expands beyond its declared {source.size} bytes")
            if total > MAX_OBJECT_SIZE:
                raise BadDataset(f"larger than the {MAX_OBJECT_SIZE}-byte limit")
            packed = source.compressed_size
            if inflates_too_far(total, packed):
                raise BadDataset(f"expands over {MAX_COMPRESSION_RATIO} times its compressed "
                                 "size: looks like a zip bomb")
            spool.write(block)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return spool


@contextlib.contextmanager
def _mapped(source: Source, directory: Path | None) -> Iterator[tuple[_Mapped | None, bytes]]:
    """The candidate's bytes mapped (``None`` when it is not DICOM), and its first bytes."""
    with source.open() as handle:
        head = handle.read(_HEAD)
        if _classify(head) is None:
            yield None, head
            return
        # A zip entry goes out to a temporary file first; a file is mapped itself.
        backing = _spool(handle, head, source, directory) if source.path is None else handle
        try:
            mapped = _Mapped(backing)
        finally:
            if backing is not handle:
                backing.close()  # the mapping keeps the pages reachable
    try:
        yield mapped, head
    finally:
        mapped.close()


@contextlib.contextmanager
def open_object(source: Source, report: ImportReport, spool_dir: Path | None = None, *,
                max_inflated: int = DEFAULT_MAX_INFLATED,
                ) -> Iterator[tuple[memoryview, str] | None]:
    """Open one candidate and prove it is a whole DICOM instance, without reading it
    into memory.

    Use as ``with open_object(source, report) as loaded:``; the view is valid inside
    the block only (do not keep it, or slices of it, beyond).

    Parameters
    ----------
    source : Source
        The candidate.
    report : ImportReport
        Receives why the candidate is skipped (not DICOM, a DICOMDIR) or refused.
    spool_dir : Path, optional
        Where a zip entry's temporary copy goes (default: the system's temporary folder).
    max_inflated : int
        Largest inflated size of a deflated dataset (bytes).

    Yields
    ------
    tuple of (memoryview, str) or None
        The encoded dataset (no File Meta) and the transfer syntax it is encoded in
        (see :func:`check_complete`); ``None`` when the candidate was skipped or
        refused (recorded in ``report``).

    Raises
    ------
    BadDataset
        The object is DICOM but malformed or truncated, or over a size limit.
    OSError, zipfile.BadZipFile
        It cannot be read.
    """
    if source.size > MAX_OBJECT_SIZE:
        report.refuse(source.name, f"{source.size} bytes exceeds the {MAX_OBJECT_SIZE}-byte "
                                   "limit")
        yield None
        return
    with _mapped(source, spool_dir) as (mapped, head):
        layout = _classify(head)
        if mapped is None or layout is None:
            reason = "empty file" if source.size == 0 else "not DICOM (no DICM prefix, no dataset)"
            if _named_like_dicom(source.name):
                report.refuse(source.name, f"named like DICOM but {reason}")
            else:
                report.skip(source.name, reason)
            yield None
            return
        data = mapped.view
        if len(data) > source.size:
            raise BadDataset("the object is larger than its declared size")
        if layout.meta_start is not None:
            meta, offset = _meta_at(data, layout.meta_start)
            if meta.sop_class == DICOMDIR_SOP_CLASS:
                report.skip(source.name, "DICOMDIR (file-set directory), not an instance")
                yield None
                return
            syntax = meta.transfer_syntax
        else:
            offset = 0
            syntax = _raw_syntax(str(layout.raw_syntax), source.transfer_syntax)
        stream = data[offset:]
        try:
            syntax, encapsulated = check_complete(
                stream, syntax, max_inflated=max_inflated,
                progress=lambda pos: mapped.forget(offset + pos))
            if layout.meta_start is None and encapsulated and not UID(syntax).is_compressed:
                raise BadDataset("raw dataset with compressed pixel data and no known "
                                 "transfer syntax")
            yield stream, syntax
        finally:
            stream.release()


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


#: Public names for other readers of CD copies (the upload review).
iso_name = _iso_name
read_dicomdir = _read_dicomdir
