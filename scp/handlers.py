"""Thin pynetdicom event handlers: call the archive, translate its errors to statuses.

Each handler takes the pynetdicom ``Event`` and the :class:`~iepnode.archive.service.ArchiveService`
(bound with ``(evt.EVT_X, handler, [archive])``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import weakref
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import evt
from pynetdicom.events import Event

from iepnode.archive.query import Root
from iepnode.archive.service import ArchiveService
from iepnode.errors import (
    BadDataset,
    BadQuery,
    DatasetMismatch,
    NodeError,
    NotAuthorized,
    OutOfResources,
    UnknownDestination,
)
from scp.answers import error_comment
from scp.contexts import PATIENT_ROOT_MODELS, allowed_contexts, sending_contexts

log = logging.getLogger("iepnode.scp")

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
class _Unsendable:
    """Yielded as ``(PENDING, UNSENDABLE)`` for a stored instance that cannot be sent.

    pynetdicom's C-GET and C-MOVE services count a pending item that is not a
    dataset as one failed sub-operation and go on with the next; a failure status
    would end the whole retrieve at that instance.
    """


UNSENDABLE = _Unsendable()


@dataclass
class AssociationStats:
    """Per-association bookkeeping for the one log line at its end."""

    calling_ae: str
    peer: str
    allowed: frozenset[str]
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0


_stats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _peer(event: Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    calling = requestor.primitive.calling_ae_title if requestor.primitive else requestor.ae_title
    return calling.strip(), f"{requestor.address}:{requestor.port}"


def _reject(event: Event, archive: ArchiveService, result: int, source: int,
            diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ and wait until it is on the wire (as pynetdicom itself does)."""
    archive.close()
    event.assoc.acse.send_reject(result, source, diagnostic)
    event.assoc.kill()


def handle_requested(event: Event, archive: ArchiveService) -> None:
    """A-ASSOCIATE-RQ: reject unless the calling AE is registered for this address."""
    calling, peer = _peer(event)
    called = event.assoc.requestor.primitive.called_ae_title.strip()
    if called != archive.settings.ae_title:
        log.warning("association rejected: called AE %r is not %r (from %s at %s)",
                    called, archive.settings.ae_title, calling, peer)
        _reject(event, archive, 0x01, 0x01, 0x07)
        return
    try:
        ae = archive.authorize(calling, event.assoc.requestor.address)
    except NotAuthorized as exc:
        log.warning("association rejected: %s (%s)", exc, peer)
        _reject(event, archive, 0x01, 0x01, 0x03)
        return
    except Exception:
        log.exception("association rejected: registry unavailable (%s)", peer)
        _reject(event, archive, 0x02, 0x03, 0x01)
        return
    _stats[event.assoc] = AssociationStats(calling, peer, ae.allowed)
    # Responses are small: send them at once instead of waiting on Nagle's algorithm.
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    acceptor = event.assoc.acceptor
    acceptor.supported_contexts = allowed_contexts(acceptor.supported_contexts, ae.allowed)


def _log_end(event: Event, archive: ArchiveService, how: str) -> None:
    # Handlers run in the association's thread: hand its connection back to the pool.
    archive.close()
    stats = _stats.pop(event.assoc, None)
    if stats is None:
        return
    elapsed = time.monotonic() - stats.started
    log.info("association %s: %s at %s, %.1fs, %d stored (%.1f MB), %d failed",
             how, stats.calling_ae, stats.peer, elapsed, stats.stored, stats.bytes / 1e6,
             stats.failed)


def handle_established(event: Event) -> None:
    """Log the accepted association."""
    stats = _stats.get(event.assoc)
    if stats is not None:
        log.info("association accepted: %s at %s", stats.calling_ae, stats.peer)


def handle_released(event: Event, archive: ArchiveService) -> None:
    """Log the association's end, with what it did."""
    _log_end(event, archive, "released")


def handle_aborted(event: Event, archive: ArchiveService) -> None:
    """Log an aborted association."""
    _log_end(event, archive, "aborted")


def _allowed(event: Event, service: str) -> bool:
    stats = _stats.get(event.assoc)
    return stats is not None and service in stats.allowed


def handle_echo(event: Event, archive: ArchiveService) -> int:
    """C-ECHO: always answered for an accepted association."""
    return SUCCESS


def handle_store(event: Event, archive: ArchiveService) -> int:
    """C-STORE: succeed only once the file is durable and indexed."""
    request = event.request
    calling, peer = _peer(event)
    stats = _stats.get(event.assoc)
    if not _allowed(event, "store"):
        log.warning("C-STORE refused: %s at %s is not allowed to store", calling, peer)
        return NOT_AUTHORIZED
    stream = request.DataSet.getvalue()
    try:
        archive.store_received(
            stream,
            event.context.transfer_syntax,
            calling_ae=calling,
            sop_class=request.AffectedSOPClassUID,
            sop_uid=request.AffectedSOPInstanceUID,
        )
    except NodeError as exc:
        status = (
            OUT_OF_RESOURCES if isinstance(exc, OutOfResources)
            else DATASET_MISMATCH if isinstance(exc, DatasetMismatch)
            else CANNOT_UNDERSTAND if isinstance(exc, BadDataset)
            else OUT_OF_RESOURCES
        )
        if stats is not None:
            stats.failed += 1
        log.warning("C-STORE failed (0x%04X) from %s, SOP Instance %s: %s", status, calling,
                    request.AffectedSOPInstanceUID, exc)
        return status
    except Exception:
        if stats is not None:
            stats.failed += 1
        log.exception("C-STORE failed (0xA700) from %s, SOP Instance %s", calling,
                      request.AffectedSOPInstanceUID)
        return OUT_OF_RESOURCES
    if stats is not None:
        stats.stored += 1
        stats.bytes += len(stream)
    return SUCCESS


