"""Hand-encoded datasets, whole and corrupted byte by byte, for the dataset check.

Elements are packed with ``struct`` (not pydicom's writer), so a test controls every
byte: lengths that lie, delimiters left out, tags out of order. Each corruption in
:data:`CORRUPTIONS` is a complete C-STORE dataset (with valid UIDs, so only the fault
itself can refuse it) and says which error the node must raise, with a pattern of its
message.
"""

from __future__ import annotations

import random
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from iepnode.archive.ingest import file_meta_bytes
from iepnode.errors import BadDataset, DatasetMismatch

ELE, ILE, EBE = ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010


def _order(ts: str) -> str:
    return ">" if ts == EBE else "<"


def element(tag: int, vr: str, value: bytes = b"", *, ts: str = ELE,
            length: int | None = None) -> bytes:
    """One encoded element (``length`` overrides the length field, e.g. ``UNDEFINED``)."""
    order, n = _order(ts), len(value) if length is None else length
    group, elem = tag >> 16, tag & 0xFFFF
    if ts == ILE or group == 0xFFFE:
        return struct.pack(order + "HHL", group, elem, n) + value
    if vr in _LONG:
        return struct.pack(order + "HH2sHL", group, elem, vr.encode(), 0, n) + value
    return struct.pack(order + "HH2sH", group, elem, vr.encode(), n) + value


def item(content: bytes = b"", *, ts: str = ELE, length: int | None = None) -> bytes:
    """An Item (FFFE,E000) holding ``content``."""
    return element(ITEM, "", content, ts=ts, length=length)


def item_end(ts: str = ELE, length: int = 0) -> bytes:
    return element(ITEM_END, "", ts=ts, length=length)


def sequence_end(ts: str = ELE, length: int = 0) -> bytes:
    return element(SEQUENCE_END, "", ts=ts, length=length)


def text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def us(value: int, ts: str = ELE) -> bytes:
    return struct.pack(_order(ts) + "H", value)


@dataclass(frozen=True)
class Image:
    """Image Pixel attributes; ``None`` leaves an attribute out."""

    rows: int | None = 4
    columns: int | None = 4
    bits: int | None = 16
    samples: int | None = 1
    frames: int | None = None
    photometric: str = "MONOCHROME2"

    def frame_bytes(self) -> int:
        bits = (self.rows or 0) * (self.columns or 0) * (self.samples or 1) * (self.bits or 0)
        return (bits * (self.frames or 1) + 7) // 8


def header(sop_uid: str, ts: str = ELE, image: Image | None = Image()) -> bytes:
    """A valid CT header (groups 0008-0028, ascending) naming ``sop_uid``."""
    ui = lambda uid: text(uid, b"\x00")  # noqa: E731
    parts = [
        element(0x00080016, "UI", ui(CTImageStorage), ts=ts),
        element(0x00080018, "UI", ui(sop_uid), ts=ts),
        element(0x00080060, "CS", text("CT"), ts=ts),
        element(0x00100010, "PN", text("Crafted^Case"), ts=ts),
        element(0x00100020, "LO", text("CRAFTED-1"), ts=ts),
        element(0x0020000D, "UI", ui(STUDY_UID), ts=ts),
        element(0x0020000E, "UI", ui(SERIES_UID), ts=ts),
        element(0x00200013, "IS", text("1"), ts=ts),
    ]
    if image is not None:
        if image.samples is not None:
            parts.append(element(0x00280002, "US", us(image.samples, ts), ts=ts))
        parts.append(element(0x00280004, "CS", text(image.photometric), ts=ts))
        if image.frames is not None:
            parts.append(element(0x00280008, "IS", text(str(image.frames)), ts=ts))
        if image.rows is not None:
            parts.append(element(0x00280010, "US", us(image.rows, ts), ts=ts))
        if image.columns is not None:
            parts.append(element(0x00280011, "US", us(image.columns, ts), ts=ts))
        if image.bits is not None:
            parts.append(element(0x00280100, "US", us(image.bits, ts), ts=ts))
    return b"".join(parts)


#: Every crafted instance belongs to this one study and series.
STUDY_UID, SERIES_UID = generate_uid(), generate_uid()


