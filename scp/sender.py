"""The SCU that sends stored instances to a remote AE by C-STORE (the send jobs' transport).

One association per attempt. Presentation contexts: for every SOP class, one
context per stored transfer syntax (so the peer cannot pick another one for it),
plus, for uncompressed or deflated data, a fallback context with explicit/implicit
VR little endian. A file goes out **as stored** (its bytes after the File Meta,
never decoded: ``_config.STORE_SEND_CHUNKED_DATASET``) whenever the peer accepted
its stored syntax; only when it accepted nothing but the fallback is the dataset
decoded and encoded again (explicit <-> implicit VR little endian, deflated ->
little endian). Compressed or big-endian data the peer does not accept as stored
fails for that instance with a clear reason; the rest of the study still goes.

TLS (``RemoteAE.tls``): a client context after PS3.15 BCP 195 (RFC 7525): TLS 1.2
or newer, ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305, the peer's
certificate checked against the AE's CA file (or the system CAs) and its host name,
and our certificate and key when the AE's files name them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial

from pydicom import dcmread
from pydicom import uid as uids
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.presentation import PresentationContext

from config import Settings
from iepnode.errors import PeerUnavailable
from iepnode.sending import Destination, ItemResult, Outgoing, Transport, failure_result

log = logging.getLogger("iepnode.sender")

#: Stored syntaxes that can be decoded and encoded again as little endian.
CONVERTIBLE = {uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian,
               uids.DeflatedExplicitVRLittleEndian}
FALLBACK = [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian]
MAX_CONTEXTS = 128
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


def _accepted(assoc) -> dict[str, set[str]]:
    accepted: dict[str, set[str]] = defaultdict(set)
    for cx in assoc.accepted_contexts:
        accepted[cx.abstract_syntax].update(cx.transfer_syntax)
    return accepted


def _send_one(assoc, item: Outgoing, accepted: dict[str, set[str]], message_id: int,
              ) -> ItemResult:
    syntaxes = accepted.get(item.sop_class, set())
    if not syntaxes:
        return ItemResult(item.item_id, False, None,
                          f"the peer accepted no context for SOP class {item.sop_class}",
                          permanent=True)
    try:
        if item.transfer_syntax in syntaxes:
            target = item.transfer_syntax
            response = assoc.send_c_store(item.path, msg_id=message_id)
        elif item.transfer_syntax in CONVERTIBLE and syntaxes & set(FALLBACK):
            target = next(ts for ts in FALLBACK if ts in syntaxes)
            dataset = dcmread(item.path)
            # Decoded: tell pynetdicom what to encode it as (it converts between
            # explicit and implicit VR little endian itself).
            dataset.file_meta.TransferSyntaxUID = target
            dataset.set_original_encoding(target == uids.ImplicitVRLittleEndian, True)
            response = assoc.send_c_store(dataset, msg_id=message_id)
        else:
            name = uids.UID(item.transfer_syntax).name
            return ItemResult(item.item_id, False, None,
                              f"stored as {name}, which the peer does not accept; "
                              f"the node converts only uncompressed data", permanent=True)
    except (OSError, ValueError, AttributeError) as exc:
        return ItemResult(item.item_id, False, None, f"cannot send the stored file: {exc}",
                          permanent=True)
    status = response.get("Status") if response is not None else None
    if status is None:
        return ItemResult(item.item_id, False, None, "no C-STORE response (association lost)")
    if status == 0x0000 or status in WARNINGS:
        if target != item.transfer_syntax:
            log.info("sent %s converted from %s to %s", item.sop_uid,
                     uids.UID(item.transfer_syntax).name, uids.UID(target).name)
        return ItemResult(item.item_id, True, int(status))
    return failure_result(item.item_id, int(status), str(response.get("ErrorComment", "")))


def send_items(destination: Destination, items: Sequence[Outgoing],
               report: Callable[[ItemResult], bool], *, calling_ae: str,
               max_pdu: int = 0, timeout: float = 60.0) -> None:
    """Send ``items`` to ``destination`` over one association (see :data:`Transport`).

    Raises
    ------
    PeerUnavailable
        No association (peer down, refused, TLS failure) or it broke mid-way.
    """
    # Send files as stored: pynetdicom reads the bytes after the File Meta and
    # sends them in P-DATA fragments without decoding (this process only sends).
    _config.STORE_SEND_CHUNKED_DATASET = True
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
    try:
        for number, item in enumerate(items):
            result = _send_one(assoc, item, accepted, number % 65535 + 1)
            if not assoc.is_established:
                if result.sent:
                    report(result)
                raise PeerUnavailable(f"{destination} dropped the association")
            if not report(result):
                break
    finally:
        if assoc.is_established:
            assoc.release()


def make_transport(settings: Settings) -> Transport:
    """The transport the node's send jobs use (calling AE = the node's AE title)."""
    return partial(send_items, calling_ae=settings.ae_title,
                   max_pdu=settings.max_pdu)
