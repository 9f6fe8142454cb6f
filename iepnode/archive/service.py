"""The archive as the SCP sees it: peers, ingest, query and retrieve, counts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset

from config import Settings
from iepnode.archive.ingest import Ingester, StoreResult
from iepnode.archive.query import (
    Query,
    Root,
    iter_instance_keys,
    iter_matches,
    parse_identifier,
    parse_retrieve_identifier,
)
from iepnode.errors import BadDataset, NotAuthorized, UnknownDestination
from storage import registry
from storage.filestore import FileStore
from storage.models import RemoteAE, Study
from storage.queries import Database
from storage.queries import archive as queries


@dataclass(frozen=True)
class RetrieveItem:
    """One stored instance selected for C-MOVE / C-GET / export (``key``: its store key)."""

    key: str
    sop_class: str
    sop_uid: str
    transfer_syntax: str


class ArchiveService:
    """What the DICOM handlers call: who may connect, store, find and retrieve.

    Parameters
    ----------
    settings : Settings
        Validated settings (the node's AE title answers C-FIND).
    database : storage.queries.Database
        The opened index database (its connection is returned by :meth:`close`).
    store : FileStore
        Where stored instances are read from.
    ingester : Ingester
        Stores received datasets.
    """

    def __init__(self, settings: Settings, database: Database, store: FileStore,
                 ingester: Ingester) -> None:
        self.settings = settings
        self.database = database
        self.store = store
        self.ingester = ingester

    def close(self) -> None:
        """Return this thread's database connection to the pool (call when a thread is done)."""
        if not self.database.is_closed():
            self.database.close()

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

    def store_received(
        self, stream: bytes, transfer_syntax: str, *, calling_ae: str, sop_class: str,
        sop_uid: str,
    ) -> StoreResult:
        """Store one C-STORE dataset; see :meth:`Ingester.ingest`."""
        return self.ingester.ingest(
            stream, transfer_syntax, source_ae=calling_ae, expected_sop_class=sop_class,
            expected_sop_uid=sop_uid,
        )

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
            :func:`~iepnode.archive.query.parse_retrieve_identifier`).
        """
        query = parse_retrieve_identifier(identifier, root)
        return [
            RetrieveItem(key, sop_class, sop_uid, ts)
            for key, sop_class, sop_uid, ts in iter_instance_keys(query)
        ]

    def retrieved_dataset(self, item: RetrieveItem) -> Dataset:
        """The stored instance of a C-MOVE/C-GET sub-operation, its values read lazily.

        Raises
        ------
        BadDataset
            The stored file cannot serve (missing, unreadable, cut short...): the
            reason is :func:`storage.stored_file.unreadable_reason`'s, in plain words.
        """
        from pydicom import dcmread

        from storage.stored_file import unreadable_reason

        path = self.store.path(item.key)
        reason = unreadable_reason(path)
        if reason is not None:
            raise BadDataset(reason)
        return dcmread(path)

    def counts(self) -> dict[str, int]:
        """Return how many patients, studies and instances are indexed."""
        with self.database.connection_context():
            return queries.index_counts()

    def study(self, study_uid: str) -> Study | None:
        """Return the indexed study with this Study Instance UID, or ``None``."""
        return queries.study_with_uid(study_uid)


def _same_host(registered: str, peer: str) -> bool:
    import socket

    if registered in ("*", peer):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(registered, None)}
    except OSError:
        return False
    return peer in addresses
