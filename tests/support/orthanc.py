"""A throw-away Orthanc (Debian's ``/usr/sbin/Orthanc``) on ephemeral loopback ports.

Used as a real importer: the tests post a download package to its REST API
(``POST /instances`` accepts a zip since Orthanc 1.8) and read its statistics.
Started with its own storage and index in a temporary folder, polled until its
HTTP API answers (no sleeps), stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.node import peer_env

ORTHANC = Path("/usr/sbin/Orthanc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningOrthanc:
    """A running Orthanc and its REST API."""

    url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> object:
        """GET ``path`` and decode the JSON answer."""
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.load(response)

    def post(self, path: str, data: bytes) -> object:
        """POST ``data`` to ``path`` and decode the JSON answer."""
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)


@contextlib.contextmanager
def running_orthanc(workdir: Path, timeout: float = 60) -> Iterator[RunningOrthanc]:
    """Start Orthanc with storage under ``workdir``; yield it; stop it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = _free_port()
    config = {
        "Name": "iepnode-test", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"), "HttpPort": http_port,
        "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(ORTHANC), str(workdir / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT, env=peer_env())
    orthanc = RunningOrthanc(f"http://127.0.0.1:{http_port}", process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"Orthanc exited: {(workdir / 'orthanc.log').read_text()}")
            try:
                orthanc.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("Orthanc did not answer in time") from None
                time.sleep(0.05)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
