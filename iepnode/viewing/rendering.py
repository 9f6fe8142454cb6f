"""Decode and render one frame of a stored image: the one rendering path of the node.

Used by the web viewer (raw values for windowing in the browser, thumbnails), the
download previews (:mod:`iepnode.sharing.previews`) and DICOMweb WADO-RS ``/rendered`` and
``/frames``. Every transfer syntax the node stores decodes: pydicom's own decoders
(uncompressed little/big endian, deflate, RLE) plus pylibjpeg with libjpeg (JPEG
baseline/extended/lossless, JPEG-LS), openjpeg (JPEG 2000, HTJ2K) and pylibjpeg-rle,
with Pillow as a fallback for baseline JPEG and JPEG 2000. Only the asked frame is
decoded, so a frame of a 1000-frame object costs one frame.

The API, in the order a caller needs it::

    info = read_info(path)                  # ImageInfo: size, frames, photometric,
                                            # default window, for listings
    frame = decode_frame(path, index)       # Frame: modality values (mono) or RGB
    pixels = frame.windowed(center, width)  # uint8 (H, W) or (H, W, 3)
    image = render(path, index, center=..., width=..., size=...)   # PIL image
    data = encode(image, "image/jpeg")      # or "image/png"
    data = render_bytes(path, index, media_type="image/png", ...)  # both in one
    body, header = raw_frame(path, index)   # little-endian values for the viewer

Windowing is DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), applied to the
values after the modality LUT (rescale or LUT); :func:`window_linear` is the
reference the browser's ``viewer.js`` repeats exactly (same rounding), so a canvas
pixel can be compared with it. Without a window the file's own VOI (window or VOI
LUT) applies, else the frame's minimum to maximum. MONOCHROME1 is inverted after
windowing; PALETTE COLOR is expanded through its LUT; YBR is converted to RGB by
pydicom; enhanced multi-frame objects take rescale and window from their
functional groups.

Errors: :class:`RenderError` (a ``ValueError``) for objects without pixel data, a
frame index out of range, a frame too large, or a transfer syntax no installed
decoder handles; callers turn it into a placeholder or an HTTP error.

Memory: a decode holds the whole frame (and its windowed and encoded copies), so at
most :func:`set_concurrency` frames (``[http] render_concurrency``, default 2) are
decoded at once in a process; more callers wait for a turn (:func:`decode_frame`,
:func:`render` and :func:`raw_frame` each take one turn, however they nest).

The values of a decoded frame and the pure numpy steps on them (the :class:`Frame`,
windowing, reduction) are :mod:`iepnode.viewing.pixel_values`; this module reads,
decodes, renders and encodes.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iepnode.viewing.pixel_values import Frame, _reduce, _to_uint8_rgb

#: A decoded frame larger than this (bytes) is refused.
MAX_FRAME_BYTES = 512 << 20
#: Media types :func:`encode` writes.
MEDIA_TYPES = ("image/jpeg", "image/png")
#: Default JPEG quality of rendered frames.
JPEG_QUALITY = 90


class RenderError(ValueError):
    """This object or frame cannot be decoded or rendered here (the message says why)."""


class _Turns:
    """At most ``n`` threads of the process decode (and render) a frame at once.

    Re-entrant per thread: :func:`render` takes a turn and the :func:`decode_frame`
    inside it does not take a second one.
    """

    def __init__(self, n: int) -> None:
        self.limit = n
        self._slots = threading.BoundedSemaphore(n)
        self._local = threading.local()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        slots = self._slots
        if depth == 0:
            slots.acquire()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                slots.release()


#: Default number of frames decoded at the same time in one process.
RENDER_CONCURRENCY = 2
_TURNS = _Turns(RENDER_CONCURRENCY)


def set_concurrency(n: int) -> None:
    """Let at most ``n`` frames be decoded at the same time in this process.

    Called once at start-up (``[http] render_concurrency``); decodes already waiting
    keep their place in the old queue.
    """
    global _TURNS
    if n < 1:
        raise ValueError("at least one frame must be decodable at a time")
    if n != _TURNS.limit:
        _TURNS = _Turns(n)


def decode_turn() -> contextlib.AbstractContextManager[None]:
    """A turn to decode a frame (blocks while ``render_concurrency`` others hold one)."""
    return _TURNS.turn()


@dataclass(frozen=True)
class ImageInfo:
    """What a viewer needs to know of an image object before decoding it.

    Attributes
    ----------
    rows, columns, frames : int
        Size of one frame and the number of frames.
    photometric : str
        Photometric Interpretation as stored (``MONOCHROME2``, ``YBR_FULL_422``, ...).
    color : bool
        Rendered as RGB (colour or palette) rather than grey values.
    window : tuple[float, float] | None
        The file's first window (centre, width), if it has one.
    bits_stored : int
        Bits stored per sample.
    transfer_syntax : str
        Transfer Syntax UID.
    """

    rows: int
    columns: int
    frames: int
    photometric: str
    color: bool
    window: tuple[float, float] | None
    bits_stored: int
    transfer_syntax: str


# -- reading ------------------------------------------------------------------------------


def _header(path: Path | str):  # -> pydicom Dataset
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise RenderError(f"not a readable DICOM file: {exc}") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise RenderError("this object has no image")
    return ds


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
            value = next(iter(value))
        number = float(value)
    except (TypeError, ValueError, StopIteration):
        return None
    return number if math.isfinite(number) else None


def _group_item(ds, index: int, sequence: str):  # -> Dataset | None
    """The item of a functional-group ``sequence`` for frame ``index`` (per-frame first)."""
    for groups, pick in (("PerFrameFunctionalGroupsSequence", index),
                         ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > pick:
            inner = seq[pick].get(sequence)
            if inner:
                return inner[0]
    return None


def _rescale(ds, index: int) -> tuple[float, float]:
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    if slope is None and intercept is None:
        item = _group_item(ds, index, "PixelValueTransformationSequence")
        if item is not None:
            slope, intercept = _first(item.get("RescaleSlope")), _first(
                item.get("RescaleIntercept"))
    return (1.0 if slope is None or slope == 0 else slope), (intercept or 0.0)


def _window(ds, index: int) -> tuple[float, float] | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        item = _group_item(ds, index, "FrameVOILUTSequence")
        if item is not None:
            center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if center is None or width is None or width < 1:
        return None
    return center, width


def read_info(path: Path | str) -> ImageInfo:
    """Describe the image at ``path`` without decoding its pixels.

    Raises
    ------
    RenderError
        Not a DICOM file, or no image in it.
    """
    ds = _header(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(ds.get("SamplesPerPixel") or 1)
    return ImageInfo(
        rows=int(ds.Rows), columns=int(ds.Columns),
        frames=max(int(ds.get("NumberOfFrames") or 1), 1),
        photometric=photometric,
        color=samples > 1 or photometric == "PALETTE COLOR",
        window=_window(ds, 0),
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
    )


def decode_frame(path: Path | str, index: int = 0) -> Frame:
    """Decode frame ``index`` (0-based) of the image at ``path``.

    Grey frames come back after the modality LUT (rescale slope/intercept, or the
    Modality LUT Sequence); palette colour is expanded and YBR converted, to RGB
    ``uint8``.

    Raises
    ------
    RenderError
        No image, index out of range, frame too large, or no decoder for the
        transfer syntax.
    """
    with decode_turn():
        return _decode_frame(path, index)


def _decode_frame(path: Path | str, index: int) -> Frame:
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _header(path)
    frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    if not 0 <= index < frames:
        raise RenderError(f"frame {index + 1} does not exist (the image has {frames})")
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    if int(ds.Rows) * int(ds.Columns) * samples * max(bits // 8, 1) > MAX_FRAME_BYTES:
        raise RenderError("the frame is too large to render")
    source: Any = path
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        source = dcmread(path)  # pixel_array() cannot stream from a deflated file
    try:
        arr = pixel_array(source, index=index if frames > 1 else None)
    except Exception as exc:  # no plugin for the syntax, truncated data, ...
        raise RenderError(f"the pixel data cannot be decoded: {exc}") from exc
    if arr.ndim == 3 and frames == 1 and samples == 1:  # a single frame with a frame axis
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return Frame(_to_uint8_rgb(arr, 16 if arr.dtype != np.uint8 else 8), True, False, None,
                     frames=frames)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Frame(_to_uint8_rgb(arr[..., :3], bits), True, False, None, frames=frames)
    if arr.ndim != 2:
        raise RenderError(f"unexpected pixel array shape {arr.shape}")
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(arr, ds)
    else:
        slope, intercept = _rescale(ds, index)
        if slope == 1.0 and intercept == int(intercept):
            values = arr.astype(np.int32) + int(intercept) if intercept else arr
        else:
            values = arr.astype(np.float64)  # in place: one float copy of the frame
            values *= slope
            values += intercept
    window = _window(ds, index)
    voi = None
    if window is None and "VOILUTSequence" in ds:
        lut = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        low, high = float(lut.min()), float(lut.max())
        span = high - low if high > low else 1.0
        voi = np.clip(np.floor((lut - low) * (255.0 / span) + 0.5), 0, 255).astype(np.uint8)
    return Frame(values, False, photometric == "MONOCHROME1", window, voi, frames=frames)


# -- rendering ----------------------------------------------------------------------------


def render(path: Path | str, index: int = 0, *, center: float | None = None,
           width: float | None = None, size: int | tuple[int, int] | None = None):
    """Render frame ``index`` as a PIL image (mode ``L`` or ``RGB``).

    Parameters
    ----------
    path : Path or str
        A stored Part-10 file.
    index : int
        0-based frame number.
    center, width : float, optional
        Window; both or neither (see :meth:`Frame.windowed`).
    size : int or (int, int), optional
        Fit inside this box (longest side if an int), keeping the aspect ratio;
        never enlarged.

    Raises
    ------
    RenderError
        See :func:`decode_frame`.
    """
    from PIL import Image

    with decode_turn():
        pixels = decode_frame(path, index).windowed(center, width)
        image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
        if size is not None:
            box = (size, size) if isinstance(size, int) else size
            if image.width > box[0] or image.height > box[1]:
                image.thumbnail(box, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return image


def encode(image, media_type: str = "image/jpeg", quality: int = JPEG_QUALITY) -> bytes:
    """Encode a PIL image as ``image/jpeg`` (baseline) or ``image/png``.

    Raises
    ------
    RenderError
        Any other media type.
    """
    out = io.BytesIO()
    if media_type == "image/jpeg":
        image.save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    elif media_type == "image/png":
        image.save(out, "PNG", compress_level=1)  # fast; frames are cached, not archived
    else:
        raise RenderError(f"cannot render as {media_type}; use one of {', '.join(MEDIA_TYPES)}")
    return out.getvalue()


def render_bytes(path: Path | str, index: int = 0, *, media_type: str = "image/jpeg",
                 center: float | None = None, width: float | None = None,
                 size: int | tuple[int, int] | None = None,
                 quality: int = JPEG_QUALITY) -> bytes:
    """:func:`render` then :func:`encode` (the WADO-RS ``/rendered`` body)."""
    if media_type not in MEDIA_TYPES:
        raise RenderError(f"cannot render as {media_type}; use one of {', '.join(MEDIA_TYPES)}")
    with decode_turn():
        image = render(path, index, center=center, width=width, size=size)
        return encode(image, media_type, quality)


def raw_frame(path: Path | str, index: int = 0,
              max_size: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Frame ``index`` as little-endian values for windowing in the browser.

    Grey frames: ``int16`` when the modality values fit, else ``float32``; colour
    frames: ``rgb8`` (3 bytes a pixel). The header dict says which, with the size,
    the default window and whether to invert (MONOCHROME1).

    Parameters
    ----------
    path : Path or str
        A stored Part-10 file.
    index : int
        0-based frame number.
    max_size : int, optional
        Reduce a larger frame by a whole factor (the mean of each block of pixels,
        rounded for integer values) so that its longest side is at most this: a mammogram's
        first view on a screen needs a fraction of its 13 million pixels.

    Returns
    -------
    (bytes, dict)
        The values, and ``{"dtype", "rows", "columns", "window", "invert",
        "frames", "full_rows", "full_columns", "factor"}``.
    """
    with decode_turn():
        return _raw_frame(path, index, max_size)


