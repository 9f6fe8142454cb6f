"""The download package's content: names, pages, previews, reports, CRC cache, determinism.

Built in-process over a real :class:`Services` and file store in ``tmp_path``; the zip is
read back with Python's zipfile (the HTTP side is in ``test_download.py``).
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import Path

import pytest
import pyzipper
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from iepnode.errors import Gone
from iepnode.people import audit
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.sharing.package import Package
from iepnode.sharing.previews import placeholder_jpeg
from iepnode.sharing.zipstream import iter_bytes
from iepnode.wiring import build_services
from storage.fileset import fileset_file_ids, plan_fileset
from storage.models import AuditEvent, Instance, InstanceChecksum
from tests import data_factory as factory
from tests.support.damage import DAMAGES, REASONS, damage, permissions_apply_here
from tests.support.ingest import store_files
from tests.support.node import run_cli
from tests.test_recipient_web import CONTACT, make_settings

NAME = re.compile(r"DICOMDIR|README\.TXT|INDEX\.HTM|IHE_PDI/[A-Z0-9]{1,8}\.(HTM|JPG)|"
                  r"REPORTS/[A-Z0-9]{1,8}\.PDF|DICOM(/[A-Z0-9_]{1,8}){1,7}")


def unpack(pkg: Package) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(b"".join(iter_bytes(pkg.layout)))) as zf:
        assert zf.testzip() is None
        return {name: zf.read(name) for name in zf.namelist()}


def share(services: Services, *uids: str) -> tx.Transaction:
    transaction, _ = tx.create_transfer(
        tx.NewTransfer(uids, "pat@example.org", otp_mobile="+447700900123"),
        contact=CONTACT, institution=services.settings.institution, created_by="cli")
    return transaction


def test_plan_fileset_under_a_root_gives_the_same_bytes(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "ct", 3)
    first = plan_fileset(files, root=("DICOM",), instance_uid="1.2.3.4")
    again = plan_fileset(list(reversed(files)), root=("DICOM",), instance_uid="1.2.3.4")
    assert first.dicomdir == again.dicomdir  # records ordered by instance number, not input
    assert [p.file_id for p in first.files] == [
        ("DICOM", "PT000000", "ST000000", "SE000000", f"IM00000{i}") for i in range(3)]
    assert dcmread(io.BytesIO(first.dicomdir)).file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    for bad in (("dicom",), ("TOOLONGNAME",), ("A", "B", "C", "D", "E"), ("..",)):
        with pytest.raises(ValueError):
            plan_fileset(files, root=bad)


def test_names_are_generated_and_pages_escape_dicom_values(services: Services,
                                                           tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script> ../../etc/passwd"
    ct = factory.make_ct_series(tmp_path / "ct", 2, PatientName="<b>Evil</b>^../x",
                                StudyDescription=hostile, SeriesDescription=hostile,
                                AccessionNumber="../../A")
    uid = store_files(services, [*ct, factory.make_pdf(tmp_path / "ct", like=ct[0],
                                                   DocumentTitle="..\\..\\evil.exe")])
    transaction = share(services, uid)
    files = unpack(services.downloads.recipient_package(transaction.recipient_id,
                                                    transaction.public_id))
    assert all(NAME.fullmatch(name) for name in files), list(files)
    for name in ("INDEX.HTM", "IHE_PDI/STUDY001.HTM"):
        page = files[name].decode("ascii")
        assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<b>" not in page and "&lt;B&gt;EVIL&lt;/B&gt;" in page


def test_same_stored_files_give_the_same_bytes_and_the_plan_is_cached(
    services: Services, tmp_path: Path
) -> None:
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 3))
    transaction = share(services, uid)
    first = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    assert services.downloads.recipient_package(transaction.recipient_id,
                                            transaction.public_id) is first
    other = build_services(services.settings)  # another process's view: nothing cached
    second = other.downloads.transaction_package(transaction.public_id)
    assert second is not first and second.etag == first.etag
    assert b"".join(iter_bytes(second.layout)) == b"".join(iter_bytes(first.layout))
    store_files(services, factory.make_ct_series(tmp_path / "more", 1, StudyInstanceUID=uid))
    grown = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    assert grown.instances == 4 and grown.etag != first.etag


def test_checksums_are_cached_when_a_study_becomes_stable(tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, stable_age=0))
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 3))
    assert InstanceChecksum.select().count() == 0
    assert services.filesets.build_stable_filesets() == 1
    rows = dict(InstanceChecksum.select(InstanceChecksum.instance,
                                        InstanceChecksum.crc32).tuples())
    instances = list(Instance.select())
    assert len(rows) == len(instances) == 3
    for instance in instances:
        assert rows[instance.key] == zlib.crc32(services.store.path(instance.key).read_bytes())
    InstanceChecksum.delete().execute()
    services.downloads.study_package(uid)  # computes what is missing, and keeps it
    assert InstanceChecksum.select().count() == 3
    services.sharing.purge_expired()
    from storage import index

    index.delete_study(uid)  # the cache rows go with the instance rows
    assert InstanceChecksum.select().count() == 0


def test_previews_decode_what_they_can_and_say_so_otherwise(services: Services,
                                                            tmp_path: Path) -> None:
    study_uid = generate_uid()
    same = {"StudyInstanceUID": study_uid, "PatientID": "P9", "PatientName": "Pre^View"}
    paths = [factory.copy_bundled(name, tmp_path / "in", SOPInstanceUID=generate_uid(),
                                  SeriesInstanceUID=generate_uid(), **same)
             for name in ("MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                          "JPEG-lossy.dcm")]
    paths.append(factory.make_sr(tmp_path / "in", like=paths[0]))
    store_files(services, paths)
    files = unpack(services.downloads.study_package(study_uid))
    previews = [files[n] for n in sorted(files) if n.endswith(".JPG")]
    assert len(previews) == 5  # one per series
    cannot_decode = placeholder_jpeg("No preview", "this image's compression cannot be shown "
                                     "here; open it in a DICOM viewer", size=256)
    report = placeholder_jpeg("Report", "No picture: open it in a DICOM viewer")
    # JPEG-lossy.dcm: a 12-bit JPEG neither libjpeg nor Pillow decodes (GDCM would)
    assert previews.count(cannot_decode) == 1
    assert previews.count(report) == 1  # the SR
    shown = [p for p in previews if p not in (cannot_decode, report)]
    assert len(shown) == 3  # RLE, JPEG 2000 and JPEG baseline decode
    for jpeg in shown:
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and 256 <= max(image.size) <= 512
    pages = b"".join(v for k, v in files.items() if k.endswith(".HTM"))
    assert pages.count(b"<img ") == 5


@pytest.mark.parametrize("size", [101, 150_001], ids=["small-odd", "large-odd"])
def test_pdf_reports_keep_their_exact_bytes(services: Services, tmp_path: Path, size: int) -> None:
    pdf = factory.minimal_pdf()
    pdf = pdf + b"%" * (size - len(pdf)) if size > len(pdf) else pdf[:size]
    ct = factory.make_ct_series(tmp_path / "ct", 1)
    uid = store_files(services, [*ct, factory.make_pdf(tmp_path / "ct", like=ct[0], pdf=pdf)])
    files = unpack(services.downloads.study_package(uid))
    assert files["REPORTS/RPT00001.PDF"] == pdf
    assert b"../REPORTS/RPT00001.PDF" in files["IHE_PDI/STUDY001.HTM"]


def test_cli_export_with_password(services: Services, tmp_path: Path) -> None:
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 2))
    transaction = share(services, uid)
    out = tmp_path / "out.zip"
    result = run_cli(services.settings.data_dir, "export", transaction.public_id, "--out", str(out),
                     "--password", "--no-progress")
    password = re.search(r"password: (\S+)", result.stdout).group(1)
    assert "100%" not in result.stderr  # --no-progress
    plain = unpack(services.downloads.transaction_package(transaction.public_id))
    with pyzipper.AESZipFile(out) as zf:
        zf.setpassword(password.encode())
        assert {n: zf.read(n) for n in zf.namelist()} == plain
    missing = run_cli(services.settings.data_dir, "export", "1.2.3.999", "--out",
                      str(tmp_path / "x.zip"), check=False)
    assert missing.returncode == 1 and "no study" in missing.stderr
    assert not (tmp_path / "x.zip").exists()


# -- unreadable stored files (issue 13) -----------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
def test_an_unreadable_file_is_left_out_and_named(services: Services, tmp_path: Path,
                                                  how: str) -> None:
    if how == "unreadable" and not permissions_apply_here():
        pytest.skip("root reads a file whatever its mode; test_bad_files.py downloads from a "
                    "node without CAP_DAC_OVERRIDE")
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 3))
    second = Instance.get(Instance.instance_number == "2")
    damage(services.store.path(second.key), how)
    transaction = share(services, uid)

    pkg = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    files = unpack(pkg)
    assert pkg.instances == 2 and len([n for n in files if n.startswith("DICOM/")]) == 2
    assert [(e.sop_uid, e.instance_number, e.reason) for e in pkg.left_out] == [
        (second.sop_uid, "2", f"the stored file {REASONS[how]}")]
    readme = " ".join(files["README.TXT"].decode().split())
    assert ("1 DICOM file of this study could not be read at the sending hospital and is "
            "not in this package") in readme
    assert f"Series 1 (CT), image 2, SOP Instance UID {second.sop_uid}: " in readme
    assert second.key not in readme and str(tmp_path) not in readme
    assert b"1 DICOM file could not be read" in files["INDEX.HTM"]
    # Another process plans the very same bytes (resumes and ranges stay consistent).
    other = build_services(services.settings).downloads.transaction_package(transaction.public_id)
    assert other.etag == pkg.etag and other.size == pkg.size
    assert b"".join(iter_bytes(other.layout)) == b"".join(iter_bytes(pkg.layout))
    services.downloads.record_download(audit.Actor("cli", "tester"), pkg, action="export")
    (event,) = AuditEvent.select().where(AuditEvent.action == "export")
    assert (f"2 instances; left out 1 unreadable instances: {second.sop_uid} (the stored "
            f"file {REASONS[how]})") in event.detail
    assert InstanceChecksum.get_or_none(InstanceChecksum.instance == second.key) is None


def test_a_file_damaged_after_a_plan_is_planned_again(services: Services, tmp_path: Path) -> None:
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 3))
    first = services.downloads.study_package(uid)
    assert services.downloads.study_package(uid) is first and first.left_out == ()
    third = Instance.get(Instance.instance_number == "3")
    path = services.store.path(third.key)
    with open(path, "r+b") as fh:  # garbage over the header; same size
        fh.write(b"\xff" * 200)
    again = services.downloads.study_package(uid)
    assert again is not first and again.instances == 2
    assert [e.sop_uid for e in again.left_out] == [third.sop_uid]


def test_a_package_with_nothing_readable_is_gone(services: Services, tmp_path: Path) -> None:
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 2))
    for instance in Instance.select():
        damage(services.store.path(instance.key), "missing")
    with pytest.raises(Gone, match="cannot be read at the moment"):
        services.downloads.study_package(uid)


def test_housekeeping_caches_checksums_of_readable_files_only(tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, stable_age=0))
    uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 3))
    bad = Instance.get(Instance.instance_number == "1")
    damage(services.store.path(bad.key), "truncated")
    assert services.filesets.build_stable_filesets() == 1
    cached = {key for (key,) in InstanceChecksum.select(InstanceChecksum.instance).tuples()}
    assert len(cached) == 2 and bad.key not in cached
    assert len(fileset_file_ids(services.filesets.fileset_path(services.archive.study(uid)))) == 2
