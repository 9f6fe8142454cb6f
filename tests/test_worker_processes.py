"""Worker processes sharing a port: HTTP and DICOM listeners, restarted when they die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.node import REPO, RunningNode, run_cli, running_node, wait_for
from tests.support.scu import dcmtk_run


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def _listeners(port: int) -> dict[int, int]:
    """PID -> number of sockets it listens with on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    owners: dict[int, int] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    owners[pid] = owners.get(pid, 0) + 1
            except OSError:
                continue
    return owners


def _get(node: RunningNode, path: str = "/healthz") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}",
                                     headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_http_workers_share_the_port_and_come_back_when_killed(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", workers=1, extra=["--http-workers", "3"]) as node:
        owners = wait_for(lambda: len(_listeners(node.http_port)) == 3 and
                          _listeners(node.http_port), what="3 HTTP listeners")
        assert node.process.pid not in owners  # the supervisor serves no requests
        assert all(count == 1 for count in owners.values())
        assert all(_get(node) == 200 for _ in range(30))

        victim = next(iter(owners))
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (lambda o: len(o) == 3 and victim not in o and o)(
            _listeners(node.http_port)), what="a replacement HTTP worker")
        assert node.process.pid not in after
        assert all(_get(node) == 200 for _ in range(30))
        wait_for(lambda: "http worker" in node.log_text and "died" in node.log_text,
                 what="the restart in the log")


def test_scp_workers_come_back_when_killed(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", workers=2,
                      register=[("ECHOSCU", "127.0.0.1", 0, "store")]) as node:
        owners = wait_for(lambda: len(_listeners(node.dicom_port)) == 2 and
                          _listeners(node.dicom_port), what="2 SCP listeners")
        assert node.process.pid not in owners  # the main process only holds the port
        os.kill(next(iter(owners)), signal.SIGKILL)
        wait_for(lambda: len(_listeners(node.dicom_port)) == 2, what="a replacement SCP worker")
        echo = dcmtk_run("echoscu", "-aet", "ECHOSCU", "-aec", node.ae_title, "127.0.0.1",
                         str(node.dicom_port))
        assert echo.returncode == 0, echo.stderr


def _serve(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``iepnode serve`` expected to refuse to start (so it returns by itself)."""
    cmd = [sys.executable, "-m", "iepnode.cli", "serve", "--data-dir", str(data_dir),
           "--bind", "127.0.0.1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_second_node_on_a_busy_port_refuses_to_start(tmp_path: Path) -> None:
    """SO_REUSEPORT would let it bind and split connections with the first: refuse."""
    with running_node(tmp_path / "first", workers=1) as first:
        for args in (("--dicom-port", str(first.dicom_port), "--http-port", "0"),
                     ("--dicom-port", "0", "--http-port", str(first.http_port))):
            second = _serve(tmp_path / "second", *args)
            assert second.returncode != 0
            assert "already in use by another process" in second.stderr
            assert "READY" not in second.stdout
        assert _get(first) == 200
    with socket.socket() as other:  # any other program on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        refused = _serve(tmp_path / "third", "--dicom-port", str(other.getsockname()[1]),
                         "--http-port", "0")
        assert refused.returncode != 0
        assert "already in use" in refused.stderr


def test_sigterm_stops_every_process_cleanly(tmp_path: Path) -> None:
    run_cli(tmp_path / "node", "ae", "add", "ECHOSCU", "127.0.0.1", "0", "--allow", "store")
    with running_node(tmp_path / "node", workers=2, extra=["--http-workers", "2"]) as node:
        echo = dcmtk_run("echoscu", "-aet", "ECHOSCU", "-aec", node.ae_title, "127.0.0.1",
                         str(node.dicom_port))
        assert echo.returncode == 0, echo.stderr
        assert _get(node) == 200
        workers = list(_listeners(node.dicom_port)) + list(_listeners(node.http_port))
        node.process.send_signal(signal.SIGTERM)
        _, stderr = node.process.communicate(timeout=30)
        assert node.process.returncode == 0
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        log = node.log_text
        assert "shutting down" in log
        assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
