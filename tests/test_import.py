"""End-to-end tests of ``iepnode import``: folders, CD copies with a DICOMDIR, zips.

Every import runs the real command line in a subprocess against a data folder under
``tmp_path``; the store and the index are then checked from the outside (files on
disk, the SQLite index, ``iepnode studies``). The hostile inputs of the issue each
have a test: zip-slip entries, zip bombs (ratio, lying sizes, declared total),
malformed and truncated objects. Imported datasets are compared byte for byte with
their source (everything after the File Meta Information, which the node rewrites).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from iepnode.archive.ingest import parse_file_meta
from tests.data_factory import (
    bundled,
    copy_bundled,
    make_ct_series,
    make_pdf,
    make_sr,
    read_header,
)
from tests.support import crafted
from tests.support.crafted import corruption
from tests.support.node import REPO, run_cli
from tests.support.tools import dcmtk

SUMMARY = re.compile(
    r"^imported (?P<stored>\d+), duplicates (?P<duplicates>\d+), "
    r"refused (?P<refused>\d+), not DICOM (?P<skipped>\d+)$",
    re.MULTILINE,
)
REFUSED_LINE = re.compile(r"^  refused (?P<name>.+?): (?P<reason>.+)$", re.MULTILINE)
STORE_KEY = re.compile(r"^[0-9A-Z]{16}$")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Bundled files with distinct SOP Instance UIDs: JPEG 2000, deflate, big endian, RLE.
BUNDLED_MIX = ("JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
               "SC_rgb_rle_2frame.dcm")
JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Imported:
    """A finished ``iepnode import`` and its parsed output."""

    proc: subprocess.CompletedProcess[str]
    counts: dict[str, int]
    refused: dict[str, str]

    @property
    def code(self) -> int:
        return self.proc.returncode


def run_import(data_dir: Path, path: Path, *, progress: bool = False) -> Imported:
    """Run ``iepnode import PATH`` and parse its summary and refused lines."""
    args = ["import", str(path)] if progress else ["import", str(path), "--no-progress"]
    proc = run_cli(data_dir, *args, check=False)
    match = SUMMARY.search(proc.stdout)
    counts = {k: int(v) for k, v in match.groupdict().items()} if match else {}
    refused = {m["name"]: m["reason"] for m in REFUSED_LINE.finditer(proc.stdout)}
    return Imported(proc, counts, refused)


def counts(stored: int, *, duplicates: int = 0, refused: int = 0,
           skipped: int = 0) -> dict[str, int]:
    return {"stored": stored, "duplicates": duplicates, "refused": refused, "skipped": skipped}


def dataset_bytes(data: bytes) -> bytes:
    """The encoded dataset of a Part-10 file: everything after its File Meta."""
    _, offset = parse_file_meta(data)
    return data[offset:]


def sources_of(paths: Iterable[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of Part-10 source files."""
    return {str(read_header(p).SOPInstanceUID): dataset_bytes(p.read_bytes()) for p in paths}


