"""One bad stored file must not break a study (issue 13), end to end on the real node.

dcmtk ``storescu`` sends a study to ``iepnode serve``; five of its stored files
are then damaged on disk, each in another way the field knows (cut to half,
overwritten with garbage, emptied, deleted, ``chmod 000``). The file-set build,
the recipient's HTTP download and ``iepnode export`` each leave those five out
with a logged and audited reason, and keep the rest byte for byte; a send to
dcmtk ``storescp`` fails those five instances alone, each with its reason.

Root reads a file whatever its mode, so the node and its CLI run without
``CAP_DAC_OVERRIDE`` (``setpriv``, see tests/support/damage.py): ``chmod 000`` is
a real ``EACCES`` for them even when the tests run as root.

The housekeeping test makes every file-set build of a study fail (a file where
the file-sets folder should be) and watches the node back off: one warning per
attempt, attempt times doubling in the database, the count kept across a
restart, and all of it cleared by the first build that succeeds; the claim of an
attempt is atomic on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread

from config import load_settings
from iepnode.services import Services
from iepnode.wiring import build_services
from storage import index
from storage.models import Study
from tests import data_factory as factory
from tests.support.damage import DAMAGES, REASONS, damage, without_permission_override
from tests.support.ingest import store_files
from tests.support.node import RunningNode, run_cli, running_node, wait_for
from tests.support.peers import free_port, received, storescp_on
from tests.support.scu import storescu
from tests.test_download import (
    PATIENT,
    check_archive_tools,
    fetch,
    http_browser,
    outbox_text,
    sign_in,
)
from tests.test_fileset import dcentvfy_errors, dciodvfy_errors, fileset_file_ids

FAILED = re.compile(r"file-set build of study (\S+) failed \(attempt (\d+); next in (\S+) s\)")


def stored_by_uid(node: RunningNode) -> dict[str, Path]:
    """Every stored object's path by SOP Instance UID."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in node.object_files()}


def query(data_dir: Path, sql: str, *args: object) -> list[sqlite3.Row]:
    """Rows of the node's SQLite index (read beside the running node, WAL)."""
    with sqlite3.connect(data_dir / "index.sqlite3", timeout=30) as db:
        db.row_factory = sqlite3.Row
        return db.execute(sql, args).fetchall()


def study_row(data_dir: Path, study_uid: str) -> sqlite3.Row:
    (row,) = query(data_dir, "SELECT * FROM study WHERE study_uid = ?", study_uid)
    return row


