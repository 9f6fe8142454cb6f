"""What an unauthenticated HTTP connection can hold in one HTTP worker process.

aiohttp accepts every connection and waits as long as the client likes for a request
head (a "slowloris" sending a header byte now and then keeps its connection, a file
descriptor and a task, for ever). :class:`GuardedAppRunner` serves the application
through :class:`GuardedServer`, which admits each connection as it is made:

- at most ``http_max_connections`` connections per process, and at most
  ``http_max_connections_per_address`` from one client address (a reverse proxy in
  ``[http] trusted_proxies`` is not counted per address: every connection through it
  comes from its address); beyond, the connection gets ``503 Service Unavailable`` and
  is closed before anything it sent is read;
- a connection must deliver its first request head within ``http_head_timeout``
  seconds, or it is closed (later requests on a kept-alive connection are bounded by
  aiohttp's keep-alive timeout and its header size limits).

Refusals are logged at most once per kind every 10 s.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from iepnode.logs import RateLimitedLog
from web.proxies import IPNetwork, parse_address

log = logging.getLogger("iepnode.web")

#: What a refused connection is told (then closed).
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Retry-After: 5\r\nConnection: close\r\nContent-Length: 52\r\n\r\n"
        b"Too many connections from your address: retry soon.")


@dataclass(frozen=True)
class HttpLimits:
    """The bounds one HTTP process enforces (see the module docstring)."""

    max_connections: int
    max_connections_per_address: int
    head_timeout: float
    trusted_proxies: tuple[str, ...] = ()

    @functools.cached_property
    def _networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)

    def exempt(self, address: str) -> bool:
        """Whether ``address`` is a trusted proxy (not limited per address)."""
        ip = parse_address(address)
        return ip is not None and any(ip in network for network in self._networks)


def _address(transport: asyncio.BaseTransport) -> str:
    """The client's address as :func:`web.proxies.parse_address` reads it (IPv4-mapped
    IPv6 as IPv4), or the raw text when it is not an IP address."""
    peer = transport.get_extra_info("peername")
    host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
    ip = parse_address(f"[{host}]" if ":" in host else host)
    return str(ip) if ip is not None else host


class GuardedServer(web.Server):
    """aiohttp's connection manager, admitting connections within :class:`HttpLimits`.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`aiohttp.web.Server`.
    limits : HttpLimits
        The bounds.
    """

    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._admitted: dict[RequestHandler, str] = {}
        self._per_address: Counter[str] = Counter()
        self._quiet = RateLimitedLog(log)

    def connection_made(self, handler: RequestHandler,
                        transport: asyncio.Transport) -> None:
        """Count the new connection, or answer 503 and close it."""
        loop = asyncio.get_running_loop()
        address = _address(transport)
        limits = self.limits
        counted = not limits.exempt(address)
        if len(self._admitted) >= limits.max_connections:
            why = f"{len(self._admitted)} connections are open"
        elif counted and self._per_address[address] >= limits.max_connections_per_address:
            why = f"{self._per_address[address]} connections from it are open"
        else:
            self._admitted[handler] = address if counted else ""
            if counted:
                self._per_address[address] += 1
            super().connection_made(handler, transport)
            loop.call_later(limits.head_timeout, self._check_head, handler, transport)
            return
        self._quiet.warning("HTTP connection from %s refused: %s", address, why)
        transport.write(BUSY)
        transport.close()

    def connection_lost(self, handler: RequestHandler,
                        exc: BaseException | None = None) -> None:
        """Forget the connection (if it was admitted)."""
        address = self._admitted.pop(handler, None)
        if address is None:
            return
        if address:
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]
        super().connection_lost(handler, exc)

    def _check_head(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Close a connection that has not delivered its first request head in time."""
        # aiohttp counts a request once its head is parsed (RequestHandler.data_received).
        if handler in self._admitted and not handler._request_count and \
                not transport.is_closing():
            self._quiet.warning("HTTP connection from %s closed: no request within %.0f s",
                                self._admitted[handler] or _address(transport),
                                self.limits.head_timeout)
            transport.abort()


class GuardedAppRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` serving through a :class:`GuardedServer`.

    Start-up and clean-up are AppRunner's: ``setup()`` runs the application's start-up
    (its ``cleanup_ctx`` generators up to their ``yield``), ``cleanup()`` unwinds them.

    Parameters
    ----------
    app : aiohttp.web.Application
        The application.
    limits : HttpLimits
        The connection bounds.
    **kwargs
        As for :class:`aiohttp.web.AppRunner`.
    """

    def __init__(self, app: web.Application, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        # As AppRunner._make_server, with the guarded connection manager.
        loop = asyncio.get_running_loop()
        app = self._app
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        return GuardedServer(app._handle, request_factory=app._make_request, loop=loop,
                             limits=self._limits, **self._kwargs)