def index_rows(data_dir: Path) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (store key, transfer syntax, SOP class) from the index."""
    db = data_dir / "index.sqlite3"
    if not db.exists():
        return {}
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT sop_uid, key, transfer_syntax, sop_class FROM instance")
        return {uid: (key, ts, cls) for uid, key, ts, cls in rows}
    finally:
        con.close()


def stored_files(data_dir: Path) -> list[Path]:
    root = data_dir / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_store_holds(data_dir: Path, expected: dict[str, bytes]) -> dict[str, Path]:
    """The index and store hold exactly ``expected``, byte for byte, under generated keys."""
    rows = index_rows(data_dir)
    assert set(rows) == set(expected)
    files = stored_files(data_dir)
    assert len(files) == len(expected)
    paths = {}
    for sop_uid, (key, _, _) in rows.items():
        assert STORE_KEY.match(key), key
        path = data_dir / "objects" / key[:2] / key
        assert path.is_file()
        assert dataset_bytes(path.read_bytes()) == expected[sop_uid], sop_uid
        paths[sop_uid] = path
    staging = data_dir / "tmp"
    assert not (staging.exists() and any(staging.iterdir())), "files left in staging"
    return paths


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def build_mixed_folder(root: Path) -> dict[str, bytes]:
    """A nested folder of DICOM objects among README/autorun/JPEG files."""
    ct = make_ct_series(root / "patient" / "study" / "CT", 3)
    docs = [make_pdf(root / "patient" / "study" / "docs", like=ct[0]),
            make_sr(root / "patient" / "study" / "docs", like=ct[0])]
    others = [copy_bundled(name, root / "other" / "deep" / "er") for name in BUNDLED_MIX]
    (root / "README.TXT").write_text("Patient CD. Insert into a DICOM viewer.\r\n")
    (root / "autorun.inf").write_text("[autorun]\r\nopen=viewer\\viewer.exe\r\n")
    (root / "viewer").mkdir()
    (root / "viewer" / "splash.jpg").write_bytes(JPEG_BYTES)
    return sources_of([*ct, *docs, *others])


def build_cd(root: Path, n: int = 3, *, transfer_syntax: str = ExplicitVRLittleEndian,
             **overrides: object) -> dict[str, bytes]:
    """A patient CD: ``DICOMDIR`` (by dcmmkdir), ``DICOM/IM0001``..., README, autorun."""
    made = make_ct_series(root / "gen", n, transfer_syntax=transfer_syntax, **overrides)
    (root / "DICOM").mkdir(parents=True)
    for number, path in enumerate(made, start=1):
        path.rename(root / "DICOM" / f"IM{number:04d}")
    (root / "gen").rmdir()
    subprocess.run([dcmtk("dcmmkdir"), "-Nxc", "+r", "DICOM"], cwd=root, check=True,
                   capture_output=True, timeout=60)
    assert (root / "DICOMDIR").is_file()
    (root / "README.TXT").write_text("Images of your examination.\r\n")
    (root / "AUTORUN.INF").write_text("[autorun]\r\n")
    return sources_of(sorted((root / "DICOM").iterdir()))


@pytest.fixture(scope="module")
def cd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A read-only patient CD built once for the module (copy it before changing it)."""
    root = tmp_path_factory.mktemp("cd") / "CDROM"
    return root, build_cd(root)


def zip_folder(folder: Path, target: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def patch_uncompressed_size(zip_path: Path, name: str, size: int) -> None:
    """Make a zip lie: rewrite an entry's uncompressed size in both of its headers."""
    data = bytearray(zip_path.read_bytes())
    raw = name.encode()
    patched = 0
    for signature, name_len_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22),
                                                     (b"PK\x01\x02", 28, 46, 24)):
        pos = data.find(signature)
        while pos != -1:
            (length,) = struct.unpack_from("<H", data, pos + name_len_at)
            if data[pos + name_at:pos + name_at + length] == raw:
                struct.pack_into("<I", data, pos + size_at, size)
                patched += 1
            pos = data.find(signature, pos + 4)
    assert patched == 2, f"{name}: patched {patched} headers"
    zip_path.write_bytes(bytes(data))


# -- folders -------------------------------------------------------------------------------


