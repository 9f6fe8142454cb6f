"""The full-dataset check every received instance passes before it is stored.

Unit tests of :func:`iepnode.archive.dataset_check.check_dataset` on every file pydicom
bundles (all must pass but the few that are broken on purpose) and on crafted
corruptions (tests/support/crafted.py), then the same corruptions through the shared
ingest path (``Ingester.ingest``): refused with the right error and nothing stored.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from config import load_settings
from iepnode.archive.dataset_check import MAX_DEPTH, check_dataset, inflate
from iepnode.archive.ingest import parse_file_meta
from iepnode.errors import BadDataset, DatasetMismatch
from iepnode.services import Services
from iepnode.wiring import build_services
from tests.support import crafted
from tests.support.crafted import (
    EBE,
    ELE,
    ILE,
    Image,
    corruption,
    deflate,
    element,
    header,
    item,
    item_end,
    native_ct,
    sequence_end,
)

# -- every bundled file ---------------------------------------------------------------------

#: Bundled files that are broken on purpose, what is wrong, and how the check says so.
KNOWN_BAD = {
    "MR_truncated.dcm": ("pixel data cut short (a truncation test)",
                         r"^truncated: element \(7FE0,0010\) at offset 1154"),
    "rtplan_truncated.dcm": ("cut in the middle of a sequence (a truncation test)",
                             r"^truncated: element \(300A,00B0\) at offset 1110"),
    "dicomdirtests/DICOMDIR-nooffset": (
        "elements deleted by hand without shortening their item's length",
        r"^truncated: element \(FFFE,E000\) at offset 10530: item length 248"),
    "MR_small_padded.dcm": ("128 bytes beyond what Rows x Columns x BitsAllocated need "
                            "(pydicom warns of excess padding)",
                            r"8320 bytes of pixel data .* make 8192"),
    "SC_rgb_jpeg.dcm": ("implicit VR elements under an explicit VR transfer syntax "
                        "(pydicom warns)", r"element \(0008,0008\) at offset 0: unknown VR"),
    "badVR.dcm": ("NumberOfFrames '1A' is no number (a bad-value test)",
                  r"NumberOfFrames \(0028,0008\) b'1A' is not an integer"),
    "nested_priv_SQ.dcm": ("a 2-byte Pixel Data without Rows, Columns or BitsAllocated "
                           "(a parser test, no image)", r"Rows \(0028,0010\) is missing"),
    "no_meta.dcm": ("a stray byte before the first element (pydicom warns)", r"offset 0:"),
}
#: Bundled files with no dataset to check: not DICOM, or no transfer syntax in the meta.
NOT_CHECKABLE = {"dicomdirtests/TINY_ALPHA/README", "meta_missing_tsyntax.dcm"}
#: Data files pydicom ships beside the DICOM files.
_OTHER_SUFFIXES = (".txt", ".json", ".dump", ".icc", ".gz", ".py")
_ENCODINGS = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
              (False, False): crafted.EBE}


def bundled_files() -> Iterator[str]:
    """Every file under pydicom's test_files/ and charset_files/, by relative name.

    Read from the installed package folder: never pydicom's pattern helpers, which may
    try to download.
    """
    for folder in ("test_files", "charset_files"):
        root = Path(DATA_ROOT) / folder
        for dirpath, _, names in os.walk(root):
            for name in sorted(names):
                path = Path(dirpath) / name
                if path.suffix not in _OTHER_SUFFIXES:
                    yield path.relative_to(root).as_posix()


def split_bundled(name: str) -> tuple[bytes, str]:
    """The dataset bytes and transfer syntax of a bundled file (with or without meta)."""
    folder = "charset_files" if name.startswith("chr") else "test_files"
    path = Path(DATA_ROOT) / folder / name
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        meta, offset = parse_file_meta(data)
        return data[offset:], meta.transfer_syntax
    ds = dcmread(path, force=True)  # no File Meta: pydicom guesses the encoding
    return data, _ENCODINGS[ds.original_encoding]


BUNDLED = sorted(set(bundled_files()) - NOT_CHECKABLE)


def test_the_bundled_set_is_what_this_test_expects() -> None:
    names = set(bundled_files())
    assert len(names) > 150
    assert set(KNOWN_BAD) | NOT_CHECKABLE <= names


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_file(name: str) -> None:
    stream, ts = split_bundled(name)
    if name not in KNOWN_BAD:
        check_dataset(stream, ts)
        return
    _, message = KNOWN_BAD[name]
    with pytest.raises(BadDataset, match=message):
        check_dataset(stream, ts)


def test_bundled_files_accepted_as_memoryview_and_bytearray() -> None:
    stream, ts = split_bundled("rtstruct.dcm")
    for buffer in (memoryview(stream), bytearray(stream), memoryview(b"xx" + stream)[2:]):
        assert check_dataset(buffer, ts).encapsulated is False
    stream, ts = split_bundled("SC_rgb_rle_2frame.dcm")
    assert check_dataset(memoryview(stream), ts).encapsulated is True


# -- crafted corruptions ------------------------------------------------------------------


@pytest.mark.parametrize("name", crafted.CORRUPTIONS)
def test_corruption_is_refused_with_what_and_where(name: str) -> None:
    case = corruption(name)
    with pytest.raises(BadDataset) as info:
        check_dataset(case.stream, case.transfer_syntax)
    assert type(info.value) is case.error, info.value
    assert re.search(case.message, str(info.value)), str(info.value)


@pytest.mark.parametrize("ts", [ELE, ILE, EBE])
def test_whole_crafted_instances_pass(ts: str) -> None:
    uid = "1.2.3"
    for image in (Image(), Image(frames=3), Image(rows=3, columns=3, bits=8, samples=3),
                  Image(rows=3, columns=3, bits=1, frames=2), Image(bits=32)):
        check_dataset(native_ct(uid, ts, image), ts)
    check_dataset(header(uid, ts, image=None), ts)  # no pixel data: no image attributes needed


def test_odd_pixel_length_takes_one_padding_byte() -> None:
    image = Image(rows=3, columns=3, bits=8, samples=3)  # 27 bytes
    check_dataset(native_ct("1.2.3", image=image, pixels=28), ELE)
    check_dataset(native_ct("1.2.3", image=image, pixels=27), ELE)
    with pytest.raises(DatasetMismatch, match="29 bytes of pixel data"):
        check_dataset(native_ct("1.2.3", image=image, pixels=29), ELE)
    with pytest.raises(DatasetMismatch, match="26 bytes of pixel data"):
        check_dataset(native_ct("1.2.3", image=image, pixels=26), ELE)


def test_bits_allocated_1_is_packed_across_frames() -> None:
    image = Image(rows=3, columns=3, bits=1, frames=2)  # 18 bits: 3 bytes, padded to 4
    check_dataset(native_ct("1.2.3", image=image, pixels=4), ELE)
    check_dataset(native_ct("1.2.3", image=Image(rows=8, columns=8, bits=1), pixels=8), ELE)
    with pytest.raises(DatasetMismatch, match="make 3"):
        check_dataset(native_ct("1.2.3", image=image, pixels=6), ELE)


def test_float_pixel_data_is_measured_like_pixel_data() -> None:
    float_pixels = 0x7FE00008
    whole = header("1.2.3", image=Image(bits=32)) + element(float_pixels, "OF", bytes(64))
    check_dataset(whole, ELE)
    short = header("1.2.3", image=Image(bits=32)) + element(float_pixels, "OF", bytes(60))
    with pytest.raises(DatasetMismatch, match=r"element \(7FE0,0008\) .* 60 bytes"):
        check_dataset(short, ELE)


def test_number_of_frames_must_be_a_positive_integer() -> None:
    zero = native_ct("1.2.3", image=Image(frames=0), pixels=32)
    with pytest.raises(DatasetMismatch, match=r"NumberOfFrames .* 0 is not positive"):
        check_dataset(zero, ELE)


def test_nesting_up_to_the_limit_passes() -> None:
    def nested(depth: int) -> bytes:
        inner = element(0x00081150, "UI", b"1.2\x00")
        for _ in range(depth):
            inner = element(0x00081140, "SQ", item(inner))
        return element(0x00080016, "UI", b"1.2\x00") + inner

    check_dataset(nested(MAX_DEPTH), ELE)
    with pytest.raises(BadDataset, match=f"nested deeper than {MAX_DEPTH}"):
        check_dataset(nested(MAX_DEPTH + 1), ELE)


def test_undefined_lengths_where_ps3_5_allows_them() -> None:
    ref = element(0x00081150, "UI", b"1.2\x00")
    implicit_ref = element(0x00081150, "", b"1.2\x00", ts=ILE)
    undefined_items = item(ref, length=crafted.UNDEFINED) + item_end() + item(ref) \
        + sequence_end()
    check_dataset(element(0x00081140, "SQ", undefined_items, length=crafted.UNDEFINED), ELE)
    # UN of undefined length: an Implicit VR Little Endian sequence (PS3.5 6.2.2), also
    # in a big endian dataset.
    un = (item(implicit_ref, ts=ILE) + sequence_end(ILE))
    for ts in (ELE, EBE):
        check_dataset(element(0x00091010, "UN", un, ts=ts, length=crafted.UNDEFINED), ts)
    # Implicit VR: a private (unknown) tag of undefined length is a sequence.
    check_dataset(element(0x00091010, "", un, ts=ILE, length=crafted.UNDEFINED), ILE)
    broken_un = item(implicit_ref, ts=ILE)  # no sequence delimiter
    with pytest.raises(BadDataset, match=r"^truncated: element \(0009,1010\)"):
        check_dataset(element(0x00091010, "UN", broken_un, length=crafted.UNDEFINED), ELE)
    with pytest.raises(BadDataset, match="not a sequence"):
        check_dataset(element(0x00100010, "", b"", ts=ILE, length=crafted.UNDEFINED), ILE)


def test_delimiters_must_have_length_zero() -> None:
    ref = element(0x00081150, "UI", b"1.2\x00")
    bad_item_end = element(0x00081140, "SQ", item(ref, length=crafted.UNDEFINED)
                           + item_end(length=4) + sequence_end(), length=crafted.UNDEFINED)
    with pytest.raises(BadDataset, match="Item Delimitation Item of length 4"):
        check_dataset(bad_item_end, ELE)
    bad_sequence_end = element(0x00081140, "SQ", item(ref) + sequence_end(length=2),
                               length=crafted.UNDEFINED)
    with pytest.raises(BadDataset, match="Sequence Delimitation Item of length 2"):
        check_dataset(bad_sequence_end, ELE)


def test_duplicate_tag_is_out_of_order() -> None:
    twice = element(0x00080060, "CS", b"CT") + element(0x00080060, "CS", b"MR")
    with pytest.raises(BadDataset, match=r"element \(0008,0060\) at offset 10: tag out of order"):
        check_dataset(twice, ELE)


def test_trailing_zero_padding_is_accepted_other_bytes_are_not() -> None:
    whole = native_ct("1.2.3")
    check_dataset(whole + b"\x00" * 4, ELE)
    with pytest.raises(BadDataset, match="element header cut after 4 bytes"):
        check_dataset(whole + b"\x00\x00\x01\x00", ELE)


def test_empty_dataset_and_unknown_syntax() -> None:
    with pytest.raises(BadDataset, match="empty dataset"):
        check_dataset(b"", ELE)
    with pytest.raises(BadDataset, match="unknown transfer syntax"):
        check_dataset(native_ct("1.2.3"), "1.2.840.10008.1.2.abc")


# -- deflate ----------------------------------------------------------------------------------


def test_deflated_dataset_is_checked_inflated() -> None:
    whole = native_ct("1.2.3", image=Image(rows=64, columns=64))
    checked = check_dataset(deflate(whole), DeflatedExplicitVRLittleEndian)
    assert checked.plain == whole
    short = native_ct("1.2.3", image=Image(rows=64, columns=64), pixels=64 * 64)
    with pytest.raises(DatasetMismatch, match="4096 bytes of pixel data"):
        check_dataset(deflate(short), DeflatedExplicitVRLittleEndian)


def test_deflate_bomb_is_refused_at_the_cap() -> None:
    bomb = crafted.deflate_bomb("1.2.3", 8 << 20)
    assert len(bomb) < 20_000
    check_dataset(bomb, DeflatedExplicitVRLittleEndian, max_inflated=16 << 20)
    with pytest.raises(BadDataset, match=r"inflates to more than 1048576 bytes"):
        check_dataset(bomb, DeflatedExplicitVRLittleEndian, max_inflated=1 << 20)


def test_bytes_after_the_deflate_stream() -> None:
    plain = native_ct("1.2.3")
    stream = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = stream.compress(plain) + stream.flush()
    assert inflate(deflated + b"\x00", 1 << 20) == plain
    gzip_trailer = struct.pack("<LL", zlib.crc32(plain), len(plain))
    assert inflate(deflated + gzip_trailer, 1 << 20) == plain  # as image_dfl.dcm has
    wrong_crc = struct.pack("<LL", zlib.crc32(plain) ^ 1, len(plain))
    for tail in (b"\x00\x00", b"garbage!", wrong_crc):
        with pytest.raises(BadDataset, match="after the end of the deflated dataset"):
            inflate(deflated + tail, 1 << 20)
    with pytest.raises(BadDataset, match="corrupt deflated dataset"):
        inflate(b"\xff" * 64, 1 << 20)


# -- through the shared ingest path -----------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One node for the module (its index is set up once), deflate capped at 1 MiB."""
    settings = load_settings(overrides={"data_dir": tmp_path_factory.mktemp("node"),
                                        "fsync": False, "max_inflated_mb": 1}, environ={})
    services = build_services(settings)
    yield services
    services.close()


