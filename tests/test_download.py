"""Download: a recipient's transaction as one zip any viewer, PACS or burner takes.

The first test runs everything for real: dcmtk ``storescu`` sends two studies
(one uncompressed CT with a PDF and an SR, one of compressed images) to ``iepnode
serve`` (two HTTP processes, a new connection per request); ``iepnode transfer
create`` shares both; the recipient signs in through the emailed link and a
passcode (both read from the outbox), and downloads over HTTP. The zip is then
checked with Python's zipfile, ``unzip -t``, ``7z t``, dicom3tools (``dciodvfy``,
``dcentvfy``), dcmtk (``dcmftest``, ``dcmmkdir +U``) and imported into a real
Orthanc; every instance must be byte-identical to the stored file; ranges must
resume to the same bytes (from either HTTP process); the CLI export must give the
same bytes as the web.

The other tests run the app in-process over a real :class:`Services` (aiohttp test
server on loopback): someone else's package, gone packages, the password option,
and a package over 4 GiB (sparse files, marked slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import time
import zipfile
from collections.abc import AsyncIterator
from email import policy
from email.parser import BytesParser
from pathlib import Path

import aiohttp
import pytest
import pyzipper
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from config import load_settings
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.sharing.zipstream import iter_bytes
from iepnode.wiring import build_services
from storage.models import AuditEvent, Instance, InstanceChecksum, Transaction
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.support.node import running_node
from tests.support.peers import ORTHANC, running_orthanc
from tests.support.scu import storescu
from tests.support.tools import dcmtk
from tests.test_fileset import dcentvfy_errors, dciodvfy_errors
from tests.test_recipient_web import log_in, page_csrf, share
from web.download import parse_range

INSTITUTION = "St Elsewhere NHS Trust"
FILE_ID = re.compile(r"DICOM(/[A-Z0-9_]{1,8}){1,7}")
GENERATED = re.compile(r"(DICOMDIR|README\.TXT|INDEX\.HTM|IHE_PDI/[A-Z0-9_]{1,8}\.(HTM|JPG)|"
                       r"REPORTS/[A-Z0-9_]{1,8}\.PDF)")
EXECUTABLE = re.compile(r"\.(exe|com|bat|cmd|msi|scr|js|vbs|sh|app|dll|jar)$|autorun", re.I)
PATIENT = {"PatientName": "Müller^Jürgen", "PatientID": "P1", "PatientBirthDate": "19800214",
           "PatientSex": "M", "SpecificCharacterSet": "ISO_IR 100"}


# -- helpers ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_browser(port: int) -> AsyncIterator[Browser]:
    """A cookie-keeping client for a node listening on loopback ``port``."""
    # A new connection per request: with several HTTP processes on one port
    # (SO_REUSEPORT), the kernel spreads them, so ranges come from different processes.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield Browser(session)


def outbox_text(data_dir: Path, to: str) -> str:
    """The newest outbox message to ``to``."""
    for path in sorted((data_dir / "outbox").glob("*.eml"), reverse=True):
        with path.open("rb") as fh:
            message = BytesParser(policy=policy.default).parse(fh)
        if to in str(message["To"]):
            return message.get_body(preferencelist=("plain",)).get_content()
    raise AssertionError(f"no message to {to} in the outbox")


async def sign_in(browser: Browser, data_dir: Path, token: str) -> None:
    """Open the emailed link, type the passcode from the outbox SMS."""
    page = await browser.get(f"/t/{token}")
    html = await page.text()
    assert page.status == 200, html
    attempt = re.search(r'name="attempt" value="(\d+)"', html).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    code = re.search(r"\b(\d{6})\b", outbox_text(data_dir, "sms:")).group(1)
    response = await browser.post(f"/t/{token}/login",
                                  data={"attempt": attempt, "code": code, "csrf": csrf})
    assert response.status == 303, await response.text()


def run(*command: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=timeout, errors="replace")


def stored_by_uid(data_dir: Path) -> dict[str, bytes]:
    """Every stored object's bytes by SOP Instance UID."""
    out = {}
    for path in (data_dir / "objects").rglob("*"):
        if path.is_file():
            out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path.read_bytes()
    return out


