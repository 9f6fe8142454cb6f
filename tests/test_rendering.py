"""Rendering of one frame per transfer syntax and photometric interpretation, against pydicom.

Grey images: the decoded values equal pydicom's pixel array after its modality LUT;
colour: pydicom's RGB (YBR converted) array; palette: pydicom's colour LUT. The
compressed variants pydicom does not ship (JPEG lossless, JPEG-LS lossless of a CT,
RLE of a CT) are written by dcmtk's compressors, real peers.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import JPEGLosslessSV1, RLELossless

from iepnode.sharing import previews
from iepnode.viewing import rendering
from iepnode.viewing.pixel_values import min_max_window, window_linear
from iepnode.viewing.rendering import RenderError
from tests.data_factory import bundled, rewrite
from tests.support.tools import dcmtk

# (file, transfer syntax or photometric case) -- bundled with pydicom
GREY = [
    "CT_small.dcm",                 # explicit LE, 16-bit signed, rescale
    "MR_small_implicit.dcm",        # implicit VR LE
    "MR_small_bigendian.dcm",       # explicit VR big endian
    "MR_small_RLE.dcm",             # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",    # JPEG-LS near-lossless, 16-bit
    "MR_small_jp2klossless.dcm",    # JPEG 2000 lossless
    "JPEG2000.dcm",                 # JPEG 2000
    "JPGExtended.dcm",              # JPEG extended (process 2/4), 12-bit
    pytest.param("image_dfl.dcm",   # deflated explicit LE, 8-bit (pydicom warns of its VR)
                 marks=pytest.mark.filterwarnings("ignore:Expected explicit VR")),
    "liver_1frame.dcm",
]
COLOUR = [
    "SC_rgb_small_odd.dcm",          # RGB, uncompressed
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422
    "SC_rgb_jpeg_dcmtk.dcm",         # JPEG baseline, YBR_FULL_422
    "SC_rgb_jpeg_gdcm.dcm",          # JPEG baseline, RGB
    "SC_rgb_rle.dcm",                # RLE RGB
    "SC_rgb_rle_16bit.dcm",          # RLE RGB 16-bit
    "examples_ybr_color.dcm",
]


def _expected_grey(path: Path, index: int = 0) -> np.ndarray:
    ds = dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[index]
    return apply_modality_lut(arr, ds)


@pytest.mark.parametrize("name", GREY)
def test_grey_frames_equal_pydicom(name: str) -> None:
    path = bundled(name)
    frame = rendering.decode_frame(path, 0)
    assert not frame.color
    np.testing.assert_array_equal(frame.values, _expected_grey(path))
    pixels = frame.windowed()
    assert pixels.dtype == np.uint8 and pixels.shape == frame.values.shape
    assert pixels.max() > pixels.min()  # something visible, not a flat frame


@pytest.mark.parametrize("name", COLOUR)
def test_colour_frames_equal_pydicom(name: str) -> None:
    path = bundled(name)
    ds = dcmread(path)
    expected = ds.pixel_array  # pydicom converts YBR to RGB
    if int(ds.get("NumberOfFrames") or 1) > 1:
        expected = expected[0]
    if expected.dtype != np.uint8:
        expected = np.clip(expected.astype(np.float64) * (255.0 / (2 ** ds.BitsAllocated - 1))
                           + 0.5, 0, 255).astype(np.uint8)
    frame = rendering.decode_frame(path, 0)
    assert frame.color and frame.values.dtype == np.uint8
    np.testing.assert_array_equal(frame.values, expected)
    assert frame.windowed(40, 400) is frame.values  # colour ignores the window


def test_palette_colour_is_expanded() -> None:
    path = bundled("examples_palette.dcm")
    ds = dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    frame = rendering.decode_frame(path)
    assert frame.color and frame.values.shape == (*ds.pixel_array.shape, 3)
    expected = np.clip(rgb.astype(np.float64) * (255.0 / 65535) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(frame.values, expected)


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm"])
def test_multi_frame_decodes_only_the_asked_frame(name: str) -> None:
    path = bundled(name)
    info = rendering.read_info(path)
    assert info.frames > 1
    ds = dcmread(path)
    whole = ds.pixel_array
    last = info.frames - 1
    frame = rendering.decode_frame(path, last)
    if info.color:
        np.testing.assert_array_equal(frame.values, whole[last])
    else:
        np.testing.assert_allclose(frame.values, apply_modality_lut(whole[last], ds))
    with pytest.raises(RenderError, match="does not exist"):
        rendering.decode_frame(path, info.frames)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono2 = bundled("MR_small.dcm")
    mono1 = rewrite(mono2, tmp_path, PhotometricInterpretation="MONOCHROME1")
    a = rendering.decode_frame(mono2).windowed(600, 1200)
    b = rendering.decode_frame(mono1).windowed(600, 1200)
    np.testing.assert_array_equal(b, 255 - a)
    assert rendering.read_info(mono1).photometric == "MONOCHROME1"


def _dcmtk_compress(tool: str, flag: str, source: Path, target: Path) -> Path:
    subprocess.run([dcmtk(tool), flag, str(source), str(target)], check=True,
                   capture_output=True)
    return target


@pytest.mark.parametrize(("tool", "flag", "syntax"), [
    ("dcmcjpeg", "--encode-lossless-sv1", JPEGLosslessSV1),   # JPEG lossless (process 14)
    ("dcmcjpls", "--encode-lossless", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("dcmcrle", "--fragment-per-frame", RLELossless),            # RLE
])
def test_ct_compressed_by_dcmtk_decodes_losslessly(tmp_path: Path, tool: str, flag: str,
                                                     syntax: str) -> None:
    source = bundled("CT_small.dcm")
    target = _dcmtk_compress(tool, flag, source, tmp_path / "ct.dcm")
    assert str(dcmread(target).file_meta.TransferSyntaxUID) == syntax
    np.testing.assert_array_equal(rendering.decode_frame(target).values,
                                  _expected_grey(source))


def test_window_linear_follows_the_standard() -> None:
    values = np.array([-1000, -161, -160, -159, 39, 40, 239, 240, 241, 3000], dtype=np.int32)
    out = window_linear(values, 40, 400)
    # c - 0.5 - (w-1)/2 = -160: at or below is 0; above c - 0.5 + (w-1)/2 = 239 is 255
    assert out[0] == 0 and out[1] == 0 and out[2] == 0
    assert 0 < out[3] < 3
    assert out[-1] == 255 and out[-2] == 255 and out[-3] == 255
    assert out[4] in (127, 128) and out[5] == 128
    assert list(window_linear(np.array([0, 1]), 1, 1)) == [0, 255]


def test_render_bytes_jpeg_png_size_and_window() -> None:
    path = bundled("CT_small.dcm")
    png = rendering.render_bytes(path, media_type="image/png", center=40, width=400)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (128, 128)
    expected = window_linear(_expected_grey(path), 40, 400)
    np.testing.assert_array_equal(np.asarray(image), expected)
    jpeg = rendering.render_bytes(path, media_type="image/jpeg", size=64)
    small = Image.open(io.BytesIO(jpeg))
    assert small.format == "JPEG" and small.size == (64, 64)
    with pytest.raises(RenderError, match="cannot render as"):
        rendering.render_bytes(path, media_type="image/gif")


def test_raw_frame_int16_and_header() -> None:
    path = bundled("CT_small.dcm")
    body, header = rendering.raw_frame(path)
    assert header["dtype"] == "int16" and (header["rows"], header["columns"]) == (128, 128)
    values = np.frombuffer(body, dtype="<i2").reshape(128, 128)
    np.testing.assert_array_equal(values, _expected_grey(path))
    assert header["window"] == list(min_max_window(values))
    body, header = rendering.raw_frame(bundled("SC_rgb_small_odd.dcm"))
    assert header["dtype"] == "rgb8" and len(body) == header["rows"] * header["columns"] * 3


def test_raw_frame_reduced_for_large_images(tmp_path: Path) -> None:
    path = bundled("CT_small.dcm")  # 128x128
    body, header = rendering.raw_frame(path, max_size=64)
    assert (header["rows"], header["columns"], header["factor"]) == (64, 64, 2)
    assert (header["full_rows"], header["full_columns"]) == (128, 128)
    assert header["dtype"] == "int16"  # block means of integers, rounded
    full = _expected_grey(path).astype(np.float64)
    expected = np.floor(full.reshape(64, 2, 64, 2).mean(axis=(1, 3)) + 0.5)  # half up
    np.testing.assert_array_equal(np.frombuffer(body, "<i2").reshape(64, 64), expected)
    _, same = rendering.raw_frame(path, max_size=128)
    assert same["factor"] == 1 and same["dtype"] == "int16"


def test_no_image_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="no image"):
        rendering.read_info(bundled("test-SR.dcm"))


def test_previews_use_the_same_rendering() -> None:
    path = bundled("CT_small.dcm")
    jpeg = previews.preview_jpeg(path)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and max(image.size) >= previews.MIN_SIZE
