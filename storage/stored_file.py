"""Is a stored instance file usable? One decision for file-sets, downloads and sends.

Files already in the store can go bad in the field: cut short by a full disk or a
crash before the node synced them, overwritten by a stray tool, emptied, deleted,
or made unreadable by a change of owner or mode. :func:`read_instance_header`
reads a stored Part-10 file's header (everything before the pixel data, large
values left on disk) and checks, at the cost of one more small read, that the
file holds every byte its elements declare:

- the file can be opened and read, and is not empty;
- it is a Part-10 file whose File Meta and dataset header parse;
- no element declared before the pixel data ends beyond the end of the file;
- the pixel data (when present) fits in the file: a defined length must end
  within it, and encapsulated pixel data must run through its fragments to the
  Sequence Delimitation Item (each fragment header is read, not its data).

A file that fails raises :class:`UnreadableFile`, whose ``reason`` says what is
wrong in plain words (no paths: it is shown to recipients in a package's
README.TXT). Deflated files are inflated whole by pydicom while reading, and
zlib refuses a truncated stream, so they need no size checks of their own.
Content that is complete but wrong (a valid file with other bytes) is not
detected here: the file store never rewrites a file in place, and the download
zip carries each file's CRC-32, so a reader of the zip would notice.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["DEFER_SIZE", "UnreadableFile", "read_instance_header", "unreadable_reason"]

#: Values at least this long stay on disk until read (encapsulated documents...).
DEFER_SIZE = 64 * 1024
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: where pydicom stops.
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}


class UnreadableFile(Exception):
    """A stored file that cannot serve as the instance it should be.

    Attributes
    ----------
    reason : str
        What is wrong, in plain words and without paths, e.g. ``"the stored file is
        cut short (truncated)"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_instance_header(path: Path, *, defer_size: int = DEFER_SIZE) -> Dataset:
    """Read a stored instance's header after checking that the file is whole and readable.

    Parameters
    ----------
    path : Path
        The stored Part-10 file.
    defer_size : int, optional
        Values longer than this are not read (pydicom reads them from ``path`` when
        they are accessed).

    Returns
    -------
    Dataset
        The dataset up to (not including) its pixel data, with its File Meta.

    Raises
    ------
    UnreadableFile
        If the file is missing, cannot be read, is empty, is not a Part-10 file,
        has a header that does not parse, or is shorter than its elements declare.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the checks
    except FileNotFoundError:
        raise UnreadableFile("the stored file is missing") from None
    except PermissionError:
        raise UnreadableFile("the stored file cannot be opened (permission denied)") from None
    except IsADirectoryError:
        raise UnreadableFile("the stored file is a folder, not a file") from None
    except OSError as exc:
        raise UnreadableFile(f"the stored file cannot be opened ({_strerror(exc)})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise UnreadableFile("the stored file is empty (0 bytes)")
        try:
            ds = dcmread(fh, stop_before_pixels=True, defer_size=defer_size)
        except InvalidDicomError:
            raise UnreadableFile("the stored file is not a DICOM Part-10 file") from None
        except OSError as exc:
            raise UnreadableFile(f"the stored file cannot be read ({_strerror(exc)})") from None
        except Exception:  # pydicom meets a broken file in many ways
            raise UnreadableFile("the stored file's DICOM header is damaged") from None
        if str(ds.file_meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            _check_complete(ds, fh, size)
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        # The SOP Common module (PS3.3 C.12.1) leads every instance: a file cut short
        # soon after its File Meta ends before them.
        raise UnreadableFile("the stored file lacks its SOP Class or SOP Instance UID "
                             "(cut short or damaged)")
    return ds


def unreadable_reason(path: Path) -> str | None:
    """Why the stored file at ``path`` is unusable (see :func:`read_instance_header`).

    Returns
    -------
    str or None
        The reason in plain words, or ``None`` when the file is usable.
    """
    try:
        read_instance_header(path)
    except UnreadableFile as exc:
        return exc.reason
    return None


def _strerror(exc: OSError) -> str:
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


_TRUNCATED = "the stored file is cut short (truncated)"


def _check_complete(ds: Dataset, fh: BinaryIO, size: int) -> None:
    """Raise :class:`UnreadableFile` unless the file holds every byte ``ds`` declares."""
    # Elements follow one another, so only the last one read can end beyond the end
    # of the file (pydicom stops at the first short read after it).
    last_end: int | None = None
    last = next(reversed(ds.keys()), None)
    if last is not None:
        elem = ds.get_item(last, keep_deferred=True)
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is not None and length is not None and length != _UNDEFINED:
            last_end = tell + length  # else a parsed sequence: its end is not kept
            if last_end > size:
                raise UnreadableFile(_TRUNCATED)
    position = fh.tell()
    if position < size:  # pydicom stopped before the pixel data: check it and what follows
        _walk_to_end(fh, position, size, ds.is_little_endian is not False,
                     bool(ds.is_implicit_VR))
        return
    if last_end is not None and last_end != size:
        raise UnreadableFile(_TRUNCATED)  # a partial element header at the end
    if "Rows" in ds and "Columns" in ds and "SpectroscopyData" not in ds:
        # An image whose file ends before its pixel data: cut at an element boundary.
        raise UnreadableFile(_TRUNCATED)


def _walk_to_end(fh: BinaryIO, position: int, size: int, little: bool,
                 implicit: bool) -> None:
    """Check, header by header, that the elements from ``position`` on fit in the file."""
    end = "<" if little else ">"
    while position < size:
        fh.seek(position)
        header = fh.read(8)
        if len(header) < 8:
            raise UnreadableFile(_TRUNCATED)
        group, element = struct.unpack(f"{end}HH", header[:4])
        if implicit:
            (length,) = struct.unpack(f"{end}I", header[4:8])
            position += 8
        elif header[4:6] in _LONG_VRS:
            more = fh.read(4)
            if len(more) < 4:
                raise UnreadableFile(_TRUNCATED)
            (length,) = struct.unpack(f"{end}I", more)
            position += 12
        else:
            (length,) = struct.unpack(f"{end}H", header[6:8])
            position += 8
        if length == _UNDEFINED:
            if (group << 16 | element) not in _PIXEL_TAGS:
                return  # an undefined-length sequence after the pixel data: not followed
            position = _walk_fragments(fh, position, size, end)
            continue
        position += length
        if position > size:
            raise UnreadableFile(_TRUNCATED)


def _walk_fragments(fh: BinaryIO, position: int, size: int, end: str) -> int:
    """Follow encapsulated pixel data item by item (headers only) past its delimiter."""
    while True:
        fh.seek(position)
        header = fh.read(8)
        if len(header) < 8:
            raise UnreadableFile(_TRUNCATED)
        group, element, length = struct.unpack(f"{end}HHI", header)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position
        if tag != _ITEM or length == _UNDEFINED:
            raise UnreadableFile("the stored file's pixel data is damaged")
        position += length
        if position > size:
            raise UnreadableFile(_TRUNCATED)
