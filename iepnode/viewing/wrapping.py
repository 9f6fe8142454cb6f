"""Wrap a PDF or a photo/screenshot as a DICOM instance of a patient's study.

An attachment (a referral letter, a photo of a wound, a screenshot) travels with the
images only when it is DICOM itself. This module turns the bytes of an uploaded file
into one dataset:

* a PDF becomes an **Encapsulated PDF** (PS3.3 A.45.1), the PDF bytes unchanged;
* a JPEG or PNG becomes a **Secondary Capture Image** (PS3.3 A.8.1) built with
  highdicom's ``SCImage``. A baseline JPEG keeps its original bitstream (JPEG Baseline
  transfer syntax: no second lossy step); other images (PNG, progressive JPEG, rotated
  phone photos) are decoded and stored uncompressed, lossless.

The content is checked, never the name or the browser's media type: a PDF must start
with ``%PDF-``, an image must decode with Pillow within a pixel limit (decompression
bombs are refused before any pixel is decoded). Every object gets fresh UIDs; it joins
an existing study as a new series, or starts a new study.

Typical use::

    ds = wrap_file(data, PatientInfo("Doe^Jane", "12345"), study=StudyInfo(uid, ...),
                   title="Referral letter", original_name="letter.pdf")
    stream, transfer_syntax = encode_dataset(ds)
    ingester.ingest(stream, transfer_syntax, source_ae="IEPNODE")
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from iepnode.errors import InvalidRequest

#: Largest PDF accepted, in bytes (an Encapsulated Document's length is a 32-bit value;
#: the node keeps well below it so a page upload stays a normal request).
MAX_PDF_BYTES = 64 * 1024 * 1024
#: Largest image file accepted, in bytes.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Largest image accepted, in pixels (width x height). A 12 MP phone photo is 12e6;
#: a decompression bomb is refused from its header, before decoding.
MAX_IMAGE_PIXELS = 50_000_000

#: Media types the node wraps, by the kind :func:`sniff` returns.
MEDIA_TYPES = {"pdf": "application/pdf", "jpeg": "image/jpeg", "png": "image/png"}

#: Series number given to attachment series (an existing study's series keep theirs).
ATTACHMENT_SERIES_NUMBER = 9001
MANUFACTURER = "iepnode"
#: Private block holding the uploaded file's original name (not a standard attribute).
PRIVATE_CREATOR = "IEPNODE 1.0"
PRIVATE_GROUP = 0x0009
_ORIGINAL_NAME = 0x01

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_SEX = {"M", "F", "O"}


class AttachmentRefused(InvalidRequest):
    """The file cannot be wrapped: wrong type, too large, damaged. The message says
    which, in words fit for the person who uploaded it."""


@dataclass(frozen=True)
class PatientInfo:
    """The patient an attachment belongs to, as in the study's images.

    Attributes
    ----------
    name : str
        DICOM PN value, e.g. ``Doe^Jane``.
    patient_id : str
        Patient ID.
    issuer : str
        Issuer of Patient ID (may be empty).
    birth_date : str
        DA value ``YYYYMMDD`` (anything else is left empty).
    sex : str
        ``M``, ``F``, ``O`` (anything else is left empty).
    """

    name: str
    patient_id: str
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class StudyInfo:
    """An existing study the attachment joins (as a new series).

    Attributes
    ----------
    study_uid : str
        Study Instance UID.
    study_date, study_time : str
        DA / TM values (malformed values are left empty).
    accession : str
        Accession Number.
    study_id : str
        Study ID.
    description : str
        Study Description.
    referring_physician : str
        Referring Physician's Name (PN).
    """

    study_uid: str
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    study_id: str = ""
    description: str = ""
    referring_physician: str = ""


def sniff(data: bytes) -> str | None:
    """Return what the bytes are, from their signature: ``pdf``, ``jpeg``, ``png`` or ``None``.

    Parameters
    ----------
    data : bytes
        The file's content (only the first bytes are looked at).
    """
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def wrap_file(
    data: bytes,
    patient: PatientInfo,
    *,
    study: StudyInfo | None = None,
    title: str = "",
    original_name: str = "",
    max_pdf_bytes: int = MAX_PDF_BYTES,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Dataset:
    """Wrap a PDF, JPEG or PNG file, chosen by its content, as a DICOM dataset.

    Parameters
    ----------
    data : bytes
        The uploaded file.
    patient : PatientInfo
        Patient attributes copied into the object.
    study : StudyInfo, optional
        The study to join; ``None`` starts a new study.
    title : str, optional
        Document title / series description (default: from the original name).
    original_name : str, optional
        The file's name on the uploader's machine (kept in a private element).
    max_pdf_bytes, max_image_bytes, max_pixels : int, optional
        Limits (see the module constants).

    Returns
    -------
    pydicom.dataset.Dataset
        With ``file_meta`` set; see :func:`encode_dataset`.

    Raises
    ------
    AttachmentRefused
        Not a PDF, JPEG or PNG, too large, or damaged.
    """
    kind = sniff(data)
    if kind == "pdf":
        return wrap_pdf(data, patient, study=study, title=title, original_name=original_name,
                        max_bytes=max_pdf_bytes)
    if kind in ("jpeg", "png"):
        return wrap_image(data, patient, study=study, title=title, original_name=original_name,
                          max_bytes=max_image_bytes, max_pixels=max_pixels)
    raise AttachmentRefused(
        "Only PDF documents and JPEG or PNG images can be attached; this file is none of these."
    )


def wrap_pdf(
    data: bytes,
    patient: PatientInfo,
    *,
    study: StudyInfo | None = None,
    title: str = "",
    original_name: str = "",
    max_bytes: int = MAX_PDF_BYTES,
) -> Dataset:
    """Wrap PDF bytes as an Encapsulated PDF Storage instance.

    Parameters
    ----------
    data : bytes
        The PDF; must start with ``%PDF-``. Stored byte for byte.
    patient, study, title, original_name
        As in :func:`wrap_file`.
    max_bytes : int, optional
        Size limit.

    Returns
    -------
    pydicom.dataset.Dataset
        An Encapsulated PDF (Modality ``DOC``) in a new series.

    Raises
    ------
    AttachmentRefused
        Not a PDF, empty, or larger than ``max_bytes``.
    """
    if not data.startswith(b"%PDF-"):
        raise AttachmentRefused("This file is not a PDF document (it does not start with %PDF-).")
    if len(data) > max_bytes:
        raise AttachmentRefused(
            f"The PDF is {_mb(len(data))}; the largest accepted is {_mb(max_bytes)}."
        )
    now = dt.datetime.now()
    ds = Dataset()
    ds.file_meta = _file_meta(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    _patient_and_study(ds, patient, study, title or _title_from(original_name), now)
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = ATTACHMENT_SERIES_NUMBER
    ds.SeriesDescription = _lo(title or _title_from(original_name))
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    # General Equipment, SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    # Who knows what a PDF shows: say it may identify the patient.
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = _lo(title or _title_from(original_name))
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values are padded to even length; the real length is kept beside them.
    ds.EncapsulatedDocument = data + b"\x00" if len(data) % 2 else data
    ds.EncapsulatedDocumentLength = len(data)
    _original_name(ds, original_name)
    return ds


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


def encode_dataset(ds: Dataset) -> tuple[bytes, str]:
    """Encode a wrapped dataset as the ingest path takes it.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        From :func:`wrap_pdf`, :func:`wrap_image` or :func:`wrap_file`.

    Returns
    -------
    tuple of (bytes, str)
        The dataset without File Meta, explicit VR little endian, and its transfer syntax
        UID: the arguments of :meth:`iepnode.archive.ingest.Ingester.ingest`.
    """
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue(), str(ds.file_meta.TransferSyntaxUID)


def original_name_of(ds: Dataset) -> str:
    """Return the original file name kept in the private block ('' when absent)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return str(block[_ORIGINAL_NAME].value)
    except KeyError:
        return ""


