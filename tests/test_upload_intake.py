"""Inspection of staged upload files (iepnode.uploads.intake.inspect_staged_file).

The files are real: DICOM written by pydicom, zips written by zipfile (including
hostile ones: ``..`` entries, links, bombs by ratio and by size, too many entries),
PDF/PNG/JPEG documents, and the usual mistakes (an empty file, a text file renamed
``.dcm``, a truncated object).
"""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from iepnode.uploads.intake import (
    DICOM,
    DICOMDIR,
    JPEG,
    PDF,
    PNG,
    SKIPPED,
    ZIP,
    FileVerdict,
    ZipLimits,
    inspect_staged_file,
    patient_key,
    scan_file,
)
from tests.data_factory import copy_bundled, make_ct_series, minimal_pdf

XSS = '<script>alert("x")</script>^<img src=x onerror=alert(1)>'


def staged(tmp_path: Path, data: bytes, name: str = "f0000001") -> Path:
    folder = tmp_path / "staging" / "k"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def make_zip(tmp_path: Path, entries: dict[str, bytes], *, name: str = "z.zip",
             method: int = zipfile.ZIP_DEFLATED) -> Path:
    path = tmp_path / "staging" / "k" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", method) as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)
    return path


def test_single_dicom_file(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1, PatientID="CD-1", PatientName="Doe^Jane")
    verdict = inspect_staged_file(staged(tmp_path, ct.read_bytes()), "IM0001", "CD/DICOM")
    assert verdict.accepted and verdict.kind == DICOM
    assert verdict.objects == 1
    assert [(p.patient_id, p.name) for p in verdict.patients] == [("CD-1", "Doe^Jane")]
    assert len(verdict.studies) == 1 and verdict.studies[0].modalities == "CT"
    assert verdict.label == "1 DICOM object"


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm",
                                  "MR_small_RLE.dcm", "rtdose.dcm"])
def test_any_transfer_syntax_is_accepted(name: str, tmp_path: Path) -> None:
    src = copy_bundled(name, tmp_path / "src")
    verdict = inspect_staged_file(staged(tmp_path, src.read_bytes()), name)
    assert verdict.kind == DICOM and verdict.objects == 1


def test_zip_with_folders_dicomdir_and_other_files(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "src", 3, PatientID="CD-2")
    entries = {f"CD/DICOM/ST0/IM{i}": p.read_bytes() for i, p in enumerate(series)}
    entries["CD/README.TXT"] = b"Viewer instructions"
    entries["CD/viewer/logo.png"] = _png()
    path = make_zip(tmp_path, entries)
    verdict = inspect_staged_file(path, "cd.zip")
    assert verdict.kind == ZIP and verdict.objects == 3
    assert len(verdict.patients) == 1 and len(verdict.studies) == 1
    assert verdict.studies[0].objects == 3
    reasons = dict(verdict.skipped)
    assert "not DICOM" in reasons["cd.zip > CD/README.TXT"]
    assert "cd.zip > CD/viewer/logo.png" in reasons  # images inside a zip are not taken
    assert verdict.label == "3 DICOM objects, 2 entries skipped"


def test_zip_slip_entries_are_refused(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1)
    (other,) = make_ct_series(tmp_path / "src2", 1)
    path = make_zip(tmp_path, {"../../evil.dcm": ct.read_bytes(),
                               "/etc/cron.d/evil": ct.read_bytes(),
                               "C:/windows/evil.dcm": ct.read_bytes(),
                               "ok/IM1": other.read_bytes()})
    verdict = inspect_staged_file(path, "slip.zip")
    assert verdict.kind == ZIP and verdict.objects == 1
    reasons = dict(verdict.skipped)
    assert "escapes" in reasons["slip.zip > ../../evil.dcm"]
    assert "absolute" in reasons["slip.zip > /etc/cron.d/evil"]
    assert "absolute" in reasons["slip.zip > C:/windows/evil.dcm"]
    assert not (tmp_path / "evil.dcm").exists()
    assert not (tmp_path / "staging" / "evil.dcm").exists()


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1)
    path = tmp_path / "staging" / "k" / "links.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        link = zipfile.ZipInfo("passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("IM1", ct.read_bytes())
    verdict = inspect_staged_file(path, "links.zip")
    assert verdict.objects == 1
    assert dict(verdict.skipped)["links.zip > passwd"] == "symbolic link"


