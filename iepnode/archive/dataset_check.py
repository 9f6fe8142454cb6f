"""Check that an encoded dataset is whole, in one pass, without decoding its values.

This is what a C-STORE Success (and an import, an upload release, an attachment)
promises: the whole dataset parses, not just its header. :func:`check_dataset`
walks the raw bytes with ``struct`` (no pydicom elements are built) and proves:

* every element header is complete and every defined length fits in what remains
  of its enclosing item or dataset (PS3.5 7.1);
* undefined lengths appear only where PS3.5 7.1.2 allows them: sequences, items,
  encapsulated OB/OW values, and UN (read as an Implicit VR Little Endian sequence,
  PS3.5 6.2.2); every sequence and item that opens also closes, with delimiters of
  length 0 (PS3.5 7.5);
* tags ascend within each dataset (PS3.5 7.1), which also catches garbage after a
  valid header that happens to look like elements;
* an encapsulated value is a Basic Offset Table item, fragment items of defined even
  length and a Sequence Delimitation Item, nothing else (PS3.5 A.4);
* native top-level Pixel Data (and Float / Double Float Pixel Data) holds exactly
  Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated / 8 bytes
  (single bits packed, rounded up to whole bytes), plus one padding byte to even
  length (PS3.5 8.1.1, 8.2); top-level Pixel Data is encapsulated exactly when the
  transfer syntax is.

Structural faults raise :class:`~iepnode.errors.BadDataset` (DIMSE 0xC000); the
message starts with ``truncated:`` when the data ends too early, and names the
element and its byte offset. Pixel Data that parses but disagrees with the image
attributes raises :class:`~iepnode.errors.DatasetMismatch` (0xA900).

Deflated datasets are inflated first, up to a cap (``Settings.max_inflated_mb``), so
a deflate bomb costs at most that much memory. Sequences nest at most
:data:`MAX_DEPTH` deep, which also keeps pydicom's recursive header parse safe.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import DicomDictionary
from pydicom.uid import UID, UID_dictionary

from iepnode.errors import BadDataset, DatasetMismatch

#: Deepest nesting of sequences accepted (SR content trees rarely pass 10).
MAX_DEPTH = 32
#: Default cap on the inflated size of a deflated dataset (bytes); see max_inflated_mb.
DEFAULT_MAX_INFLATED = 512 << 20

#: Deflated Explicit VR Little Endian and JPIP Referenced Deflate (PS3.5 A.5, A.7).
DEFLATED_SYNTAXES = frozenset(("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
_SAMPLES, _PHOTOMETRIC, _FRAMES = 0x00280002, 0x00280004, 0x00280008
_ROWS, _COLUMNS, _BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280100
#: Top-level elements whose positions the pixel data check needs.
_NOTED = frozenset((_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS_ALLOCATED,
                    _PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA))
_PIXEL_TAGS = (_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA)
_KEYWORDS = {_SAMPLES: "SamplesPerPixel", _ROWS: "Rows", _COLUMNS: "Columns",
             _BITS_ALLOCATED: "BitsAllocated", _FRAMES: "NumberOfFrames"}

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"))
#: Explicit VRs with a 2-byte length (PS3.5 Table 7.1-2).
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
#: Public tags the dictionary knows as sequences (Implicit VR has no VR on the wire).
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
#: Public tags that are neither SQ nor UN: never of undefined length in Implicit VR.
_NEVER_UNDEFINED = frozenset(tag for tag, entry in DicomDictionary.items()
                             if entry[0] not in ("SQ", "UN")) - {_PIXEL_DATA}


@dataclass(frozen=True)
class Syntax:
    """What the checker needs to know of a transfer syntax."""

    uid: str
    implicit: bool
    little: bool
    deflated: bool
    encapsulated: bool


@lru_cache(maxsize=64)
def syntax_of(transfer_syntax: str) -> Syntax:
    """Describe a transfer syntax UID.

    Raises
    ------
    BadDataset
        If the UID is not a transfer syntax pydicom knows.
    """
    value = str(transfer_syntax).strip("\x00 ")
    if UID_dictionary.get(value, ("", ""))[1] != "Transfer Syntax":
        raise BadDataset(f"unknown transfer syntax {value!r}")
    ts = UID(value)
    return Syntax(value, ts.is_implicit_VR, ts.is_little_endian, value in DEFLATED_SYNTAXES,
                  ts.is_encapsulated)


@dataclass(frozen=True)
class CheckedDataset:
    """The result of :func:`check_dataset`.

    Attributes
    ----------
    plain : bytes or memoryview
        The dataset that was checked: the input itself, or its inflated bytes when
        the transfer syntax is deflated.
    encapsulated : bool
        The top-level Pixel Data is encapsulated (compressed).
    """

    plain: bytes | memoryview
    encapsulated: bool


def inflate(data: bytes | bytearray | memoryview, max_size: int) -> bytes:
    """Inflate a deflated dataset (raw deflate, PS3.5 A.5), refusing more than ``max_size``.

    Raises
    ------
    BadDataset
        If the stream is corrupt, ends early, is followed by more than a padding
        byte, or inflates to more than ``max_size`` bytes.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise BadDataset(f"corrupt deflated dataset: {exc}") from exc
    if len(plain) > max_size:
        raise BadDataset(f"the deflated dataset inflates to more than {max_size} bytes "
                         "(max_inflated_mb)")
    if not inflater.eof:
        raise BadDataset("truncated: the deflated dataset ends early")
    rest = inflater.unused_data
    if rest not in (b"", b"\x00") and not _gzip_trailer(rest, plain):
        raise BadDataset(f"{len(rest)} bytes after the end of the deflated dataset")
    return plain


