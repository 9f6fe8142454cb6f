"""Housekeeping of uploads: interrupted releases back for release, abandoned uploads purged.

Both run from the node's housekeeping (``iepnode serve``) and are audited per upload
as DICOM Instances Transferred (110104) by the ``system`` actor.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from iepnode.errors import InvalidRequest
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.uploads.review import staging_folder, staging_root
from iepnode.uploads.staging import CANCELLED, RELEASING, SENT, STAGING
from storage.db import write_transaction
from storage.models import Transaction, Upload

log = logging.getLogger("iepnode.upload")


#: A release still ``RELEASING`` after this long was interrupted (its process died).
RELEASE_STUCK_SECONDS = 3600.0


def recover_releases(*, now: float | None = None,
                     max_age_seconds: float = RELEASE_STUCK_SECONDS) -> int:
    """Put uploads whose release began over ``max_age_seconds`` ago back to ``SENT``.

    A release that dies with its process (crash, kill, power loss) leaves the upload
    ``RELEASING`` for good. Staff may release it again: the objects stored the first
    time come back as duplicates and the rest are stored. Audited per upload.

    Returns
    -------
    int
        Uploads put back to ``SENT``.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_seconds
    recovered = 0
    stuck = list(Upload.select(Upload, Transaction).join(Transaction)
                 .where((Upload.status == RELEASING) & (Upload.updated_at < cutoff)))
    for upload in stuck:
        with write_transaction():  # release() sets updated_at when it claims the upload
            changed = (Upload.update(status=SENT, updated_at=now)
                       .where((Upload.id == upload.id) & (Upload.status == RELEASING)
                              & (Upload.updated_at < cutoff)).execute())
            if changed:
                audit.record(audit.INSTANCES_TRANSFERRED, "upload-release-interrupted",
                             Actor("system", "housekeeping"), outcome=audit.MINOR_FAILURE,
                             patient_id=upload.transaction.patient_id,
                             transaction=upload.transaction.public_id,
                             detail=f"release began {(now - upload.updated_at) / 60:.0f} min "
                                    "ago and never finished: the upload is back for release")
        if changed:
            log.warning("upload %s was stuck releasing: back to SENT", upload.id)
            recovered += 1
    return recovered


def purge_abandoned(data_dir: Path, max_age_seconds: float, *,
                    now: float | None = None) -> int:
    """Delete staged files of uploads left unsent for ``max_age_seconds`` (audited).

    Such uploads become ``CANCELLED``. Staging folders that belong to no upload, or
    to one already released, rejected or cancelled, go too once that old.

    Returns
    -------
    int
        Staging folders deleted.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_seconds
    removed = 0
    stale = list(Upload.select(Upload, Transaction).join(Transaction)
                 .where((Upload.status == STAGING) & (Upload.updated_at < cutoff)))
    for upload in stale:
        with write_transaction():
            changed = (Upload.update(status=CANCELLED, updated_at=now)
                       .where((Upload.id == upload.id) & (Upload.status == STAGING)
                              & (Upload.updated_at < cutoff)).execute())
            if changed:
                audit.record(audit.INSTANCES_TRANSFERRED, "upload-abandoned",
                             Actor("system", "housekeeping"), outcome=audit.MINOR_FAILURE,
                             patient_id=upload.transaction.patient_id,
                             transaction=upload.transaction.public_id,
                             detail=f"upload never sent; staged files deleted after "
                                    f"{max_age_seconds / 3600:g} h")
        if changed:
            with contextlib.suppress(InvalidRequest):
                shutil.rmtree(staging_folder(data_dir, upload), ignore_errors=True)
            removed += 1
    root = staging_root(data_dir)
    if root.is_dir():
        live = {u.key for u in Upload.select(Upload.key).where(
            Upload.status.in_([STAGING, SENT, RELEASING]))}
        for folder in root.iterdir():
            if folder.name in live or not folder.is_dir() or folder.is_symlink():
                continue
            try:
                if folder.stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