def data_start(zf: zipfile.ZipFile, name: str) -> int:
    """Offset of a member's data in the archive (after its local header)."""
    info = zf.getinfo(name)
    with open(zf.filename, "rb") as fh:  # type: ignore[arg-type]
        fh.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(fh.read(2), "little"), int.from_bytes(
            fh.read(2), "little")
    return info.header_offset + 30 + name_length + extra_length


async def fetch(browser: Browser, path: str, **headers: str) -> tuple[aiohttp.ClientResponse,
                                                                      bytes]:
    response = await browser.get(path, headers=headers)
    return response, await response.read()


def check_archive_tools(archive: Path) -> None:
    unzip = run("/usr/bin/unzip", "-t", archive)
    assert unzip.returncode == 0 and "No errors detected" in unzip.stdout, unzip.stdout
    seven = run("/usr/bin/7z", "t", archive)
    assert seven.returncode == 0 and "Everything is Ok" in seven.stdout, seven.stdout


def study_b_files(directory: Path, study_uid: str) -> list[tuple[Path, str]]:
    """Compressed images (RLE, JPEG 2000, JPEG baseline, JPEG-LS) of one more study.

    Every Patient and Study attribute the bundled files carry is set alike, so the
    sources themselves are consistent for dcentvfy.
    """
    out = []
    for name, flag in (("MR_small_RLE.dcm", "-xr"), ("JPEG2000.dcm", "-xw"),
                       ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),
                       ("MR_small_jpeg_ls_lossless.dcm", "-xt")):
        path = factory.copy_bundled(
            name, directory, **PATIENT, StudyInstanceUID=study_uid, StudyDate="20230310",
            StudyTime="101500", StudyID="B1", AccessionNumber="ACC2",
            StudyDescription="MR KNEE", ReferringPhysicianName="Referrer^Rita",
            SOPInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
            PatientAge=None, PatientWeight=None, PatientSize=None, OtherPatientIDs=None,
            InstitutionName=None)
        out.append((path, flag))
    return out


# -- the whole path, for real -------------------------------------------------------------


