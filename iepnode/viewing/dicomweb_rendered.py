"""DICOMweb (WADO-RS) rendered images: ``/rendered`` parameters and rendered parts.

Frames are rendered by :mod:`iepnode.viewing.rendering` (JPEG or PNG, windowed and
fitted to a viewport as asked); a client that accepts neither gets
:class:`NotAcceptableMedia` (HTTP 406).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from iepnode.errors import BadQuery, NodeError, NotFound
from iepnode.viewing.dicomweb import StoredInstance
from iepnode.viewing.dicomweb_frames import Part


@dataclass(frozen=True)
class Rendering:
    """Parsed ``/rendered`` query parameters (PS3.18 8.3.5.1)."""

    media_type: str
    center: float | None = None
    width: float | None = None
    size: tuple[int, int] | None = None
    quality: int = 90
    #: Parameters understood but not applied (for a Warning header).
    ignored: tuple[str, ...] = ()


def parse_rendering(params: Mapping[str, str], accept: Sequence[str]) -> Rendering:
    """Media type (``accept`` query parameter, else the Accept header), window, viewport.

    ``window=center,width[,function]`` (``linear`` only), ``viewport=vw,vh`` (a box the
    image is fitted in; source cropping ``sx,sy,sw,sh`` is ignored), ``quality=1-100``
    (JPEG). ``annotation`` is ignored.

    Raises
    ------
    BadQuery
        A malformed value.
    NotAcceptableMedia
        Neither JPEG nor PNG is acceptable.
    """
    from iepnode.viewing.rendering import MEDIA_TYPES

    wanted = [m.strip().split(";")[0].lower() for m in params.get("accept", "").split(",")
              if m.strip()] or [m.lower() for m in accept] or ["image/jpeg"]
    media = next((m for m in wanted if m in MEDIA_TYPES), None)
    if media is None and any(m in ("*/*", "image/*") for m in wanted):
        media = "image/jpeg"
    if media is None:
        raise NotAcceptableMedia(f"rendered images are {' or '.join(MEDIA_TYPES)}")
    center = width = None
    size = None
    quality = 90
    ignored: list[str] = []
    try:
        if "window" in params:
            parts = params["window"].split(",")
            if len(parts) not in (2, 3) or (len(parts) == 3 and
                                            parts[2].strip().lower() != "linear"):
                raise ValueError("window=center,width[,linear]")
            center, width = float(parts[0]), float(parts[1])
            if width <= 0:
                raise ValueError("window width must be positive")
        if "viewport" in params:
            parts = params["viewport"].split(",")
            if len(parts) not in (2, 6):
                raise ValueError("viewport=vw,vh[,sx,sy,sw,sh]")
            size = (int(parts[0]), int(parts[1]))
            if not (0 < size[0] <= 4096 and 0 < size[1] <= 4096):
                raise ValueError("viewport sides must be 1-4096")
            if len(parts) == 6:
                ignored.append("viewport source region")
        if "quality" in params:
            quality = int(params["quality"])
            if not 1 <= quality <= 100:
                raise ValueError("quality must be 1-100")
    except ValueError as exc:
        raise BadQuery(str(exc)) from None
    if "annotation" in params:
        ignored.append("annotation")
    return Rendering(media, center, width, size, quality, tuple(ignored))


class NotAcceptableMedia(NodeError):
    """The client accepts no media type the node can give (HTTP 406)."""


def render_image(item: StoredInstance, frame: int, how: Rendering) -> bytes:
    """Frame ``frame`` (1-based) of an instance rendered as asked.

    Raises
    ------
    NotFound
        No image, or no such frame (the rendering module's ``RenderError``).
    """
    from iepnode.viewing.rendering import RenderError, render_bytes

    try:
        return render_bytes(item.path, frame - 1, media_type=how.media_type, center=how.center,
                            width=how.width, size=how.size, quality=how.quality)
    except RenderError as exc:
        raise NotFound(str(exc)) from exc


def frame_count(item: StoredInstance) -> int:
    """Number of frames of an image instance (for checking a frame list before rendering).

    Raises
    ------
    NotFound
        No image.
    """
    from iepnode.viewing.rendering import RenderError, read_info

    try:
        return read_info(item.path).frames
    except RenderError as exc:
        raise NotFound(str(exc)) from exc


def rendered_frame_parts(item: StoredInstance, numbers: Iterable[int],
                         how: Rendering) -> Iterator[Part]:
    """Frames of one instance rendered as asked, a part each (rendered when reached)."""
    for number in numbers:
        yield Part(how.media_type, (render_image(item, number, how),))


def rendered_parts(items: Iterable[StoredInstance], how: Rendering) -> Iterator[Part]:
    """The first frame of each instance that has an image, rendered, one at a time.

    Instances without an image (reports, documents) are passed over.
    """
    for item in items:
        try:
            image = render_image(item, 1, how)
        except NotFound:
            continue
        yield Part(how.media_type, (image,))


__all__ = [
    "NotAcceptableMedia",
    "Rendering",
    "frame_count",
    "parse_rendering",
    "render_image",
    "rendered_frame_parts",
    "rendered_parts",
]
