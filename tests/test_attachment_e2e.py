"""End to end: a forwarded copy's attachment stays the copy's until staff file it (issue 13).

``iepnode serve`` receives a CT study from dcmtk ``storescu``; ``iepnode transfer
create`` shares it with a patient on behalf of the hospital contact; over plain HTTP
the patient signs in (link and passcode from the outbox) and forwards the package to
a solicitor, who signs in and attaches a PDF titled "Official Radiology Report -
FINAL" to their copy. Then, with real peers:

- the copy lists it with who added it; the source's reports and download do not have
  it; the copy's download has it under ``ATTACHED/`` only;
- staff DICOMweb of the study and dcmtk ``findscu`` (STUDY, SERIES, IMAGE level) do
  not find it; ``iepnode send`` to dcmtk ``storescp`` (the PACS) does not send it;
  the study's ``images_expected`` are unchanged;
- the hospital contact logs in (password + TOTP) and files it into the study: now
  ``findscu`` finds it and a send carries it; the audit trail has it; filing twice
  is refused.
"""

from __future__ import annotations

import io
import re
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pyotp
import pytest
from pydicom import dcmread

from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.node import REPO, RunningNode, run_cli, running_node, wait_for
from tests.support.peers import free_port, received, storescp_on
from tests.support.scu import dcmtk_run, storescu
from tests.test_download import outbox_text
from tests.test_forward_web import form as forward_form
from tests.test_recipient_web import field
from tests.test_reports_web import upload_form

TITLE = "Official Radiology Report - FINAL"
SOLICITOR = "solicitor@law.example"
HOSPITAL = "radiology@hospital.example"
PASSWORD = "correct horse battery staple"


