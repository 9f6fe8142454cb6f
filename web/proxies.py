"""The client's address and scheme behind trusted reverse proxies (``[http] trusted_proxies``).

A reverse proxy (nginx, HAProxy, a load balancer) connects to the node itself and
says who its client was in ``X-Forwarded-For`` (each proxy appends the address it
was connected from) and which scheme the client used in ``X-Forwarded-Proto``.
Anyone can send those headers, so they are believed only when the TCP peer is a
trusted proxy; then the client is the right-most ``X-Forwarded-For`` address that
is not itself a trusted proxy (addresses left of it were written by the client and
prove nothing). From any other peer the headers are ignored: a client cannot
choose the address the audit trail records.

aiohttp-remotes was considered: its ``XForwardedStrict`` wants a fixed number of
proxy hops and answers 400 to direct clients, and its ``XForwardedFiltered``
believes the headers whatever the TCP peer is; neither is the rule above.

The middleware applying the rule to each request is
:func:`web.middlewares.trusted_proxies`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Forwarded:
    """What a request says about its client once the proxy headers are weighed."""

    remote: str
    scheme: str | None


def parse_address(text: str) -> IPAddress | None:
    """An address from a header entry (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:443``), or None.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``, as a dual-stack socket reports
    IPv4 peers) become plain IPv4 addresses.
    """
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in networks)


def forwarded(peer: str, forwarded_for: Iterable[str], forwarded_proto: Iterable[str],
              networks: Sequence[IPNetwork]) -> Forwarded:
    """The client address and scheme of a request from ``peer``.

    Parameters
    ----------
    peer : str
        The TCP peer's address.
    forwarded_for, forwarded_proto : iterable of str
        The ``X-Forwarded-For`` / ``X-Forwarded-Proto`` header values, in order
        (several headers count as one comma-separated list).
    networks : sequence of ip_network
        The trusted proxies.

    Returns
    -------
    Forwarded
        ``peer`` and no scheme unless the peer is trusted. Behind trusted proxies:
        the right-most forwarded address that is not a trusted proxy (the left-most
        when all are; the last trusted hop when an entry is not an address), and the
        right-most ``X-Forwarded-Proto`` value when it is ``http`` or ``https``.
    """
    hop = parse_address(peer)
    if hop is None or not _trusted(hop, networks):
        return Forwarded(peer, None)
    entries = [e for value in forwarded_for for e in value.split(",") if e.strip()]
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        hop = address
        if not _trusted(address, networks):
            break
    protos = [p.strip().lower() for value in forwarded_proto for p in value.split(",")
              if p.strip()]
    scheme = protos[-1] if protos and protos[-1] in _SCHEMES else None
    return Forwarded(str(hop), scheme)

