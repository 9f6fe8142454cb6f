"""JPEG previews of series for the offline web pages of a download (IHE PDI web content).

One image per series: the middle instance's middle frame, with the modality LUT
(rescale) and the file's own VOI (window or VOI LUT) applied, else stretched from
its minimum to its maximum; MONOCHROME1 inverted, palette colour expanded, colour
converted to RGB by pydicom. Only that one frame is decoded (pydicom decodes a
single frame of a multi-frame file), so a preview costs the same for any study size.
An object that cannot be decoded here (a transfer syntax without a decoder, no
pixel data, a broken file) gets a plain placeholder naming why, never a failure.
The same file gives the same JPEG bytes every time (no timestamps, fixed quality).
"""

from __future__ import annotations

import io
import logging
import textwrap
from pathlib import Path

log = logging.getLogger("iepnode.previews")

#: Largest preview side in pixels.
PREVIEW_SIZE = 512
#: Images smaller than this (pixels, longest side) are enlarged by a whole factor to it.
MIN_SIZE = 256
#: JPEG quality of previews.
QUALITY = 85
#: A frame larger than this (bytes, decoded) is not previewed.
MAX_FRAME_BYTES = 256 << 20


def preview_jpeg(path: Path, size: int = PREVIEW_SIZE) -> bytes:
    """Return a JPEG preview of the middle frame of the image at ``path``.

    Parameters
    ----------
    path : Path
        A Part-10 file with pixel data.
    size : int, optional
        Largest side of the preview in pixels.

    Returns
    -------
    bytes
        A baseline JPEG; a placeholder (see :func:`placeholder_jpeg`) when the
        image cannot be decoded.
    """
    try:
        return _encode(_render(path), size)
    except Exception as exc:  # any decoder or file problem: show it, do not fail the package
        log.info("no preview of %s: %s", path, exc)
        return placeholder_jpeg("No preview", _reason(exc), size=min(size, 256))


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "plugin" in text or "decoder" in text.lower() or "transfer syntax" in text.lower():
        return "this image's compression cannot be shown here; open it in a DICOM viewer"
    return "this image cannot be shown here; open it in a DICOM viewer"


def _render(path: Path):  # -> PIL.Image.Image
    import numpy as np
    from PIL import Image
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("no image")
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    if int(ds.Rows) * int(ds.Columns) * samples * max(bits // 8, 1) > MAX_FRAME_BYTES:
        raise ValueError("frame too large to preview")
    index = frames // 2
    arr = pixel_array(path, index=index)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float64)
        top = float(2 ** bits - 1) if arr.dtype != np.uint8 else 255.0
        scaled = np.clip(rgb * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "RGB")
    if arr.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if has_voi:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        grey = np.zeros(values.shape, dtype=np.uint8)
    else:
        grey = np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L")


def _encode(image, size: int) -> bytes:  # image: PIL.Image.Image
    from PIL import Image

    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    factor = -(-MIN_SIZE // max(image.size))  # rounded up: at least MIN_SIZE
    if factor > 1:  # tiny images (e.g. 64x64 nuclear medicine): enlarge, pixels kept sharp
        image = image.resize((image.width * factor, image.height * factor),
                             Image.Resampling.NEAREST)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=QUALITY, optimize=False, progressive=False)
    return out.getvalue()


def placeholder_jpeg(title: str, text: str = "", size: int = 256) -> bytes:
    """Return a grey JPEG with ``title`` and a wrapped ``text`` (for series without images).

    Parameters
    ----------
    title : str
        First line, e.g. ``"Report"`` or ``"No preview"`` (ASCII is safest).
    text : str, optional
        Smaller explanation, wrapped to the width.
    size : int, optional
        Side of the square image in pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (size, size), 64)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle((4, 4, size - 5, size - 5), outline=160)
    y = 16
    for line in [title, "", *textwrap.wrap(text, width=max(10, size // 7))]:
        draw.text((14, y), line.encode("ascii", "replace").decode(), fill=235, font=font)
        y += 14
    out = io.BytesIO()
    image.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()
