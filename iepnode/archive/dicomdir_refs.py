"""How CD copies name their files, and the file references a DICOMDIR holds.

Read by the bulk import (:mod:`iepnode.archive.import_sources`) and by the upload
review: names are compared as CD copies vary them (:func:`iso_name`), and DICOMDIR
File IDs are checked for escapes and resolved case-insensitively under a folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from iepnode.errors import BadDataset


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



#: Public names for other readers of CD copies (the upload review).
iso_name = _iso_name
read_dicomdir = _read_dicomdir
