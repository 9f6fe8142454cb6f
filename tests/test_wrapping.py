"""Wrapping uploaded PDFs and images as DICOM (iepnode/viewing/wrapping.py).

Every wrapped object is written as a Part-10 file and checked with dicom3tools'
``dciodvfy`` (the IOD verifier); pixel data and PDF bytes are compared with the input.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from iepnode.archive.ingest import parse_header, record_from_header
from iepnode.viewing.image_wrapping import wrap_image
from iepnode.viewing.wrapped_object import (
    AttachmentRefused,
    PatientInfo,
    StudyInfo,
    original_name_of,
    sniff,
)
from iepnode.viewing.wrapping import encode_dataset, wrap_file, wrap_pdf
from tests.data_factory import minimal_pdf
from tests.support.tools import dicom3tools

PATIENT = PatientInfo("Müller^Jane", "P-12345", "HOSP", "19680102", "F")
STUDY = StudyInfo("1.2.826.0.1.3680043.8.498.1", "20070213", "132608", "ACC77", "S1",
                  "Schaedel", "Who^Doctor")


def _verify(ds, path: Path) -> list[str]:
    """Save ``ds`` and return dciodvfy's error lines (warnings are allowed)."""
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run([dicom3tools("dciodvfy"), str(path)], capture_output=True,
                            timeout=120, check=False)
    lines = (result.stdout + result.stderr).decode("latin-1").splitlines()
    return [line for line in lines if "Error" in line]


def _image_bytes(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(shape, dtype=np.uint8, seed=1) -> np.ndarray:
    high = 255 if dtype == np.uint8 else 65535
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def test_sniff_by_content_not_name():
    assert sniff(minimal_pdf()) == "pdf"
    assert sniff(_image_bytes(_noise((4, 4, 3)), "PNG")) == "png"
    assert sniff(_image_bytes(_noise((8, 8, 3)), "JPEG")) == "jpeg"
    assert sniff(b"GIF89a....") is None
    assert sniff(b"") is None


def test_pdf_in_existing_study_is_valid_and_keeps_the_bytes(tmp_path):
    pdf = minimal_pdf("referral") + b"x"  # odd length: padded in DICOM, length kept
    ds = wrap_pdf(pdf, PATIENT, study=STUDY, title="Referral letter",
                  original_name="C:\\Users\\me\\letter ä.pdf")
    assert _verify(ds, tmp_path / "pdf.dcm") == []
    back = dcmread(tmp_path / "pdf.dcm")
    assert back.SOPClassUID == EncapsulatedPDFStorage
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.EncapsulatedDocument[: back.EncapsulatedDocumentLength] == pdf
    assert back.EncapsulatedDocumentLength == len(pdf)
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.StudyInstanceUID == STUDY.study_uid
    assert (back.AccessionNumber, back.StudyDate, back.StudyID) == ("ACC77", "20070213", "S1")
    assert str(back.PatientName) == "Müller^Jane"
    assert (back.PatientID, back.IssuerOfPatientID) == ("P-12345", "HOSP")
    assert (back.PatientBirthDate, back.PatientSex) == ("19680102", "F")
    assert back.DocumentTitle == "Referral letter"
    assert back.Modality == "DOC"
    assert original_name_of(back) == "C:\\Users\\me\\letter ä.pdf"


def test_pdf_new_study_gets_fresh_uids(tmp_path):
    one = wrap_pdf(minimal_pdf(), PATIENT, original_name="scan.pdf")
    two = wrap_pdf(minimal_pdf(), PATIENT, original_name="scan.pdf")
    assert _verify(one, tmp_path / "one.dcm") == []
    uids = {one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID,
            two.StudyInstanceUID, two.SeriesInstanceUID, two.SOPInstanceUID}
    assert len(uids) == 6
    assert one.DocumentTitle == "scan"  # from the original name when no title is given


def test_png_becomes_sc_with_the_same_pixels(tmp_path):
    arr = _noise((120, 160, 3))
    ds = wrap_file(_image_bytes(arr, "PNG"), PATIENT, study=STUDY, title="Wound photo",
                   original_name="wound.png")
    assert _verify(ds, tmp_path / "sc.dcm") == []
    back = dcmread(tmp_path / "sc.dcm")
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.PhotometricInterpretation == "RGB"
    assert back.StudyInstanceUID == STUDY.study_uid
    assert back.SeriesDescription == "Wound photo"
    assert np.array_equal(back.pixel_array, arr)
    assert original_name_of(back) == "wound.png"


def test_16_bit_grey_png_keeps_its_values(tmp_path):
    arr = _noise((64, 48), dtype=np.uint16)
    ds = wrap_image(_image_bytes(arr, "PNG"), PATIENT)
    assert _verify(ds, tmp_path / "grey.dcm") == []
    back = dcmread(tmp_path / "grey.dcm")
    assert (back.BitsAllocated, back.PhotometricInterpretation) == (16, "MONOCHROME2")
    assert np.array_equal(back.pixel_array, arr)


def test_transparent_png_is_flattened_onto_white(tmp_path):
    arr = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent black
    ds = wrap_image(_image_bytes(arr, "PNG"), PATIENT)
    assert _verify(ds, tmp_path / "alpha.dcm") == []
    assert (dcmread(tmp_path / "alpha.dcm").pixel_array == 255).all()


def test_baseline_jpeg_keeps_its_bitstream(tmp_path):
    arr = _noise((90, 130, 3))
    data = _image_bytes(arr, "JPEG", quality=90)
    ds = wrap_image(data, PATIENT, study=STUDY)
    assert _verify(ds, tmp_path / "jpeg.dcm") == []
    back = dcmread(tmp_path / "jpeg.dcm")
    assert back.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert back.PhotometricInterpretation == "YBR_FULL_422"
    frame = next(generate_frames(back.PixelData, number_of_frames=1))
    assert frame.rstrip(b"\x00") == data.rstrip(b"\x00")
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert back.pixel_array.shape == decoded.shape
    # Same bitstream, possibly another decoder: within a grey level or two.
    assert np.abs(back.pixel_array.astype(int) - decoded.astype(int)).mean() < 2

    grey = _image_bytes(_noise((70, 30), seed=4), "JPEG")
    ds = wrap_image(grey, PATIENT)
    assert _verify(ds, tmp_path / "grey.dcm") == []
    back = dcmread(tmp_path / "grey.dcm")
    assert (back.file_meta.TransferSyntaxUID, back.PhotometricInterpretation) == (
        JPEGBaseline8Bit, "MONOCHROME2")
    assert (back.Rows, back.Columns, back.SamplesPerPixel) == (70, 30, 1)
    assert back.pixel_array.shape == (70, 30)


def test_progressive_and_rotated_jpegs_are_decoded(tmp_path):
    arr = _noise((40, 60), seed=3)
    progressive = _image_bytes(arr, "JPEG", progressive=True)
    ds = wrap_image(progressive, PATIENT)
    assert _verify(ds, tmp_path / "prog.dcm") == []
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "MONOCHROME2"

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = _image_bytes(_noise((40, 60, 3)), "JPEG", exif=exif.tobytes())
    ds = wrap_image(rotated, PATIENT)
    assert (ds.Rows, ds.Columns) == (60, 40)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a" + b"\0" * 100, "Only PDF documents and JPEG or PNG images"),
        (b"MZ\x90\x00 an exe", "Only PDF documents and JPEG or PNG images"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "damaged"),
        (b"\xff\xd8\xff\xe0" + b"\x12" * 40, "damaged"),
    ],
)
def test_refused_files_say_why(data, message):
    with pytest.raises(AttachmentRefused, match=message):
        wrap_file(data, PATIENT)


