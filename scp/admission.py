"""Admission: what an unauthenticated TCP connection can make an SCP worker do.

Every connection to the DICOM port, from anywhere, is read before its calling AE
title can be checked: the A-ASSOCIATE-RQ carries the title. pynetdicom reads that
PDU trusting its 4-byte length (a header claiming 4 GB made a worker buffer whatever
followed) with a blocking ``recv`` that no timer interrupts (one byte, then silence,
held an association slot for ever), and gives each connection two threads polling
every millisecond from the first byte. So a worker reads the A-ASSOCIATE-RQ itself,
here, and hands only complete ones to pynetdicom:

- **Admission** (:class:`ConnectionGuard`): a worker holds at most
  ``dicom_max_pending`` connections whose A-ASSOCIATE-RQ has not fully arrived, and
  at most ``dicom_max_pending_per_address`` of them from one peer address; beyond
  that a new connection gets A-ASSOCIATE-RJ (transient, local limit exceeded) at
  once, before a byte of it is read, so one address cannot take the slots of the
  registered peers.
- **The request** (:class:`PreAssociationReader`, one thread per worker, all pending
  connections in one selector): the first PDU must be an A-ASSOCIATE-RQ of at most
  ``dicom_max_associate_rq`` bytes (otherwise A-ABORT, read no further) and must be
  complete within ``dicom_preassoc_timeout`` seconds of the connection (otherwise the
  connection is closed, as PS3.8's ARTIM timer does). A pending connection costs a
  socket and its buffer, no thread.

The counts are per SCP worker process (the kernel spreads connections over the
workers): with ``dicom_workers`` workers one address can hold at most
``dicom_workers x dicom_max_pending_per_address`` unfinished connections, each for at
most ``dicom_preassoc_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from iepnode.logs import RateLimitedLog

log = logging.getLogger("iepnode.scp")

#: PDU types (PS3.8 9.3): A-ASSOCIATE-RQ and P-DATA-TF; 1-7 are the valid ones.
ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
VALID_PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ASSOCIATE-RJ: rejected-transient (2), service-provider presentation related (3),
#: local-limit-exceeded (2).
LIMIT_REJECT = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x02, 0x03, 0x02)
#: A-ABORT reasons from the service provider (PS3.8 9.3.8).
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds one SCP worker enforces (see the module docstring).

    Attributes
    ----------
    max_pending : int
        Connections whose A-ASSOCIATE-RQ has not fully arrived, from all peers.
    max_pending_per_address : int
        The same, from one peer address.
    preassoc_timeout : float
        Seconds from connection to a complete A-ASSOCIATE-RQ.
    max_associate_rq : int
        Largest A-ASSOCIATE-RQ PDU (its length field), in bytes.
    max_pdu : int
        Largest P-DATA-TF PDU after acceptance: the maximum PDU the node announces.
    """

    max_pending: int
    max_pending_per_address: int
    preassoc_timeout: float
    max_associate_rq: int
    max_pdu: int


def peer_address(client_address: object) -> str:
    """The address part of a socket peer name, IPv4-mapped IPv6 shown as IPv4."""
    host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


class ConnectionGuard:
    """Count one worker's pending connections; decide whether a new one may start.

    Parameters
    ----------
    limits : ConnectionLimits
        The bounds.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self.refusals = RateLimitedLog(log)

    @property
    def pending(self) -> int:
        """Connections admitted whose A-ASSOCIATE-RQ has not fully arrived."""
        with self._lock:
            return sum(self._pending.values())

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address`` as pending, or return ``False``."""
        with self._lock:
            total = sum(self._pending.values())
            if total >= self.limits.max_pending:
                reason = f"{total} connections are already waiting to associate"
            elif self._pending[address] >= self.limits.max_pending_per_address:
                reason = f"{self._pending[address]} connections from it are already waiting"
            else:
                self._pending[address] += 1
                return True
        self.refusals.warning("connection from %s refused: %s (local limit exceeded)",
                              address, reason)
        return False

    def done(self, address: str) -> None:
        """A pending connection from ``address`` associated or went away."""
        with self._lock:
            self._pending[address] -= 1
            if self._pending[address] <= 0:
                del self._pending[address]