def _gzip_trailer(rest: bytes, plain: bytes) -> bool:
    """``True`` when ``rest`` is the CRC-32 and size a gzip writer appends (RFC 1952).

    Some encoders (the well-known ``image_dfl`` sample among them) deflate with gzip
    and keep its 8-byte trailer; it is accepted only when it matches the data.
    """
    if len(rest) not in (8, 9) or rest[8:] not in (b"", b"\x00"):
        return False
    crc, size = struct.unpack_from("<LL", rest)
    return crc == zlib.crc32(plain) and size == len(plain) & 0xFFFFFFFF


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    little: bool
    head: struct.Struct  # group, element, then length (implicit) or VR and 2-byte length
    tag: struct.Struct
    u32: struct.Struct


def _encoding(implicit: bool, little: bool) -> _Encoding:
    order = "<" if little else ">"
    return _Encoding(implicit, little, struct.Struct(order + ("HHL" if implicit else "HH2sH")),
                     struct.Struct(order + "HH"), struct.Struct(order + "L"))


_ENCODINGS = {(implicit, little): _encoding(implicit, little)
              for implicit in (True, False) for little in (True, False)}
_IMPLICIT_LE = _ENCODINGS[True, True]


def _fail(offset: int, what: str, tag: int | None = None, *,
          truncated: bool = False) -> BadDataset:
    where = f"element {_name(tag)} at offset {offset}" if tag is not None else f"offset {offset}"
    return BadDataset(f"{'truncated: ' if truncated else ''}{where}: {what}")


