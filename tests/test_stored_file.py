"""The one decision "is this stored file usable?" (storage.stored_file), on real files.

Whole files in every syntax the node stores pass; each way a file goes bad in the
field fails with its reason in plain words; a file cut at any point inside its
pixel data, or inside an element, is caught (cuts exactly between two header
elements of a non-image are the documented blind spot).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from storage.stored_file import UnreadableFile, read_instance_header, unreadable_reason
from tests import data_factory as factory
from tests.support.damage import (
    DAMAGES,
    REASONS,
    damage,
    permissions_apply_here,
    without_permission_override,
)
from tests.support.node import REPO

#: Bundled files: explicit/implicit/big endian, RLE, JPEG 2000, JPEG-LS, JPEG, deflate,
#: multi-frame, SR, RT structure set.
WHOLE = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
         "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "image_dfl.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "test-SR.dcm"]


def reason_in_another_process(path: Path) -> str:
    """:func:`unreadable_reason` of ``path`` in a process that file modes apply to."""
    code = ("import sys; from storage.stored_file import unreadable_reason; "
            "print(unreadable_reason(sys.argv[1]))")
    result = subprocess.run([*without_permission_override(), sys.executable, "-c", code,
                             str(path)], capture_output=True, text=True, cwd=REPO, timeout=60,
                            check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("name", WHOLE)
def test_whole_files_in_every_syntax_are_usable(tmp_path: Path, name: str) -> None:
    path = factory.copy_bundled(name, tmp_path)
    ds = read_instance_header(path)
    assert ds.SOPInstanceUID == dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert "PixelData" not in ds  # the header only


def test_large_values_stay_on_disk_until_read(tmp_path: Path) -> None:
    ct = factory.make_ct_series(tmp_path, 1)
    pdf = factory.minimal_pdf() + b"%" * 200_000
    ds = read_instance_header(factory.make_pdf(tmp_path, like=ct[0], pdf=pdf))
    assert ds.get_item("EncapsulatedDocument", keep_deferred=True).value is None
    assert bytes(ds.EncapsulatedDocument).rstrip(b"\0") == pdf  # read when asked for


@pytest.mark.parametrize("how", DAMAGES)
def test_each_damage_has_its_reason(tmp_path: Path, how: str) -> None:
    (path,) = factory.make_ct_series(tmp_path, 1)
    damage(path, how)
    if how == "unreadable" and not permissions_apply_here():
        reason = reason_in_another_process(path)  # root reads it; a process without
        assert read_instance_header(path)  # CAP_DAC_OVERRIDE is refused
    else:
        with pytest.raises(UnreadableFile) as raised:
            read_instance_header(path)
        reason = raised.value.reason
        assert reason == unreadable_reason(path)
    assert REASONS[how] in reason
    assert str(tmp_path) not in reason and path.name not in reason  # no paths


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"])
def test_a_cut_anywhere_in_the_pixel_data_is_caught(tmp_path: Path, name: str) -> None:
    source = factory.bundled(name)
    data = source.read_bytes()
    pixel_start = dcmread(source, defer_size=64).get_item("PixelData",
                                                          keep_deferred=True).value_tell
    cut = tmp_path / "cut"
    missed = []
    step = max(1, (len(data) - pixel_start) // 300)  # ~300 cuts, fragment headers included
    for length in range(pixel_start - 12, len(data), step):
        cut.write_bytes(data[:length])
        if unreadable_reason(cut) is None:
            missed.append(length)
    cut.write_bytes(data[:-1])  # the last byte (CT_small: of its trailing padding)
    assert unreadable_reason(cut) == "the stored file is cut short (truncated)"
    assert missed == []


def test_a_cut_inside_a_header_element_is_caught(tmp_path: Path) -> None:
    source = factory.bundled("CT_small.dcm")
    data = source.read_bytes()
    ds = dcmread(source, defer_size=64)
    cut = tmp_path / "cut"
    for keyword in ("SOPInstanceUID", "PatientName", "ImageType", "Rows", "RescaleSlope"):
        elem = ds.get_item(keyword, keep_deferred=True)
        cut.write_bytes(data[:elem.value_tell + max(1, elem.length // 2)])
        assert unreadable_reason(cut) == "the stored file is cut short (truncated)", keyword
    # An image cut just before its Pixel Data element (an element boundary).
    pixel_header = ds.get_item("PixelData", keep_deferred=True).value_tell - 12
    cut.write_bytes(data[:pixel_header])
    assert unreadable_reason(cut) == "the stored file is cut short (truncated)"
    cut.write_bytes(data[:pixel_header + 5])  # inside the element's header
    assert unreadable_reason(cut) == "the stored file is cut short (truncated)"
