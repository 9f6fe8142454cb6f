"""Outgoing mail and SMS: SMTP, SMS gateways, or the outbox folder.

Where a message goes depends on the settings:

- ``send_email``: SMTP when ``smtp_host`` is set, else an ``.eml`` file in
  ``DATA_DIR/outbox/``.
- ``send_sms`` with ``sms_gateway = "outbox"``: an ``.eml`` in the outbox whose
  ``To`` is ``sms:+44...`` and whose body is the text; ``"email"``: mail without
  subject to ``<digits>@sms_email_domain`` (SMTP or outbox, as above); ``"http"``:
  ``POST {"to": ..., "text": ...}`` with a bearer token to ``sms_http_url``.

Messages carry login links and one-time passcodes: neither the body nor the
subject is ever logged, and error texts name only the recipient, the channel
and what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib

from config import Settings
from iepnode.errors import NodeError
from iepnode.rules.text import has_control, is_email, is_phone

log = logging.getLogger("iepnode.messaging")

#: Seconds allowed for the whole HTTP SMS gateway request.
SMS_HTTP_TIMEOUT = 10.0

_KIND = re.compile(r"[A-Za-z0-9._-]{1,40}")
#: A gateway's message id is logged only if it looks like one.
_GATEWAY_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,100}")

#: ``To: sms:+447700900123`` is kept verbatim (the address parser would turn
#: ``sms:`` into a group name).
_SMS_POLICY = policy.default.clone(header_factory=HeaderRegistry())
_SMS_POLICY.header_factory.map_to_type("to", UnstructuredHeader)


class DeliveryError(NodeError):
    """A message could not be sent or written; the text holds no message content."""


@dataclass(frozen=True)
class Delivery:
    """Where one message went.

    Attributes
    ----------
    channel : str
        ``smtp``, ``outbox``, ``sms-http`` or ``sms-email``.
    to : str
        The recipient as addressed: an email address, a normalised phone number
        (``sms-http``, SMS in the outbox) or ``<digits>@domain`` (``sms-email``).
    outbox_path : Path or None
        The ``.eml`` file written, when the message went to the outbox.
    message_id : str
        The ``Message-ID`` header; for ``sms-http`` the ``id`` of the gateway's
        JSON answer, or a generated id when it gave none.
    """

    channel: str
    to: str
    outbox_path: Path | None
    message_id: str


def normalize_phone(number: str) -> str:
    """Return ``number`` without spaces and dashes, checked to look like E.164.

    Parameters
    ----------
    number : str
        A phone number such as ``+44 7700 900-123``.

    Returns
    -------
    str
        The number with an optional leading ``+`` and 7-15 digits.

    Raises
    ------
    ValueError
        If the number has other characters or the wrong length.
    """
    compact = re.sub(r"[ \-]", "", number.strip())
    if not is_phone(compact):
        raise ValueError(f"phone number {number!r}: expected an optional + and 7-15 digits "
                         "(spaces and dashes allowed)")
    return compact


def check_email(address: str) -> str:
    """Return ``address`` stripped of surrounding spaces after a sanity check.

    Parameters
    ----------
    address : str
        One bare email address (no display name).

    Returns
    -------
    str
        The address.

    Raises
    ------
    ValueError
        If it contains line breaks (header injection), more or less than one
        ``@``, or characters that would make it several addresses.
    """
    if "\r" in address or "\n" in address:
        raise ValueError("email address must not contain line breaks")
    stripped = address.strip()
    if not is_email(stripped):
        raise ValueError(f"email address {address!r}: expected one address like name@example.org")
    return stripped


def _check_header(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must not contain line breaks")
    if has_control(value):
        raise ValueError(f"{name} must not contain control characters")
    return value


def _redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no query (tokens live there) or userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Messenger:
    """Send mail and SMS as configured; see the module docstring for the routes.

    Parameters
    ----------
    settings : Settings
        The ``smtp_*``, ``mail_from``, ``sms_*`` settings and ``outbox_dir`` are used.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        address = parseaddr(settings.mail_from)[1]
        self._from_address = address
        self._msgid_domain = address.rpartition("@")[2] or "iepnode.invalid"
        if settings.smtp_host and settings.smtp_user and settings.smtp_tls == "none":
            log.warning("SMTP credentials for %s are sent without TLS (smtp_tls = none)",
                        settings.smtp_host)

    # -- email -------------------------------------------------------------------------

    async def send_email(
        self, to: str, subject: str, text: str, html: str | None = None, *, kind: str = "mail"
    ) -> Delivery:
        """Send one email by SMTP, or write it to the outbox when no server is set.

        Parameters
        ----------
        to : str
            One bare recipient address.
        subject : str
            The subject; non-ASCII is fine, line breaks are refused.
        text : str
            The plain-text body.
        html : str, optional
            An HTML alternative to ``text``.
        kind : str
            A short label for logs and the ``X-Iepnode-Kind`` header (``login-link``,
            ``passcode`` ...); the subject and body are never logged.

        Returns
        -------
        Delivery
            ``channel`` is ``smtp`` or ``outbox``.

        Raises
        ------
        ValueError
            If ``to``, ``subject`` or ``kind`` is malformed (header injection included).
        DeliveryError
            If the SMTP server refuses the message or cannot be reached, or the
            outbox cannot be written.
        """
        to = check_email(to)
        message = self._build(to, _check_header("subject", subject), text, html, kind)
        return await self._deliver(message, to, kind)

    def _build(
        self, to: str, subject: str, text: str, html: str | None, kind: str,
        *, message_policy: policy.EmailPolicy = policy.default,
    ) -> EmailMessage:
        if not _KIND.fullmatch(kind):
            raise ValueError(f"kind {kind!r}: 1-40 letters, digits, '.', '_' or '-'")
        message = EmailMessage(policy=message_policy)
        message["Message-ID"] = make_msgid(domain=self._msgid_domain)
        message["Date"] = format_datetime(datetime.now(UTC))
        message["From"] = self.settings.mail_from
        message["To"] = to
        message["Subject"] = subject
        message["X-Iepnode-Kind"] = kind
        message.set_content(text, charset="utf-8")
        if html is not None:
            message.add_alternative(html, subtype="html", charset="utf-8")
        return message

    async def _deliver(self, message: EmailMessage, to: str, kind: str) -> Delivery:
        if self.settings.smtp_host:
            return await self._send_smtp(message, to, kind)
        path = await asyncio.to_thread(self._write_outbox, message)
        log.info("mail to %s (%s) written to outbox/%s", to, kind, path.name)
        return Delivery("outbox", to, path, str(message["Message-ID"]))

    async def _send_smtp(self, message: EmailMessage, to: str, kind: str) -> Delivery:
        s = self.settings
        where = f"{s.smtp_host}:{s.smtp_port}"
        try:
            _, response = await aiosmtplib.send(
                message,
                sender=self._from_address,
                recipients=[to],
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_user or None,
                password=s.smtp_password if s.smtp_user else None,
                use_tls=s.smtp_tls == "tls",
                start_tls=s.smtp_tls == "starttls",
                timeout=s.smtp_timeout,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # aiosmtplib's texts carry the server's reply, never the message or password.
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("mail to %s (%s) via SMTP %s failed: %s", to, kind, where, reason)
            raise DeliveryError(f"mail to {to} via SMTP {where} failed: {reason}") from exc
        log.info("mail to %s (%s) sent via SMTP %s: %s", to, kind, where, response)
        return Delivery("smtp", to, None, str(message["Message-ID"]))

    def _write_outbox(self, message: EmailMessage) -> Path:
        """Write ``message`` as ``outbox/<UTC time>-<random>.eml``, atomically (0600)."""
        outbox = self.settings.outbox_dir
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = outbox / f"{stamp}-{secrets.token_hex(4)}.eml"
        tmp = outbox / f".{path.name}.tmp"
        try:
            outbox.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(message.as_bytes())
                    if self.settings.fsync:
                        handle.flush()
                        os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            if self.settings.fsync:
                dir_fd = os.open(outbox, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise DeliveryError(f"cannot write to the outbox {outbox}: {exc.strerror}") from exc
        return path

    # -- SMS ---------------------------------------------------------------------------

    async def send_sms(self, number: str, text: str) -> Delivery:
        """Send one text message through the configured gateway.

        Parameters
        ----------
        number : str
            The recipient's phone number (optional ``+``, 7-15 digits; spaces and
            dashes are removed).
        text : str
            The message text; never logged.

        Returns
        -------
        Delivery
            ``channel`` is ``outbox``, ``sms-email`` or ``sms-http``.

        Raises
        ------
        ValueError
            If the number is not a plausible phone number.
        DeliveryError
            If the gateway refuses the message or cannot be reached.
        """
        number = normalize_phone(number)
        gateway = self.settings.sms_gateway
        if gateway == "http":
            return await self._send_sms_http(number, text)
        if gateway == "email":
            address = f"{number.lstrip('+')}@{self.settings.sms_email_domain}"
            # No subject: many gateways prepend it to the text.
            delivery = await self.send_email(address, "", text, kind="sms")
            return Delivery("sms-email", address, delivery.outbox_path, delivery.message_id)
        message = self._build(f"sms:{number}", "SMS", text, None, "sms",
                              message_policy=_SMS_POLICY)
        path = await asyncio.to_thread(self._write_outbox, message)
        log.info("SMS to %s written to outbox/%s", number, path.name)
        return Delivery("outbox", number, path, str(message["Message-ID"]))

    async def _send_sms_http(self, number: str, text: str) -> Delivery:
        s = self.settings
        where = _redact_url(s.sms_http_url)
        headers = {"Authorization": f"Bearer {s.sms_http_token}"} if s.sms_http_token else {}
        timeout = aiohttp.ClientTimeout(total=SMS_HTTP_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(s.sms_http_url, json={"to": number, "text": text},
                             headers=headers) as response,
            ):
                status = response.status
                body: Any = None
                if 200 <= status < 300:
                    with contextlib.suppress(ValueError, aiohttp.ClientError):
                        body = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("SMS to %s via %s failed: %s", number, where, reason)
            raise DeliveryError(f"SMS to {number} via gateway {where} failed: {reason}") from exc
        if not 200 <= status < 300:
            log.warning("SMS to %s via %s refused: HTTP %d", number, where, status)
            raise DeliveryError(f"SMS to {number}: gateway {where} answered HTTP {status}")
        raw_id = body.get("id") if isinstance(body, dict) else None
        gateway_id = str(raw_id) if isinstance(raw_id, str | int) else ""
        if not _GATEWAY_ID.fullmatch(gateway_id):
            gateway_id = make_msgid(domain=self._msgid_domain)
        log.info("SMS to %s sent via %s (HTTP %d, id %s)", number, where, status, gateway_id)
        return Delivery("sms-http", number, None, gateway_id)

    # -- blocking wrappers for the CLI ---------------------------------------------------

    def send_email_blocking(
        self, to: str, subject: str, text: str, html: str | None = None, *, kind: str = "mail"
    ) -> Delivery:
        """Run :meth:`send_email` in a new event loop (for the CLI; not inside a loop)."""
        return asyncio.run(self.send_email(to, subject, text, html, kind=kind))

    def send_sms_blocking(self, number: str, text: str) -> Delivery:
        """Run :meth:`send_sms` in a new event loop (for the CLI; not inside a loop)."""
        return asyncio.run(self.send_sms(number, text))
