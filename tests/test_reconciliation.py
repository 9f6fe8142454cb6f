"""Import reconciliation of uploaded objects (iepnode.archive.reconciliation).

Every reconciled file is checked with dicom3tools' ``dciodvfy`` (no error it did
not have before), its pixel data compared byte for byte with the original for
native and encapsulated transfer syntaxes, and its Original Attributes Sequence
read back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from iepnode.archive.reconciliation import PatientIdentity, reconcile_file, reconcile_stream
from iepnode.errors import BadDataset
from tests.data_factory import bundled, copy_bundled, make_ct_series
from tests.support.tools import dicom3tools
from tests.test_fileset import _tool_output

HOSPITAL = PatientIdentity("H0012345", "RXH", "Müller^Jürgen", "19610203", "M")
WHEN = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def dciodvfy(path: Path) -> set[str]:
    """The ``Error`` lines dciodvfy reports for ``path``."""
    _, lines = _tool_output(dicom3tools("dciodvfy"), path)
    return {line for line in lines if "Error" in line}


def pixel_bytes(path: Path) -> bytes:
    """Everything from (7FE0,0010) on, as stored in the file."""
    data = path.read_bytes()
    ds = dcmread(path)
    assert "PixelData" in ds
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    tag = b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10"
    return data[data.rindex(tag):]


def reconcile(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir(exist_ok=True)
    reconcile_file(src, dst, HOSPITAL, source="Patient upload IEPTEST1",
                   modifying_system="IEPNODE", now=WHEN)
    return dst


@pytest.mark.parametrize("name", [
    "CT_small.dcm",               # explicit VR little endian
    "MR_small_implicit.dcm",      # implicit VR little endian
    "MR_small_bigendian.dcm",     # explicit VR big endian
    "MR_small_RLE.dcm",           # RLE lossless (encapsulated)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 (encapsulated)
    "SC_rgb_jpeg_dcmtk.dcm",      # JPEG baseline (encapsulated)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "SC_rgb_rle_2frame.dcm",      # RLE, multi-frame
])
def test_pixel_data_byte_identical_and_valid(name: str, tmp_path: Path) -> None:
    src = copy_bundled(name, tmp_path)
    dst = reconcile(src, tmp_path)
    before, after = dcmread(src), dcmread(dst)
    assert pixel_bytes(dst) == pixel_bytes(src)
    assert after.PixelData == before.PixelData
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert after[keyword].value == before[keyword].value
    assert after.file_meta.MediaStorageSOPInstanceUID == before.SOPInstanceUID
    assert after.PatientID == "H0012345"
    assert after.IssuerOfPatientID == "RXH"
    assert str(after.PatientName) == "Müller^Jürgen"
    new_errors = dciodvfy(dst) - dciodvfy(src)
    assert new_errors == set()


def test_original_attributes_kept(tmp_path: Path) -> None:
    (src,) = make_ct_series(tmp_path / "in", 1, PatientID="CD-77", PatientName="Doe^Jane",
                            PatientBirthDate="19800101", PatientSex="F",
                            IssuerOfPatientID="OTHERHOSP")
    dst = reconcile(src, tmp_path)
    ds = dcmread(dst)
    assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientBirthDate, ds.PatientSex) == (
        "H0012345", "RXH", "19610203", "M")
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # the new name is not ASCII
    (other,) = ds.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == (
        "CD-77", "OTHERHOSP", "TEXT")
    (item,) = ds.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.SourceOfPreviousValues == "Patient upload IEPTEST1"
    assert item.ModifyingSystem == "IEPNODE"
    assert item.AttributeModificationDateTime.startswith("20261123120000")
    (old,) = item.ModifiedAttributesSequence
    assert old.PatientID == "CD-77"
    assert old.IssuerOfPatientID == "OTHERHOSP"
    assert str(old.PatientName) == "Doe^Jane"
    assert old.PatientBirthDate == "19800101"
    assert old.PatientSex == "F"
    assert "OtherPatientIDsSequence" in old  # it was absent: recorded empty
    assert dciodvfy(dst) == set()


def test_reconciling_twice_changes_nothing_more(tmp_path: Path) -> None:
    (src,) = make_ct_series(tmp_path / "in", 1)
    once = reconcile(src, tmp_path)
    again = tmp_path / "again.dcm"
    result = reconcile_file(once, again, HOSPITAL, source="x", modifying_system="IEPNODE")
    assert result.coercion.changed == ()
    assert len(dcmread(again).OriginalAttributesSequence) == 1


@pytest.mark.parametrize("name", ["chrX1.dcm", "chrH31.dcm", "chrGreek.dcm"])
def test_non_ascii_originals_kept_readable(name: str, tmp_path: Path) -> None:
    src = copy_bundled(name, tmp_path)
    original = dcmread(src)
    dst = reconcile(src, tmp_path)
    ds = dcmread(dst)
    assert str(ds.PatientName) == "Müller^Jürgen"
    old = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert str(old.PatientName) == str(original.PatientName)
    assert ds.OtherPatientIDsSequence[0].PatientID == original.PatientID
    # Every other text value still reads the same in the new character set.
    for keyword in ("StudyDescription", "InstitutionName", "ReferringPhysicianName"):
        if keyword in original:
            assert str(ds[keyword].value) == str(original[keyword].value)
    assert dciodvfy(dst) - dciodvfy(src) == set()


def test_latin1_dataset_keeps_its_character_set(tmp_path: Path) -> None:
    (src,) = make_ct_series(tmp_path / "in", 1, SpecificCharacterSet="ISO_IR 100",
                            PatientName="Gößmann^Zoë", StudyDescription="Schädel")
    dst = reconcile(src, tmp_path)
    ds = dcmread(dst)
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert ds.StudyDescription == "Schädel"
    assert str(ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientName) \
        == "Gößmann^Zoë"


def test_deflated_becomes_explicit_little_endian(tmp_path: Path) -> None:
    src = copy_bundled("image_dfl.dcm", tmp_path)
    dst = reconcile(src, tmp_path)
    before, after = dcmread(src), dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert after.PixelData == before.PixelData
    assert after.PatientID == "H0012345"


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_stream_of_generated_series(syntax: str, tmp_path: Path) -> None:
    (src,) = make_ct_series(tmp_path / "in", 1, transfer_syntax=syntax)
    data = src.read_bytes()
    from iepnode.archive.ingest import parse_file_meta

    meta, offset = parse_file_meta(data)
    result = reconcile_stream(data[offset:], meta.transfer_syntax, HOSPITAL, source="s",
                              modifying_system="IEPNODE")
    tail = data[data.rindex(b"\xe0\x7f\x10\x00" if syntax == ImplicitVRLittleEndian
                            else b"\x7f\xe0\x00\x10"):]
    assert result.stream.endswith(tail)
    assert result.coercion.original.patient_id == "IEP-TEST-0001"


def test_garbage_is_refused() -> None:
    with pytest.raises(BadDataset):
        reconcile_stream(b"\x08\x00\x05\x00CS\xff\xff" + b"x" * 10, "1.2.840.10008.1.2.1",
                         HOSPITAL, source="s", modifying_system="IEPNODE")


def test_bundled_helper_is_what_we_think() -> None:
    assert bundled("chrX1.dcm").is_file()
