"""The node façade: the one object DICOM handlers, web views and the CLI call."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from config import Settings
from iepnode.errors import NotAuthorized, UnknownDestination
from iepnode.ingest import Ingester, StoreResult
from iepnode.query import (
    Query,
    Root,
    iter_instance_keys,
    iter_matches,
    parse_identifier,
    parse_retrieve_identifier,
)
from storage import index, registry
from storage.db import open_database
from storage.filestore import FileStore
from storage.models import RemoteAE, Study

log = logging.getLogger("iepnode.node")


@dataclass(frozen=True)
class RetrieveItem:
    """One stored instance selected for C-MOVE / C-GET / export."""

    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str


class Node:
    """Everything the node does, behind one object.

    Parameters
    ----------
    settings : Settings
        Validated settings; the database is opened and the store created.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.database = open_database(settings.resolved_database_url)
        self.store = FileStore(settings.store_dir, settings.tmp_dir, durable=settings.fsync)
        self.ingester = Ingester(
            self.store, replace_duplicates=settings.duplicate_policy == "replace"
        )

    def close(self) -> None:
        """Return this thread's database connection to the pool (call when a thread is done)."""
        if not self.database.is_closed():
            self.database.close()

    # -- peers ---------------------------------------------------------------------------

    def authorize(self, calling_ae: str, peer_host: str | None) -> RemoteAE:
        """Check that a calling AE is registered and connects from its address.

        Raises
        ------
        NotAuthorized
            If the AE title is unknown or the peer address differs.
        """
        ae = registry.get_remote_ae(calling_ae.strip())
        if ae is None:
            raise NotAuthorized(f"calling AE title {calling_ae.strip()!r} is not registered")
        if peer_host is not None and not _same_host(ae.host, peer_host):
            raise NotAuthorized(
                f"calling AE {ae.ae_title!r} connected from {peer_host}, registered as {ae.host}"
            )
        return ae

    def require_service(self, calling_ae: str, service: str) -> None:
        """Raise :class:`NotAuthorized` unless ``calling_ae`` may use ``service``."""
        ae = registry.get_remote_ae(calling_ae.strip())
        if ae is None or service not in ae.allowed:
            raise NotAuthorized(f"{calling_ae.strip()!r} is not allowed {service}")

    def move_destination(self, ae_title: str) -> RemoteAE:
        """Return the registered AE a C-MOVE may send to.

        Raises
        ------
        UnknownDestination
            If no remote AE with that title is registered.
        """
        ae = registry.get_remote_ae(ae_title.strip())
        if ae is None:
            raise UnknownDestination(f"move destination {ae_title.strip()!r} is not registered")
        return ae

    # -- ingest --------------------------------------------------------------------------

    def store_received(
        self, stream: bytes, transfer_syntax: str, *, calling_ae: str, sop_class: str,
        sop_uid: str,
    ) -> StoreResult:
        """Store one C-STORE dataset; see :meth:`Ingester.ingest`."""
        return self.ingester.ingest(
            stream, transfer_syntax, source_ae=calling_ae, expected_sop_class=sop_class,
            expected_sop_uid=sop_uid,
        )

    # -- query / retrieve ----------------------------------------------------------------

    def find(self, identifier: Dataset, root: Root) -> Iterator[Dataset]:
        """Yield a C-FIND response identifier per match.

        Raises
        ------
        BadQuery
            If the identifier cannot be answered.
        """
        query = parse_identifier(identifier, root)
        for values in iter_matches(query):
            yield self._response(query, values)

    def _response(self, query: Query, values: dict[str, object]) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = query.level.name
        ds.RetrieveAETitle = self.settings.ae_title
        non_ascii = False
        for keyword in query.return_keys:
            value = values.get(keyword)
            value = "" if value is None else value
            if isinstance(value, str):
                non_ascii = non_ascii or not value.isascii()
                if "\\" in value:
                    value = value.split("\\")
            setattr(ds, keyword, value)
        for keyword in query.unsupported_keys:
            setattr(ds, keyword, None)
        if non_ascii:
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def retrieve(self, identifier: Dataset, root: Root) -> list[RetrieveItem]:
        """Return the stored instances a C-MOVE/C-GET identifier selects.

        Raises
        ------
        BadQuery
            If the identifier lacks its level's unique key (see
            :func:`~iepnode.query.parse_retrieve_identifier`).
        """
        query = parse_retrieve_identifier(identifier, root)
        return [
            RetrieveItem(self.store.path(key), sop_class, sop_uid, ts)
            for key, sop_class, sop_uid, ts in iter_instance_keys(query)
        ]

    def counts(self) -> dict[str, int]:
        """Return how many patients, studies and instances are indexed."""
        from storage.models import Instance, Patient

        with self.database.connection_context():
            return {
                "patients": Patient.select().count(),
                "studies": Study.select().count(),
                "instances": Instance.select().count(),
            }

    # -- studies & file-sets -------------------------------------------------------------

    def study(self, study_uid: str) -> Study | None:
        """Return the indexed study with this Study Instance UID, or ``None``."""
        return Study.get_or_none(Study.study_uid == study_uid)

    def fileset_path(self, study: Study) -> Path:
        """Folder of the study's DICOMDIR file-set (named by generated key)."""
        return self.settings.fileset_dir / study.key

    def build_fileset(self, study_uid: str) -> Path:
        """Build (or rebuild) the study's DICOMDIR file-set now; return its folder.

        Raises
        ------
        KeyError
            If no such study is indexed.
        """
        from storage.fileset import write_fileset

        study = self.study(study_uid)
        if study is None:
            raise KeyError(study_uid)
        built_from = study.last_received
        members = [self.store.path(i.key) for i in index.study_files(study)]
        dest = self.fileset_path(study)
        dest.parent.mkdir(parents=True, exist_ok=True)
        count = write_fileset(dest, members)
        index.mark_fileset_built(study.id, built_from)
        log.info("file-set built for study %s: %d instances in %s", study_uid, count, dest)
        return dest

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
        known = {s.key for s in Study.select(Study.key).where(Study.key.in_(list(names)))}
        removed = 0
        for name in sorted(names - known):
            shutil.rmtree(root / name, ignore_errors=True)
            log.info("removed file-set %s: its study is no longer stored", name)
            removed += 1
        return removed

    def remote_aes(self) -> list[RemoteAE]:
        """Return the registered remote AEs."""
        return registry.list_remote_aes()

    def build_stable_filesets(self) -> int:
        """Build file-sets of studies stable for ``stable_age`` seconds; return how many."""
        built = 0
        for study in index.studies_due_for_fileset(self.settings.stable_age, time.time()):
            try:
                self.build_fileset(study.study_uid)
                built += 1
            except Exception:
                log.exception("file-set build failed for study %s", study.study_uid)
        return built


def _same_host(registered: str, peer: str) -> bool:
    import socket

    if registered in ("*", peer):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(registered, None)}
    except OSError:
        return False
    return peer in addresses