async def test_damaged_files_are_left_out_of_fileset_download_and_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"FSYNC": "false", "HTTP_WORKERS": "2"}.items():
        monkeypatch.setenv(f"IEPNODE_{name}", value)
    ct = factory.make_ct_series(tmp_path / "in", 2 + len(DAMAGES), **PATIENT,
                                StudyDate="20240105", StudyDescription="CT HEAD",
                                AccessionNumber="ACC1")
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
    data_dir = tmp_path / "node"

    with running_node(data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store")],
                      prefix=without_permission_override()) as node:
        sent = storescu(node, ct)
        assert sent.returncode == 0, sent.stderr
        stored = stored_by_uid(node)
        # The first and the last instance stay whole; each other one is damaged.
        intact = {uid: stored[uid].read_bytes() for uid in (uids[0], uids[-1])}
        damaged = dict(zip(uids[1:-1], DAMAGES, strict=True))
        keys = {uid: stored[uid].name for uid in damaged}
        for uid, how in damaged.items():
            damage(stored[uid], how)

        # -- the file-set: built without them, valid, each one logged and audited
        built = node.cli("fileset", study_uid)
        dicomdir = Path(built.stdout.strip())
        members = [dicomdir.parent / f for f in fileset_file_ids(dicomdir.parent)]
        assert sorted(p.read_bytes() for p in members) == sorted(intact.values())
        assert dciodvfy_errors(dicomdir) == [] and dcentvfy_errors(members) == []
        for uid, how in damaged.items():
            line = (f"file-set of study {study_uid}: left out instance {uid} (file "
                    f"{keys[uid]}): the stored file {REASONS[how]}")
            assert line in built.stderr
        alerts = query(data_dir, "SELECT * FROM auditevent WHERE event_code = '110113' "
                                 "AND action = 'stored-file-unreadable' ORDER BY id")
        assert [(a["study_uid"], a["outcome"], a["patient_id"]) for a in alerts] == [
            (study_uid, 4, "P1")] * len(damaged)
        for alert, (uid, how) in zip(alerts, damaged.items(), strict=True):
            assert uid in alert["detail"] and REASONS[how] in alert["detail"]

        # -- the recipient's download: the zip streams, valid, naming what it leaves out
        public_id = node.cli("transfer", "create", "--study", study_uid, "--to",
                             "pat@example.org", "--otp-mobile", "+447700900123").stdout.strip()
        token = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        url = f"/transactions/{public_id}/download"
        async with http_browser(node.http_port) as browser:
            await sign_in(browser, data_dir, token.group(1))
            response, body = await fetch(browser, url)
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == len(body)
            etag = response.headers["ETag"]
            # Resumes (new connections, either HTTP process) plan the same bytes again.
            for start in (len(body) // 3, len(body) - 100):
                resumed, part = await fetch(browser, url, Range=f"bytes={start}-",
                                            **{"If-Range": etag})
                assert resumed.status == 206 and body[:start] + part == body
        archive = tmp_path / "download.zip"
        archive.write_bytes(body)
        check_archive_tools(archive)
        with zipfile.ZipFile(archive) as zf:
            assert zf.testzip() is None
            dicom = [n for n in zf.namelist() if n.startswith("DICOM/")]
            assert sorted(zf.read(n) for n in dicom) == sorted(intact.values())
            readme = zf.read("README.TXT").decode("utf-8")
            index = zf.read("INDEX.HTM").decode("ascii")
        flat = " ".join(readme.split())
        assert f"{len(damaged)} DICOM files of this study could not be read" in flat
        for number, (uid, how) in enumerate(damaged.items(), start=2):
            assert f"image {number}, SOP Instance UID {uid}: the stored file " \
                   f"{REASONS[how]}" in flat
        for internal in (str(data_dir), *keys.values()):
            assert internal not in readme  # no paths, no store keys
        assert f"{len(damaged)} DICOM files could not be read" in index

        # -- the CLI export: the very same bytes
        exported = tmp_path / "export.zip"
        out = node.cli("export", public_id, "--out", str(exported), "--no-progress")
        assert exported.read_bytes() == body
        assert "2 instances" in out.stdout
        assert f"left out {len(damaged)} instances" in out.stderr

    exports = query(data_dir, "SELECT * FROM auditevent WHERE event_code = '110106' AND "
                              "action IN ('download', 'export') ORDER BY id")
    assert [e["action"] for e in exports] == ["download"] * 3 + ["export"]
    for event in exports:
        assert event["outcome"] == 0
        assert f"left out {len(damaged)} unreadable instances" in event["detail"]
        assert all(uid in event["detail"] for uid in damaged)


def test_housekeeping_backs_off_a_failing_fileset_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"FSYNC": "false", "FILESET_RETRY_SECONDS": "1",
                        "FILESET_RETRY_MAX_SECONDS": "4"}.items():
        monkeypatch.setenv(f"IEPNODE_{name}", value)
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    in_the_way = data_dir / "filesets"
    in_the_way.write_text("not a folder")  # every file-set build fails
    ct = factory.make_ct_series(tmp_path / "in", 2)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)

    def failures(node: RunningNode) -> list[tuple[int, float]]:
        return [(int(m[2]), float(m[3])) for m in FAILED.finditer(node.log_text)
                if m[1] == study_uid]

    def attempts_seen(rows: dict[int, float], at_least: int) -> bool:
        row = study_row(data_dir, study_uid)
        if row["fileset_attempts"] and row["fileset_error"]:
            rows.setdefault(row["fileset_attempts"], row["fileset_retry_at"])
        return len(rows) >= at_least

    retry_at: dict[int, float] = {}
    with running_node(data_dir, stable_age=0,
                      register=[("TESTSCU", "127.0.0.1", 0, "store")]) as node:
        assert storescu(node, ct).returncode == 0
        first = time.monotonic()
        wait_for(lambda: attempts_seen(retry_at, 2), timeout=30, what="two failed attempts")
        wait_for(lambda: len(failures(node)) == 2, what="two warnings")
    assert failures(node) == [(1, 1.0), (2, 2.0)]
    assert node.log_text.count("Traceback") == 1  # only the first failure shows one
    error = study_row(data_dir, study_uid)["fileset_error"]
    assert error.startswith(("FileExistsError", "NotADirectoryError")), error

    # A restart keeps the count and the wait: the next attempt is the third, not a new first.
    with running_node(data_dir, stable_age=0) as node:
        wait_for(lambda: attempts_seen(retry_at, 3), timeout=30, what="a third attempt")
        wait_for(lambda: len(failures(node)) == 3, what="the third warning")
        assert failures(node)[2] == (3, 4.0)
        # Each attempt started no earlier than the previous one's retry time, and put
        # the next one its doubled delay further: the times in the database grow.
        assert retry_at[2] - retry_at[1] >= 2.0 and retry_at[3] - retry_at[2] >= 4.0

        in_the_way.unlink()  # the cause goes away: the next attempt succeeds
        wait_for(lambda: study_row(data_dir, study_uid)["fileset_attempts"] == 0,
                 timeout=30, what="a successful build")
        elapsed = time.monotonic() - first
        row = study_row(data_dir, study_uid)
        assert (row["fileset_retry_at"], row["fileset_error"]) == (None, "")
        assert row["fileset_built_from"] == row["last_received"]
        (folder,) = [p for p in in_the_way.iterdir() if not p.name.startswith(".")]
        assert len(fileset_file_ids(folder)) == 2
        wait_for(lambda: f"file-set built for study {study_uid}" in node.log_text,
                 what="the success line")
    # Three failed attempts in all, over the 1 + 2 + 4 seconds of back-off and more
    # (housekeeping runs every second: without back-off, one failure per second).
    assert len(failures(node)) == 3 and elapsed >= 7


