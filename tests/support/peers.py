"""Receivers for send tests: dcmtk ``storescp`` on a chosen port (plain or TLS), Orthanc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.node import peer_env, wait_for
from tests.support.scu import dcmtk_run, free_port
from tests.support.tools import dcmtk

ORTHANC = Path("/usr/sbin/Orthanc")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI: a CA, the server's and a client's key and certificate."""

    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path


def make_pki(directory: Path) -> TlsFiles:
    """Create a CA and server/client certificates (server valid for 127.0.0.1) with openssl."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=iepnode test CA")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"),
                        ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=iepnode test {name}")
        (directory / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return TlsFiles(directory / "ca.pem", directory / "server.key", directory / "server.pem",
                    directory / "client.key", directory / "client.pem")


@contextlib.contextmanager
def storescp_on(port: int, out_dir: Path, ae_title: str = "DEST", *,
                options: tuple[str, ...] = ("+xa",),
                tls: TlsFiles | None = None) -> Iterator[subprocess.Popen]:
    """Run dcmtk storescp (bit-preserving) on ``port`` until the block ends.

    Parameters
    ----------
    options : tuple of str
        Transfer syntax options (default ``+xa``: accept all).
    tls : TlsFiles, optional
        Serve DICOM TLS (dcmtk's default BCP 195 profile) and require a client
        certificate signed by the CA; the readiness probe uses ``echoscu`` over TLS.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    server_tls: tuple[str, ...] = ()
    probe_tls: tuple[str, ...] = ()
    if tls is not None:
        server_tls = ("+tls", str(tls.server_key), str(tls.server_cert), "+cf", str(tls.ca),
                      "-rc")
        probe_tls = ("+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca))
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--aetitle", ae_title, "--output-directory", str(out_dir),
         "--bit-preserving", *options, *server_tls, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=peer_env())
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"storescp exited: {err!r}")
            return dcmtk_run("echoscu", "-aet", "PROBE", "-aec", ae_title, *probe_tls,
                             "127.0.0.1", str(port), timeout=10).returncode == 0
        wait_for(answers, timeout=20, what="storescp")
        yield proc
    finally:
        _stop(proc)


def received(out_dir: Path) -> list[Path]:
    """Files storescp wrote."""
    return sorted(p for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []


@dataclass
class Orthanc:
    """A running Orthanc: DICOM port, REST base URL."""

    ae_title: str
    port: int
    url: str

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file",
                                    timeout=30) as response:
            return response.read()

    def post(self, path: str, body: object) -> object:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)


@contextlib.contextmanager
def orthanc(workdir: Path, modalities: dict[str, list[object]],
            ae_title: str = "ORTHANC") -> Iterator[Orthanc]:
    """Run Debian's Orthanc with a generated configuration (TCP_NODELAY=1)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    while http_port == port:
        http_port = free_port()
    config = {
        "Name": "test-orthanc", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"), "DicomAet": ae_title, "DicomPort": port,
        "DicomCheckCalledAet": True, "DicomModalities": modalities, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(ORTHANC), str(workdir / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, env=peer_env(), start_new_session=True)
    peer = Orthanc(ae_title, port, f"http://127.0.0.1:{http_port}")
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((workdir / "orthanc.log").read_text()[-2000:])
            with contextlib.suppress(OSError):
                return bool(peer.get("/system"))
            return False
        wait_for(up, timeout=60, what="Orthanc")
        yield peer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
