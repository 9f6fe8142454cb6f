"""Helpers for tests that drive the node with dcmtk tools or a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config, build_context

from iepnode.archive.ingest import parse_file_meta
from tests.support.node import RunningNode, peer_env, wait_for
from tests.support.tools import dcmtk


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part-10 file (everything after the File Meta)."""
    data = path.read_bytes()
    _, offset = parse_file_meta(data)
    return data[offset:]


def dcmtk_run(tool: str, *args: str, timeout: float = 120, cwd: Path | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (absolute path, TCP_NODELAY=1) and return the result."""
    return subprocess.run([dcmtk(tool), *args], capture_output=True, text=True,
                          timeout=timeout, env=peer_env(), cwd=cwd)


def storescu(node: RunningNode, files: list[Path], *, aet: str = "TESTSCU",
             aec: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send ``files`` to the node with dcmtk's storescu."""
    return dcmtk_run("storescu", "-aet", aet, "-aec", aec or node.ae_title, *extra,
                     node.host, str(node.dicom_port), *map(str, files))


def free_port() -> int:
    """Return a currently free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def dcmtk_storescp(out_dir: Path, ae_title: str = "DEST") -> Iterator[int]:
    """Run dcmtk's storescp (bit-preserving, all transfer syntaxes) on a free port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", ae_title, "--output-directory", str(out_dir),
             "--bit-preserving", "+xa", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=peer_env(),
        )
        try:
            def answers(port: int = port, proc: subprocess.Popen = proc) -> bool:
                if proc.poll() is not None:
                    return True
                echo = dcmtk_run("echoscu", "-aet", "PROBE", "-aec", ae_title,
                                 "127.0.0.1", str(port), timeout=10)
                return echo.returncode == 0
            wait_for(answers, timeout=20, what="storescp")
            if proc.poll() is None:
                yield port
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
    raise AssertionError("could not start storescp")


@contextlib.contextmanager
def raw_sending():
    """Make pynetdicom send files as they are (no decoding) within the block."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def associate(node: RunningNode, paths: list[Path] | None = None, *, aet: str = "TESTSCU",
              contexts: list | None = None):
    """Open a pynetdicom association proposing the files' exact contexts."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    requested = list(contexts or [])
    pairs = set()
    for path in paths or []:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        pairs.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    requested += [build_context(sop_class, [ts]) for sop_class, ts in sorted(pairs)]
    ae.requested_contexts = requested[:128]
    assoc = ae.associate(node.host, node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established, "association with the node was not established"
    return assoc


def send_raw(node: RunningNode, path: Path, *, propose: Path | None = None) -> int:
    """Send a file's bytes exactly as they are with pynetdicom; return the C-STORE status.

    Parameters
    ----------
    path : Path
        The Part-10 file whose dataset is sent (its File Meta names the request's
        SOP Class/Instance UIDs and the transfer syntax).
    propose : Path, optional
        Propose the presentation context of this file instead (for broken files).
    """
    with raw_sending():
        assoc = associate(node, [propose or path])
        try:
            return assoc.send_c_store(path).Status
        finally:
            assoc.release()
