"""Helpers for tests that drive the node with dcmtk tools or a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config, build_context

from iepnode.archive.ingest import parse_file_meta
from tests.support.node import RunningNode
from tests.support.peers import peer_env
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
