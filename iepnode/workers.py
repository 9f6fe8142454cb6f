"""Worker processes that share one listening port (``SO_REUSEPORT``).

A Python process runs Python code on one core at a time (the GIL), so the node
scales its DICOM and HTTP listeners by processes: each worker binds its own
socket to the same port and the kernel spreads incoming connections over them.
The parent reserves the port first (bound, not listening) so that port 0 picks
one free port that every worker then shares.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("iepnode.workers")

#: A worker's entry point: ``target(number, ready, *args)``; it sets ``ready`` once it
#: accepts connections and returns after SIGTERM (see :func:`stop_on_sigterm`).
WorkerTarget = Callable[..., None]


def stop_on_sigterm() -> threading.Event:
    """In a worker: return an event that SIGTERM sets (SIGINT is left to the parent).

    Each worker has its own event: a shared ``multiprocessing.Event`` breaks when a
    worker is killed while waiting on it (its condition then waits for the dead
    waiter), which made the parent's shutdown hang after a worker crash.
    """
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


class PortInUse(OSError):
    """Another process already holds the port the node was asked to listen on."""


def _family(bind: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in bind else socket.AF_INET


def _check_port_free(bind: str, port: int) -> int:
    """Bind ``port`` *without* ``SO_REUSEPORT`` to prove no other process holds it.

    With ``SO_REUSEPORT`` on both sides, the kernel lets a second node bind a port the
    first one listens on and then splits connections between them. A socket without
    it cannot share: its bind fails if any socket, of any process, is bound there.
    Returns the port (the kernel's choice when ``port`` is 0).
    """
    probe = socket.socket(_family(bind), socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR only lets the probe past connections in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(exc.errno, f"port {port} on {bind} is already in use by "
                                "another process (is another iepnode running?)") from exc
            raise
        return probe.getsockname()[1]
    finally:
        probe.close()


def reserve_port(bind: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket to fix the port number.

    Only this node's workers can then share the port: the port is first checked to
    be held by no other process (:func:`_check_port_free`).

    Parameters
    ----------
    bind : str
        Address to bind (IPv6 when it contains a colon).
    port : int
        Port number; 0 lets the kernel choose a free one.

    Returns
    -------
    socket.socket
        The bound socket; keep it open while workers run (it holds the port).

    Raises
    ------
    PortInUse
        Another process holds the port.
    """
    port = _check_port_free(bind, port)
    sock = socket.socket(_family(bind), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bind, port))
    return sock


class WorkerPool:
    """Start, watch and stop a group of worker processes (``spawn`` start method).

    Parameters
    ----------
    kind : str
        Short name for logs and process names (``scp``, ``http``).
    target : WorkerTarget
        Module-level function run in each worker.
    count : int
        Number of workers.
    args : tuple
        Extra arguments passed to ``target`` after ``(number, ready)``.
    """

    def __init__(self, kind: str, target: WorkerTarget, count: int, args: tuple[Any, ...]) -> None:
        self.kind = kind
        self.target = target
        self.count = count
        self.args = args
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def _start_one(self, number: int) -> multiprocessing.process.BaseProcess:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=self.target,
            args=(number, ready, *self.args),
            name=f"iepnode-{self.kind}-{number}",
            daemon=True,
        )
        proc.start()
        while not ready.wait(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"{self.kind} worker {number} exited with code "
                                   f"{proc.exitcode}")
        return proc

    def start(self) -> None:
        """Start all workers; return once each one accepts connections."""
        self._procs = [self._start_one(n) for n in range(self.count)]

    def restart_dead(self) -> int:
        """Restart workers that died unexpectedly; return how many were restarted."""
        restarted = 0
        for number, proc in enumerate(self._procs):
            if not proc.is_alive() and not self._stopping:
                log.error("%s worker %d died (exit code %s); restarting", self.kind, number,
                          proc.exitcode)
                self._procs[number] = self._start_one(number)
                restarted += 1
        return restarted

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the workers to finish (SIGTERM) and wait for them; kill stragglers."""
        self._stopping = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                log.error("%s worker %s did not stop in %.0f s; killing it", self.kind,
                          proc.name, timeout)
                proc.kill()
                proc.join(timeout)

    @property
    def pids(self) -> list[int]:
        """Process IDs of the running workers."""
        return [p.pid for p in self._procs if p.pid is not None]