def add_staff(data_dir: Path, username: str, *args: str) -> str:
    """``iepnode user add``; return the TOTP secret from the enrolment URI it prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", username, *args,
         "--password-stdin", "--data-dir", str(data_dir)],
        input=f"{PASSWORD}\n", capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    uri = next(line for line in proc.stdout.splitlines() if line.startswith("otpauth://"))
    return pyotp.parse_uri(uri).secret


async def sign_in(browser: Browser, data_dir: Path, to: str, phone: str) -> None:
    """Follow the newest link mailed to ``to``; type the passcode texted to ``phone``."""
    token = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, to))
    assert token
    page = await browser.page(f"/t/{token.group(1)}")
    def texted() -> re.Match[str] | None:
        try:  # the passcode may be sent just after the page answers
            return re.search(r"\b(\d{6})\b", outbox_text(data_dir, phone))
        except AssertionError:
            return None

    code = wait_for(texted, what=f"a passcode to {phone}")
    assert isinstance(code, re.Match)
    response = await browser.post(f"/t/{token.group(1)}/login", data={
        "attempt": field(page, "attempt"), "csrf": field(page, "csrf"), "code": code.group(1)})
    assert response.status == 303, await response.text()


async def staff_sign_in(browser: Browser, username: str, secret: str) -> None:
    page = await browser.page("/admin/login")
    response = await browser.post("/admin/login", data={
        "csrf": field(page, "csrf"), "next": "/admin", "username": username,
        "password": PASSWORD, "code": pyotp.TOTP(secret).now()})
    assert response.status == 303 and response.headers["Location"] == "/admin"


def find(node: RunningNode, out: Path, *keys: str) -> list[dict[str, str]]:
    """dcmtk ``findscu`` (study root) against the node; the answers' attributes."""
    out.mkdir(parents=True)
    args = ["-S", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = dcmtk_run("findscu", "-aet", "TESTSCU", "-aec", node.ae_title, *args, node.host,
                       str(node.dicom_port))
    assert result.returncode == 0, result.stderr
    return [{e.keyword: str(e.value) for e in dcmread(p, force=True) if e.keyword}
            for p in sorted(out.iterdir())]


def images_found(node: RunningNode, out: Path, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study, asked at SERIES then at IMAGE level."""
    series = find(node, out / "series", "QueryRetrieveLevel=SERIES",
                  f"StudyInstanceUID={study_uid}", "SeriesInstanceUID")
    uids: set[str] = set()
    for n, row in enumerate(series):
        images = find(node, out / f"images{n}", "QueryRetrieveLevel=IMAGE",
                      f"StudyInstanceUID={study_uid}",
                      f"SeriesInstanceUID={row['SeriesInstanceUID']}", "SOPInstanceUID")
        uids |= {r["SOPInstanceUID"] for r in images}
    return uids


def images_expected(data_dir: Path) -> list[tuple[str, int]]:
    uri = f"file:{data_dir / 'index.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        return conn.execute(
            'SELECT t."public_id", s."images_expected" FROM "transactionstudy" s '
            'JOIN "transaction" t ON s."transaction_id" = t."id" ORDER BY t."id"').fetchall()


def sent_uids(out: Path) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in received(out))


async def test_a_forwarded_copy_attachment_reaches_the_study_only_when_staff_file_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IEPNODE_FSYNC", "false")
    files = factory.make_ct_series(tmp_path / "ct", 2, PatientName="Connor^Flake",
                                   PatientID="SDH1088", StudyDescription="CT HEAD")
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    ct_uids = {str(dcmread(p).SOPInstanceUID) for p in files}
    data_dir = tmp_path / "node"
    secret = add_staff(data_dir, "drwho", "--name", "Dr Who", "--email", HOSPITAL)
    pacs_port, pacs_out = free_port(), tmp_path / "pacs"
    run_cli(data_dir, "ae", "add", "PACS", "127.0.0.1", str(pacs_port), "--send-to")
    pdf = factory.minimal_pdf("Fake findings")

    with storescp_on(pacs_port, pacs_out, "PACS"), running_node(
            data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store,find")]) as node:
        assert storescu(node, files).returncode == 0
        source = node.cli("transfer", "create", "--study", study_uid, "--to",
                          "pat@example.org", "--otp-mobile", "+447700900123", "--as-user",
                          "drwho").stdout.strip()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{node.http_port}",
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            patient, solicitor, hospital = Browser(session), Browser(session), Browser(session)
            await sign_in(patient, data_dir, "pat@example.org", "+447700900123")
            dialog = await patient.page(f"/transactions/{source}/forward")
            response = await patient.post(f"/transactions/{source}/forward",
                                          data=forward_form(field(dialog, "csrf")))
            assert response.status == 303, await response.text()
            await sign_in(solicitor, data_dir, SOLICITOR, "900555")
            board = await solicitor.page("/dashboard?tab=all")
            (copy,) = set(re.findall(r"/transactions/(IEP\d{8})", board))
            before = images_expected(data_dir)
            source_zip_before = await (await patient.get(
                f"/transactions/{source}/download")).read()

            page = await solicitor.page(f"/transactions/{copy}/attachments")
            response = await solicitor.post(f"/transactions/{copy}/attachments",
                                            data=upload_form(field(page, "csrf"), pdf,
                                                             "final.pdf", "application/pdf",
                                                             title=TITLE))
            assert response.status == 303, await response.text()

            # The source has nothing new; the copy lists it, labelled.
            assert TITLE not in await patient.page(f"/transactions/{source}/reports")
            listing = await solicitor.page(f"/transactions/{copy}/reports")
            added = listing.split('id="attached"')[1]
            assert TITLE in added and f"Added by the recipient {SOLICITOR} on" in added
            sop_uid = re.search(rf"/transactions/{copy}/reports/([0-9.]+)", added).group(1)
            source_zip = await (await patient.get(f"/transactions/{source}/download")).read()
            assert source_zip == source_zip_before and pdf not in source_zip
            copy_zip = zipfile.ZipFile(io.BytesIO(await (await solicitor.get(
                f"/transactions/{copy}/download")).read()))
            assert copy_zip.read("ATTACHED/ATT00001.PDF") == pdf
            assert {str(dcmread(io.BytesIO(copy_zip.read(n))).SOPInstanceUID)
                    for n in copy_zip.namelist() if n.startswith("DICOM/")} == ct_uids
            assert "not part of the hospital's record" in " ".join(
                copy_zip.read("README.TXT").decode().split())

            # Not the study's: staff DICOMweb, C-FIND, a PACS send, the counts.
            await staff_sign_in(hospital, "drwho", secret)
            response = await hospital.get(f"/dicomweb/studies/{study_uid}/instances")
            assert {i["00080018"]["Value"][0] for i in await response.json()} == ct_uids
            assert images_found(node, tmp_path / "find1", study_uid) == ct_uids
            (row,) = find(node, tmp_path / "study1", "QueryRetrieveLevel=STUDY",
                          f"StudyInstanceUID={study_uid}", "NumberOfStudyRelatedInstances")
            assert row["NumberOfStudyRelatedInstances"] == "2"
            sent = node.cli("send", study_uid, "--to", "PACS", "--no-progress")
            assert "done: 2 of 2 sent, 0 failed" in sent.stdout
            assert sent_uids(pacs_out) == sorted(ct_uids)
            assert images_expected(data_dir) == before == [(source, 2), (copy, 2)]

            # The hospital contact files it: now it is the study's, everywhere.
            page = await hospital.page(f"/admin/transactions/{copy}")
            assert f"the recipient {SOLICITOR}," in page and "Held by this transaction" in page
            url = re.search(r'action="(/admin/transactions/IEP\d{8}/attachments/\d+/file)"',
                            page).group(1)
            filed = await hospital.post(url, data={"csrf": field(page, "csrf"),
                                                   "confirm": "yes"})
            assert filed.status == 303, await filed.text()
            assert images_found(node, tmp_path / "find2", study_uid) == ct_uids | {sop_uid}
            sent = node.cli("send", study_uid, "--to", "PACS", "--no-progress")
            assert "done: 3 of 3 sent, 0 failed" in sent.stdout
            assert sop_uid in sent_uids(pacs_out)
            audit = await hospital.page(f"/admin/transactions/{copy}")
            assert "attachment-file" in audit and "Filed into the study by staff Dr Who" in audit
            again = await hospital.post(url, data={"csrf": field(page, "csrf"),
                                                   "confirm": "yes"})
            assert again.status == 400 and "already filed" in await again.text()
            assert images_found(node, tmp_path / "find3", study_uid) == ct_uids | {sop_uid}
