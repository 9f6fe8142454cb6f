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

The parts: this module wraps a PDF and picks the wrapper by content;
:mod:`iepnode.viewing.image_wrapping` wraps images; :mod:`iepnode.viewing.wrapped_object`
holds what every wrapped object shares (its patient and study, the file-type check, the
common attributes, :class:`~iepnode.viewing.wrapped_object.AttachmentRefused`).
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from iepnode.viewing.image_wrapping import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, wrap_image
from iepnode.viewing.wrapped_object import (
    ATTACHMENT_SERIES_NUMBER,
    MANUFACTURER,
    AttachmentRefused,
    PatientInfo,
    StudyInfo,
    _file_meta,
    _lo,
    _mb,
    _original_name,
    _patient_and_study,
    _title_from,
    sniff,
)

#: Largest PDF accepted, in bytes (an Encapsulated Document's length is a 32-bit value;
#: the node keeps well below it so a page upload stays a normal request).
MAX_PDF_BYTES = 64 * 1024 * 1024


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
