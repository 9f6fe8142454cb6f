"""What a peer can make an SCP worker do before (and outside) an accepted association.

pynetdicom reads a PDU by trusting its 4-byte length (a header claiming 4 GB makes it
buffer whatever follows) and with a blocking ``recv`` that no timer can interrupt
(one byte, then silence, holds an association slot for as long as the peer likes).
Every TCP connection from anywhere reaches that code before the calling AE title is
checked, so this module bounds it:

- **Admission** (:class:`ConnectionGuard`, used by :class:`GuardedServer` when it
  accepts): each worker counts *pending* connections, those whose A-ASSOCIATE-RQ has
  not fully arrived, in all and per peer address. Beyond ``dicom_max_pending`` or
  ``dicom_max_pending_per_address`` a new connection is refused at once with
  A-ASSOCIATE-RJ (transient, local limit exceeded), before a byte of it is read, so one
  address cannot take the slots of the registered peers.
- **Reads** (:class:`GuardedDUL`, the DUL of every accepted connection): a PDU larger
  than allowed is answered with A-ABORT and the connection closed before its body is
  read (an A-ASSOCIATE-RQ may be ``dicom_max_associate_rq`` bytes; after acceptance a
  P-DATA-TF may be the node's negotiated maximum PDU, other PDUs a few bytes). A PDU
  is read with a deadline: the whole A-ASSOCIATE-RQ within ``dicom_preassoc_timeout``
  seconds of the connection (the ARTIM timer's job, which pynetdicom cannot do while
  its thread is blocked in ``recv``), later PDUs within the network timeout once their
  first byte came. Bodies go straight into one buffer of the announced size
  (``recv_into``), not 4 KiB pieces joined together.

The counts are per SCP worker process (the kernel spreads connections over the
workers): with ``dicom_workers`` workers, one address can hold at most
``dicom_workers x dicom_max_pending_per_address`` unfinished connections, each for at
most ``dicom_preassoc_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from scp.answers import answer_every_request

log = logging.getLogger("iepnode.scp")

#: PDU types (PS3.8 9.3): A-ASSOCIATE-RQ and P-DATA-TF; 1-7 are the valid ones.
ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
VALID_PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ASSOCIATE-RJ: rejected-transient (2), service-provider presentation related (3),
#: local-limit-exceeded (2).
LIMIT_REJECT = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x02, 0x03, 0x02)
#: A-ABORT diagnostic "invalid-PDU-parameter value" (PS3.8 9.3.8), from the provider (2).
ABORT_INVALID_PARAMETER = 0x06
#: Release, abort and the association PDUs other than the request stay this small.
SMALL_PDU = 1 << 16
#: Seconds between two log lines about refused connections (the rest are counted).
LOG_EVERY = 10.0


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


@dataclass(eq=False)
class Ticket:
    """One admitted connection: its address and whether it still counts as pending."""

    address: str
    admitted_at: float = field(default_factory=time.monotonic)
    pending: bool = True
    released: bool = False


class _RateLimitedLog:
    """Log a warning at most every :data:`LOG_EVERY` seconds, counting the rest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < LOG_EVERY:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            message += f" (and {suppressed} more since the last such line)"
        log.warning(message, *args)


def peer_address(client_address: object) -> str:
    """The address part of a socket peer name, IPv4-mapped IPv6 shown as IPv4."""
    host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