def _raw_frame(path: Path | str, index: int,
               max_size: int | None) -> tuple[bytes, dict[str, Any]]:
    frame = decode_frame(path, index)
    values = frame.values
    full_rows, full_columns = values.shape[:2]
    factor = 1
    if max_size and max(full_rows, full_columns) > max_size:
        factor = -(-max(full_rows, full_columns) // max_size)
        values = _reduce(values, factor)
    rows, columns = values.shape[:2]
    header: dict[str, Any] = {
        "rows": rows, "columns": columns, "invert": frame.monochrome1,
        "frames": frame.frames,
        "full_rows": full_rows, "full_columns": full_columns, "factor": factor,
    }
    if frame.color:
        header.update(dtype="rgb8", window=None)
        return np.ascontiguousarray(values, dtype=np.uint8).tobytes(), header
    if frame.window is None and frame.voi_lut is not None:  # non-linear VOI LUT: send it
        lut = frame.voi_lut if factor == 1 else np.clip(
            _reduce(frame.voi_lut, factor) + 0.5, 0, 255).astype(np.uint8)
        header.update(dtype="uint8", window=[128.0, 256.0])
        return np.ascontiguousarray(lut).tobytes(), header
    header["window"] = list(frame.auto_window())
    if np.issubdtype(values.dtype, np.integer) and values.size and (
            int(values.min()) >= -32768 and int(values.max()) <= 32767):
        header["dtype"] = "int16"
        return np.ascontiguousarray(values, dtype="<i2").tobytes(), header
    header["dtype"] = "float32"
    return np.ascontiguousarray(values, dtype="<f4").tobytes(), header


__all__ = [
    "JPEG_QUALITY", "MAX_FRAME_BYTES", "MEDIA_TYPES", "RENDER_CONCURRENCY",
    "ImageInfo", "RenderError", "decode_frame", "decode_turn", "encode",
    "raw_frame", "read_info", "render", "render_bytes", "set_concurrency",
]
