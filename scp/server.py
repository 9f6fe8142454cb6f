"""Run the SCP: one or more worker processes sharing one port with ``SO_REUSEPORT``.

A Python process uses one core for Python code (the GIL), so ingest scales by
processes: the kernel spreads incoming connections over the workers' listening
sockets. Each worker opens its own database connection and file store.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from multiprocessing.synchronize import Event as EventType

from pydicom import config as pydicom_config
from pynetdicom import AE, _config
from pynetdicom.transport import ThreadedAssociationServer

from config import Settings
from iepnode.logs import setup_logging
from iepnode.node import Node
from scp.contexts import supported_contexts
from scp.handlers import event_handlers

log = logging.getLogger("iepnode.scp")

# pynetdicom formats every request/response identifier and every PDU for its log
# even when those levels are off (~1 ms per C-FIND match); the node logs one line
# per association and per failure instead.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"


class ReusePortServer(ThreadedAssociationServer):
    """An association server whose socket shares its port with other workers."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def reserve_port(bind: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket to fix the port number.

    With ``port=0`` the kernel picks a free port; workers then bind the same one.
    The returned socket must stay open while workers run.
    """
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bind, port))
    return sock


def build_ae(settings: Settings) -> AE:
    """Return the node's AE with its timeouts and limits set."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = 64
    ae.require_called_aet = True
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    return ae


def make_server(settings: Settings, node: Node, port: int) -> ReusePortServer:
    """Create (bound, listening) the association server of one worker."""
    ae = build_ae(settings)
    return ae.make_server(
        (settings.bind, port),
        contexts=supported_contexts(),
        evt_handlers=event_handlers(node),
        server_class=ReusePortServer,
    )


def run_worker(settings: Settings, port: int, ready: EventType, stop: EventType,
               number: int) -> None:
    """Entry point of a worker process: serve associations until ``stop`` is set."""
    setup_logging(settings, process_name=f"scp-{number}")
    # pydicom validates every value it reads or sets (the response datasets
    # pynetdicom builds included): ~10% of a worker's CPU. The node checks what it
    # relies on (UIDs) itself and stores datasets as received.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node = Node(settings)
    server = make_server(settings, node, port)
    thread = threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True)
    thread.start()
    ready.set()
    stop.wait()
    server.shutdown()
    server.server_close()
    node.close()


class WorkerPool:
    """Start, watch and stop the SCP worker processes.

    Parameters
    ----------
    settings : Settings
        Node settings (``dicom_workers`` processes are started).
    port : int
        The (already reserved) DICOM port.
    """

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def _start_one(self, number: int) -> multiprocessing.process.BaseProcess:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=run_worker,
            args=(self.settings, self.port, ready, self._stop, number),
            name=f"iepnode-scp-{number}",
            daemon=True,
        )
        proc.start()
        while not ready.wait(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"SCP worker {number} exited with code {proc.exitcode}")
        return proc

    def start(self) -> None:
        """Start all workers; return once each accepts associations."""
        self._procs = [self._start_one(n) for n in range(self.settings.dicom_workers)]

    def restart_dead(self) -> int:
        """Restart workers that died unexpectedly; return how many were restarted."""
        restarted = 0
        for number, proc in enumerate(self._procs):
            if not proc.is_alive() and not self._stop.is_set():
                log.error("SCP worker %d died (exit code %s); restarting", number, proc.exitcode)
                self._procs[number] = self._start_one(number)
                restarted += 1
        return restarted

    def stop(self, timeout: float = 10.0) -> None:
        """Ask workers to finish and wait for them."""
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)

    @property
    def pids(self) -> list[int]:
        """Process IDs of the running workers."""
        return [p.pid for p in self._procs if p.pid is not None]
