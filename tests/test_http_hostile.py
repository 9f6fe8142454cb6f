"""Hostile HTTP clients: connections and slow request heads, over raw sockets.

The real ``iepnode serve`` (one HTTP worker); attackers connect from 127.0.0.2 and
127.0.0.3, the well-behaved client from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import RunningNode, running_node, wait_for


@pytest.fixture
def http_node(tmp_path: Path) -> Iterator[RunningNode]:
    config = tmp_path / "iepnode.toml"
    config.write_text("[http]\nmax_connections = 6\nmax_connections_per_address = 4\n"
                      "head_timeout = 2.0\n", encoding="utf-8")
    with running_node(tmp_path / "node", workers=1, extra=["--config", str(config)]) as node:
        yield node


def _connect(node: RunningNode, source: str) -> socket.socket:
    return socket.create_connection((node.host, node.http_port), timeout=10,
                                    source_address=(source, 0))


def _answer(sock: socket.socket, within: float = 2.0) -> bytes:
    """What ``sock`` receives within ``within`` seconds (b"" if nothing, or closed)."""
    ready, _, _ = select.select([sock], [], [], within)
    if not ready:
        return b""
    with contextlib.suppress(OSError):
        return sock.recv(4096)
    return b""


def _healthz(node: RunningNode) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/healthz",
                                     headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _closed(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0.05)
    if not ready:
        return False
    try:
        return sock.recv(4096) == b""
    except OSError:
        return True


def test_connections_from_one_address_are_limited(http_node: RunningNode) -> None:
    held = [_connect(http_node, "127.0.0.2") for _ in range(4)]
    try:
        # The kernel hands connections to the worker in the order they were made, so
        # the fifth is admitted (or not) after the four.
        extra = _connect(http_node, "127.0.0.2")
        with extra:
            answer = _answer(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert _healthz(http_node) == 200  # another address is served at once
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: "HTTP connection from 127.0.0.2 refused" in http_node.log_text,
             what="the refusal in the log")


def test_connections_are_limited_in_all(http_node: RunningNode) -> None:
    held = [_connect(http_node, "127.0.0.2") for _ in range(4)]
    held += [_connect(http_node, "127.0.0.3") for _ in range(2)]
    try:
        with _connect(http_node, "127.0.0.4") as extra:
            assert _answer(extra).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _healthz(http_node) == 200, what="room again once they closed")


def test_a_slow_request_head_is_cut_off(http_node: RunningNode) -> None:
    with _connect(http_node, "127.0.0.2") as slow, _connect(http_node, "127.0.0.2") as quick:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end of it
        started = time.monotonic()
        quick.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(quick).startswith(b"HTTP/1.1 200")
        wait_for(lambda: _closed(slow), timeout=10, what="the slow connection closed")
        assert 1.5 < time.monotonic() - started < 8
        # The quick one answered a request in time: it stays open (keep-alive).
        assert not _closed(quick)
        quick.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(quick).startswith(b"HTTP/1.1 200")
    wait_for(lambda: "no request within 2 s" in http_node.log_text, what="the log line")