# --- helpers ---------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _lo(text: str) -> str:
    """A LO value: at most 64 characters, no backslash or control characters."""
    clean = "".join(c for c in text if c.isprintable() and c != "\\").strip()
    return clean[:64]


def _title_from(original_name: str) -> str:
    stem = PurePath(original_name.replace("\\", "/")).stem if original_name else ""
    return _lo(stem) or "Attached document"


def _file_meta(sop_class: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_and_study(ds: Dataset, patient: PatientInfo, study: StudyInfo | None, title: str,
                       now: dt.datetime) -> None:
    """Patient and General Study modules, from the given values (checked, not trusted)."""
    ds.PatientName = _pn(patient.name)
    ds.PatientID = _lo(patient.patient_id)
    if patient.issuer.strip():
        ds.IssuerOfPatientID = _lo(patient.issuer)
    ds.PatientBirthDate = patient.birth_date if _DATE.match(patient.birth_date or "") else ""
    ds.PatientSex = patient.sex if patient.sex in _SEX else ""
    if study is None:
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.StudyID = now.strftime("%y%m%d%H%M%S")  # DICOMDIR readers want one
        ds.StudyDescription = _lo(title)
        ds.ReferringPhysicianName = ""
        return
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date if _DATE.match(study.study_date or "") else ""
    ds.StudyTime = study.study_time if _TIME.match(study.study_time or "") else ""
    ds.AccessionNumber = _lo(study.accession)[:16]
    ds.StudyID = _lo(study.study_id)[:16]
    if study.description.strip():
        ds.StudyDescription = _lo(study.description)
    ds.ReferringPhysicianName = _pn(study.referring_physician)


def _pn(value: str) -> str:
    """A PN value: printable, no backslash, each component group at most 64 characters."""
    clean = "".join(c for c in (value or "") if c.isprintable() and c != "\\").strip()
    return "=".join(group[:64] for group in clean.split("=")[:3])


def _original_name(ds: Dataset, original_name: str) -> None:
    name = "".join(c for c in original_name if c.isprintable()).strip()[:1024]
    if name:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(_ORIGINAL_NAME, "LT", name)


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