async def test_recipient_downloads_a_pdi_zip_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two HTTP processes: a resume must get the same bytes from either (deterministic plan).
    for name, value in {"INSTITUTION": INSTITUTION, "FSYNC": "false",
                        "HTTP_WORKERS": "2"}.items():
        monkeypatch.setenv(f"IEPNODE_{name}", value)
    ct = factory.make_ct_series(tmp_path / "a", 4, **PATIENT, StudyDate="20240105",
                                StudyDescription="CT HEAD", AccessionNumber="ACC1")
    pdf_bytes = factory.minimal_pdf("Report of the CT head")
    a_files = [*ct, factory.make_pdf(tmp_path / "a", like=ct[0], pdf=pdf_bytes),
               factory.make_sr(tmp_path / "a", like=ct[0])]
    study_a = str(dcmread(ct[0]).StudyInstanceUID)
    study_b = generate_uid()
    b_files = study_b_files(tmp_path / "b", study_b)
    data_dir = tmp_path / "node"

    with running_node(data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store")]) as node:
        sent = storescu(node, a_files)
        assert sent.returncode == 0, sent.stderr
        for path, flag in b_files:
            sent = storescu(node, [path], extra=(flag,))
            assert sent.returncode == 0, sent.stderr
        public_id = node.cli("transfer", "create", "--study", study_a, "--study", study_b,
                             "--to", "pat@example.org", "--otp-mobile", "+447700900123",
                             ).stdout.strip()
        token = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        async with http_browser(node.http_port) as browser:
            await sign_in(browser, data_dir, token.group(1))
            page = await browser.page(f"/transactions/{public_id}")
            assert f'href="/transactions/{public_id}/download"' in page
            assert f'action="/transactions/{public_id}/download-protected"' in page

            response, body = await fetch(browser, f"/transactions/{public_id}/download")
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/zip"
            assert response.headers["Content-Disposition"] == (
                f'attachment; filename="{public_id}.zip"')
            assert response.headers["Accept-Ranges"] == "bytes"
            assert int(response.headers["Content-Length"]) == len(body)
            assert response.headers["Cache-Control"] == "no-store"
            etag = response.headers["ETag"]
            assert re.fullmatch(r'"[0-9a-f]{40}"', etag)

            head = await browser.request("HEAD", f"/transactions/{public_id}/download")
            assert head.status == 200 and int(head.headers["Content-Length"]) == len(body)
            assert head.headers["ETag"] == etag

            archive = tmp_path / "download.zip"
            archive.write_bytes(body)
            await check_ranges(browser, f"/transactions/{public_id}/download", archive, etag)

        exported = tmp_path / "export.zip"
        out = node.cli("export", public_id, "--out", str(exported), "--no-progress")
        assert f"{len(a_files) + len(b_files)} instances" in out.stdout
        assert exported.read_bytes() == body  # the CLI writes the very same package
        only_b = tmp_path / "study-b.zip"
        node.cli("export", study_b, "--out", str(only_b), "--no-progress")
        with zipfile.ZipFile(only_b) as zf:
            assert zf.testzip() is None
            assert len([n for n in zf.namelist() if n.startswith("DICOM/")]) == len(b_files)

        stored = stored_by_uid(data_dir)
    check_package(archive, tmp_path / "x", stored, a_files, b_files, pdf_bytes)

    audit_services = build_services(load_settings(overrides={"data_dir": data_dir}, environ={}))
    events = list(AuditEvent.select().where(AuditEvent.event_code == "110106")
                  .order_by(AuditEvent.id))
    downloads_ = [e for e in events if e.action == "download"]
    assert len(downloads_) >= 7  # the full download and each range request
    assert {e.transaction_public_id for e in downloads_} == {public_id}
    assert all(e.actor == "pat@example.org" and e.outcome == 0 for e in downloads_)
    studies = re.search(r"studies=([^;]+)", downloads_[0].detail).group(1).split(",")
    assert sorted(studies) == sorted([study_a, study_b])
    assert "media=zip" in downloads_[0].detail and "complete" in downloads_[0].detail
    assert [e.actor_kind for e in events if e.action == "export"] == ["cli", "cli"]
    audit_services.close()

    if not ORTHANC.is_file():
        pytest.fail(f"{ORTHANC} not found: run scripts/install-system-deps (Debian orthanc)")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        answers = orthanc.post("/instances", body)
        assert all(a["Status"] == "Success" for a in answers), answers
        stats = orthanc.get("/statistics")
        assert stats["CountInstances"] == len(a_files) + len(b_files)
        assert stats["CountStudies"] == 2 and stats["CountPatients"] == 1


async def check_ranges(browser: Browser, url: str, archive: Path, etag: str) -> None:
    """Resumes and ranges give exactly the bytes of the full download."""
    whole = archive.read_bytes()
    size = len(whole)
    with zipfile.ZipFile(archive) as zf:
        dicom = [n for n in zf.namelist() if n.startswith("DICOM/")]
        inside = data_start(zf, dicom[len(dicom) // 2]) + 100  # in the middle of an instance
    for start in (inside, 1, size - 1):
        response, part = await fetch(browser, url, Range=f"bytes={start}-", **{"If-Range": etag})
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {start}-{size - 1}/{size}"
        assert whole[:start] + part == whole
    response, part = await fetch(browser, url, Range=f"bytes={inside}-{inside + 99999}")
    assert response.status == 206 and part == whole[inside:inside + 100000]
    response, part = await fetch(browser, url, Range="bytes=-22")
    assert response.status == 206 and part == whole[-22:] and part.startswith(b"PK\x05\x06")
    response, part = await fetch(browser, url, Range=f"bytes={size}-")
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"
    response, part = await fetch(browser, url, Range="bytes=10-", **{"If-Range": '"other"'})
    assert response.status == 200 and part == whole  # stale partial copy: start again


def check_package(archive: Path, folder: Path, stored: dict[str, bytes],
                  a_files: list[Path], b_files: list[tuple[Path, str]],
                  pdf_bytes: bytes) -> None:
    """Layout, byte identity, and every validator and reader we have."""
    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert names[0] == "DICOMDIR"
        for name in names:
            assert FILE_ID.fullmatch(name) or GENERATED.fullmatch(name), name
            assert not EXECUTABLE.search(name), name
        dicom = [n for n in names if n.startswith("DICOM/")]
        assert len(dicom) == len(stored) == len(a_files) + len(b_files)
        for name in dicom:
            data = zf.read(name)
            uid = str(dcmread(zf.open(name), stop_before_pixels=True).SOPInstanceUID)
            assert data == stored[uid], name  # byte-identical to what the node stored
        reports = [n for n in names if n.startswith("REPORTS/")]
        assert [zf.read(n) for n in reports] == [pdf_bytes]
        readme = zf.read("README.TXT").decode("utf-8")
        assert INSTITUTION in readme and "not for diagnostic use" in readme.lower()
        assert "MÜLLER, Jürgen" in readme and "\r\n" in readme
        index = zf.read("INDEX.HTM")
        assert index.isascii() and b"M&#220;LLER, J&#252;rgen" in index
        assert b"<script" not in index.lower()
        pages = [n for n in names if n.endswith(".HTM")]
        for page in pages:
            base = page.rsplit("/", 1)[0] + "/" if "/" in page else ""
            for link in re.findall(rb'(?:href|src)="([^"]+)"', zf.read(page)):
                target = os.path.normpath(base + link.decode()).replace(os.sep, "/")
                assert target in names, (page, link)
        previews = [n for n in names if n.endswith(".JPG")]
        assert len(previews) == 3 + len(b_files)  # one per series
        from PIL import Image

        for name in previews:
            with Image.open(zf.open(name)) as image:
                assert image.format == "JPEG"
        zf.extractall(folder)
    check_archive_tools(archive)

    # Uncompressed sources: the stored dataset is what storescu sent.
    from tests.support.scu import dataset_bytes

    extracted = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                 for p in (folder / "DICOM").rglob("*") if p.is_file()}
    for source in a_files:
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(extracted[uid]) == dataset_bytes(source)

    assert dciodvfy_errors(folder / "DICOMDIR") == []
    members = sorted(extracted.values())
    assert dcentvfy_errors(members) == []
    for member in members:
        result = run(dcmtk("dcmftest"), member)
        assert result.returncode == 0 and "yes" in result.stdout, result.stdout
    dump = run(dcmtk("dcmdump"), "-q", folder / "DICOMDIR")
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    # dcmtk's DICOMDIR tool reads, checks and rewrites it (STD-GEN-CD; compressed
    # files are allowed with -Nxc). Nothing to report means it accepts our records.
    update = subprocess.run([dcmtk("dcmmkdir"), "+U", "-Nxc", "+r", "DICOM"], cwd=folder,
                            capture_output=True, text=True, timeout=120)
    assert update.returncode == 0, update.stderr
    remarks = [line for line in update.stderr.splitlines() if line.startswith(("E:", "W:"))
               and "LittleEndianExplicit expected but" not in line]  # the compressed images
    assert remarks == [], update.stderr


# -- rules, in-process ---------------------------------------------------------------------
# The app runs on aiohttp's test server (conftest.py: client, browser) over the default
# services in tmp_path, as in test_recipient_web.py (whose login helpers these tests use).


@pytest.fixture
def ct_study(services: Services, tmp_path: Path) -> str:
    return store_files(services, factory.make_ct_series(
        tmp_path / "ct", 3, PatientName="Doe^Jane", PatientID="P1", StudyDate="20240105",
        StudyDescription="CT HEAD", AccessionNumber="ACC1"))


async def test_someone_elses_package_is_not_found(browser: Browser, services: Services,
                                                  ct_study: str) -> None:
    study = ct_study
    mine, token = share([study], "me@example.org")
    theirs, _ = share([study], "them@example.org")
    anonymous = await browser.get(f"/transactions/{mine.public_id}/download")
    assert anonymous.status == 303 and anonymous.headers["Location"] == "/signin"
    await log_in(browser, services, token)
    ok = await browser.get(f"/transactions/{mine.public_id}/download")
    assert ok.status == 200
    await ok.read()
    for url in (f"/transactions/{theirs.public_id}/download", "/transactions/IEP00000000/download",
                "/transactions/../download", "/transactions/iep1/download"):
        response = await browser.get(url)
        assert response.status == 404, url
        assert b"PK" not in await response.read()
    csrf = await page_csrf(browser)
    response = await browser.post(f"/transactions/{theirs.public_id}/download-protected",
                                   data={"csrf": csrf})
    assert response.status == 404


async def test_declined_expired_and_purged_packages_are_gone(
    browser: Browser, services: Services, ct_study: str, tmp_path: Path
) -> None:
    study = ct_study
    live, token = share([study])
    declined, _ = share([study])
    expired, _ = share([study], now=time.time() - 20 * tx.DAY)
    old_ct = factory.make_ct_series(tmp_path / "old", 2, PatientID="P1", PatientName="Doe^Jane")
    only_in_expired = store_files(services, old_ct)
    purged, _ = share([only_in_expired], now=time.time() - 20 * tx.DAY)
    await log_in(browser, services, token)
    csrf = await page_csrf(browser)
    assert (await browser.post(f"/transactions/{declined.public_id}/decline",
                               data={"csrf": csrf, "reason": "not mine"})).status == 303
    page = await browser.page("/dashboard?tab=all")
    assert page.count("/download\"") == 1  # only the live one offers a download
    assert f'href="/transactions/{live.public_id}/download"' in page

    for gone, words in ((declined, "You declined"), (expired, "has expired")):
        response = await browser.get(f"/transactions/{gone.public_id}/download")
        assert response.status == 410
        assert words in await response.text()
        response = await browser.post(f"/transactions/{gone.public_id}/download-protected",
                                      data={"csrf": csrf})
        assert response.status == 410

    assert services.sharing.purge_expired() == 2  # the old study's files go; the shared one stays
    response = await browser.get(f"/transactions/{purged.public_id}/download")
    assert response.status == 410 and "removed" in await response.text()
    assert (await browser.get(f"/transactions/{live.public_id}/download")).status == 200
    with pytest.raises(Exception, match="purged"):
        services.downloads.transaction_package(purged.public_id)


async def test_interrupted_download_is_audited_as_such(browser: Browser, services: Services,
                                                      tmp_path: Path) -> None:
    uid = store_files(services, factory.make_ct_series(tmp_path / "big", 48, rows=512,
                                                          columns=512))  # ~25 MB
    transaction, token = share([uid])
    await log_in(browser, services, token)
    response = await browser.get(f"/transactions/{transaction.public_id}/download")
    assert response.status == 200 and int(response.headers["Content-Length"]) > 20_000_000
    await response.content.readexactly(1 << 20)
    response.close()  # the browser goes away mid-download

    deadline = time.monotonic() + 30
    while not (events := list(AuditEvent.select().where(AuditEvent.action == "download"))):
        assert time.monotonic() < deadline, "no audit event for the interrupted download"
        await asyncio.sleep(0.05)
    (event,) = events
    assert event.outcome == 4 and "interrupted by the client after" in event.detail
    sent = int(re.search(r"after (\d+) bytes", event.detail).group(1))
    assert 1 << 20 <= sent < int(response.headers["Content-Length"])


async def test_a_file_cut_short_while_streaming_breaks_the_download_not_the_bytes(
    browser: Browser, services: Services, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored file truncated after the plan, mid-stream: the client sees a broken
    download (never a zip of wrong bytes), the audit says so, and the next request
    plans again without that instance."""
    uid = store_files(services, factory.make_ct_series(tmp_path / "big", 24, rows=512,
                                                          columns=512))  # ~12.6 MB
    transaction, token = share([uid])
    await log_in(browser, services, token)
    url = f"/transactions/{transaction.public_id}/download"
    response = await browser.get(url)
    assert response.status == 200
    size = int(response.headers["Content-Length"])
    await response.content.readexactly(1 << 20)
    last = Instance.get(Instance.instance_number == "24")  # the last member of the zip
    os.truncate(services.store.path(last.key), 1000)
    with pytest.raises(aiohttp.ClientPayloadError):
        while await response.content.read(1 << 20):
            pass
    response.close()

    deadline = time.monotonic() + 30
    while not (events := list(AuditEvent.select().where(AuditEvent.action == "download"))):
        assert time.monotonic() < deadline, "no audit event for the broken download"
        await asyncio.sleep(0.05)
    (event,) = events
    assert event.outcome == 8 and "shorter than planned after" in event.detail
    assert int(re.search(r"after (\d+) bytes", event.detail).group(1)) < size
    assert f"download of {transaction.public_id} aborted after" in caplog.text

    again, body = await fetch(browser, url)
    assert again.status == 200 and int(again.headers["Content-Length"]) == len(body) < size
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.testzip() is None
        assert len([n for n in zf.namelist() if n.startswith("DICOM/")]) == 23
        readme = " ".join(zf.read("README.TXT").decode().split())
    assert f"image 24, SOP Instance UID {last.sop_uid}: the stored file is cut short" in readme


def test_range_header_parsing() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-", 100) == (0, 100)
    assert parse_range("bytes=10-19", 100) == (10, 20)
    assert parse_range("bytes=90-200", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=-1000", 100) == (0, 100)
    for ignored in ("bytes=1-2,5-6", "items=0-1", "bytes=5-2", "bytes=-", "bytes=a-b", "x"):
        assert parse_range(ignored, 100) is None, ignored
    for unsatisfiable in ("bytes=100-", "bytes=100-200", "bytes=-0"):
        with pytest.raises(Exception) as raised:
            parse_range(unsatisfiable, 100)
        assert raised.value.status == 416 and raised.value.headers["Content-Range"] == (
            "bytes */100")


# -- password-protected copies --------------------------------------------------------------


async def test_password_protected_download(browser: Browser, services: Services,
                                           ct_study: str) -> None:
    study = ct_study
    transaction, token = share([study])
    await log_in(browser, services, token)
    url = f"/transactions/{transaction.public_id}/download-protected"
    assert (await browser.post(url, data={"csrf": "wrong"})).status == 403
    csrf = await page_csrf(browser)
    response = await browser.post(url, data={"csrf": csrf})
    html = await response.text()
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    password = re.search(r'id="password">([A-Z0-9-]+)<', html).group(1)
    assert re.fullmatch(r"([A-HJ-NP-Z2-9]{5}-){3}[A-HJ-NP-Z2-9]{5}", password)
    link = re.search(r'href="(/downloads/[A-Za-z0-9_-]{32})"', html).group(1)

    response = await browser.get(link)
    encrypted = await response.read()
    assert response.status == 200
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="{transaction.public_id}.zip"')
    resumed = await browser.get(link, headers={"Range": "bytes=100-"})
    assert resumed.status == 206 and await resumed.read() == encrypted[100:]

    plain = services.downloads.recipient_package(transaction.recipient_id, transaction.public_id)
    with zipfile.ZipFile(io.BytesIO(b"".join(iter_bytes(plain.layout)))) as zf:
        expected = {n: zf.read(n) for n in zf.namelist()}
    with pyzipper.AESZipFile(io.BytesIO(encrypted)) as zf:
        assert all(info.flag_bits & 0x1 for info in zf.infolist())  # every entry encrypted
        zf.setpassword(password.encode())
        assert {n: zf.read(n) for n in zf.namelist()} == expected
        zf.setpassword(b"WRONG-WRONG-WRONG-WRONG")
        with pytest.raises(RuntimeError):
            zf.read("DICOMDIR")
    seven = run("/usr/bin/7z", "t", f"-p{password}", write_tmp(services, encrypted))
    assert seven.returncode == 0 and "Everything is Ok" in seven.stdout, seven.stdout

    # The password was shown once and is kept nowhere.
    data_dir = services.settings.data_dir
    for path in data_dir.rglob("*"):
        if path.is_file() and path.suffix != ".zip":
            assert password.encode() not in path.read_bytes(), path
    assert "AES-256 copy" in " ".join(e.detail for e in AuditEvent.select())

    # Someone else cannot use the link; asking again replaces the copy.
    _, other_token = share([study], "other@example.org")
    someone_else = Browser(browser.client)  # the same server, another cookie jar
    await log_in(someone_else, services, other_token)
    assert (await someone_else.get(link)).status == 404
    response = await browser.post(url, data={"csrf": csrf})
    assert (await browser.get(link)).status == 404
    new_link = re.search(r'href="(/downloads/[A-Za-z0-9_-]{32})"', await response.text()).group(1)
    assert (await browser.get(new_link)).status == 200
    folder = data_dir / "downloads"
    assert len(list(folder.glob("*.zip"))) == 1
    Transaction.update(expires_at=time.time() - 1).where(
        Transaction.id == transaction.id).execute()
    assert (await browser.get(new_link)).status == 410
    assert services.downloads.sweep_protected_downloads() == 1
    assert list(folder.glob("*")) == []


def write_tmp(owner: Services, data: bytes) -> Path:
    path = owner.settings.data_dir / "check.bin"
    path.write_bytes(data)
    return path


# -- over 4 GiB ---------------------------------------------------------------------------------

FRAMES = 4200  # 4200 frames of 512x512x16 bits: 2.2 GB per instance, two make > 4 GiB


def big_multiframe(path: Path, like: Path, frames: int) -> None:
    """Rewrite ``like`` (a stored one-frame image) with ``frames`` frames of zeros (sparse)."""
    ds = dcmread(like)
    del ds.PixelData
    ds.NumberOfFrames = frames
    header = path.with_suffix(".head")
    ds.save_as(header, enforce_file_format=True)
    length = 512 * 512 * 2 * frames
    with open(path, "wb") as out:
        out.write(header.read_bytes())
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        out.truncate(out.tell() + length)
    header.unlink()


def one_frame(directory: Path, study_uid: str, number: int) -> Path:
    ds = Dataset()
    ds.update({k: v for k, v in PATIENT.items() if k != "SpecificCharacterSet"})
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, "1.2.826.0.1.3680043.8.498.1"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "1200", "1", "A"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber = "", "OT", 1
    ds.InstanceNumber, ds.ConversionType, ds.PatientOrientation = number, "WSD", ""
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = 1
    ds.PixelData = bytes(512 * 512 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return factory.save(ds, directory)


@pytest.mark.slow
async def test_package_over_4_gib_downloads_and_resumes(
    browser: Browser, services: Services, tmp_path: Path
) -> None:
    """ZIP64 offsets for real: two 2.2 GB instances (sparse files in the store) and a
    small one after them."""
    started = time.monotonic()
    study_uid = generate_uid()
    small = [one_frame(tmp_path / "in", study_uid, number) for number in (1, 2, 3)]
    store_files(services, small)
    for instance in Instance.select().where(Instance.instance_number != "3"):
        path = services.store.path(instance.key)
        big_multiframe(path.with_name(path.name + ".big"), path, FRAMES)
        os.replace(path.with_name(path.name + ".big"), path)
    transaction, token = share([study_uid])
    await log_in(browser, services, token)

    url = f"/transactions/{transaction.public_id}/download"
    response = await browser.get(url)
    assert response.status == 200
    size = int(response.headers["Content-Length"])
    assert size > 4 << 30
    archive = tmp_path / "big.zip"
    zero = bytes(1 << 20)
    with open(archive, "wb") as out:
        async for chunk in response.content.iter_chunked(1 << 20):
            if chunk == zero[:len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)  # keep the copy sparse
            else:
                out.write(chunk)
        out.truncate()
    assert archive.stat().st_size == size
    assert InstanceChecksum.select().count() == 3

    with zipfile.ZipFile(archive) as zf:
        dicom = sorted(n for n in zf.namelist() if n.startswith("DICOM/"))
        # The third, small instance starts past 4 GiB: its offset needs the ZIP64 field.
        assert len(dicom) == 3 and zf.getinfo(dicom[-1]).header_offset > 4 << 30
        assert zf.testzip() is None
    seven = run("/usr/bin/7z", "t", archive)
    assert seven.returncode == 0 and "Everything is Ok" in seven.stdout, seven.stdout

    cut = (4 << 30) - 1000  # a resume across the 4 GiB boundary, and the ZIP64 end records
    for start, stop in ((cut, cut + 2000), (size - 200, size - 1)):
        response = await browser.get(url, headers={"Range": f"bytes={start}-{stop}",
                                                   "If-Range": response.headers["ETag"]})
        assert response.status == 206
        with open(archive, "rb") as fh:
            fh.seek(start)
            assert await response.read() == fh.read(stop - start + 1)
    print(f"> 4 GiB package: {time.monotonic() - started:.1f} s")

