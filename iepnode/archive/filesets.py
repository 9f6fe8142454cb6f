"""Per-study DICOMDIR file-sets: built when a study is stable, swept when it is gone."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from config import Settings
from iepnode.outbound import sending
from iepnode.people import audit
from iepnode.sharing import checksums
from storage import index
from storage.filestore import FileStore
from storage.models import Study
from storage.queries import archive as queries

log = logging.getLogger("iepnode.filesets")


class FilesetService:
    """Builds and removes the DICOMDIR file-sets of stored studies.

    Parameters
    ----------
    settings : Settings
        Where file-sets go (``fileset_dir``), when a study is stable, the retry back-off.
    store : FileStore
        Where the instances linked into a file-set are.
    """

    def __init__(self, settings: Settings, store: FileStore) -> None:
        self.settings = settings
        self.store = store

    def fileset_path(self, study: Study) -> Path:
        """Folder of the study's DICOMDIR file-set (named by generated key)."""
        return self.settings.fileset_dir / study.key

    def build_fileset(self, study_uid: str) -> Path:
        """Build (or rebuild) the study's DICOMDIR file-set now; return its folder.

        Instances whose stored files cannot be read are left out (see
        :meth:`_write_fileset`).

        Raises
        ------
        KeyError
            If no such study is indexed.
        storage.fileset.FilesetError
            If none of its files can be read, or the folder cannot be written.
        OSError
            If the file system fails.
        """
        return self._write_fileset(study_uid)[0]

    def _write_fileset(self, study_uid: str) -> tuple[Path, list[str]]:
        """Build the study's file-set; return its folder and the store keys left out.

        Each instance left out (its file missing, unreadable, empty, not DICOM or cut
        short) gets a warning line and a Security Alert audit event (DCM 110113,
        minor failure) naming the study, the SOP Instance UID, the store key and the
        reason, once per build.
        """
        from storage.fileset import NoUsableMember, write_fileset

        study = queries.study_with_uid(study_uid)
        if study is None:
            raise KeyError(study_uid)
        built_from = study.last_received
        rows = {self.store.path(i.key): i for i in index.study_files(study)}
        dest = self.fileset_path(study)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            plan = write_fileset(dest, list(rows))
        except NoUsableMember as exc:
            self._report_left_out(study, [(rows[m.path], m.reason) for m in exc.left_out])
            raise
        self._report_left_out(study, [(rows[m.path], m.reason) for m in plan.left_out])
        index.mark_fileset_built(study.id, built_from)
        log.info("file-set built for study %s: %d instances in %s%s", study_uid,
                 len(plan.files), dest,
                 f" ({len(plan.left_out)} unreadable left out)" if plan.left_out else "")
        return dest, [rows[m.path].key for m in plan.left_out]

    def _report_left_out(self, study: Study, left_out: list[tuple[Any, str]]) -> None:
        """Log and audit the instances a file-set build leaves out."""
        if not left_out:
            return
        patient_id = study.patient.patient_id
        for instance, reason in left_out:
            log.warning("file-set of study %s: left out instance %s (file %s): %s",
                        study.study_uid, instance.sop_uid, instance.key, reason)
            audit.record(audit.SECURITY_ALERT, "stored-file-unreadable",
                         audit.Actor("system", "file-set"), outcome=audit.MINOR_FAILURE,
                         patient_id=patient_id, study_uid=study.study_uid,
                         detail=f"instance {instance.sop_uid} (file {instance.key}) left out "
                                f"of the study's file-set: {reason}")

    def build_stable_filesets(self) -> int:
        """Build file-sets of studies stable for ``stable_age`` seconds; return how many.

        A study whose build fails (any exception) is tried again after
        ``fileset_retry_seconds``, doubling after each further failure up to
        ``fileset_retry_max_seconds``; the attempts and the next retry time are kept
        in the study's row (:func:`storage.index.claim_fileset_build`), so the back-off
        holds across restarts and processes. Each failure is one warning line (with
        the traceback only for the first); a success clears the back-off.
        """
        backoff = sending.RetryPolicy(self.settings.fileset_retry_seconds,
                                      self.settings.fileset_retry_max_seconds)
        built = 0
        for study in index.studies_due_for_fileset(self.settings.stable_age, time.time()):
            delay = backoff.delay(study.fileset_attempts + 1)
            attempt = index.claim_fileset_build(study, time.time(), delay)
            if attempt is None:
                continue  # another process took it, or it is not due any more
            try:
                _, left_out = self._write_fileset(study.study_uid)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                index.record_fileset_failure(study.id, reason)
                log.warning("file-set build of study %s failed (attempt %d; next in %g s): "
                            "%s", study.study_uid, attempt, delay, reason,
                            exc_info=attempt == 1)
                continue
            built += 1
            try:
                checksums.cache_study(study.study_uid, self.store.path, exclude=left_out)
            except Exception:
                log.exception("checksums of study %s not cached", study.study_uid)
        return built

    def remove_orphan_filesets(self) -> int:
        """Delete file-set folders whose study is no longer indexed; return how many.

        A study disappears when its last instance is deleted or replaced by one of
        another study; its folder of hard links would otherwise stay forever.
        Hidden staging folders of builds in progress are left alone.
        """
        root = self.settings.fileset_dir
        if not root.is_dir():
            return 0
        names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if not names:
            return 0
        known = queries.known_study_keys(list(names))
        removed = 0
        for name in sorted(names - known):
            shutil.rmtree(root / name, ignore_errors=True)
            log.info("removed file-set %s: its study is no longer stored", name)
            removed += 1
        return removed
