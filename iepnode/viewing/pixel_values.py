"""The values of one decoded frame, and what numpy alone does to them.

A :class:`Frame` holds modality values (grey) or RGB; :func:`window_linear` is DICOM's
linear VOI function (PS3.3 C.11.2.1.2.1), the reference the browser's ``viewer.js``
repeats exactly (same rounding); :func:`min_max_window` spans a frame's values. Also
the colour-to-``uint8`` scaling and the block-mean reduction used by
:mod:`iepnode.viewing.rendering`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    """One decoded frame.

    Attributes
    ----------
    values : numpy.ndarray
        Grey images: (rows, columns) after the modality LUT (``float64`` when the
        rescale is not integral, else an integer type). Colour: (rows, columns, 3)
        ``uint8`` RGB.
    color : bool
        ``values`` is RGB.
    monochrome1 : bool
        Low values are white (invert after windowing).
    window : tuple[float, float] | None
        The file's window (centre, width) for this frame, if any.
    voi_lut : numpy.ndarray | None
        Values after the file's VOI LUT, scaled 0-255 (used when there is no window).
    frames : int
        Number of frames of the object the frame is from.
    """

    values: np.ndarray
    color: bool
    monochrome1: bool
    window: tuple[float, float] | None
    voi_lut: np.ndarray | None = None
    frames: int = 1

    def auto_window(self) -> tuple[float, float]:
        """The window to show with: the file's, else minimum to maximum."""
        if self.window is not None:
            return self.window
        return min_max_window(self.values)

    def windowed(self, center: float | None = None, width: float | None = None) -> np.ndarray:
        """Display values: ``uint8`` (rows, columns) grey, or (rows, columns, 3) RGB.

        Parameters
        ----------
        center, width : float, optional
            The window; both or neither. Without one, the file's window, else its
            VOI LUT, else minimum to maximum. Colour frames ignore the window.
        """
        if self.color:
            return self.values
        if center is None or width is None:
            if self.window is None and self.voi_lut is not None:
                grey = self.voi_lut
                return 255 - grey if self.monochrome1 else grey
            center, width = self.auto_window()
        grey = window_linear(self.values, center, width)
        return 255 - grey if self.monochrome1 else grey


def min_max_window(values: np.ndarray) -> tuple[float, float]:
    """The window (centre, width) that spans ``values`` from minimum to maximum."""
    low, high = float(values.min()), float(values.max())
    width = max(high - low, 1.0) + 1.0
    return low + (width - 1.0) / 2.0 + 0.5, width


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2.1) to ``uint8`` 0-255.

    ``x <= c - 0.5 - (w-1)/2`` gives 0, ``x > c - 0.5 + (w-1)/2`` gives 255, and in
    between ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255`` rounded half up. ``viewer.js``
    computes the same numbers.
    """
    width = max(float(width), 1.0)
    center = float(center)
    if width == 1.0:  # the standard's threshold case
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    # The same operations in the same order as ((x - (c - 0.5)) / (w - 1) + 0.5) * 255,
    # + 0.5, floor (so the same numbers), in place: one float copy of the frame, not five.
    scaled = np.subtract(values, center - 0.5)
    scaled /= width - 1.0
    scaled += 0.5
    scaled *= 255.0
    scaled += 0.5
    np.floor(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _to_uint8_rgb(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    top = float(2 ** bits - 1)
    return np.clip(arr.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def _reduce(values: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``factor`` x ``factor`` pixels (edges cropped to whole blocks).

    Summed from ``factor**2`` strided views (no float copy of the whole frame: a
    3328x4096 mammogram halves in ~30 ms); integers are rounded half up.
    """
    rows, columns = values.shape[0] // factor, values.shape[1] // factor
    integral = np.issubdtype(values.dtype, np.integer)
    total = np.zeros((rows, columns, *values.shape[2:]),
                     dtype=np.int64 if integral and values.itemsize > 2 else
                     np.int32 if integral else np.float64)
    for dy in range(factor):
        for dx in range(factor):
            total += values[dy:rows * factor:factor, dx:columns * factor:factor]
    count = factor * factor
    if values.dtype == np.uint8:
        return ((total + count // 2) // count).astype(np.uint8)
    if integral:  # stays integral: int16 on the wire when it fits
        return np.floor_divide(total + count // 2, count).astype(np.int32)
    return (total / count).astype(np.float32)


__all__ = ["Frame", "min_max_window", "window_linear"]