class ConnectionGuard:
    """Count one worker's pending connections and decide whether a new one may start.

    Parameters
    ----------
    limits : ConnectionLimits
        The bounds.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._refusals = _RateLimitedLog()
        #: Warnings about connections that never became associations (rate limited: an
        #: attacker must not be able to fill the log).
        self.preassoc_log = _RateLimitedLog()

    @property
    def pending(self) -> int:
        """Connections admitted whose A-ASSOCIATE-RQ has not fully arrived."""
        with self._lock:
            return sum(self._pending.values())

    def admit(self, address: str) -> Ticket | None:
        """Admit a new connection from ``address``, or return ``None`` to refuse it."""
        with self._lock:
            total = sum(self._pending.values())
            if total >= self.limits.max_pending:
                reason = f"{total} connections are already waiting to associate"
            elif self._pending[address] >= self.limits.max_pending_per_address:
                reason = f"{self._pending[address]} connections from it are already waiting"
            else:
                self._pending[address] += 1
                return Ticket(address)
        self._refusals.warning("connection from %s refused: %s (local limit exceeded)",
                               address, reason)
        return None

    def associate_rq_received(self, ticket: Ticket) -> None:
        """The connection's A-ASSOCIATE-RQ has fully arrived: it no longer counts as pending."""
        with self._lock:
            if ticket.pending and not ticket.released:
                ticket.pending = False
                self._release_pending(ticket.address)

    def release(self, ticket: Ticket) -> None:
        """The connection is gone (idempotent)."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            if ticket.pending:
                ticket.pending = False
                self._release_pending(ticket.address)

    def _release_pending(self, address: str) -> None:
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]


class _Closed(Exception):
    """The peer closed the connection, or the read's deadline passed."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "closed")
        self.timed_out = timed_out


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with bounded, deadline-limited PDU reads (module docstring).

    pynetdicom builds the DUL inside ``Association.__init__``;
    :meth:`GuardedRequestHandler._create_association` turns that instance into this
    class and calls :meth:`guard_with`. Only :meth:`_read_pdu_data` (the one place bytes
    are read from the peer) and :meth:`run_reactor` (to release the ticket when the
    connection ends) are overridden; the state machine, timers and decoding are
    pynetdicom's.
    """

    _guard: ConnectionGuard
    _ticket: Ticket

    def guard_with(self, guard: ConnectionGuard, ticket: Ticket) -> None:
        """Bind the guard and this connection's ticket (before the reactor starts)."""
        self._guard = guard
        self._ticket = ticket

    def run_reactor(self) -> None:
        """Run pynetdicom's reactor; release the connection's ticket when it ends."""
        try:
            super().run_reactor()
        finally:
            self._guard.release(self._ticket)

    def _recv_exact(self, sock: socket.socket, view: memoryview, deadline: float | None) -> None:
        """Fill ``view`` from ``sock`` before ``deadline`` (monotonic; ``None``: no limit)."""
        previous = sock.gettimeout()
        try:
            got = 0
            while got < len(view):
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _Closed(timed_out=True)
                    sock.settimeout(remaining)
                try:
                    n = sock.recv_into(view[got:])
                except TimeoutError as exc:
                    raise _Closed(timed_out=True) from exc
                except OSError as exc:
                    raise _Closed(timed_out=False) from exc
                if n == 0:
                    raise _Closed(timed_out=False)
                got += n
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def _deadline(self) -> float | None:
        """When the PDU now arriving must be complete."""
        if self._ticket.pending:
            return self._ticket.admitted_at + self._guard.limits.preassoc_timeout
        timeout = self.network_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _limit(self, pdu_type: int) -> int:
        """The largest length field allowed for a PDU of ``pdu_type`` now."""
        limits = self._guard.limits
        if self._ticket.pending:
            return limits.max_associate_rq if pdu_type == ASSOCIATE_RQ else SMALL_PDU
        return limits.max_pdu if pdu_type == P_DATA_TF else SMALL_PDU

    def _warn(self, message: str, *args: object) -> None:
        """Log a warning; rate limited while the peer has not sent its A-ASSOCIATE-RQ."""
        if self._ticket.pending:
            self._guard.preassoc_log.warning(message, *args)
        else:
            log.warning(message, *args)

    def _abort(self, reason: str) -> None:
        """Send A-ABORT (invalid PDU parameter) and close, reading nothing more."""
        self._warn("connection from %s aborted: %s", self._ticket.address, reason)
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = ABORT_INVALID_PARAMETER
        self.socket.send(pdu.encode())  # type: ignore[union-attr]
        self._guard.release(self._ticket)
        self.socket.close()  # type: ignore[union-attr]  # Evt17: transport closed

    def _read_pdu_data(self) -> None:
        """Read one PDU from the peer: bounded length, within its deadline.

        **Events** as pynetdicom's: Evt3/4/6/10/12/13/16 for a decoded PDU, Evt17 when
        the connection closed, Evt18 (ARTIM expired) when the A-ASSOCIATE-RQ did not
        arrive in time, Evt19 for an unknown or undecodable PDU.
        """
        assert self.socket is not None and self.socket.socket is not None
        sock = self.socket.socket
        deadline = self._deadline()
        header = bytearray(6)
        try:
            self._recv_exact(sock, memoryview(header), deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in VALID_PDU_TYPES:
                self._warn("connection from %s: unknown PDU type 0x%02X", self._ticket.address,
                           pdu_type)
                self.event_queue.put("Evt19")
                return
            limit = self._limit(pdu_type)
            if length > limit:
                self._abort(f"a PDU of type 0x{pdu_type:02X} announced {length} bytes, "
                            f"more than the {limit} allowed")
                return
            pdu = bytearray(6 + length)
            pdu[:6] = header
            self._recv_exact(sock, memoryview(pdu)[6:], deadline)
        except _Closed as exc:
            if exc.timed_out and self._ticket.pending:
                self._warn("connection from %s closed: no complete A-ASSOCIATE-RQ within %.1f s",
                           self._ticket.address, self._guard.limits.preassoc_timeout)
                self.event_queue.put("Evt18")  # as the ARTIM timer would
            else:
                self.event_queue.put("Evt17")
            return
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:
            self._warn("connection from %s: undecodable PDU of type 0x%02X: %s",
                       self._ticket.address, pdu_type, exc)
            self.event_queue.put("Evt19")
            return
        if pdu_type == ASSOCIATE_RQ:
            self._guard.associate_rq_received(self._ticket)
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, giving each association a :class:`GuardedDUL`.

    It also makes every request of the association answered
    (:func:`scp.answers.answer_every_request`).
    """

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        ticket = self.server.take_ticket(self.request)
        dul = assoc.dul
        dul.__class__ = GuardedDUL
        assert isinstance(dul, GuardedDUL)
        dul.guard_with(self.server.guard, ticket)
        answer_every_request(assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """An association server that admits connections through a :class:`ConnectionGuard`.

    Its socket shares the port with the other workers (``SO_REUSEPORT``).

    Parameters
    ----------
    *args
        As for pynetdicom's ``ThreadedAssociationServer``.
    guard : ConnectionGuard
        The worker's guard.
    **kwargs
        As for pynetdicom's ``ThreadedAssociationServer``.
    """

    def __init__(self, *args: object, guard: ConnectionGuard, **kwargs: object) -> None:
        self.guard = guard
        self._tickets: dict[int, Ticket] = {}
        self._tickets_lock = threading.Lock()
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        """Bind with ``SO_REUSEPORT`` so that every worker listens on the same port."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: tuple[str, int]) -> None:
        """Admit the connection (then serve it in its own thread) or refuse it at once."""
        ticket = self.guard.admit(peer_address(client_address))
        if ticket is None:
            _refuse(request)
            return
        with self._tickets_lock:
            self._tickets[id(request)] = ticket
        try:
            super().process_request(request, client_address)
        except Exception:
            self.take_ticket(request)
            self.guard.release(ticket)
            raise

    def take_ticket(self, request: socket.socket) -> Ticket:
        """The ticket :meth:`process_request` gave ``request`` (once)."""
        with self._tickets_lock:
            return self._tickets.pop(id(request))

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket.

        pynetdicom's own ``shutdown`` also removes the server from the AE's list of
        servers it started itself, which this one is not in (``ValueError``).
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _refuse(request: socket.socket) -> None:
    """Answer A-ASSOCIATE-RJ (local limit exceeded) without reading the request; close.

    Whatever the peer already sent is read without waiting before the close, so that
    the kernel does not answer it with a reset that could discard the rejection.
    """
    try:
        request.setblocking(False)
        request.send(LIMIT_REJECT)
        request.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not request.recv(1 << 16):
                break
    except OSError:
        pass
    finally:
        request.close()