def answer_and_close(sock: socket.socket, pdu: bytes) -> None:
    """Send ``pdu`` (a rejection or abort) without waiting, then close the connection.

    What the peer already sent is read once, without waiting, so that the close does
    not answer it with a reset that could discard the answer in flight.
    """
    try:
        sock.setblocking(False)
        sock.send(pdu)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1 << 16)
    except OSError:
        pass
    finally:
        sock.close()


def refuse(sock: socket.socket) -> None:
    """Answer A-ASSOCIATE-RJ (local limit exceeded) without reading the request; close."""
    answer_and_close(sock, LIMIT_REJECT)


@dataclass(eq=False)
class _Pending:
    """A connection whose A-ASSOCIATE-RQ is being read."""

    sock: socket.socket
    client_address: tuple
    address: str
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    need: int = 6  # the header first; then 6 + its length


#: Called with (socket, client address, the A-ASSOCIATE-RQ PDU) for a complete request.
HandOff = Callable[[socket.socket, tuple, bytes], None]


class PreAssociationReader:
    """Read A-ASSOCIATE-RQs of admitted connections in one thread; hand complete ones on.

    Parameters
    ----------
    guard : ConnectionGuard
        Whose pending count each connection leaves when it is handed on or closed.
    hand_off : callable
        ``hand_off(sock, client_address, pdu)`` for a complete A-ASSOCIATE-RQ (the
        socket is blocking again).
    """

    def __init__(self, guard: ConnectionGuard, hand_off: HandOff) -> None:
        self.guard = guard
        self.limits = guard.limits
        self.hand_off = hand_off
        self._selector = selectors.DefaultSelector()
        self._incoming: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: set[_Pending] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="scp-preassoc", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, client_address: tuple, address: str) -> None:
        """Start reading the A-ASSOCIATE-RQ of an admitted connection."""
        sock.setblocking(False)
        deadline = time.monotonic() + self.limits.preassoc_timeout
        self._incoming.put(_Pending(sock, client_address, address, deadline))
        self._wake()

    def stop(self) -> None:
        """Close every pending connection and end the thread."""
        self._stopping = True
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._pending:
                    timeout = max(0.0, min(p.deadline for p in self._pending) - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        self._take_incoming()
                    else:
                        self._read(key.data)
                self._expire()
        finally:
            for pending in list(self._pending):
                self._close(pending)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                pending = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._pending.add(pending)
            self._selector.register(pending.sock, selectors.EVENT_READ, pending)

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending if p.deadline <= now]:
            self.guard.refusals.warning(
                "connection from %s closed: no complete A-ASSOCIATE-RQ within %.1f s",
                pending.address, self.limits.preassoc_timeout)
            self._close(pending)

    def _read(self, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(pending.need - len(pending.buffer))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(pending)
            return
        pending.buffer += chunk
        if len(pending.buffer) < pending.need:
            return
        if pending.need == 6:
            self._check_header(pending)
            if pending.need > 6 or pending not in self._pending:
                return
        self._complete(pending)

    def _check_header(self, pending: _Pending) -> None:
        pdu_type, _, length = struct.unpack(">BBL", pending.buffer)
        if pdu_type != ASSOCIATE_RQ:
            known = pdu_type in VALID_PDU_TYPES
            self._abort(pending, UNEXPECTED_PDU if known else UNRECOGNISED_PDU,
                        f"its first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ")
        elif length > self.limits.max_associate_rq:
            self._abort(pending, INVALID_PARAMETER,
                        f"an A-ASSOCIATE-RQ announced {length} bytes, more than the "
                        f"{self.limits.max_associate_rq} allowed")
        else:
            pending.need = 6 + length

    def _abort(self, pending: _Pending, reason: int, why: str) -> None:
        self.guard.refusals.warning("connection from %s aborted: %s", pending.address, why)
        self._forget(pending)
        answer_and_close(pending.sock, abort_pdu(reason))

    def _forget(self, pending: _Pending) -> None:
        self._pending.discard(pending)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(pending.sock)
        self.guard.done(pending.address)

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        with contextlib.suppress(OSError):
            pending.sock.shutdown(socket.SHUT_RDWR)
        pending.sock.close()

    def _complete(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.setblocking(True)
        try:
            self.hand_off(pending.sock, pending.client_address, bytes(pending.buffer))
        except Exception:
            log.exception("association from %s could not be started", pending.address)
            pending.sock.close()