def test_zip_bomb_by_ratio_entry(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1)
    path = make_zip(tmp_path, {"bomb.dcm": b"\x00" * (16 << 20), "IM1": ct.read_bytes()})
    assert path.stat().st_size < (1 << 20)
    verdict = inspect_staged_file(path, "bomb.zip")
    assert verdict.objects == 1
    assert "zip bomb" in dict(verdict.skipped)["bomb.zip > bomb.dcm"]


def test_zip_bomb_by_overall_ratio(tmp_path: Path) -> None:
    # Many entries each under the per-entry rule, together expanding far too much.
    path = make_zip(tmp_path, {f"part{i}": b"\x00" * (900 << 10) for i in range(40)})
    limits = ZipLimits(ratio_floor=16 << 20)
    verdict = inspect_staged_file(path, "bomb.zip", limits=limits)
    assert verdict.kind == SKIPPED
    assert "zip bomb" in verdict.reason


def test_zip_bomb_by_size(tmp_path: Path) -> None:
    path = make_zip(tmp_path, {"big": b"\x01\x02" * (2 << 20)}, method=zipfile.ZIP_STORED)
    verdict = inspect_staged_file(path, "big.zip", limits=ZipLimits(max_total=2 << 20))
    assert verdict.kind == SKIPPED
    assert "more than the limit" in verdict.reason


def test_too_many_entries(tmp_path: Path) -> None:
    path = make_zip(tmp_path, {f"e{i}": b"x" for i in range(11)})
    verdict = inspect_staged_file(path, "many.zip", limits=ZipLimits(max_entries=10))
    assert verdict.kind == SKIPPED
    assert "11 entries" in verdict.reason


def test_corrupt_zip(tmp_path: Path) -> None:
    path = make_zip(tmp_path, {"a": b"x" * 1000})
    path.write_bytes(path.read_bytes()[:60])
    verdict = inspect_staged_file(path, "cut.zip")
    assert verdict.kind == SKIPPED and "zip" in verdict.reason


def test_zip_without_dicom(tmp_path: Path) -> None:
    verdict = inspect_staged_file(make_zip(tmp_path, {"a.txt": b"hello"}), "docs.zip")
    assert verdict.kind == SKIPPED and verdict.reason == "no DICOM objects in the zip"
    assert verdict.skipped


def test_empty_file(tmp_path: Path) -> None:
    verdict = inspect_staged_file(staged(tmp_path, b""), "IM0001.dcm")
    assert verdict.kind == SKIPPED and verdict.reason == "empty file (0 bytes)"
    assert verdict.label == "skipped: empty file (0 bytes)"


def test_text_file_renamed_dcm(tmp_path: Path) -> None:
    verdict = inspect_staged_file(staged(tmp_path, b"just some notes\n" * 20), "scan.dcm")
    assert verdict.kind == SKIPPED
    assert verdict.reason.startswith("named like DICOM but not DICOM")


def test_unsupported_type(tmp_path: Path) -> None:
    verdict = inspect_staged_file(staged(tmp_path, b"MZ\x90\x00" + b"\x00" * 300), "setup.exe")
    assert verdict.kind == SKIPPED and "unsupported type" in verdict.reason


def test_truncated_dicom(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1, rows=64, columns=64)
    data = ct.read_bytes()
    verdict = inspect_staged_file(staged(tmp_path, data[: len(data) - 100]), "IM1")
    assert verdict.kind == SKIPPED and "truncated" in verdict.reason