class _Walker:
    """One pass over ``buf``; each method returns the offset just past what it read."""

    def __init__(self, buf: bytes | memoryview,
                 progress: Callable[[int], None] | None = None, every: int = 1 << 62) -> None:
        self.buf = buf
        #: top-level tag -> (offset of its header, value offset, value length)
        self.noted: dict[int, tuple[int, int, int]] = {}
        self.progress = progress
        self.every = every
        #: The next top-level offset at which ``progress`` is told (never without one).
        self.due = every if progress is not None else 1 << 62

    def dataset(self, pos: int, end: int, enc: _Encoding, depth: int, *,
                item: bool = False) -> int:
        """Walk the elements of a dataset in ``[pos, end)``.

        ``item``: an undefined-length item, which must close with an Item
        Delimitation Item before ``end``.
        """
        buf, noted = self.buf, self.noted
        head, u32 = enc.head.unpack_from, enc.u32.unpack_from
        implicit, top = enc.implicit, depth == 0
        long_vrs, short_vrs, sq_tags = LONG_VRS, SHORT_VRS, _SQ_TAGS
        last = -1
        while pos < end:
            start = pos
            if top and pos >= self.due:
                assert self.progress is not None
                self.progress(pos)
                self.due = pos + self.every
            if end - pos < 8:
                if top and not any(buf[pos:end]):
                    return end  # a few bytes of trailing zero padding
                raise _fail(pos, f"element header cut after {end - pos} bytes", truncated=True)
            if implicit:
                group, element, length = head(buf, pos)
                vr = b""
                pos += 8
            else:
                group, element, vr, length = head(buf, pos)
                pos += 8
                if group == 0xFFFE:
                    length = u32(buf, start + 4)[0]
                elif vr in long_vrs:
                    if end - pos < 4:
                        raise _fail(start, "element header cut short", group << 16 | element,
                                    truncated=True)
                    length = u32(buf, pos)[0]
                    pos += 4
                elif vr not in short_vrs:
                    raise _fail(start, f"unknown VR {vr!r}", group << 16 | element)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and item:
                    if length:
                        raise _fail(start, f"Item Delimitation Item of length {length}", tag)
                    return pos
                raise _fail(start, "item or delimiter where a data element was expected", tag)
            if tag <= last:
                raise _fail(start, f"tag out of order (after {_name(last)})", tag)
            last = tag
            if length == _UNDEFINED:
                pos = self.undefined(start, pos, end, tag, vr, enc, depth)
            elif length > end - pos:
                raise _fail(start, f"value length {length} exceeds the {end - pos} bytes left",
                            tag, truncated=True)
            else:
                if (tag in sq_tags) if implicit else (vr == b"SQ"):
                    self.sequence(pos, pos + length, enc, depth + 1, start, tag)
                pos += length
            if top and tag in _NOTED:
                noted[tag] = (start, pos - length, length)
        if item:
            raise _fail(end, "an item of undefined length ends without its Item Delimitation "
                        "Item", truncated=True)
        return pos

    def undefined(self, start: int, pos: int, end: int, tag: int, vr: bytes, enc: _Encoding,
                  depth: int) -> int:
        """Walk a value of undefined length; return the offset after its delimiter."""
        if enc.implicit:
            if tag == _PIXEL_DATA:
                return self.encapsulated(start, pos, end, tag, enc)
            if tag in _NEVER_UNDEFINED:
                raise _fail(start, "undefined length on an element that is not a sequence",
                            tag)
            return self.sequence(pos, end, enc, depth + 1, start, tag, undefined=True)
        if vr == b"SQ":
            return self.sequence(pos, end, enc, depth + 1, start, tag, undefined=True)
        if vr == b"UN":
            return self.sequence(pos, end, _IMPLICIT_LE, depth + 1, start, tag, undefined=True)
        if vr in (b"OB", b"OW"):
            return self.encapsulated(start, pos, end, tag, enc)
        raise _fail(start, f"undefined length not allowed for VR {vr.decode()}", tag)

    def sequence(self, pos: int, end: int, enc: _Encoding, depth: int, start: int, tag: int,
                 *, undefined: bool = False) -> int:
        """Walk the items of the sequence ``tag`` in ``[pos, end)``."""
        if depth > MAX_DEPTH:
            raise _fail(start, f"sequences nested deeper than {MAX_DEPTH}", tag)
        buf = self.buf
        tag_of, u32 = enc.tag.unpack_from, enc.u32.unpack_from
        while pos < end:
            at = pos
            if end - pos < 8:
                raise _fail(pos, f"item header cut after {end - pos} bytes in the sequence "
                            f"{_name(tag)}", truncated=True)
            group, element = tag_of(buf, pos)
            item_tag = group << 16 | element
            length = u32(buf, pos + 4)[0]
            pos += 8
            if item_tag == _SEQUENCE_END and undefined:
                if length:
                    raise _fail(at, f"Sequence Delimitation Item of length {length}", item_tag)
                return pos
            if item_tag != _ITEM:
                raise _fail(at, f"not an item of the sequence {_name(tag)}", item_tag)
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, enc, depth, item=True)
            elif length > end - pos:
                raise _fail(at, f"item length {length} exceeds the {end - pos} bytes left in "
                            f"the sequence {_name(tag)}", item_tag, truncated=True)
            else:
                pos = self.dataset(pos, pos + length, enc, depth)
        if undefined:
            raise _fail(start, "sequence of undefined length ends without its Sequence "
                        "Delimitation Item", tag, truncated=True)
        return pos

    def encapsulated(self, start: int, pos: int, end: int, tag: int, enc: _Encoding) -> int:
        """Walk an encapsulated value: Basic Offset Table, fragments, sequence delimiter."""
        buf = self.buf
        tag_of, u32 = enc.tag.unpack_from, enc.u32.unpack_from
        first = True
        while pos < end:
            at = pos
            if end - pos < 8:
                raise _fail(pos, f"item header cut after {end - pos} bytes in the "
                            f"encapsulated {_name(tag)}", truncated=True)
            group, element = tag_of(buf, pos)
            item_tag = group << 16 | element
            length = u32(buf, pos + 4)[0]
            pos += 8
            if item_tag == _SEQUENCE_END:
                if length:
                    raise _fail(at, f"Sequence Delimitation Item of length {length}", item_tag)
                if first:
                    raise _fail(start, "encapsulated value without a Basic Offset Table item",
                                tag)
                return pos
            if item_tag != _ITEM:
                raise _fail(at, f"inside the encapsulated {_name(tag)}, where only items may "
                            "be", item_tag)
            if length == _UNDEFINED:
                raise _fail(at, f"fragment of undefined length in {_name(tag)}", item_tag)
            if length > end - pos:
                raise _fail(at, f"fragment length {length} exceeds the {end - pos} bytes left "
                            f"in {_name(tag)}", item_tag, truncated=True)
            if length & 1:
                raise _fail(at, f"odd fragment length {length} in {_name(tag)}", item_tag)
            if first and length & 3:
                raise _fail(at, f"Basic Offset Table of {length} bytes in {_name(tag)} (not "
                            "a multiple of 4)", item_tag)
            first = False
            pos += length
        raise _fail(start, "encapsulated value ends without its Sequence Delimitation Item",
                    tag, truncated=True)


