"""DICOMDIR file-sets: checked by the real validators (dicom3tools) and read back by pydicom.

Every built file-set goes through :func:`assert_valid_fileset`: ``dciodvfy`` on the
DICOMDIR and ``dcentvfy`` on the members report no error, pydicom's ``FileSet``
loads it with nothing to fix, File IDs are conformant, and each member is the
source file itself (hard link) or a byte-identical copy.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ColorPaletteStorage, generate_uid

import storage.fileset as fileset_module
from storage.fileset import FilesetError, NoUsableMember, fileset_file_ids, write_fileset
from tests.data_factory import (
    copy_bundled,
    make_ct_series,
    make_pdf,
    make_sr,
    read_header,
    rewrite,
    save,
)
from tests.support.damage import DAMAGES, REASONS, damage, permissions_apply_here
from tests.support.tools import dicom3tools

COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")


# ------------------------------------------------------------------------------------
# Helpers


def _tool_output(*command: str | Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, timeout=120, check=False
    )
    text = (result.stdout + result.stderr).decode("latin-1")
    return result.returncode, text.splitlines()


def dciodvfy_errors(dicomdir: Path) -> list[str]:
    """Lines of ``dciodvfy`` output that report an error (``Error - ...``)."""
    code, lines = _tool_output(dicom3tools("dciodvfy"), dicomdir)
    errors = [line for line in lines if "Error" in line]
    if code != 0 and not errors:
        errors.append(f"dciodvfy exited with {code}: {lines}")
    return errors


def dcentvfy_errors(files: Sequence[Path]) -> list[str]:
    """Lines of ``dcentvfy`` output reporting an entity inconsistency or a failure."""
    code, lines = _tool_output(dicom3tools("dcentvfy"), *files)
    errors = [line for line in lines if "Error" in line]
    if code != 0 and not errors:
        errors.append(f"dcentvfy exited with {code}: {lines}")
    return errors


def records(dest: Path, record_type: str | None = None) -> list[Dataset]:
    ds = dcmread(dest / "DICOMDIR")
    return [
        r
        for r in ds.DirectoryRecordSequence
        if record_type is None or r.DirectoryRecordType == record_type
    ]


def assert_valid_fileset(
    dest: Path, sources: Sequence[Path], *, check_entities: bool = True
) -> None:
    """Run every check a built file-set must pass."""
    dicomdir = dest / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []

    file_ids = fileset_file_ids(dest)
    for file_id in file_ids:
        parts = file_id.split("/")
        assert 1 <= len(parts) <= 8, file_id
        assert all(COMPONENT.match(part) for part in parts), file_id
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {
        "DICOMDIR"
    }
    assert on_disk == set(file_ids)
    assert len(file_ids) == len(set(file_ids))

    members = [dest / f for f in file_ids]
    if check_entities:
        assert dcentvfy_errors(members) == []

    by_uid = {str(read_header(s).SOPInstanceUID): s for s in sources}
    with pydicom_fileset(dicomdir) as fs:
        assert len(fs) == len(by_uid) == len(file_ids)
        assert not fs.is_staged  # pydicom's own layout: nothing to move or rewrite
        for instance in fs:
            source = by_uid[str(instance.SOPInstanceUID)]
            member = Path(instance.path)
            assert filecmp.cmp(source, member, shallow=False)
            assert read_header(member).SOPClassUID == instance.SOPClassUID
            meta = dcmread(source, stop_before_pixels=True).file_meta
            assert instance.TransferSyntaxUID == meta.TransferSyntaxUID


@contextlib.contextmanager
def pydicom_fileset(dicomdir: Path) -> Iterator[FileSet]:
    """pydicom's view of a file-set, with its staging folder removed afterwards.

    ``FileSet`` always holds a ``TemporaryDirectory`` and never cleans it up; left
    to the garbage collector it raises a ResourceWarning (an error under
    ``filterwarnings = error``, possibly inside some later test).
    """
    fs = FileSet(dcmread(dicomdir))
    try:
        yield fs
    finally:
        fs._stage["t"].cleanup()


def staging_leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def snapshot(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "sets" / "study1"


# ------------------------------------------------------------------------------------
# Content


def test_two_studies_of_two_patients(src: Path, dest: Path) -> None:
    sources = [copy_bundled("CT_small.dcm", src), copy_bundled("MR_small.dcm", src)]

    assert len(write_fileset(dest, sources).files) == 2

    assert_valid_fileset(dest, sources)
    assert [str(r.PatientID) for r in records(dest, "PATIENT")] == ["1CT1", "4MR1"]
    assert len(records(dest, "STUDY")) == 2
    assert dcmread(dest / "DICOMDIR").FileSetID == "IEPNODE"


def test_ct_series_is_one_series_in_instance_order(src: Path, dest: Path) -> None:
    sources = make_ct_series(src, 3)

    assert len(write_fileset(dest, list(reversed(sources)), fileset_id="STUDY_42").files) == 3

    assert_valid_fileset(dest, sources)
    assert len(records(dest, "SERIES")) == 1
    assert [int(r.InstanceNumber) for r in records(dest, "IMAGE")] == [1, 2, 3]
    assert fileset_file_ids(dest) == [f"PT000000/ST000000/SE000000/IM00000{i}" for i in range(3)]
    assert dcmread(dest / "DICOMDIR").FileSetID == "STUDY_42"


MISSING = (
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesNumber",
    "InstanceNumber",
    "AccessionNumber",
    "PatientID",
)


def test_missing_type1_keys_are_filled_in_the_directory_only(src: Path, dest: Path) -> None:
    sources = make_ct_series(src, 2, **dict.fromkeys(MISSING))
    before = [s.read_bytes() for s in sources]

    assert len(write_fileset(dest, sources).files) == 2

    assert_valid_fileset(dest, sources)
    assert [s.read_bytes() for s in sources] == before
    (patient,) = records(dest, "PATIENT")
    assert patient.PatientID == "NOID0001"
    (study,) = records(dest, "STUDY")
    header = read_header(sources[0])
    assert (study.StudyDate, study.StudyTime) == (header.SeriesDate, header.SeriesTime)
    assert study.StudyID == "IEP0001"
    assert study.AccessionNumber == ""
    (series,) = records(dest, "SERIES")
    assert series.SeriesNumber == 1
    assert sorted(int(r.InstanceNumber) for r in records(dest, "IMAGE")) == [1, 2]


def test_study_without_any_date_gets_a_placeholder(src: Path, dest: Path) -> None:
    dates = {
        f"{prefix}{part}": None
        for prefix in ("Study", "Series", "Acquisition", "Content", "InstanceCreation")
        for part in ("Date", "Time")
    }
    sources = make_ct_series(src, 1, **dates)

    write_fileset(dest, sources)

    assert_valid_fileset(dest, sources)
    (study,) = records(dest, "STUDY")
    assert (study.StudyDate, study.StudyTime) == ("19000101", "000000")


def test_study_id_falls_back_to_accession_number(src: Path, dest: Path) -> None:
    sources = make_ct_series(src, 1, StudyID="", AccessionNumber="A123")

    write_fileset(dest, sources)

    assert_valid_fileset(dest, sources)
    assert records(dest, "STUDY")[0].StudyID == "A123"


def test_missing_numbers_do_not_reuse_numbers_in_use(src: Path, dest: Path) -> None:
    first = make_ct_series(src, 2)
    like = read_header(first[0])
    second = make_ct_series(src / "b", 1, like=like, SeriesNumber=None, InstanceNumber=None)
    # Two instances of the first series: one numbered 1, one unnumbered.
    unnumbered = rewrite(first[1], src / "c", InstanceNumber=None)
    sources = [first[0], unnumbered, *second]

    write_fileset(dest, sources)

    assert_valid_fileset(dest, sources)
    assert [int(r.SeriesNumber) for r in records(dest, "SERIES")] == [1, 2]
    assert [int(r.InstanceNumber) for r in records(dest, "IMAGE")] == [1, 2, 1]


@pytest.mark.parametrize(
    ("charset", "name", "description"),
    [
        ("ISO_IR 100", "Müller^Jürgen", "Schädel nativ"),
        ("ISO_IR 192", "中山^太郎", "頭部 CT"),
        ("GB18030", "王^小明", "头部平扫"),
    ],
)
def test_non_ascii_names_keep_their_character_set(
    src: Path, dest: Path, charset: str, name: str, description: str
) -> None:
    sources = make_ct_series(
        src, 2, SpecificCharacterSet=charset, PatientName=name, StudyDescription=description
    )

    write_fileset(dest, sources)

    assert_valid_fileset(dest, sources)
    for record in records(dest):
        assert record.SpecificCharacterSet == charset
    assert str(records(dest, "PATIENT")[0].PatientName) == name
    assert records(dest, "STUDY")[0].StudyDescription == description
    codec = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8", "GB18030": "gb18030"}[charset]
    assert name.encode(codec) in (dest / "DICOMDIR").read_bytes()


@pytest.mark.parametrize(
    "name", ["chrX1.dcm", "chrX2.dcm", "chrH31.dcm", "chrI2.dcm", "chrGerm.dcm", "chrRuss.dcm"]
)
def test_bundled_character_set_files(src: Path, dest: Path, name: str) -> None:
    source = copy_bundled(name, src)

    write_fileset(dest, [source])

    assert_valid_fileset(dest, [source])
    header = read_header(source)
    (patient,) = records(dest, "PATIENT")
    assert patient.SpecificCharacterSet == header.SpecificCharacterSet
    assert str(patient.PatientName) == str(header.PatientName)


@pytest.mark.parametrize(
    ("name", "record_type", "check_entities"),
    [
        ("CT_small.dcm", "IMAGE", True),
        ("MR_small_RLE.dcm", "IMAGE", True),
        ("JPEG2000.dcm", "IMAGE", True),
        ("SC_rgb_rle_2frame.dcm", "IMAGE", True),
        ("MR_small_bigendian.dcm", "IMAGE", True),
        ("test-SR.dcm", "SR DOCUMENT", True),
        ("reportsi.dcm", "SR DOCUMENT", True),
        ("waveform_ecg.dcm", "WAVEFORM", True),
        ("rtplan.dcm", "RT PLAN", True),
        # dcentvfy cannot read these two (it asserts on 32-bit dose pixels and
        # does not inflate deflated files); dciodvfy still checks the DICOMDIR.
        ("rtdose.dcm", "RT DOSE", False),
        ("image_dfl.dcm", "IMAGE", False),
    ],
)
def test_bundled_files_get_the_right_record(
    src: Path, dest: Path, name: str, record_type: str, check_entities: bool
) -> None:
    source = copy_bundled(name, src)

    assert len(write_fileset(dest, [source]).files) == 1

    assert_valid_fileset(dest, [source], check_entities=check_entities)
    (leaf,) = records(dest, record_type)
    assert leaf.ReferencedSOPInstanceUIDInFile == read_header(source).SOPInstanceUID


def test_compressed_and_multiframe_together(src: Path, dest: Path) -> None:
    names = ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "CT_small.dcm"]
    sources = [copy_bundled(n, src) for n in names]

    assert len(write_fileset(dest, sources).files) == 4

    assert_valid_fileset(dest, sources)


def test_verified_sr_record_carries_verification_datetime(src: Path, dest: Path) -> None:
    source = copy_bundled("test-SR.dcm", src)
    header = read_header(source)
    assert header.VerificationFlag == "VERIFIED"
    assert "VerificationDateTime" not in header  # only inside the observer sequence

    write_fileset(dest, [source])

    (record,) = records(dest, "SR DOCUMENT")
    expected = max(i.VerificationDateTime for i in header.VerifyingObserverSequence)
    assert record.VerificationDateTime == expected


def test_sr_record_keeps_only_concept_modifiers(src: Path, dest: Path) -> None:
    source = make_sr(src)

    write_fileset(dest, [source])

    assert_valid_fileset(dest, [source])
    (record,) = records(dest, "SR DOCUMENT")
    assert [i.RelationshipType for i in record.ContentSequence] == ["HAS CONCEPT MOD"]
    assert record.ConceptNameCodeSequence[0].CodeValue == "18748-4"


def test_ct_pdf_and_report_share_one_study(src: Path, dest: Path) -> None:
    ct = make_ct_series(src, 2)
    sources = [*ct, make_pdf(src, like=ct[0]), make_sr(src, like=ct[0])]

    assert len(write_fileset(dest, sources).files) == 4

    assert_valid_fileset(dest, sources)
    assert len(records(dest, "STUDY")) == 1
    assert [r.Modality for r in records(dest, "SERIES")] == ["CT", "DOC", "SR"]
    (doc,) = records(dest, "ENCAP DOC")
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    member = dest / "/".join(doc.ReferencedFileID)
    assert dcmread(member).EncapsulatedDocument.startswith(b"%PDF-")


def test_pdf_lacking_type1_keys(src: Path, dest: Path) -> None:
    source = make_pdf(src, MIMETypeOfEncapsulatedDocument=None, InstanceNumber=None)

    write_fileset(dest, [source])

    assert_valid_fileset(dest, [source])
    (doc,) = records(dest, "ENCAP DOC")
    assert (doc.MIMETypeOfEncapsulatedDocument, doc.InstanceNumber) == ("application/pdf", 1)


def test_top_level_record_for_a_color_palette(src: Path, dest: Path) -> None:
    palette = Dataset()
    palette.SOPClassUID = ColorPaletteStorage
    palette.SOPInstanceUID = generate_uid()
    palette.ContentLabel = "HOT_IRON"
    palette.ContentDescription = "Hot iron"
    sources = [save(palette, src), *make_ct_series(src, 1)]

    assert len(write_fileset(dest, sources).files) == 2

    assert_valid_fileset(dest, sources, check_entities=False)
    top = dcmread(dest / "DICOMDIR")
    assert [r.DirectoryRecordType for r in top.DirectoryRecordSequence][-1] == "PALETTE"
    assert fileset_file_ids(dest)[-1] == "PA000001"


def test_same_instance_twice_is_written_once(src: Path, dest: Path) -> None:
    sources = [copy_bundled("MR_small.dcm", src), copy_bundled("MR_small_RLE.dcm", src)]

    assert len(write_fileset(dest, sources).files) == 1

    assert_valid_fileset(dest, sources[:1])


def test_patients_without_id_are_told_apart(src: Path, dest: Path) -> None:
    first = make_ct_series(src, 1, PatientID=None, PatientName="Alpha^Anna")
    second = make_ct_series(src, 1, PatientID=None, PatientName="Beta^Bert")
    sources = [*first, *second]

    write_fileset(dest, sources)

    # dcentvfy takes the two files for one patient with an empty ID and two names:
    # true of the sources, which the file-set must not change.
    assert_valid_fileset(dest, sources, check_entities=False)
    patients = records(dest, "PATIENT")
    assert [(str(p.PatientName), p.PatientID) for p in patients] == [
        ("Alpha^Anna", "NOID0001"),
        ("Beta^Bert", "NOID0002"),
    ]


def test_study_keys_are_borrowed_from_other_instances(src: Path, dest: Path) -> None:
    with_id, plain = make_ct_series(src, 2, StudyID=None)
    with_id = rewrite(with_id, src / "b", StudyID="S77")
    sources = [plain, with_id]  # the first instance, whose values are used, lacks it

    write_fileset(dest, sources)

    assert dciodvfy_errors(dest / "DICOMDIR") == []
    assert records(dest, "STUDY")[0].StudyID == "S77"


def test_empty_fileset(dest: Path) -> None:
    assert len(write_fileset(dest, []).files) == 0

    assert dciodvfy_errors(dest / "DICOMDIR") == []
    assert fileset_file_ids(dest) == []


# ------------------------------------------------------------------------------------
# Files, atomicity, failures


def test_members_are_hard_links_to_the_sources(src: Path, dest: Path) -> None:
    sources = make_ct_series(src, 2)

    write_fileset(dest, sources)

    members = sorted(dest / f for f in fileset_file_ids(dest))
    assert {m.stat().st_ino for m in members} == {s.stat().st_ino for s in sources}


def test_copies_when_linking_is_impossible(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = make_ct_series(src, 2)

    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    write_fileset(dest, sources)

    assert_valid_fileset(dest, sources)
    for member in (dest / f for f in fileset_file_ids(dest)):
        assert not any(os.path.samefile(member, s) for s in sources)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_rebuild_replaces_the_previous_fileset(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(fileset_module, "_rename_exchange", lambda a, b: False)
    write_fileset(dest, make_ct_series(src / "old", 3))
    (dest / "README.TXT").write_text("left over from the old set")
    new = [copy_bundled("CT_small.dcm", src)]

    assert len(write_fileset(dest, new).files) == 1

    assert_valid_fileset(dest, new)
    assert staging_leftovers(dest) == []
    assert not (dest / "README.TXT").exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_member_is_left_out_and_the_rest_is_built(
    src: Path, dest: Path, how: str
) -> None:
    if how == "unreadable" and not permissions_apply_here():
        pytest.skip("root reads a file whatever its mode; test_bad_files.py runs the node "
                    "without CAP_DAC_OVERRIDE for this one")
    sources = make_ct_series(src, 4)
    damage(sources[1], how)

    plan = write_fileset(dest, sources)

    assert [(m.path, m.reason) for m in plan.left_out] == [
        (sources[1], f"the stored file {REASONS[how]}")]
    kept = [s for s in sources if s != sources[1]]
    assert sorted(p.path for p in plan.files) == sorted(kept)
    assert_valid_fileset(dest, kept)
    assert staging_leftovers(dest) == []


def test_a_member_lacking_its_uids_is_left_out(src: Path, dest: Path) -> None:
    good = make_ct_series(src, 2)
    no_series = rewrite(good[0], src, SOPInstanceUID=generate_uid(), SeriesInstanceUID=None)
    plan = write_fileset(dest, [*good, no_series])
    assert [(m.path, m.reason) for m in plan.left_out] == [
        (no_series, "the file lacks its Series Instance UID")]
    assert_valid_fileset(dest, good)


def test_no_usable_member_leaves_dest_untouched(src: Path, dest: Path) -> None:
    write_fileset(dest, make_ct_series(src, 2))
    before = snapshot(dest)
    missing = src / "0123456789abcdef"
    empty = src / "fedcba9876543210"
    empty.write_bytes(b"")

    with pytest.raises(NoUsableMember, match="0123456789abcdef: the stored file is missing; "
                       "fedcba9876543210: the stored file is empty") as raised:
        write_fileset(dest, [missing, empty])

    assert [m.path for m in raised.value.left_out] == [missing, empty]
    assert snapshot(dest) == before
    assert staging_leftovers(dest) == []


def test_failure_while_linking_leaves_nothing_behind(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fileset(dest, make_ct_series(src, 1))
    before = snapshot(dest)
    real_link = os.link
    calls = []

    def link_then_fail(a: str | Path, b: str | Path) -> None:
        calls.append(b)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(a, b)

    monkeypatch.setattr(os, "link", link_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_fileset(dest, make_ct_series(src / "new", 4))

    assert snapshot(dest) == before
    assert staging_leftovers(dest) == []


def test_first_build_failure_creates_no_dest(src: Path, dest: Path) -> None:
    with pytest.raises(FilesetError):
        write_fileset(dest, [src / "nothing-here"])

    assert not dest.exists()
    assert not dest.parent.exists() or staging_leftovers(dest) == []


def test_stale_staging_folders_are_swept(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    stale = dest.parent / f".{dest.name}.crashed.staging"
    fresh = dest.parent / f".{dest.name}.running.staging"
    for folder in (stale, fresh):
        (folder / "PT000000").mkdir(parents=True)
    os.utime(stale, (0, 0))

    write_fileset(dest, make_ct_series(src, 1))

    assert staging_leftovers(dest) == [fresh.name]


def test_rejects_a_dicomdir_as_member(src: Path, dest: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_fileset(other, make_ct_series(src, 1))

    with pytest.raises(FilesetError, match="DICOMDIR"):
        write_fileset(dest, [other / "DICOMDIR"])


def test_refuses_to_replace_a_folder_that_is_not_a_fileset(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "precious.txt").write_text("keep me")

    with pytest.raises(FilesetError, match="refusing"):
        write_fileset(dest, make_ct_series(src, 1))

    assert (dest / "precious.txt").read_text() == "keep me"


def test_rejects_files_that_are_not_part10(src: Path, dest: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    no_meta = copy_bundled("rtstruct.dcm", src)  # bundled without a File Meta header

    for bad in (text, no_meta):
        with pytest.raises(FilesetError, match="Part-10"):
            write_fileset(dest, [bad])
    assert not dest.exists()


@pytest.mark.parametrize("bad_id", ["", "lower", "SEVENTEEN_CHARS_X", "HAS SPACE", "ÄÖ"])
def test_malformed_fileset_id(src: Path, dest: Path, bad_id: str) -> None:
    with pytest.raises(ValueError, match="File-set ID"):
        write_fileset(dest, make_ct_series(src, 1), fileset_id=bad_id)
