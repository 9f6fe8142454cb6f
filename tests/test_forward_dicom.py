"""Forwarding to DICOM nodes, end to end: the real node sends to dcmtk storescp and Orthanc.

The node runs as ``iepnode serve`` (its send runner works in the main process);
studies are stored with ``iepnode import`` or dcmtk ``storescu``; sends are asked
for with ``iepnode send``. What arrives is compared with what was stored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests import data_factory as factory
from tests.conftest import SCU_AE
from tests.support.node import RunningNode, run_cli, running_node, wait_for
from tests.support.peers import (
    ORTHANC,
    free_port,
    make_pki,
    received,
    running_orthanc,
    storescp_on,
)
from tests.support.scu import dataset_bytes, storescu

#: Bundled files in syntaxes the node must send as stored (deflate: deflated anew).
AS_STORED = ["MR_small_implicit.dcm", "MR_small_RLE.dcm", "image_dfl.dcm",
             "MR_small_jp2klossless.dcm"]
DEFLATE = "1.2.840.10008.1.2.1.99"


def bundled_copies(directory: Path) -> list[Path]:
    """The :data:`AS_STORED` files, each with its own SOP Instance UID (same syntax)."""
    return [factory.copy_bundled(name, directory, SOPInstanceUID=generate_uid())
            for name in AS_STORED]


def same_dataset(arrived: Path, original: Path) -> bool:
    """Byte-identical datasets, or for deflated data the same dataset once inflated."""
    if dcmread(original, stop_before_pixels=True).file_meta.TransferSyntaxUID != DEFLATE:
        return dataset_bytes(arrived) == dataset_bytes(original)
    a, b = dcmread(arrived), dcmread(original)
    return a == b and a.PixelData == b.PixelData


def fast_retries(tmp_path: Path, first: float = 0.3) -> list[str]:
    """``--config`` arguments for quick retries (tests must not wait minutes)."""
    config = tmp_path / "fast.toml"
    config.write_text(f"[dicom]\nsend_retry_seconds = {first}\nsend_retry_max_seconds = 1.0\n"
                      "send_max_attempts = 200\n")
    return ["--config", str(config)]


def add_destination(data_dir: Path, title: str, port: int, *more: str,
                    extra: list[str] | None = None) -> None:
    run_cli(data_dir, "ae", "add", title, "127.0.0.1", str(port), "--send-to", *more,
            extra=extra)


def job(node: RunningNode, job_id: int) -> dict[str, object]:
    with sqlite3.connect(node.data_dir / "index.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM sendjob WHERE id = ?", (job_id,)).fetchone())


def by_sop_uid(paths: list[Path]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in paths:
        found.setdefault(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                         []).append(path)
    return found


def study_uids(paths: list[Path]) -> list[str]:
    return sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths})


# -- to dcmtk storescp ---------------------------------------------------------------------


def test_send_arrives_byte_identical_in_every_stored_syntax(tmp_path: Path) -> None:
    source = tmp_path / "in"
    files = factory.make_ct_series(source, 5)
    files += bundled_copies(source)
    out = tmp_path / "received"
    port = free_port()
    with storescp_on(port, out), running_node(tmp_path / "n") as n:
        add_destination(n.data_dir, "DEST", port)
        n.cli("import", str(source), "--no-progress")
        result = n.cli("send", *study_uids(files), "--to", "DEST")
        assert "sent by the running node" in result.stderr
        assert "100%" in result.stderr  # the progress bar reached the end
        assert f"done: {len(files)} of {len(files)} sent, 0 failed" in result.stdout
        got = by_sop_uid(received(out))
        assert len(got) == len(files)
        for path in files:
            (arrived,) = got[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
            meta = dcmread(arrived, stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == dcmread(path).file_meta.TransferSyntaxUID
            assert same_dataset(arrived, path), path.name
        wait_for(lambda: "send job 1 done: 9 sent, 0 failed of 9 to DEST" in n.log_text,
                 what="log line")


def test_convert_only_when_the_peer_accepts_nothing_else(tmp_path: Path) -> None:
    source = tmp_path / "in"
    ct = factory.make_ct_series(source, 3)
    rle = factory.copy_bundled("MR_small_RLE.dcm", source)
    out = tmp_path / "received"
    port = free_port()
    with storescp_on(port, out, options=("+xi",)), running_node(tmp_path / "n") as n:
        add_destination(n.data_dir, "IMPLICIT", port)
        n.cli("import", str(source), "--no-progress")
        result = n.cli("send", *study_uids([*ct, rle]), "--to", "IMPLICIT", "--no-progress",
                       check=False)
        assert result.returncode == 1
        assert "job 1 failed: 3 of 4 sent, 1 failed" in result.stdout
        assert "stored as RLE Lossless, which the peer does not accept" in result.stdout
        got = by_sop_uid(received(out))
        assert len(got) == 3
        for path in ct:
            (arrived,) = got[str(dcmread(path).SOPInstanceUID)]
            sent = dcmread(arrived)
            assert sent.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
            original = dcmread(path)
            assert sent.PixelData == original.PixelData
            assert sent.PatientName == original.PatientName
            assert sent.SOPInstanceUID == original.SOPInstanceUID


def test_peer_down_is_retried_until_it_comes_back(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 4)
    port = free_port()  # nothing listens here yet
    out = tmp_path / "received"
    fast = fast_retries(tmp_path)
    with running_node(tmp_path / "n", extra=fast) as n:
        add_destination(n.data_dir, "LATER", port, extra=fast)
        n.cli("import", str(tmp_path / "in"), "--no-progress")
        job_id = int(n.cli("send", *study_uids(files), "--to", "LATER", "--no-wait")
                     .stdout.strip())
        wait_for(lambda: job(n, job_id)["attempts"] >= 2, timeout=30, what="two attempts")
        row = job(n, job_id)
        assert row["state"] in ("queued", "running") and row["sent"] == 0
        assert "cannot be reached" in str(row["error"]) or row["state"] == "running"
        with storescp_on(port, out, "LATER"):
            wait_for(lambda: job(n, job_id)["state"] == "done", timeout=60, what="job done")
        assert job(n, job_id)["sent"] == 4
        assert len(by_sop_uid(received(out))) == 4
        wait_for(lambda: "retrying in" in n.log_text, what="retry log line")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node's main process, then its worker processes (a crash, not a stop)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                              capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def test_node_killed_mid_send_resumes_after_restart(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 300, rows=256, columns=256)
    out = tmp_path / "received"
    port = free_port()
    with storescp_on(port, out):
        with running_node(tmp_path / "n") as n:
            add_destination(n.data_dir, "DEST", port)
            n.cli("import", str(tmp_path / "in"), "--no-progress")
            job_id = int(n.cli("send", study_uids(files)[0], "--to", "DEST", "--no-wait")
                         .stdout.strip())
            wait_for(lambda: job(n, job_id)["sent"] >= 30, timeout=60, what="30 sent")
            _kill_tree(n.process)
        row = job(n, job_id)
        assert row["state"] == "running" and row["sent"] < 300
        sent_before = row["sent"]
        with running_node(tmp_path / "n") as again:
            wait_for(lambda: job(again, job_id)["state"] == "done", timeout=120,
                     what="job done after restart")
            assert "resuming 1 send jobs" in again.log_text
        row = job(again, job_id)
        assert row["sent"] == 300 and row["failed"] == 0 and row["attempts"] == 2
    got = by_sop_uid(received(out))
    assert len(got) == 300
    # Only instances answered after the last batch was written before the kill go
    # twice (results are written every 0.25 s); everything recorded goes once.
    duplicates = sum(len(paths) - 1 for paths in got.values())
    assert len(received(out)) >= 300
    assert duplicates <= 100, duplicates
    assert sent_before >= 30


def test_tls_destination(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    files = factory.make_ct_series(tmp_path / "in", 3)
    out = tmp_path / "received"
    port = free_port()
    with storescp_on(port, out, "SECURE", tls=pki), running_node(tmp_path / "n") as n:
        add_destination(n.data_dir, "SECURE", port, "--tls", "--tls-ca", str(pki.ca),
                        "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        listed = n.cli("ae", "list").stdout
        assert "tls" in listed.splitlines()[-1]
        n.cli("import", str(tmp_path / "in"), "--no-progress")
        result = n.cli("send", *study_uids(files), "--to", "SECURE", "--no-progress")
        assert "done: 3 of 3 sent" in result.stdout
        got = by_sop_uid(received(out))
        for path in files:
            (arrived,) = got[str(dcmread(path).SOPInstanceUID)]
            assert dataset_bytes(arrived) == dataset_bytes(path)
        # Without our client certificate the peer refuses: the send does not happen.
        add_destination(n.data_dir, "SECURE", port, "--tls", "--tls-ca", str(pki.ca))
        refused = n.cli("send", *study_uids(files), "--to", "SECURE", "--no-wait")
        job_id = int(refused.stdout.strip())
        wait_for(lambda: job(n, job_id)["attempts"] >= 1 and job(n, job_id)["error"],
                 timeout=30, what="failed TLS attempt")
        assert job(n, job_id)["sent"] == 0


def test_standalone_send_without_a_running_node(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 3)
    out = tmp_path / "received"
    port = free_port()
    data = tmp_path / "data"
    with storescp_on(port, out):
        add_destination(data, "DEST", port)
        run_cli(data, "import", str(tmp_path / "in"), "--no-progress")
        result = run_cli(data, "send", *study_uids(files), "--to", "DEST")
        assert "sent from this process" in result.stderr
        assert "done: 3 of 3 sent" in result.stdout
        assert len(by_sop_uid(received(out))) == 3
        unknown = run_cli(data, "send", *study_uids(files), "--to", "NOBODY", check=False)
        assert unknown.returncode == 1 and "'NOBODY' is not registered" in unknown.stderr


# -- auto-routing ----------------------------------------------------------------------------


def test_routing_rule_forwards_matching_studies(tmp_path: Path) -> None:
    wanted = factory.make_ct_series(tmp_path / "a", 3, AccessionNumber="RAD123")
    other = factory.make_ct_series(tmp_path / "b", 2, AccessionNumber="OTHER9")
    out = tmp_path / "received"
    port = free_port()
    with storescp_on(port, out), running_node(
            tmp_path / "n", stable_age=0.5,
            register=[(SCU_AE, "127.0.0.1", 0, "store"), ("PACS2", "127.0.0.1", 0, "store")],
    ) as n:
        add_destination(n.data_dir, "DEST", port)
        rule = n.cli("route", "add", "--to", "DEST", "--from", SCU_AE,
                     "--accession-prefix", "RAD").stdout
        assert rule.startswith("rule 1: from TESTSCU, accession RAD* -> DEST")
        assert "RAD*" in n.cli("route", "list").stdout
        # Wrong prefix, and the right prefix from another AE: neither is routed.
        assert storescu(n, other).returncode == 0
        from_elsewhere = factory.make_ct_series(tmp_path / "c", 1, AccessionNumber="RAD999")
        assert storescu(n, from_elsewhere, aet="PACS2").returncode == 0
        assert storescu(n, wanted).returncode == 0
        wait_for(lambda: len(received(out)) == 3, timeout=30, what="routed study")
        wait_for(lambda: "done: 3 sent" in n.log_text, what="job done")
        assert set(by_sop_uid(received(out))) == {str(dcmread(p).SOPInstanceUID)
                                                  for p in wanted}
        assert n.log_text.count("queued as send job") == 1
        n.cli("route", "remove", "1")
        assert n.cli("route", "list").stdout.strip() == ""


# -- to Orthanc ------------------------------------------------------------------------------


@pytest.mark.skipif(not ORTHANC.exists(), reason="Orthanc is not installed (apt-get install "
                                                 "orthanc; scripts/install-system-deps)")
def test_send_to_orthanc_byte_identical(tmp_path: Path) -> None:
    source = tmp_path / "in"
    files = factory.make_ct_series(source, 4)
    files += bundled_copies(source)
    with running_node(tmp_path / "n") as n, running_orthanc(
            tmp_path / "orthanc", {"node": [n.ae_title, "127.0.0.1", n.dicom_port]}) as peer:
        add_destination(n.data_dir, peer.aet, peer.port)
        n.cli("import", str(source), "--no-progress")
        result = n.cli("send", *study_uids(files), "--to", peer.aet, "--no-progress")
        assert f"done: {len(files)} of {len(files)} sent" in result.stdout
        instances = peer.get("/instances")
        assert isinstance(instances, list) and len(instances) == len(files)
        stored = {str(dcmread(p).SOPInstanceUID): p for p in files}
        for instance_id in instances:
            data = peer.file(instance_id)
            path = tmp_path / f"{instance_id}.dcm"
            path.write_bytes(data)
            original = stored[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
            if same_dataset(path, original):
                continue
            # Orthanc (DCMTK) writes encapsulated Pixel Data with VR OB; pydicom's
            # bundled JPEG 2000 file says OW. That one byte pair is Orthanc's doing
            # (storescp, bit-preserving, gets the file unchanged): nothing else differs.
            fixed = dataset_bytes(original).replace(b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00OB")
            assert dataset_bytes(path) == fixed, original.name
