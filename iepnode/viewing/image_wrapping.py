"""Wrapping a JPEG or PNG image (a photo, a screenshot) as a Secondary Capture Image.

Built with highdicom's ``SCImage``. A baseline JPEG keeps its original bitstream (JPEG
Baseline transfer syntax: no second lossy step); other images (PNG, progressive JPEG,
rotated phone photos) are decoded and stored uncompressed, lossless. An image must
decode with Pillow within :data:`MAX_IMAGE_PIXELS` (decompression bombs are refused
from the header, before any pixel is decoded).
"""

from __future__ import annotations

import datetime as dt
import warnings
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from iepnode.viewing.wrapped_object import (
    ATTACHMENT_SERIES_NUMBER,
    MANUFACTURER,
    AttachmentRefused,
    PatientInfo,
    StudyInfo,
    _lo,
    _mb,
    _original_name,
    _patient_and_study,
    _title_from,
    sniff,
)

#: Largest image file accepted, in bytes.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Largest image accepted, in pixels (width x height). A 12 MP phone photo is 12e6;
#: a decompression bomb is refused from its header, before decoding.
MAX_IMAGE_PIXELS = 50_000_000


def wrap_image(
    data: bytes,
    patient: PatientInfo,
    *,
    study: StudyInfo | None = None,
    title: str = "",
    original_name: str = "",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Dataset:
    """Wrap a JPEG or PNG image as a Secondary Capture Image (highdicom ``SCImage``).

    A baseline JPEG without an EXIF rotation keeps its bitstream (JPEG Baseline transfer
    syntax, YBR_FULL_422 / YBR_FULL / RGB / MONOCHROME2 as the JPEG says); everything else
    is decoded (EXIF rotation applied, transparency flattened onto white) and stored
    uncompressed: 8-bit RGB or MONOCHROME2 (16-bit for 16-bit grey PNGs).

    Parameters
    ----------
    data : bytes
        The JPEG or PNG file.
    patient, study, title, original_name
        As in :func:`wrap_file`.
    max_bytes : int, optional
        File size limit.
    max_pixels : int, optional
        Pixel limit (width x height), checked from the header before decoding.

    Returns
    -------
    pydicom.dataset.Dataset
        A Secondary Capture Image (Modality ``OT``) in a new series.

    Raises
    ------
    AttachmentRefused
        Not a JPEG/PNG, too large, too many pixels, or it does not decode.
    """
    from highdicom.sc import SCImage

    kind = sniff(data)
    if kind not in ("jpeg", "png"):
        raise AttachmentRefused("This file is not a JPEG or PNG image.")
    if len(data) > max_bytes:
        raise AttachmentRefused(
            f"The image file is {_mb(len(data))}; the largest accepted is {_mb(max_bytes)}."
        )
    image = _open_image(data, kind, max_pixels)
    keep_jpeg = kind == "jpeg" and _is_plain_baseline_jpeg(data, image)
    if keep_jpeg:
        # The bitstream is kept: highdicom builds the modules around a one-pixel stand-in
        # (no 36 MB copy of a 12 MP photo), then the real size and frame are set below.
        channels = 1 if image.mode == "L" else 3
        pixels = np.zeros((1, 1) if channels == 1 else (1, 1, 3), dtype=np.uint8)
        photometric = "MONOCHROME2" if channels == 1 else "RGB"
    else:
        pixels, photometric = _pixels(image, kind)
    now = dt.datetime.now()
    study_uid = study.study_uid if study is not None else generate_uid()
    with warnings.catch_warnings():
        # highdicom warns about values it finds odd; this module sets them itself below.
        warnings.simplefilter("ignore")
        ds = SCImage(
            pixel_array=pixels,
            photometric_interpretation=photometric,
            bits_allocated=16 if pixels.dtype == np.uint16 else 8,
            # A photo or screenshot has no patient coordinate system; highdicom wants one
            # named, so the orientation it then requires is emptied below (Type 2C:
            # present, empty = unknown).
            coordinate_system="PATIENT",
            patient_orientation=("L", "P"),
            study_instance_uid=study_uid,
            series_instance_uid=generate_uid(),
            series_number=ATTACHMENT_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=_lo(title or _title_from(original_name)),
            specific_character_set="ISO_IR 192",
        )
    ds.PatientOrientation = None
    ds.Laterality = None  # Type 2C: unknown (a photo of what, only the uploader knows)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    _patient_and_study(ds, patient, study, title or _title_from(original_name), now)
    ds.StudyInstanceUID = study_uid
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    if keep_jpeg:
        width, height = image.size
        ds.Rows, ds.Columns = height, width
        ds.PhotometricInterpretation = _jpeg_photometric(image)
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = round(width * height * channels / len(data), 2)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    _original_name(ds, original_name)
    return ds


def _open_image(data: bytes, kind: str, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing bombs from the header first."""
    fmt = "JPEG" if kind == "jpeg" else "PNG"
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) past its own limit; both mean "too many pixels".
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise AttachmentRefused(
                    f"The image is {width} x {height} pixels; the largest accepted is "
                    f"{max_pixels / 1e6:.0f} megapixels."
                )
            image.load()
    except AttachmentRefused:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise AttachmentRefused(
            f"The image has too many pixels; the largest accepted is "
            f"{max_pixels / 1e6:.0f} megapixels."
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise AttachmentRefused(f"The {fmt} image is damaged and cannot be read ({exc}).") from exc
    if image.size[0] < 1 or image.size[1] < 1:
        raise AttachmentRefused("The image is empty.")
    return image


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError):
        return 1


def _sof_marker(data: bytes) -> int | None:
    """Return the first Start Of Frame marker (0xC0..0xCF) of a JPEG bitstream."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _is_plain_baseline_jpeg(data: bytes, image: Image.Image) -> bool:
    """A JPEG the JPEG Baseline transfer syntax can carry as it is."""
    return (
        _sof_marker(data) == 0xC0
        and image.mode in ("L", "RGB")
        and _exif_orientation(image) == 1
    )


def _jpeg_photometric(image: Image.Image) -> str:
    """Photometric Interpretation of a baseline JPEG's bitstream (PS3.5 8.2.1)."""
    if image.mode == "L":
        return "MONOCHROME2"
    if image.info.get("adobe_transform") == 0:
        return "RGB"  # Adobe APP14 says the components are not YCbCr
    layers = getattr(image, "layer", None) or []
    sampling = {(h, v) for _id, h, v, _q in layers}
    return "YBR_FULL" if len(sampling) <= 1 else "YBR_FULL_422"


def _pixels(image: Image.Image, kind: str) -> tuple[np.ndarray, str]:
    """Decoded pixels as SCImage takes them, and their Photometric Interpretation."""
    if kind == "jpeg":
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image)
        if arr.min() < 0 or arr.max() > 0xFFFF:
            raise AttachmentRefused("The image's grey values do not fit 16 bits.")
        return arr.astype(np.uint16), "MONOCHROME2"
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.uint8), "MONOCHROME2"
    if mode in ("LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    rgb = image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8), "RGB"
