"""JPEG previews of series for the offline web pages of a download (IHE PDI web content).

One image per series: the middle instance's middle frame, with the modality LUT
(rescale) and the file's own VOI (window or VOI LUT) applied, else stretched from
its minimum to its maximum; MONOCHROME1 inverted, palette colour expanded, colour
converted to RGB by pydicom (all of it in :mod:`iepnode.viewing.rendering`, the node's one
rendering path). Only that one frame is decoded (pydicom decodes a
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
    """The middle frame, windowed as :mod:`iepnode.viewing.rendering` does for the viewer."""
    from iepnode.viewing.rendering import read_info, render

    return render(path, read_info(path).frames // 2)


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