def test_a_send_fails_each_damaged_instance_alone(tmp_path: Path) -> None:
    """``iepnode send`` (no node running: the CLI sends itself) to dcmtk storescp."""
    ct = factory.make_ct_series(tmp_path / "in", 2 + len(DAMAGES))
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
    data = tmp_path / "data"
    out = tmp_path / "received"
    port = free_port()
    prefix = without_permission_override()
    with storescp_on(port, out):
        run_cli(data, "ae", "add", "DEST", "127.0.0.1", str(port), "--send-to")
        run_cli(data, "import", str(tmp_path / "in"), "--no-progress")
        stored = {row["sop_uid"]: data / "objects" / row["key"][:2] / row["key"]
                  for row in query(data, "SELECT sop_uid, key FROM instance")}
        damaged = dict(zip(uids[1:-1], DAMAGES, strict=True))
        for uid, how in damaged.items():
            damage(stored[uid], how)
        result = run_cli(data, "send", study_uid, "--to", "DEST", "--no-progress",
                         check=False, prefix=prefix)
        assert result.returncode == 1, result.stderr
        assert f"failed: 2 of {len(ct)} sent, {len(damaged)} failed" in result.stdout
        arrived = sorted(dcmread(p, stop_before_pixels=True).SOPInstanceUID
                         for p in received(out))
    assert arrived == sorted([uids[0], uids[-1]])  # nothing damaged went out
    items = {row["sop_uid"]: row for row in query(data, "SELECT * FROM senditem")}
    for uid, how in damaged.items():
        assert (items[uid]["state"], items[uid]["error"]) == (
            "failed", f"the stored file {REASONS[how]}")
    assert {items[uid]["state"] for uid in (uids[0], uids[-1])} == {"sent"}


# Overrides conftest.py's any_db_services: plain settings (no portal), and the PostgreSQL
# run carries the ``postgres`` mark.
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_services(request: pytest.FixtureRequest, tmp_path: Path) -> Services:
    values: dict[str, object] = {"data_dir": tmp_path / "data", "fsync": False}
    if request.param == "postgres":
        values["database_url"] = request.getfixturevalue("fresh_postgres_url")
    return build_services(load_settings(overrides=values, environ={}))


def test_only_one_process_gets_a_build_attempt(any_db_services: Services, tmp_path: Path) -> None:
    """The claim is one conditional UPDATE: of two racing claimers one wins, and the
    study is not due again before its retry time (SQLite and PostgreSQL alike)."""
    uid = store_files(any_db_services, factory.make_ct_series(tmp_path / "ct", 1))
    now = time.time() + 1
    (seen,) = index.studies_due_for_fileset(0, now)
    barrier = threading.Barrier(2)
    won: list[int | None] = []

    def claim() -> None:
        barrier.wait()
        won.append(index.claim_fileset_build(seen, now, 60.0))
        any_db_services.close()

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(won, key=str) == [1, None]
    assert index.studies_due_for_fileset(0, now + 59) == []
    (again,) = index.studies_due_for_fileset(0, now + 60)
    assert index.claim_fileset_build(again, now + 60, 120.0) == 2
    assert index.claim_fileset_build(again, now + 60, 120.0) is None  # a stale row loses
    any_db_services.filesets.build_fileset(uid)  # a success clears the back-off
    row = Study.get(Study.study_uid == uid)
    assert (row.fileset_attempts, row.fileset_retry_at, row.fileset_error) == (0, None, "")


@pytest.mark.parametrize("tool", ["getscu", "movescu"])
def test_retrieve_fails_each_damaged_instance_alone(tmp_path: Path, tool: str) -> None:
    """C-GET / C-MOVE: a damaged stored file is one failed sub-operation, never sent."""
    from tests.support.scu import dcmtk_run

    ct = factory.make_ct_series(tmp_path / "in", 4, **PATIENT)
    study_uid = str(dcmread(ct[0]).StudyInstanceUID)
    out = tmp_path / "got"
    out.mkdir()
    port = free_port()  # movescu receives its sub-operations here
    with running_node(tmp_path / "node",
                      register=[("TESTSCU", "127.0.0.1", port, "store,move,get")]) as node:
        assert storescu(node, ct).returncode == 0
        stored = stored_by_uid(node)
        damaged = str(dcmread(ct[1], stop_before_pixels=True).SOPInstanceUID)
        damage(stored[damaged], "truncated")
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
        common = ["-aet", "TESTSCU", "-aec", node.ae_title, "-S", "-od", str(out), *keys]
        if tool == "getscu":
            run = dcmtk_run("getscu", *common, node.host, str(node.dicom_port))
        else:
            run = dcmtk_run("movescu", *common, "-aem", "TESTSCU", "--port", str(port),
                            node.host, str(node.dicom_port))
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received(out)}
        assert got == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in ct} - {damaged}
        assert "Failed" in run.stdout + run.stderr or run.returncode != 0, run.stderr
        wait_for(lambda: f"stored instance {damaged} not sent: the stored file is cut short"
                 in node.log_text, what="the reason in the log")