def native_ct(sop_uid: str, ts: str = ELE, image: Image = Image(),
              pixels: int | None = None) -> bytes:
    """A whole native CT instance; ``pixels`` bytes of pixel data (default: what fits)."""
    size = image.frame_bytes() if pixels is None else pixels
    size += size % 2 if pixels is None else 0
    return header(sop_uid, ts, image) + element(PIXEL_DATA, "OW", bytes(size), ts=ts)


def encapsulated(fragments: bytes, ts: str = JPEGBaseline8Bit) -> bytes:
    """Top-level encapsulated Pixel Data with the given items (after the header)."""
    return element(PIXEL_DATA, "OB", fragments, ts=ts, length=UNDEFINED)


def jpeg_ct(sop_uid: str, fragments: bytes | None = None) -> bytes:
    """An instance with encapsulated pixel data: empty offset table, one fragment."""
    if fragments is None:
        fragments = item(b"") + item(b"\xff\xd8" + bytes(10) + b"\xff\xd9") + sequence_end()
    return header(sop_uid, JPEGBaseline8Bit, Image(bits=8)) + encapsulated(fragments)


def deflate(plain: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = compressor.compress(plain) + compressor.flush()
    return out + b"\x00" * (len(out) % 2)


def _offset(stream: bytes, tag: int, vr: str, ts: str = ELE) -> int:
    """Byte offset of the element ``tag`` in ``stream`` (found by its header bytes)."""
    order = _order(ts)
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if ts != ILE:
        head += vr.encode()
    return stream.index(head)


@dataclass(frozen=True)
class Crafted:
    """A dataset to send, and what the node must answer."""

    stream: bytes
    transfer_syntax: str
    sop_uid: str
    error: type[BadDataset]
    message: str  # a regular expression the error's message must match

    @property
    def status(self) -> int:
        """The C-STORE status this dataset must get."""
        return 0xA900 if self.error is DatasetMismatch else 0xC000

    def write(self, directory: Path) -> Path:
        """Write it as a Part-10 file (node-made File Meta), for SCUs that send files."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.sop_uid}.dcm"
        path.write_bytes(file_meta_bytes(CTImageStorage, self.sop_uid, self.transfer_syntax,
                                         "CRAFTED") + self.stream)
        return path


def _sequence(ts: str, items: bytes, *, length: int | None = None) -> bytes:
    """(0008,1140) Referenced Image Sequence."""
    return element(0x00081140, "SQ", items, ts=ts, length=length)


def _referenced(ts: str) -> bytes:
    return element(0x00081150, "UI", text(CTImageStorage, b"\x00"), ts=ts)


def _open_sequence(uid: str, ts: str) -> bytes:
    # Header up to (0008,0060), then an undefined-length sequence whose delimiter never comes.
    head = header(uid, ts)
    cut = _offset(head, 0x00100010, "PN", ts)
    return head[:cut] + _sequence(ts, item(_referenced(ts), ts=ts), length=UNDEFINED)


def _open_item(uid: str, ts: str) -> bytes:
    head = header(uid, ts)
    cut = _offset(head, 0x00100010, "PN", ts)
    return head[:cut] + _sequence(ts, item(_referenced(ts), ts=ts, length=UNDEFINED),
                                  length=UNDEFINED)


def _item_closed_by_sequence_end(uid: str, ts: str) -> bytes:
    head = header(uid, ts)
    cut = _offset(head, 0x00100010, "PN", ts)
    body = _sequence(ts, item(_referenced(ts), ts=ts, length=UNDEFINED) + sequence_end(ts),
                     length=UNDEFINED)
    return head[:cut] + body + head[cut:] + element(PIXEL_DATA, "OW", bytes(32), ts=ts)


def _with_sequence(uid: str, sequence: bytes, ts: str = ELE) -> bytes:
    """A whole native CT with ``sequence`` (tag 0008,1140) in its place among the elements."""
    whole = native_ct(uid, ts)
    cut = _offset(whole, 0x00100010, "PN", ts)
    return whole[:cut] + sequence + whole[cut:]


def _nested(depth: int) -> bytes:
    """Referenced Image Sequences nested ``depth`` deep (each one item holding the next)."""
    inner = _referenced(ELE)
    for _ in range(depth):
        inner = _sequence(ELE, item(inner))
    return inner


def _cases() -> dict[str, Callable[[str], Crafted]]:
    bad, mismatch = BadDataset, DatasetMismatch
    px = r"element \(7FE0,0010\) at offset \d+"
    cases: dict[str, Callable[[str], Crafted]] = {
        # -- the three acknowledged corruptions --
        "pixels-128-declared-10-sent": lambda u: Crafted(
            header(u) + element(PIXEL_DATA, "OW", bytes(10), length=128), ELE, u, bad,
            rf"^truncated: {px}: value length 128 exceeds the 10 bytes left"),
        "pixels-declared-2GB": lambda u: Crafted(
            header(u) + element(PIXEL_DATA, "OW", bytes(32), length=0x80000000), ELE, u, bad,
            rf"^truncated: {px}: value length 2147483648 exceeds the 32 bytes left"),
        "garbage-random-bytes-after-header": lambda u: Crafted(
            header(u) + random.Random(13).randbytes(300), ELE, u, bad,
            rf"element \([0-9A-F]{{4}},[0-9A-F]{{4}}\) at offset {len(header(u))}: "),
        "garbage-truncated-element-header": lambda u: Crafted(
            native_ct(u) + b"\xe0\x7f\x10\x00O", ELE, u, bad,
            r"^truncated: offset \d+: element header cut after 5 bytes"),
        "garbage-tag-lower-than-previous": lambda u: Crafted(
            native_ct(u) + element(0x00080020, "DA", text("20240101")), ELE, u, bad,
            r"element \(0008,0020\) at offset \d+: tag out of order \(after \(7FE0,0010\)\)"),
        "garbage-element-running-past-the-end": lambda u: Crafted(
            header(u) + element(0x00321060, "LO", text("x" * 40), length=400), ELE, u, bad,
            r"^truncated: element \(0032,1060\) at offset \d+: value length 400 exceeds"),
        # -- sequences and items --
        "undefined-sequence-left-open": lambda u: Crafted(
            _open_sequence(u, ELE), ELE, u, bad,
            r"^truncated: element \(0008,1140\) at offset \d+: sequence of undefined length "
            r"ends without its Sequence Delimitation Item"),
        "undefined-sequence-left-open-implicit": lambda u: Crafted(
            _open_sequence(u, ILE), ILE, u, bad,
            r"^truncated: element \(0008,1140\) at offset \d+: sequence of undefined length"),
        "undefined-sequence-left-open-big-endian": lambda u: Crafted(
            _open_sequence(u, EBE), EBE, u, bad,
            r"^truncated: element \(0008,1140\) at offset \d+: sequence of undefined length"),
        "item-without-delimiter": lambda u: Crafted(
            _open_item(u, ELE), ELE, u, bad,
            r"^truncated: offset \d+: an item of undefined length ends without its Item "
            r"Delimitation Item"),
        "item-closed-by-sequence-delimiter": lambda u: Crafted(
            _item_closed_by_sequence_end(u, ELE), ELE, u, bad,
            r"element \(FFFE,E0DD\) at offset \d+: item or delimiter where a data element "
            r"was expected"),
        "item-longer-than-its-sequence": lambda u: Crafted(
            _with_sequence(u, _sequence(ELE, item(_referenced(ELE), length=60))), ELE, u, bad,
            r"^truncated: element \(FFFE,E000\) at offset \d+: item length 60 exceeds the "
            r"34 bytes left in the sequence \(0008,1140\)"),
        "nested-too-deep": lambda u: Crafted(
            _with_sequence(u, _nested(40)), ELE, u, bad,
            r"element \(0008,1140\) at offset \d+: sequences nested deeper than 32"),
        "undefined-length-on-a-text-element": lambda u: Crafted(
            header(u) + element(0x00321066, "UT", text("note"), length=UNDEFINED), ELE, u, bad,
            r"element \(0032,1066\) at offset \d+: undefined length not allowed for VR UT"),
        "unknown-vr": lambda u: Crafted(
            header(u) + element(0x00321060, "ZZ", text("x")), ELE, u, bad,
            r"element \(0032,1060\) at offset \d+: unknown VR b'ZZ'"),
        # -- encapsulated pixel data --
        "encapsulated-odd-fragment-length": lambda u: Crafted(
            jpeg_ct(u, item(b"") + item(b"\xff\xd8\x00\xff\xd9") + sequence_end()),
            JPEGBaseline8Bit, u, bad,
            r"element \(FFFE,E000\) at offset \d+: odd fragment length 5 in \(7FE0,0010\)"),
        "encapsulated-non-item-inside": lambda u: Crafted(
            jpeg_ct(u, item(b"") + element(0x00080020, "DA", text("20240101"))
                    + sequence_end()), JPEGBaseline8Bit, u, bad,
            r"element \(0008,0020\) at offset \d+: inside the encapsulated \(7FE0,0010\), "
            r"where only items may be"),
        "encapsulated-missing-sequence-delimiter": lambda u: Crafted(
            jpeg_ct(u, item(b"") + item(b"\xff\xd8\xff\xd9")), JPEGBaseline8Bit, u, bad,
            r"^truncated: element \(7FE0,0010\) at offset \d+: encapsulated value ends "
            r"without its Sequence Delimitation Item"),
        "encapsulated-fragment-past-the-end": lambda u: Crafted(
            jpeg_ct(u, item(b"") + item(b"\xff\xd8\xff\xd9", length=4000)), JPEGBaseline8Bit,
            u, bad, r"^truncated: element \(FFFE,E000\) at offset \d+: fragment length 4000"),
        "encapsulated-pixels-in-native-syntax": lambda u: Crafted(
            header(u) + encapsulated(item(b"") + item(b"\x00\x00") + sequence_end(), ELE),
            ELE, u, bad, rf"{px}: encapsulated pixel data in the native transfer syntax"),
        "native-pixels-in-encapsulated-syntax": lambda u: Crafted(
            native_ct(u, JPEGBaseline8Bit), JPEGBaseline8Bit, u, bad,
            rf"{px}: native Pixel Data in the encapsulated transfer syntax"),
        # -- native pixel data against the image attributes --
        "native-pixels-one-frame-short": lambda u: Crafted(
            native_ct(u, image=Image(frames=3), pixels=2 * 32), ELE, u, mismatch,
            rf"{px}: 64 bytes of pixel data where Rows 4 x Columns 4 x SamplesPerPixel 1 x "
            r"NumberOfFrames 3 x BitsAllocated 16 make 96"),
        "native-pixels-one-frame-short-big-endian": lambda u: Crafted(
            native_ct(u, EBE, image=Image(rows=300, columns=2, frames=2), pixels=1200), EBE, u,
            mismatch, r"1200 bytes of pixel data where Rows 300 x Columns 2 .* make 2400"),
        "native-pixels-one-frame-short-implicit": lambda u: Crafted(
            native_ct(u, ILE, image=Image(frames=2), pixels=32), ILE, u, mismatch,
            r"32 bytes of pixel data .* make 64"),
        "native-pixels-too-long": lambda u: Crafted(
            native_ct(u, pixels=32 + 128), ELE, u, mismatch,
            r"160 bytes of pixel data .* make 32"),
        "native-pixels-without-rows": lambda u: Crafted(
            native_ct(u, image=Image(rows=None), pixels=32), ELE, u, mismatch,
            r"Rows \(0028,0010\) is missing, but the dataset has native pixel data"),
        "bits-allocated-1-unpacked": lambda u: Crafted(
            native_ct(u, image=Image(rows=3, columns=3, bits=1, frames=2), pixels=18), ELE, u,
            mismatch, r"18 bytes of pixel data .* BitsAllocated 1 make 3"),
        # -- deflate --
        "deflated-truncated-sequence": lambda u: Crafted(
            deflate(_open_sequence(u, ELE)), DeflatedExplicitVRLittleEndian, u, bad,
            r"^truncated: element \(0008,1140\) at offset \d+: sequence of undefined length"),
        "deflated-stream-cut": lambda u: Crafted(
            deflate(native_ct(u, image=Image(rows=64, columns=64)))[:-40],
            DeflatedExplicitVRLittleEndian, u, bad,
            r"^truncated: the deflated dataset ends early"),
    }
    return cases


CORRUPTIONS = _cases()


def corruption(name: str) -> Crafted:
    """The corrupted dataset ``name`` with a fresh SOP Instance UID."""
    crafted = CORRUPTIONS[name](generate_uid())
    re.compile(crafted.message)
    return crafted


def deflate_bomb(sop_uid: str, inflated: int) -> bytes:
    """A deflated CT whose pixel data makes it inflate to about ``inflated`` bytes."""
    side = int((inflated // 2) ** 0.5)
    return deflate(native_ct(sop_uid, image=Image(rows=side, columns=side)))
