"""The SCP's association server: pynetdicom behind :mod:`scp.admission`.

A connection reaches pynetdicom only once its whole A-ASSOCIATE-RQ has been read
within the limits (:class:`~scp.admission.PreAssociationReader`). From then on its
DUL is a :class:`GuardedDUL`: it starts from the request already read and reads
every later PDU bounded and with a deadline, where pynetdicom trusts the 4-byte
length and blocks in ``recv`` for as long as the peer likes:

- a P-DATA-TF may be as long as the maximum PDU the node announced (``max_pdu``),
  other PDUs (release, abort) a few bytes; a longer one is answered with A-ABORT and
  the connection closed before its body is read;
- a PDU whose first byte came must be complete within the network timeout;
- the body goes straight into one buffer of the announced size (``recv_into``),
  not 4 KiB pieces joined together.

Every request of an accepted association gets an answer
(:func:`scp.answers.answer_every_request`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import select
import socket
import socketserver
import struct
import threading
import time

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from scp.admission import (
    INVALID_PARAMETER,
    P_DATA_TF,
    VALID_PDU_TYPES,
    ConnectionGuard,
    ConnectionLimits,
    PreAssociationReader,
    abort_pdu,
    peer_address,
    refuse,
)
from scp.answers import answer_every_request

log = logging.getLogger("iepnode.scp")

#: Release, abort and (unexpected) association PDUs after the request stay this small.
SMALL_PDU = 1 << 16
#: Seconds between two garbage collections run by the accepting thread.
GC_EVERY = 30.0


class _Closed(Exception):
    """The peer closed the connection, or the read's deadline passed."""


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL, fed the A-ASSOCIATE-RQ already read, then reading bounded PDUs.

    pynetdicom builds the DUL inside ``Association.__init__``;
    :meth:`GuardedRequestHandler._create_association` turns that instance into this
    class and calls :meth:`guard_with`. Only the reading of PDUs is overridden
    (:meth:`_is_transport_event` to deliver the request read beforehand, and
    :meth:`_read_pdu_data`); the state machine, timers and decoding are pynetdicom's.
    """

    _limits: ConnectionLimits
    _first: bytes | None
    _address: str

    def guard_with(self, limits: ConnectionLimits, first_pdu: bytes, address: str) -> None:
        """Bind the limits and the A-ASSOCIATE-RQ already read (before the reactor starts)."""
        self._limits = limits
        self._first = first_pdu
        self._address = address

    def _is_transport_event(self) -> bool:
        if self._first is not None:
            self._read_pdu_data()
            return True
        return super()._is_transport_event()

    def _recv_exact(self, sock: socket.socket, view: memoryview, deadline: float | None) -> None:
        """Fill ``view`` from ``sock`` before ``deadline`` (monotonic; ``None``: no limit)."""
        previous = sock.gettimeout()
        try:
            got = 0
            while got < len(view):
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _Closed("timed out")
                    sock.settimeout(remaining)
                try:
                    n = sock.recv_into(view[got:])
                except OSError as exc:  # TimeoutError included
                    raise _Closed(str(exc)) from exc
                if n == 0:
                    raise _Closed("closed by the peer")
                got += n
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def _read_pdu(self) -> bytearray | None:
        """The next PDU from the socket, or ``None`` after an abort for its length."""
        assert self.socket is not None and self.socket.socket is not None
        sock = self.socket.socket
        timeout = self.network_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        header = bytearray(6)
        self._recv_exact(sock, memoryview(header), deadline)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in VALID_PDU_TYPES:
            return header  # Evt19 follows: nothing of an unknown PDU is read or kept
        limit = self._limits.max_pdu if pdu_type == P_DATA_TF else SMALL_PDU
        if length > limit:
            log.warning("association from %s aborted: a PDU of type 0x%02X announced %d "
                        "bytes, more than the %d allowed", self._address, pdu_type, length,
                        limit)
            with contextlib.suppress(OSError):
                sock.send(abort_pdu(INVALID_PARAMETER))
            self.socket.close()  # Evt17: transport closed
            return None
        pdu = bytearray(6 + length)
        pdu[:6] = header
        self._recv_exact(sock, memoryview(pdu)[6:], deadline)
        return pdu

    def _read_pdu_data(self) -> None:
        """Read one PDU from the peer (bounded, within its deadline) and queue its event.

        **Events** as pynetdicom's: Evt3/4/6/10/12/13/16 for a decoded PDU, Evt17 when
        the connection closed or timed out, Evt19 for an unknown or undecodable PDU.
        """
        if self._first is not None:
            pdu: bytearray | bytes | None = self._first
            self._first = None
        else:
            try:
                pdu = self._read_pdu()
            except _Closed as exc:
                if self.state_machine.current_state != "Sta13":
                    log.info("association from %s: connection lost (%s)", self._address, exc)
                self.event_queue.put("Evt17")
                return
            if pdu is None:
                return
        if pdu[0] not in VALID_PDU_TYPES:
            log.warning("association from %s: unknown PDU type 0x%02X", self._address, pdu[0])
            self.event_queue.put("Evt19")
            return
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception as exc:
            log.warning("association from %s: undecodable PDU of type 0x%02X: %s",
                        self._address, pdu[0], exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)


class PollingSocket(AssociationSocket):
    """pynetdicom's socket wrapper, asking ``poll()`` instead of ``select()``.

    ``select()`` cannot watch a descriptor numbered 1024 or more (``ValueError``),
    which pynetdicom turns into "transport closed": a worker with many open files and
    connections would abort its associations.
    """

    _poller: select.poll | None = None

    @property
    def ready(self) -> bool:
        """``True`` if data (or the peer's close) is waiting to be read."""
        if self.socket is None or self._is_connected is False:
            return False
        try:
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(self.socket, select.POLLIN | select.POLLPRI)
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: transport connection closed
            return False


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, giving each association a :class:`GuardedDUL`."""

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        first_pdu = self.server.take_first_pdu(self.request)
        dul = assoc.dul
        assert dul.socket is not None
        dul.socket.__class__ = PollingSocket
        dul.__class__ = GuardedDUL
        assert isinstance(dul, GuardedDUL)
        dul.guard_with(self.server.guard.limits, first_pdu, peer_address(self.client_address))
        answer_every_request(assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """An association server that admits connections as :mod:`scp.admission` says.

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

    #: The listen backlog (socketserver's default is 5: a burst of connections beyond
    #: it waits for the client's SYN retry, a second or more, legitimate peers too).
    request_queue_size = 256

    def __init__(self, *args: object, guard: ConnectionGuard, **kwargs: object) -> None:
        self.guard = guard
        self._first_pdus: dict[int, bytes] = {}
        self._last_gc = time.monotonic()
        self._lock = threading.Lock()
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reader = PreAssociationReader(guard, self._hand_off)

    def server_bind(self) -> None:
        """Bind with ``SO_REUSEPORT`` so that every worker listens on the same port."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: tuple) -> None:
        """Admit the connection (its request is then read apart) or refuse it at once."""
        address = peer_address(client_address)
        if self.guard.admit(address):
            self.reader.add(request, client_address, address)
        else:
            refuse(request)

    def _hand_off(self, request: socket.socket, client_address: tuple, pdu: bytes) -> None:
        """Serve a connection whose A-ASSOCIATE-RQ has arrived, in its own thread."""
        with self._lock:
            self._first_pdus[id(request)] = pdu
        try:
            super().process_request(request, client_address)
        except Exception:
            self.take_first_pdu(request)
            raise

    def service_actions(self) -> None:
        """Collect garbage every :data:`GC_EVERY` seconds, not every 60 connections.

        pynetdicom runs ``gc.collect()`` after every 60th connection (dead association
        threads were not collected otherwise); under a flood of refused connections
        that was most of a worker's CPU.
        """
        now = time.monotonic()
        if now - self._last_gc >= GC_EVERY:
            self._last_gc = now
            gc.collect()

    def take_first_pdu(self, request: socket.socket) -> bytes:
        """The A-ASSOCIATE-RQ read for ``request`` (once)."""
        with self._lock:
            return self._first_pdus.pop(id(request))

    def shutdown(self) -> None:
        """Stop accepting, close pending connections and the listening socket.

        pynetdicom's own ``shutdown`` also removes the server from the AE's list of
        servers it started itself, which this one is not in (``ValueError``).
        """
        socketserver.BaseServer.shutdown(self)
        self.reader.stop()
        self.server_close()