class _ImageCheck:
    """The top-level pixel data against the image attributes, from their raw bytes."""

    def __init__(self, walker: _Walker, syntax: Syntax) -> None:
        self.buf = walker.buf
        self.noted = walker.noted
        self.syntax = syntax

    def run(self) -> bool:
        """Check the pixel data; return ``True`` when it is encapsulated."""
        encapsulated = False
        for tag in _PIXEL_TAGS:
            found = self.noted.get(tag)
            if found is None:
                continue
            offset, _, length = found
            undefined = length == _UNDEFINED
            if tag == _PIXEL_DATA and self.syntax.encapsulated:
                if not undefined:
                    raise _fail(offset, "native Pixel Data in the encapsulated transfer syntax "
                                f"{self.syntax.uid}", tag)
                encapsulated = True
                continue
            if undefined:
                raise _fail(offset, "encapsulated pixel data in the native transfer syntax "
                            f"{self.syntax.uid}", tag)
            self.native(tag, offset, length)
        return encapsulated

    def native(self, tag: int, offset: int, actual: int) -> None:
        rows = self.us(_ROWS, required=True)
        columns = self.us(_COLUMNS, required=True)
        bits = self.us(_BITS_ALLOCATED, required=True)
        samples = self.us(_SAMPLES) or 1
        frames = self.frames()
        total_bits = rows * columns * samples * frames * bits
        if self.value(_PHOTOMETRIC).strip(b" \x00") == b"YBR_FULL_422":
            total_bits = total_bits // 3 * 2  # chroma shared by each pair of pixels
        expected = (total_bits + 7) // 8
        if actual != expected and not (expected & 1 and actual == expected + 1):
            raise DatasetMismatch(
                f"element {_name(tag)} at offset {offset}: {actual} bytes of pixel data where "
                f"Rows {rows} x Columns {columns} x SamplesPerPixel {samples} x NumberOfFrames "
                f"{frames} x BitsAllocated {bits} make {expected}")

    def value(self, tag: int) -> bytes:
        found = self.noted.get(tag)
        if found is None:
            return b""
        _, at, length = found
        return bytes(self.buf[at:at + length]) if length != _UNDEFINED else b""

    def us(self, tag: int, *, required: bool = False) -> int:
        raw = self.value(tag)
        if not raw:
            if required:
                raise DatasetMismatch(f"{_KEYWORDS[tag]} {_name(tag)} is missing, but the "
                                      "dataset has native pixel data")
            return 0
        if len(raw) != 2:
            raise DatasetMismatch(f"{_KEYWORDS[tag]} {_name(tag)} holds {len(raw)} bytes, not "
                                  "one US value")
        return struct.unpack("<H" if self.syntax.little else ">H", raw)[0]

    def frames(self) -> int:
        text = self.value(_FRAMES).strip(b" \x00")
        if not text:
            return 1
        try:
            frames = int(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DatasetMismatch(f"NumberOfFrames {_name(_FRAMES)} {text!r} is not an "
                                  "integer") from None
        if frames < 1:
            raise DatasetMismatch(f"NumberOfFrames {_name(_FRAMES)} {frames} is not positive")
        return frames


def check_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax: str,
    *,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    progress: Callable[[int], None] | None = None,
    every: int = 32 << 20,
) -> CheckedDataset:
    """Check an encoded dataset (no File Meta) from end to end without decoding values.

    Parameters
    ----------
    data : bytes-like
        The dataset as encoded in ``transfer_syntax`` (deflated if that syntax is).
    transfer_syntax : str
        Its transfer syntax UID.
    max_inflated : int
        Largest inflated size accepted for a deflated dataset (bytes).
    progress : callable, optional
        Told, about every ``every`` bytes of the top-level dataset, an offset the walk
        is past and will not look at again (a caller holding a mapped file lets those
        pages go); offsets are in the plain (inflated) dataset.
    every : int, optional
        How many bytes between two calls of ``progress``.

    Returns
    -------
    CheckedDataset
        The plain (inflated) dataset that was checked, and whether its Pixel Data is
        encapsulated.

    Raises
    ------
    BadDataset
        The dataset is not whole, or not encoded as its transfer syntax says; the
        message names the element and its byte offset (in the inflated dataset when
        deflated), and starts with ``truncated:`` when the data ends too early.
    DatasetMismatch
        The native pixel data's length disagrees with the image attributes, or those
        are missing.
    """
    syntax = syntax_of(transfer_syntax)
    plain = data if isinstance(data, bytes) else memoryview(data).cast("B")
    if syntax.deflated:
        plain = inflate(plain, max_inflated)
    if not len(plain):
        raise BadDataset("empty dataset")
    walker = _Walker(plain, None if syntax.deflated else progress, every)
    try:
        walker.dataset(0, len(plain), _ENCODINGS[syntax.implicit, syntax.little], 0)
    except (struct.error, OverflowError) as exc:  # not expected: every read is bounds-checked
        raise BadDataset(f"cannot parse dataset: {exc}") from exc
    encapsulated = _ImageCheck(walker, syntax).run()
    return CheckedDataset(plain, encapsulated)