def stored(services: Services) -> tuple[list[Path], list[Path], dict[str, int]]:
    """Files in the store and in staging, and the index counts."""
    files = sorted(p for p in services.settings.store_dir.rglob("*") if p.is_file())
    return files, sorted(services.settings.tmp_dir.iterdir()), services.archive.counts()


@pytest.mark.parametrize("name", crafted.CORRUPTIONS)
def test_ingest_refuses_the_corruption_and_stores_nothing(services: Services, name: str) -> None:
    case = corruption(name)
    before = stored(services)
    with pytest.raises(BadDataset) as info:
        services.archive.store_received(case.stream, case.transfer_syntax, calling_ae="TESTSCU",
                            sop_class=crafted.CTImageStorage, sop_uid=case.sop_uid)
    assert type(info.value) is case.error
    assert re.search(case.message, str(info.value)), str(info.value)
    assert stored(services) == before


def test_ingest_refuses_a_deflate_bomb_beyond_max_inflated_mb(services: Services) -> None:
    before = stored(services)
    bomb = crafted.deflate_bomb("1.2.3", 4 << 20)
    with pytest.raises(BadDataset, match=r"inflates to more than 1048576 bytes"):
        services.ingester.ingest(bomb, DeflatedExplicitVRLittleEndian)
    assert stored(services) == before
    small = deflate(native_ct("1.2.3", image=Image(rows=64, columns=64)))
    assert services.ingester.ingest(small, DeflatedExplicitVRLittleEndian).sop_uid == "1.2.3"
    assert stored(services)[2]["instances"] == before[2]["instances"] + 1


@pytest.mark.parametrize("name", ["undefined-sequence-left-open",
                                  "undefined-sequence-left-open-implicit",
                                  "item-without-delimiter"])
def test_header_parse_alone_turns_a_parse_failure_into_bad_dataset(name: str) -> None:
    """parse_header (used alone by upload inspection): pydicom's OSError is a BadDataset."""
    from iepnode.archive.ingest import parse_header

    case = corruption(name)
    with pytest.raises(BadDataset, match="cannot parse dataset"):
        parse_header(case.stream, case.transfer_syntax)
