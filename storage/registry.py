"""Remote AE registry verbs: the DICOM peers allowed to associate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.models import RemoteAE

SERVICES = ("store", "find", "move", "get")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for DICOM TLS to a remote AE: CA bundle, and our certificate and key.

    An empty ``ca`` verifies the peer against the system's trusted CAs; empty
    ``cert``/``key`` send no client certificate.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""


def add_remote_ae(ae_title: str, host: str, port: int, allow: set[str], *,
                  send_to: bool | None = None, tls: TlsFiles | bool | None = False,
                  ) -> RemoteAE:
    """Register (or update) a remote AE.

    Parameters
    ----------
    ae_title : str
        The peer's AE title (its Calling AE Title, and the C-MOVE destination name).
    host : str
        Address the peer connects from and listens on.
    port : int
        The peer's listening port (C-MOVE destination, and where sends go).
    allow : set of str
        Services beyond C-ECHO it may use: a subset of ``SERVICES``.
    send_to : bool, optional
        Whether the node may send studies to it (``None``: keep the current value;
        new AEs default to ``False``).
    tls : TlsFiles, None or False, optional
        TLS for sends: ``TlsFiles`` turns it on with those files, ``None`` turns it
        off, ``False`` (default) keeps the current setting.
    """
    unknown = set(allow) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}; choose from {SERVICES}")
    allow_text = ",".join(s for s in SERVICES if s in allow)
    row = RemoteAE.get_or_none(RemoteAE.ae_title == ae_title)
    if row is None:
        row = RemoteAE(ae_title=ae_title, created_at=time.time(), send_to=False)
    row.host, row.port, row.allow = host, port, allow_text
    if send_to is not None:
        row.send_to = send_to
    if tls is None:
        row.tls, row.tls_ca, row.tls_cert, row.tls_key = False, "", "", ""
    elif isinstance(tls, TlsFiles):
        row.tls, row.tls_ca, row.tls_cert, row.tls_key = True, tls.ca, tls.cert, tls.key
    row.save()
    return row


def send_destinations() -> list[RemoteAE]:
    """Return the remote AEs the node may send studies to, by title."""
    return list(RemoteAE.select().where(RemoteAE.send_to == True)  # noqa: E712
                .order_by(RemoteAE.ae_title))


def remove_remote_ae(ae_title: str) -> bool:
    """Unregister a remote AE; return ``False`` if it was not registered."""
    return RemoteAE.delete().where(RemoteAE.ae_title == ae_title).execute() > 0


def list_remote_aes() -> list[RemoteAE]:
    """Return every registered remote AE, by title."""
    return list(RemoteAE.select().order_by(RemoteAE.ae_title))


def get_remote_ae(ae_title: str) -> RemoteAE | None:
    """Return the registered AE with this title, or ``None``."""
    return RemoteAE.get_or_none(RemoteAE.ae_title == ae_title)
