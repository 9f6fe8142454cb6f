"""Store test files through the node's ingest path, in-process."""

from __future__ import annotations

from pathlib import Path

from iepnode.archive.ingest import parse_file_meta
from iepnode.services import Services


def dataset_part(path: Path) -> tuple[bytes, str, str, str]:
    """Split a Part-10 file into (dataset bytes, transfer syntax, SOP class, SOP instance)."""
    data = path.read_bytes()
    meta, offset = parse_file_meta(data)
    return data[offset:], meta.transfer_syntax, meta.sop_class, meta.sop_uid


def store_files(services: Services, paths: list[Path], calling_ae: str = "T") -> str:
    """Store ``paths`` as if received by C-STORE; return the last one's Study UID."""
    for path in paths:
        stream, ts, sop_class, sop_uid = dataset_part(path)
        result = services.archive.store_received(stream, ts, calling_ae=calling_ae,
                                                 sop_class=sop_class, sop_uid=sop_uid)
    return result.study_uid
