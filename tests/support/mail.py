"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 at an ephemeral port.

``running_smtp(handler)`` starts an aiosmtpd ``Controller`` on port 0 (the port is
learnt before aiosmtpd's start-up self-test connects) and stops it afterwards.
:class:`Inbox` is the usual handler: it keeps every message it accepts, parsed.
The ``smtp_inbox`` fixture in ``tests/conftest.py`` is one running inbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.node import wait_for

H = TypeVar("H")


class Inbox:
    """aiosmtpd handler keeping every message it accepts; ``port`` is the server's."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.port = 0

    async def handle_DATA(self, server: SMTP, session: Session,  # noqa: N802
                          envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        self.messages.append(BytesParser(policy=policy.default).parsebytes(raw))  # type: ignore[arg-type]
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        """Messages sent to ``address``, oldest first."""
        return [m for m in self.messages if str(m["To"]) == address]


class PortZeroController(Controller):
    """A Controller bound to port 0: learn the port before the start-up self-test."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@contextlib.contextmanager
def running_smtp(handler: H, **options: Any) -> Iterator[tuple[H, int]]:
    """Serve SMTP on 127.0.0.1 with ``handler`` until the block ends; yield it and the port.

    Parameters
    ----------
    handler : object
        An aiosmtpd handler (e.g. :class:`Inbox`; its ``port`` is set if it has one).
    **options
        More ``Controller`` arguments (e.g. ``authenticator``, ``auth_require_tls``).
    """
    controller = PortZeroController(handler, hostname="127.0.0.1", port=0, **options)
    controller.start()
    try:
        if isinstance(handler, Inbox):
            handler.port = controller.port
        yield handler, controller.port
    finally:
        controller.stop()


def wait_for_mail(inbox: Inbox, address: str, count: int = 1) -> EmailMessage:
    """Wait (up to 30 s) until ``address`` has ``count`` messages; return the last of them."""
    messages = wait_for(lambda: inbox.to(address)[count - 1:], timeout=30,
                        what=f"mail number {count} to {address}")
    return messages[0]  # type: ignore[index]