def failure_status(status: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = error_comment(comment)
    return ds


def _root(event: Event) -> Root:
    sop_class = event.request.AffectedSOPClassUID
    return Root.PATIENT if sop_class in PATIENT_ROOT_MODELS else Root.STUDY


def handle_find(event: Event, archive: ArchiveService):
    """C-FIND: yield one pending response per match."""
    calling, peer = _peer(event)
    if not _allowed(event, "find"):
        log.warning("C-FIND refused: %s at %s is not allowed to query", calling, peer)
        yield NOT_AUTHORIZED, None
        return
    try:
        for match in archive.find(event.identifier, _root(event)):
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, match
    except BadQuery as exc:
        log.warning("C-FIND from %s failed: %s", calling, exc)
        yield failure_status(IDENTIFIER_MISMATCH, str(exc)), None
    except Exception:
        log.exception("C-FIND from %s failed", calling)
        yield OUT_OF_RESOURCES, None


def _send_items(event: Event, archive: ArchiveService, items):
    """Yield each stored instance for a sub-operation.

    pynetdicom's retrieve services take datasets, not files: the file is read
    lazily and pynetdicom writes its elements back as they were read, so what is
    sent equals what was stored (deflated data is deflated anew). A stored file that
    cannot serve (missing, cut short...) fails its sub-operation, not the others.
    """
    for item in items:
        if event.is_cancelled:
            yield CANCEL, None
            return
        try:
            dataset = archive.retrieved_dataset(item)
        except (OSError, InvalidDicomError, BadDataset) as exc:
            log.error("stored instance %s not sent: %s", item.sop_uid, exc)
            yield PENDING, UNSENDABLE
            continue
        yield PENDING, dataset


def handle_move(event: Event, archive: ArchiveService):
    """C-MOVE: send the selected instances, as stored, to a registered AE."""
    calling, peer = _peer(event)
    if not _allowed(event, "move"):
        log.warning("C-MOVE refused: %s at %s is not allowed to retrieve", calling, peer)
        yield None, None
        return
    try:
        destination = archive.move_destination(event.move_destination)
        items = archive.retrieve(event.identifier, _root(event))
    except UnknownDestination as exc:
        log.warning("C-MOVE from %s refused: %s", calling, exc)
        yield None, None
        return
    except BadQuery as exc:
        # pynetdicom wants the destination first and then the number of
        # sub-operations; raising here makes it answer 0xC513 (unable to process).
        log.warning("C-MOVE from %s failed: %s", calling, exc)
        yield destination.host, destination.port
        raise
    contexts = sending_contexts((i.sop_class, i.transfer_syntax) for i in items)
    log.info("C-MOVE from %s: %d instances to %s", calling, len(items), destination.ae_title)
    yield destination.host, destination.port, {"contexts": contexts} if contexts else {}
    yield len(items)
    yield from _send_items(event, archive, items)


def handle_get(event: Event, archive: ArchiveService):
    """C-GET: send the selected instances, as stored, over the same association."""
    calling, peer = _peer(event)
    if not _allowed(event, "get"):
        log.warning("C-GET refused: %s at %s is not allowed to retrieve", calling, peer)
        yield 0
        return
    try:
        items = archive.retrieve(event.identifier, _root(event))
    except BadQuery as exc:
        # Raised before the first yield, pynetdicom answers with one failure
        # response (0xC413, unable to process) and nothing after it.
        log.warning("C-GET from %s failed: %s", calling, exc)
        raise
    log.info("C-GET from %s: %d instances", calling, len(items))
    yield len(items)
    yield from _send_items(event, archive, items)


def event_handlers(archive: ArchiveService) -> list[tuple]:
    """Return the handler bindings for ``make_server``."""
    return [
        (evt.EVT_REQUESTED, handle_requested, [archive]),
        (evt.EVT_ESTABLISHED, handle_established),
        (evt.EVT_RELEASED, handle_released, [archive]),
        (evt.EVT_ABORTED, handle_aborted, [archive]),
        (evt.EVT_C_ECHO, handle_echo, [archive]),
        (evt.EVT_C_STORE, handle_store, [archive]),
        (evt.EVT_C_FIND, handle_find, [archive]),
        (evt.EVT_C_MOVE, handle_move, [archive]),
        (evt.EVT_C_GET, handle_get, [archive]),
    ]


__all__ = ["Dataset", "event_handlers"]
