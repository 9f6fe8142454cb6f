"""Run the SCP: one or more worker processes sharing one port with ``SO_REUSEPORT``.

A Python process uses one core for Python code (the GIL), so ingest scales by
processes: the kernel spreads incoming connections over the workers' listening
sockets. Each worker opens its own database connection and file store: the
composition root (:func:`iepnode.serve.run_scp_worker`) builds them and hands
:func:`serve_associations` the archive service.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.synchronize import Event as EventType

from pydicom import config as pydicom_config
from pynetdicom import AE, _config

from config import Settings
from iepnode.archive.service import ArchiveService
from scp.admission import ConnectionGuard, ConnectionLimits
from scp.contexts import supported_contexts
from scp.guard import GuardedServer
from scp.handlers import event_handlers

log = logging.getLogger("iepnode.scp")

# pynetdicom formats every request/response identifier and every PDU for its log
# even when those levels are off (~1 ms per C-FIND match); the node logs one line
# per association and per failure instead.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"


#: Seconds a stopping worker lets running associations finish before aborting them.
SHUTDOWN_GRACE = 5.0


def build_ae(settings: Settings) -> AE:
    """Return the node's AE with its timeouts and limits set.

    The ACSE timeout is the ARTIM timer of PS3.8: how long a new connection may take
    to send its A-ASSOCIATE-RQ (``dicom_preassoc_timeout``).
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.dicom_max_associations
    ae.require_called_aet = True
    ae.acse_timeout = settings.dicom_preassoc_timeout
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    return ae


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The pre-association limits of one SCP worker, from the settings."""
    return ConnectionLimits(
        max_pending=settings.dicom_max_pending,
        max_pending_per_address=settings.dicom_max_pending_per_address,
        preassoc_timeout=settings.dicom_preassoc_timeout,
        max_associate_rq=settings.dicom_max_associate_rq,
        max_pdu=settings.max_pdu,
    )


def make_server(settings: Settings, archive: ArchiveService, port: int) -> GuardedServer:
    """Create (bound, listening) the association server of one worker."""
    ae = build_ae(settings)
    return ae.make_server(
        (settings.bind, port),
        contexts=supported_contexts(),
        evt_handlers=event_handlers(archive),
        server_class=GuardedServer,
        guard=ConnectionGuard(connection_limits(settings)),
    )


def stop_server(server: GuardedServer, grace: float = SHUTDOWN_GRACE) -> None:
    """Stop accepting, give running associations ``grace`` seconds, then abort the rest."""
    server.shutdown()
    deadline = time.monotonic() + grace
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    for assoc in server.active_associations:
        log.warning("association with %s aborted: the node is stopping",
                    assoc.requestor.ae_title.strip() or assoc.requestor.address)
        assoc.abort()


def serve_associations(settings: Settings, archive: ArchiveService, port: int,
                       ready: EventType, stop: threading.Event) -> None:
    """Serve associations on ``port`` until ``stop`` is set (the body of a worker process).

    Parameters
    ----------
    settings : Settings
        The SCP's settings (AE title, limits, bind address).
    archive : ArchiveService
        What the handlers call.
    port : int
        The port shared with the other workers (``SO_REUSEPORT``).
    ready : Event
        Set once the server listens.
    stop : threading.Event
        Set to stop (on SIGTERM): running associations get :data:`SHUTDOWN_GRACE`.
    """
    # pydicom validates every value it reads or sets (the response datasets
    # pynetdicom builds included): ~10% of a worker's CPU. The node checks what it
    # relies on (UIDs) itself and stores datasets as received.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    server = make_server(settings, archive, port)
    thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
    thread.start()
    ready.set()
    stop.wait()
    stop_server(server)
    thread.join(5)