def test_folder_imports_every_dicom_object_and_skips_the_rest(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    expected = build_mixed_folder(src)

    result = run_import(data, src)

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(len(expected), skipped=3)
    assert result.refused == {}
    assert_store_holds(data, expected)
    # The index knows the transfer syntaxes as received (nothing was transcoded).
    syntaxes = {ts for _, ts, _ in index_rows(data).values()}
    assert {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.5"} <= syntaxes


def test_progress_bar_on_stderr_unless_no_progress(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_ct_series(src, 3)

    shown = run_import(tmp_path / "data1", src, progress=True)
    hidden = run_import(tmp_path / "data2", src)

    assert shown.code == hidden.code == 0
    assert shown.counts == hidden.counts == counts(3)
    assert "import:" in shown.proc.stderr
    assert "100%" in shown.proc.stderr and "3/3" in shown.proc.stderr
    assert "100%" not in hidden.proc.stderr and "obj/s" not in hidden.proc.stderr


def test_importing_the_same_folder_twice_reports_duplicates(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    expected = build_mixed_folder(src)
    assert run_import(data, src).counts == counts(len(expected), skipped=3)
    before_files, before_rows = snapshot(data / "objects"), index_rows(data)

    again = run_import(data, src)

    assert again.code == 0
    assert again.counts == counts(0, duplicates=len(expected), skipped=3)
    assert snapshot(data / "objects") == before_files
    assert index_rows(data) == before_rows


def test_malformed_objects_are_refused_and_the_rest_imported(tmp_path: Path) -> None:
    src, data, outside = tmp_path / "src", tmp_path / "data", tmp_path / "outside"
    good = make_ct_series(src, 2)
    (src / "empty.dcm").write_bytes(b"")
    (src / "EMPTY").write_bytes(b"")  # no DICOM name: skipped, not refused
    (src / "notes.dcm").write_text("This is not an image.\n")
    ct_small = bundled("CT_small.dcm").read_bytes()
    (src / "half.dcm").write_bytes(ct_small[: len(ct_small) // 2])
    deflated = bundled("image_dfl.dcm").read_bytes()
    (src / "cut-deflate.dcm").write_bytes(deflated[: len(deflated) * 2 // 3])
    (src / "badmeta.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    no_uid = dcmread(make_ct_series(tmp_path / "gen", 1)[0])
    del no_uid.SOPInstanceUID  # the File Meta still names one; the dataset does not
    no_uid.save_as(src / "no-uid.dcm")
    shutil.copyfile(bundled("MR_truncated.dcm"), src / "MR_truncated.dcm")
    outside_ct = make_ct_series(outside, 1)[0]
    (src / "link.dcm").symlink_to(outside_ct)

    result = run_import(data, src)

    assert result.code == 2, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(2, refused=8, skipped=1)
    reasons = {Path(name).name: reason for name, reason in result.refused.items()}
    expected_reasons = {
        "empty.dcm": r"empty file",
        "notes.dcm": r"not DICOM",
        "half.dcm": r"^truncated: element \(7FE0,0010\)",
        "cut-deflate.dcm": r"^truncated: the deflated dataset ends early",
        "badmeta.dcm": r"File Meta Information",
        "no-uid.dcm": r"missing SOPInstanceUID",
        "MR_truncated.dcm": r"^truncated",
        "link.dcm": r"symbolic link",
    }
    assert set(reasons) == set(expected_reasons)
    for name, pattern in expected_reasons.items():
        assert re.search(pattern, reasons[name]), (name, reasons[name])
    assert_store_holds(data, sources_of(good))


def test_corrupted_datasets_are_refused_with_the_reason_c_store_gives(tmp_path: Path) -> None:
    """The crafted corruptions of the dataset check, imported: same check, same reasons."""
    src, data = tmp_path / "src", tmp_path / "data"
    good = make_ct_series(src, 1)
    cases = {name: corruption(name) for name in crafted.CORRUPTIONS}
    for name, case in cases.items():
        case.write(src / "tmp").rename(src / f"{name}.dcm")

    result = run_import(data, src)

    assert result.code == 2, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(1, refused=len(cases))
    reasons = {Path(name).stem: reason for name, reason in result.refused.items()}
    assert set(reasons) == set(cases)
    for name, case in cases.items():
        assert re.search(case.message, reasons[name]), (name, reasons[name])
    assert_store_holds(data, sources_of(good))


def test_non_existent_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "cd"

    result = run_import(tmp_path / "data", missing)

    assert result.code == 1
    assert result.counts == {}
    assert f"iepnode: nothing to import: {missing} does not exist" in result.proc.stderr
    assert "Traceback" not in result.proc.stderr
    assert stored_files(tmp_path / "data") == []


def test_non_ascii_patient_names_are_indexed_and_listed(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    make_ct_series(src, 1, PatientName="Müller^Jürgen", PatientID="UTF8-1",
                   SpecificCharacterSet="ISO_IR 192")
    make_ct_series(src, 1, PatientName="Gößmann^Zoë", PatientID="LATIN1-1",
                   SpecificCharacterSet="ISO_IR 100")
    copy_bundled("chrX1.dcm", src)  # ISO_IR 192: Wang^XiaoDong=王^小東
    assert b"G\xf6\xdfmann" in next(p for p in src.iterdir()
                                     if b"LATIN1-1" in p.read_bytes()).read_bytes()

    result = run_import(data, src)
    studies = run_cli(data, "studies").stdout

    assert result.code == 0 and result.counts == counts(3)
    assert "Müller^Jürgen" in studies
    assert "Gößmann^Zoë" in studies
    assert "Wang^XiaoDong=王^小東" in studies


# -- CD copies with a DICOMDIR -------------------------------------------------------------


@pytest.mark.parametrize("via", ["folder", "DICOMDIR"])
def test_cd_with_dicomdir(tmp_path: Path, cd: tuple[Path, dict[str, bytes]], via: str) -> None:
    root, expected = cd
    data = tmp_path / "data"

    result = run_import(data, root if via == "folder" else root / "DICOMDIR")

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    # The DICOMDIR is skipped (plus README and AUTORUN when the whole folder is read).
    assert result.counts == counts(3, skipped=3 if via == "folder" else 1)
    assert_store_holds(data, expected)
    dicomdir_uid = str(read_header(root / "DICOMDIR").file_meta.MediaStorageSOPInstanceUID)
    rows = index_rows(data)
    assert dicomdir_uid not in rows
    assert all(sop_class != DICOMDIR_SOP_CLASS for _, _, sop_class in rows.values())


@pytest.mark.parametrize("via", ["folder", "DICOMDIR"])
def test_cd_copy_with_lower_case_names_and_a_missing_file(
    tmp_path: Path, cd: tuple[Path, dict[str, bytes]], via: str
) -> None:
    source, expected = cd
    root, data = tmp_path / "copy", tmp_path / "data"
    shutil.copytree(source, root)
    # A copy made on a case-changing system: the DICOMDIR still says DICOM\IM0001.
    (root / "DICOM").rename(root / "dicom")
    for path in (root / "dicom").iterdir():
        path.rename(path.with_name(path.name.lower()))
    lost = root / "dicom" / "im0003"
    lost_uid = str(read_header(lost).SOPInstanceUID)
    lost.unlink()

    result = run_import(data, root if via == "folder" else root / "DICOMDIR")

    assert result.code == 2, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(2, refused=1, skipped=3 if via == "folder" else 1)
    [(name, reason)] = result.refused.items()
    assert name.endswith("DICOMDIR -> DICOM\\IM0003")
    assert reason == "referenced by the DICOMDIR but missing"
    assert_store_holds(data, {k: v for k, v in expected.items() if k != lost_uid})


def test_old_cd_with_raw_datasets_without_preamble(tmp_path: Path) -> None:
    root, data = tmp_path / "OLDCD", tmp_path / "data"
    build_cd(root, 3, transfer_syntax=ImplicitVRLittleEndian)
    raw: dict[str, bytes] = {}
    for path in sorted((root / "DICOM").iterdir()):  # keep only the bare datasets
        bare = dataset_bytes(path.read_bytes())
        raw[str(read_header(path).SOPInstanceUID)] = bare
        path.write_bytes(bare)
    # One more, explicit VR and not in the DICOMDIR: the encoding is read from the bytes.
    extra = make_ct_series(tmp_path / "gen", 1)[0]
    raw[str(read_header(extra).SOPInstanceUID)] = dataset_bytes(extra.read_bytes())
    (root / "EXTRA").mkdir()
    (root / "EXTRA" / "RAW0001").write_bytes(dataset_bytes(extra.read_bytes()))
    # File Meta but no preamble, with and without the DICM prefix.
    for name, cut in (("NOPREAMB", 132), ("DICMONLY", 128)):
        part10 = make_ct_series(tmp_path / "gen", 1)[0]
        raw.update(sources_of([part10]))
        (root / "EXTRA" / name).write_bytes(part10.read_bytes()[cut:])
    assert all(p.read_bytes()[128:132] != b"DICM" for p in (root / "DICOM").iterdir())

    result = run_import(data, root)

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(6, skipped=3)
    assert_store_holds(data, raw)
    syntaxes = {uid: ts for uid, (_, ts, _) in index_rows(data).items()}
    assert sorted(syntaxes.values()) == sorted([ExplicitVRLittleEndian] * 3
                                               + [ImplicitVRLittleEndian] * 3)
    assert syntaxes[str(read_header(extra).SOPInstanceUID)] == ExplicitVRLittleEndian


# -- zips ----------------------------------------------------------------------------------


def test_zip_of_a_folder(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    expected = build_mixed_folder(src)
    archive = zip_folder(src, tmp_path / "export.zip")

    result = run_import(data, archive)

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(len(expected), skipped=3)
    assert_store_holds(data, expected)


def test_zip_of_a_cd_with_dicomdir(tmp_path: Path, cd: tuple[Path, dict[str, bytes]]) -> None:
    root, expected = cd
    data = tmp_path / "data"
    archive = zip_folder(root, tmp_path / "cd.zip", prefix="PATIENT CD/")

    result = run_import(data, archive)

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(3, skipped=3)  # DICOMDIR, README.TXT, AUTORUN.INF
    assert_store_holds(data, expected)


def test_zip_slip_entries_write_nothing_outside_the_store(tmp_path: Path) -> None:
    data, gen = tmp_path / "data", tmp_path / "gen"
    good = make_ct_series(gen / "good", 2)
    evil = make_ct_series(gen / "evil", 3)
    tag = uuid.uuid4().hex
    dotdot, backslash = f"../../iepnode-{tag}-evil.dcm", f"..\\..\\iepnode-{tag}-evil2.dcm"
    absolute = Path(f"/tmp/iepnode-{tag}-x.dcm")
    link_target = f"../../iepnode-{tag}-link-target"
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in good:
            zf.writestr(f"good/{path.name}.dcm", path.read_bytes())
        zf.writestr(dotdot, evil[0].read_bytes())
        zf.writestr(backslash, evil[1].read_bytes())
        zf.writestr(str(absolute), evil[2].read_bytes())
        link = zipfile.ZipInfo("link.dcm")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, link_target)
    assert str(absolute) in zipfile.ZipFile(archive).namelist()
    bases = [data, data / "objects", data / "tmp", archive.parent, tmp_path, REPO, Path.cwd()]
    targets = [absolute, *((base / name).resolve() for base in bases
                           for name in (dotdot, backslash.replace("\\", "/"), link_target))]
    assert not any(t.exists() for t in targets)
    before = set(snapshot(tmp_path))

    result = run_import(data, archive)

    assert result.code == 2, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(2, refused=4)
    assert result.refused == {
        dotdot: "path escapes the archive ('..')",
        backslash: "path escapes the archive ('..')",
        str(absolute): "absolute path",
        "link.dcm": "symbolic link",
    }
    assert not any(t.exists() for t in targets)
    new = set(snapshot(tmp_path)) - before
    allowed = (data / "objects", data / "logs")
    assert all(p.is_relative_to(allowed[0]) or p.is_relative_to(allowed[1])
               or (p.name.startswith("index.sqlite3") and p.parent == data) for p in new), new
    assert_store_holds(data, sources_of(good))
    assert not set(index_rows(data)) & set(sources_of(evil))


def _run_measured(data_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI in a child that reports its own peak RSS (KiB) on the last line.

    The peak is VmHWM of the child's own address space: ``ru_maxrss`` survives
    ``exec`` on Linux and would report the (large) pytest process it was started from.
    """
    code = ("import re, sys\n"
            "from iepnode.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "status = open('/proc/self/status').read()\n"
            "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+) kB', status)[1])\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    maxrss = int(re.search(r"^MAXRSS (\d+)$", proc.stdout, re.MULTILINE)[1])
    return proc, maxrss


def test_zip_bomb_is_refused_without_blowing_memory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = make_ct_series(tmp_path / "gen", 1)[0]
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IMAGES/IM0001", good.read_bytes())
        with zf.open("IMAGES/IM0002", "w") as fh:  # 200 MiB of zeros, ~200 KiB zipped
            chunk = bytes(1 << 20)
            for _ in range(200):
                fh.write(chunk)
    assert archive.stat().st_size < 1 << 20

    proc, maxrss_kib = _run_measured(data, "import", str(archive), "--no-progress")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert SUMMARY.search(proc.stdout)["stored"] == "1"
    assert re.search(r"^  refused IMAGES/IM0002: compression ratio \d+:1 .*zip bomb$",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert maxrss_kib < 150 * 1024, f"peak RSS {maxrss_kib} KiB"
    assert_store_holds(data, sources_of([good]))


def test_zip_entry_lying_about_its_size_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good, liar = make_ct_series(tmp_path / "gen", 2)
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.dcm", good.read_bytes())
        zf.writestr("liar.dcm", liar.read_bytes() + bytes(20 << 20))
    patch_uncompressed_size(archive, "liar.dcm", liar.stat().st_size)

    result = run_import(data, archive)

    assert result.code == 2, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(1, refused=1)
    assert re.search(r"Bad CRC-32", result.refused["liar.dcm"])
    assert_store_holds(data, sources_of([good]))


def test_zip_declaring_more_than_the_total_limit_is_refused_as_a_whole(tmp_path: Path) -> None:
    from iepnode.archive.import_sources import MAX_ZIP_TOTAL

    data = tmp_path / "data"
    good = make_ct_series(tmp_path / "gen", 1)[0]
    archive = tmp_path / "huge.zip"
    names = [f"PART{i:02d}" for i in range(MAX_ZIP_TOTAL // 0xFFFFFFFE + 1)]
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("good.dcm", good.read_bytes())
        for name in names:
            zf.writestr(name, b"tiny")
    for name in names:  # each claims almost 4 GiB: together more than MAX_ZIP_TOTAL
        patch_uncompressed_size(archive, name, 0xFFFFFFFE)

    result = run_import(data, archive)

    assert result.code == 1, result.proc.stdout + result.proc.stderr
    assert re.search(r"^iepnode: zip expands to \d+ bytes, more than the "
                     rf"{MAX_ZIP_TOTAL}-byte limit: refused as a whole$",
                     result.proc.stderr, re.MULTILINE), result.proc.stderr
    assert stored_files(data) == [] and index_rows(data) == {}


def test_truncated_zip_is_a_clear_error(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    make_ct_series(src, 3)
    whole = zip_folder(src, tmp_path / "whole.zip").read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole[: len(whole) * 2 // 3])

    result = run_import(data, cut)

    assert result.code == 1
    assert f"iepnode: {cut} looks like a zip but cannot be read" in result.proc.stderr
    assert stored_files(data) == []


# -- in process ----------------------------------------------------------------------------


def test_import_path_reports_progress(tmp_path: Path) -> None:
    from config import load_settings
    from iepnode.archive.importer import import_path
    from iepnode.wiring import build_services

    src = tmp_path / "src"
    make_ct_series(src / "a", 3)
    make_ct_series(src / "b" / "c", 2)
    (src / "README.TXT").write_text("readme")
    services = build_services(load_settings(None, {"data_dir": tmp_path / "data"}, environ={}))
    calls: list[tuple[int, int]] = []
    try:
        report = import_path(services.ingester, src, progress=lambda d, t: calls.append((d, t)))
    finally:
        services.close()

    assert calls == [(done, 6) for done in range(7)]
    assert (report.stored, report.duplicates, report.rejected) == (5, 0, [])
    assert report.skipped == [(str(src / "README.TXT"), "not DICOM (no DICM prefix, no dataset)")]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "JPEG2000.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
                                  "image_dfl.dcm", "SC_rgb_rle_2frame.dcm", "UN_sequence.dcm",
                                  "rtplan.dcm", "test-SR.dcm", "chrX1.dcm"])
def test_check_complete_accepts_whole_bundled_files(name: str) -> None:
    from iepnode.archive.object_check import check_complete

    data = bundled(name).read_bytes()
    meta, offset = parse_file_meta(data)
    syntax, _ = check_complete(memoryview(data)[offset:], meta.transfer_syntax)
    assert syntax == meta.transfer_syntax


def test_check_complete_refuses_pixel_data_without_image_attributes() -> None:
    """nested_priv_SQ.dcm (a parser test) has 2 bytes of Pixel Data and no Rows/Columns."""
    from iepnode.archive.object_check import check_complete
    from iepnode.errors import DatasetMismatch

    data = bundled("nested_priv_SQ.dcm").read_bytes()
    meta, offset = parse_file_meta(data)
    with pytest.raises(DatasetMismatch, match=r"Rows \(0028,0010\) is missing"):
        check_complete(memoryview(data)[offset:], meta.transfer_syntax)


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_check_complete_refuses_truncated_bundled_files(name: str) -> None:
    from iepnode.archive.object_check import check_complete
    from iepnode.errors import BadDataset

    data = bundled(name).read_bytes()
    meta, offset = parse_file_meta(data)
    with pytest.raises(BadDataset, match=r"^truncated"):
        check_complete(memoryview(data)[offset:], meta.transfer_syntax)


def test_check_complete_takes_a_mislabelled_vr_encoding_as_what_its_bytes_are() -> None:
    """Old media: Implicit VR bytes labelled Explicit VR (and the reverse) are accepted under
    the syntax they are in, so the node's File Meta tells the truth; where no syntax fits
    (implicit VR bytes with encapsulated JPEG pixel data), the object is refused."""
    from iepnode.archive.object_check import check_complete
    from iepnode.errors import BadDataset

    for name, label, real in (("MR_small_implicit.dcm", ExplicitVRLittleEndian,
                               ImplicitVRLittleEndian),
                              ("MR_small.dcm", ImplicitVRLittleEndian, ExplicitVRLittleEndian)):
        data = bundled(name).read_bytes()
        meta, offset = parse_file_meta(data)
        assert meta.transfer_syntax == real
        assert check_complete(memoryview(data)[offset:], label) == (real, False)
    data = bundled("SC_rgb_jpeg.dcm").read_bytes()  # JPEG Baseline label, implicit VR bytes
    meta, offset = parse_file_meta(data)
    with pytest.raises(BadDataset, match="unknown VR"):
        check_complete(memoryview(data)[offset:], meta.transfer_syntax)


def test_mislabelled_object_is_imported_under_the_syntax_its_bytes_are_in(
        tmp_path: Path) -> None:
    from iepnode.archive.ingest import file_meta_bytes

    src, data = tmp_path / "src", tmp_path / "data"
    source = bundled("MR_small_implicit.dcm").read_bytes()
    meta, offset = parse_file_meta(source)
    src.mkdir()
    (src / "IM1").write_bytes(file_meta_bytes(meta.sop_class, meta.sop_uid,
                                              ExplicitVRLittleEndian, "") + source[offset:])

    result = run_import(data, src)

    assert result.code == 0, result.proc.stdout + result.proc.stderr
    assert result.counts == counts(1)
    paths = assert_store_holds(data, {meta.sop_uid: source[offset:]})
    assert index_rows(data)[meta.sop_uid][1] == ImplicitVRLittleEndian
    assert dcmread(paths[meta.sop_uid]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
