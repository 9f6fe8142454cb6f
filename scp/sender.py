"""The SCU that sends stored instances to a remote AE by C-STORE (the send jobs' transport).

One association per attempt. Presentation contexts: for every SOP class, one
context per stored transfer syntax (so the peer cannot pick another one for it),
plus, for uncompressed or deflated data, a fallback context with explicit/implicit
VR little endian. A file goes out **as stored** (its bytes after the File Meta,
never decoded) whenever the peer accepted its stored syntax (deflated data is
deflated anew: a stored deflate stream may have an odd length, which a PDV may
not); only when it accepted nothing but the
fallback is the dataset decoded and encoded again (explicit <-> implicit VR
little endian, deflated -> little endian). Compressed or big-endian data the peer
does not accept as stored fails for that instance with a clear reason; the rest of
the study still goes.

TLS (``RemoteAE.tls``): a client context after PS3.15 BCP 195 (RFC 7525): TLS 1.2
or newer, ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305, the peer's
certificate checked against the AE's CA file (or the system CAs) and its host name,
and our certificate and key when the AE's files name them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from io import BytesIO

from pydicom import dcmread
from pydicom import uid as uids
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import PresentationContext

from config import Settings
from iepnode.archive.ingest import parse_file_meta
from iepnode.errors import NodeError, PeerUnavailable
from iepnode.outbound.sending import (
    DROPPED,
    Destination,
    ItemResult,
    Outgoing,
    Transport,
    failure_result,
)

log = logging.getLogger("iepnode.sender")

#: Stored syntaxes that can be decoded and encoded again as little endian.
CONVERTIBLE = {uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian,
               uids.DeflatedExplicitVRLittleEndian}
FALLBACK = [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian]
MAX_CONTEXTS = 128
#: How long pynetdicom's DUL thread naps between socket polls while a job sends.
DUL_POLL_SECONDS = 0.0002
#: BCP 195 (RFC 7525 4.2) cipher suites for TLS 1.2; TLS 1.3 suites are all AEAD.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
#: C-STORE statuses that mean stored: Success and the Warnings (PS3.4 B.2.3).
WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}


def propose(items: Sequence[Outgoing]) -> list[PresentationContext]:
    """The presentation contexts to propose for ``items`` (at most 128).

    Exact (SOP class, stored syntax) contexts come first; fallbacks are dropped
    first when there are too many kinds of objects.
    """
    stored: dict[str, set[str]] = defaultdict(set)
    for item in items:
        stored[item.sop_class].add(item.transfer_syntax)
    exact = [build_context(sop_class, [ts]) for sop_class in sorted(stored)
             for ts in sorted(stored[sop_class])]
    fallback = []
    for sop_class in sorted(stored):
        if stored[sop_class] & CONVERTIBLE:
            extra = [ts for ts in FALLBACK if ts not in stored[sop_class]]
            if extra:
                fallback.append(build_context(sop_class, extra))
    return (exact + fallback)[:MAX_CONTEXTS]


def tls_context(destination: Destination) -> ssl.SSLContext:
    """A BCP 195 client TLS context for ``destination``.

    Raises
    ------
    PeerUnavailable
        A CA, certificate or key file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=destination.tls_ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(BCP195_CIPHERS)
        if destination.tls_cert:
            context.load_cert_chain(destination.tls_cert, destination.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise PeerUnavailable(f"TLS files for {destination.ae_title} cannot be used: "
                              f"{exc}") from exc
    return context


def _nodelay(event: evt.Event) -> None:
    # Debian's dcmtk needs TCP_NODELAY=1 for the same reason: a C-STORE is several
    # small writes, and Nagle's algorithm would hold them back for the peer's ACK.
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _accepted(assoc) -> dict[str, dict[str, int]]:
    """SOP class -> accepted transfer syntax -> presentation context ID."""
    accepted: dict[str, dict[str, int]] = defaultdict(dict)
    for cx in assoc.accepted_contexts:
        for ts in cx.transfer_syntax:
            accepted[cx.abstract_syntax].setdefault(ts, cx.context_id)
    return accepted


class _Parked:
    """Keep the association's reactor thread parked while this SCU sends.

    pynetdicom 3.0's ``send_c_store`` pauses the reactor per message but can let it
    take a fast peer's response off the DIMSE queue between two messages ("Received
    unexpected C-STORE service message"): the sender then waits for the DIMSE
    timeout and the association is aborted (seen against storescp about once in a
    few hundred instances). Parked for the whole run, the reactor never competes
    for responses; the DUL thread still moves the PDUs. (Private attributes: the
    same ones ``send_c_store`` uses.)
    """

    def __init__(self, assoc) -> None:
        self.assoc = assoc

    def __enter__(self) -> _Parked:
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused and self.assoc.is_established:
            time.sleep(0.0001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.assoc._reactor_checkpoint.set()


def _write(assoc, request: C_STORE, context_id: int) -> None:
    """Send a C-STORE request's PDUs.

    On plain TCP the P-DATA-TF PDUs (encoded by pynetdicom's own classes) are
    written to the socket from this thread in one ``sendall``: going through the
    DUL thread costs a queue hand-off and a state machine pass per PDU, and that
    path measured ~200 instances/s against storescp where this one gives ~340.
    Nothing else writes meanwhile (the reactor is parked; the DUL thread only
    reads). Over TLS (an SSL object must not be read and written from two threads
    at once) the DUL thread does the writing.
    """
    if isinstance(assoc.dul.socket.socket, ssl.SSLSocket):
        assoc.dimse.send_msg(request, context_id)
        return
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context_id, assoc.acceptor.maximum_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    assoc.dul.socket.socket.sendall(b"".join(pdus))


def _response(assoc, timeout: float):
    """The next DIMSE message, or ``None`` if the association ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, message = assoc.dimse.msg_queue.get(timeout=0.2)
        except queue.Empty:
            if not assoc.dul.is_alive() or assoc.dul.peek_next_pdu() is not None:
                return None  # aborted or released by the peer
            continue
        return message
    return None


def _dataset_stream(item: Outgoing, target: str) -> bytes:
    """The encoded dataset to send: the stored bytes, or the dataset encoded anew."""
    if target == item.transfer_syntax and target != uids.DeflatedExplicitVRLittleEndian:
        with item.open() as fh:
            data = fh.read()
        _, offset = parse_file_meta(data)
        return data[offset:]
    # Deflated data is deflated anew (a stored deflate stream may have an odd length,
    # which a PDV may not); uncompressed data is converted to the accepted syntax.
    ts = uids.UID(target)
    with item.open() as fh:
        dataset = dcmread(fh)
    encoded = encode(dataset, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if encoded is None:
        raise ValueError(f"cannot encode the dataset as {ts.name}")
    return encoded


def _send_one(assoc, item: Outgoing, accepted: dict[str, dict[str, int]], message_id: int,
              timeout: float) -> ItemResult:
    syntaxes = accepted.get(item.sop_class, {})
    if item.transfer_syntax in syntaxes:
        target = item.transfer_syntax
    elif item.transfer_syntax in CONVERTIBLE and syntaxes.keys() & set(FALLBACK):
        target = next(ts for ts in FALLBACK if ts in syntaxes)
    elif not syntaxes and item.transfer_syntax in CONVERTIBLE:
        return ItemResult(item.item_id, False, None,
                          f"the peer does not accept {uids.UID(item.sop_class).name}",
                          permanent=True)
    else:
        name = uids.UID(item.transfer_syntax).name
        return ItemResult(item.item_id, False, None,
                          f"stored as {name}, which the peer does not accept; "
                          f"the node converts only uncompressed data", permanent=True)
    try:
        stream = _dataset_stream(item, target)
    except (OSError, ValueError, AttributeError, NodeError) as exc:
        return ItemResult(item.item_id, False, None, f"cannot read the stored file: {exc}",
                          permanent=True)
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2
    request.AffectedSOPClassUID = item.sop_class
    request.AffectedSOPInstanceUID = item.sop_uid
    request.DataSet = BytesIO(stream)
    _write(assoc, request, syntaxes[target])
    response = _response(assoc, timeout)
    status = getattr(response, "Status", None) if response is not None else None
    if status is None:
        return ItemResult(item.item_id, False, None, DROPPED)
    if status == 0x0000 or status in WARNINGS:
        if target != item.transfer_syntax:
            log.info("sent %s converted from %s to %s", item.sop_uid,
                     uids.UID(item.transfer_syntax).name, uids.UID(target).name)
        return ItemResult(item.item_id, True, int(status))
    return failure_result(item.item_id, int(status), str(getattr(response, "ErrorComment", "")
                                                         or ""))


def send_items(destination: Destination, items: Sequence[Outgoing],
               report: Callable[[ItemResult], bool], *, calling_ae: str,
               max_pdu: int = 0, timeout: float = 60.0) -> None:
    """Send ``items`` to ``destination`` over one association (see :data:`Transport`).

    Raises
    ------
    PeerUnavailable
        No association (peer down, refused, TLS failure) or it broke mid-way.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 15.0)
    ae.requested_contexts = propose(items)
    tls_args = (tls_context(destination), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         max_pdu=max_pdu, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        why = ("rejected the association" if assoc.is_rejected
               else "aborted the association" if assoc.is_aborted
               else "cannot be reached")
        raise PeerUnavailable(f"{destination} {why}")
    accepted = _accepted(assoc)
    # The DUL thread polls the socket for responses, sleeping between polls (1 ms
    # by default): a shorter nap answers each C-STORE sooner while the job runs.
    assoc.dul._run_loop_delay = DUL_POLL_SECONDS
    try:
        with _Parked(assoc):
            for number, item in enumerate(items):
                result = _send_one(assoc, item, accepted, number % 65535 + 1, timeout)
                if result.error == DROPPED:
                    report(result)
                    raise PeerUnavailable(f"{destination} dropped the association")
                if not report(result):
                    break
    finally:
        assoc.dul._run_loop_delay = 0.001
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def make_transport(settings: Settings) -> Transport:
    """The transport the node's send jobs use (calling AE = the node's AE title)."""
    return partial(send_items, calling_ae=settings.ae_title,
                   max_pdu=settings.max_pdu)