def test_pdf_checks():
    with pytest.raises(AttachmentRefused, match="not a PDF"):
        wrap_pdf(b"<html>%PDF-1.4", PATIENT)
    with pytest.raises(AttachmentRefused, match="largest accepted"):
        wrap_pdf(minimal_pdf(), PATIENT, max_bytes=10)


def test_decompression_bomb_refused_before_decoding():
    # A 20000 x 20000 PNG of zeros: ~ 1 MB compressed, 400 megapixels decoded.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG")
    with pytest.raises(AttachmentRefused, match="megapixels"):
        wrap_image(buf.getvalue(), PATIENT)
    with pytest.raises(AttachmentRefused, match="megapixels"):
        wrap_image(_image_bytes(_noise((100, 100)), "PNG"), PATIENT, max_pixels=5000)


def test_odd_patient_values_are_cleaned_not_trusted(tmp_path):
    patient = PatientInfo("Evil\\Name^With\x07Bell", "ID\\1", "", "1968-01-02", "Female")
    study = StudyInfo("1.2.3.4", "yesterday", "25:00", "A" * 40, "", "", "")
    ds = wrap_pdf(minimal_pdf(), patient, study=study)
    assert _verify(ds, tmp_path / "odd.dcm") == []
    assert str(ds.PatientName) == "EvilName^WithBell"
    assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyDate) == ("", "", "")
    assert len(ds.AccessionNumber) == 16


def test_encoded_dataset_goes_through_the_ingest_parser():
    ds = wrap_pdf(minimal_pdf(), PATIENT, study=STUDY)
    stream, ts = encode_dataset(ds)
    rec = record_from_header(parse_header(stream, ts), ts, "IEPNODE")
    assert (rec.sop_uid, rec.study_uid, rec.sop_class) == (
        ds.SOPInstanceUID, STUDY.study_uid, EncapsulatedPDFStorage)
    assert rec.patient_name == "Müller^Jane"