def test_non_ascii_names(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1, SpecificCharacterSet="ISO_IR 192",
                           PatientName="Åström^Zoë=山田^太郎")
    verdict = inspect_staged_file(staged(tmp_path, ct.read_bytes()), "Röntgen 画像.dcm",
                                  "Bilder/Ärzte")
    assert verdict.kind == DICOM
    assert verdict.patients[0].name == "Åström^Zoë=山田^太郎"
    path = make_zip(tmp_path, {"Ärzte/画像/IM1": ct.read_bytes(), "Ärzte/読んで.txt": b"x"})
    verdict = inspect_staged_file(path, "Überweisung.zip")
    assert verdict.objects == 1
    assert "Überweisung.zip > Ärzte/読んで.txt" in dict(verdict.skipped)


def test_xss_payload_is_kept_as_text(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1, PatientName=XSS)
    verdict = inspect_staged_file(staged(tmp_path, ct.read_bytes()), "<b>x</b>.dcm")
    assert verdict.patients[0].name == XSS  # escaping is the page's job (tested there)


def test_second_patient_in_one_zip(tmp_path: Path) -> None:
    mine = make_ct_series(tmp_path / "a", 2, PatientID="P1", PatientName="Doe^Jane")
    other = make_ct_series(tmp_path / "b", 1, PatientID="P2", PatientName="Roe^Richard")
    entries = {f"A/{i}": p.read_bytes() for i, p in enumerate(mine)}
    entries["B/0"] = other[0].read_bytes()
    verdict = inspect_staged_file(make_zip(tmp_path, entries), "two.zip")
    assert verdict.objects == 3
    assert sorted(p.patient_id for p in verdict.patients) == ["P1", "P2"]
    keys = {s.patient_key for s in verdict.studies}
    assert keys == {patient_key(p) for p in verdict.patients}


def test_dicomdir_file(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    series = make_ct_series(tmp_path / "src", 2)
    fs = FileSet()
    for p in series:
        fs.add(p)
    out = tmp_path / "cd"
    try:
        fs.write(out)
    finally:
        fs._stage["t"].cleanup()  # pydicom leaves its staging folder to the GC (see test_fileset)
    verdict = inspect_staged_file(staged(tmp_path, (out / "DICOMDIR").read_bytes()), "DICOMDIR")
    assert verdict.kind == DICOMDIR
    assert verdict.reason == "directory of 2 files"


def test_pdf_and_images(tmp_path: Path) -> None:
    assert inspect_staged_file(staged(tmp_path, minimal_pdf()), "letter.pdf").kind == PDF
    assert inspect_staged_file(staged(tmp_path, _png(), "p"), "photo.png").kind == PNG
    assert inspect_staged_file(staged(tmp_path, _jpeg(), "j"), "photo.jpg").kind == JPEG
    cut = inspect_staged_file(staged(tmp_path, minimal_pdf()[:100], "c"), "cut.pdf")
    assert cut.kind == SKIPPED and "truncated" in cut.reason
    broken = inspect_staged_file(staged(tmp_path, _png()[:40], "b"), "broken.png")
    assert broken.kind == SKIPPED and "cannot be read" in broken.reason


def test_image_bomb_is_skipped(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, "PNG")  # 100 megapixels, a few kB
    verdict = inspect_staged_file(staged(tmp_path, out.getvalue()), "bomb.png")
    assert verdict.kind == SKIPPED and "decompression bomb" in verdict.reason


def test_scan_hands_every_object_over(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "src", 3)
    path = make_zip(tmp_path, {f"IM{i}": p.read_bytes() for i, p in enumerate(series)})
    seen: list[tuple[str, int, str]] = []
    scan_file(path, "z.zip", on_object=lambda obj, payload, ts: seen.append(
        (obj.record.sop_uid, len(payload), ts)))
    assert len(seen) == 3
    assert all(ts == "1.2.840.10008.1.2.1" and size > 512 for _, size, ts in seen)


def test_verdict_json_round_trip(tmp_path: Path) -> None:
    (ct,) = make_ct_series(tmp_path / "src", 1, PatientName="Zoë^Ä")
    verdict = inspect_staged_file(make_zip(tmp_path, {"IM": ct.read_bytes(), "x": b"?"}), "a")
    again = FileVerdict.from_dict(json.loads(json.dumps(verdict.to_dict())))
    assert again == verdict


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, "JPEG")
    return out.getvalue()
