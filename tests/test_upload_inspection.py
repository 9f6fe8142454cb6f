"""Inspection of uploads and imports without reading objects into memory (issue 13).

Zip entries are copied out in blocks to an unnamed temporary file and checked from a
mapping of it; files are mapped directly. These tests run the real code on real
files (generated with pydicom, or bundled with it); the memory itself is measured on
the real node in ``tests/test_memory_bounds.py``.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread

from iepnode.archive import object_check
from iepnode.archive.import_sources import ImportReport, Source
from iepnode.errors import BadDataset
from iepnode.uploads.intake import MAX_HEADER, SKIPPED, ZIP, inspect_staged_file
from tests import data_factory as factory


def ct(tmp_path: Path, **overrides: object) -> Path:
    return factory.make_ct_series(tmp_path / "ct", 1, PatientID="CD-1", **overrides)[0]


def test_bytes_beyond_the_declared_size_are_refused_as_they_come(tmp_path: Path) -> None:
    data = ct(tmp_path).read_bytes()
    lying = Source("IM1", 200, lambda: io.BytesIO(data))  # declares 200 bytes
    with pytest.raises(BadDataset, match="beyond its declared 200 bytes"), \
            object_check.open_object(lying, ImportReport(), tmp_path):
        pass


def test_an_entry_expanding_too_much_is_refused_as_it_comes(tmp_path: Path) -> None:
    big = ct(tmp_path, Rows=1024, Columns=1024, PixelData=bytes(2 << 20))
    data = big.read_bytes()
    bomb = Source("IM1", len(data), lambda: io.BytesIO(data),
                           compressed_size=len(data) // 500)
    with pytest.raises(BadDataset, match="zip bomb"), \
            object_check.open_object(bomb, ImportReport(), tmp_path):
        pass
    honest = Source("IM1", len(data), lambda: io.BytesIO(data),
                             compressed_size=len(data) // 50)
    with object_check.open_object(honest, ImportReport(), tmp_path) as loaded:
        assert loaded is not None and loaded[1] == "1.2.840.10008.1.2.1"
        assert bytes(loaded[0][-16:]) == data[-16:]


def test_a_zip_entry_is_checked_from_a_temporary_copy_that_does_not_stay(
        tmp_path: Path) -> None:
    staging = tmp_path / "staging" / "key"
    staging.mkdir(parents=True)
    path = staging / "disk-name"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(3):
            archive.write(ct(tmp_path / str(number)), f"DICOM/IM{number}")
        archive.writestr("README.TXT", "a CD")
    verdict = inspect_staged_file(path, "cd.zip")
    assert (verdict.kind, verdict.objects) == (ZIP, 3)
    assert sorted(p.name for p in staging.iterdir()) == ["disk-name"]


def test_a_deflated_dataset_is_checked_whole(tmp_path: Path) -> None:
    """Inflated (up to ``max_inflated_mb``) and walked like any other dataset."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    body = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + (
        b"\x09\x00\x10\x10OB\x00\x00" + (40 << 20).to_bytes(4, "little") + bytes(40 << 20))
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(body) + packer.flush()
    assert len(stream) < (1 << 20) < len(body)  # inflates from one block to forty
    assert object_check.check_complete(stream, DeflatedExplicitVRLittleEndian) == (
        DeflatedExplicitVRLittleEndian, False)
    with pytest.raises(BadDataset, match="ends early"):
        object_check.check_complete(stream[: len(stream) // 2], DeflatedExplicitVRLittleEndian)


def test_the_check_lets_go_of_what_it_has_walked(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_check, "FORGET_EVERY", 4096)
    path = ct(tmp_path, Rows=256, Columns=256, PixelData=bytes(2 * 256 * 256),
              ImageComments="x" * 10_000, StudyDescription="y" * 60)
    stream = memoryview(path.read_bytes())
    offset = object_check._meta_at(stream, 132)[1]
    seen: list[int] = []
    object_check.check_complete(stream[offset:], "1.2.840.10008.1.2.1", progress=seen.append)
    assert seen and seen == sorted(seen) and seen[0] >= 4096
    # Pages let go of are read again from the file: nothing is lost.
    with path.open("rb") as handle:
        mapped = object_check._Mapped(handle)
    try:
        before = bytes(mapped.view)
        mapped.forget(len(before))
        assert bytes(mapped.view) == before == path.read_bytes()
    finally:
        mapped.close()


def test_a_header_over_one_mib_is_read_and_one_over_the_limit_refused(
        tmp_path: Path) -> None:
    def with_private(size: int, name: str) -> Path:
        ds = dcmread(ct(tmp_path / name))
        ds.add_new(0x00090010, "LO", "IEPNODE TEST")
        ds.add_new(0x00091001, "OB", bytes(size))  # before the patient module (0010)
        return factory.save(ds, tmp_path / name / "out")

    fine = inspect_staged_file(with_private(2 << 20, "two"), "IM1")
    assert fine.accepted and [p.patient_id for p in fine.patients] == ["CD-1"]
    huge = inspect_staged_file(with_private(MAX_HEADER + (1 << 20), "huge"), "IM2")
    assert huge.kind == SKIPPED and f"first {MAX_HEADER} bytes" in huge.reason
