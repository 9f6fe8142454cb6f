"""Remote AE registry verbs: the DICOM peers allowed to associate."""

from __future__ import annotations

import time

from storage.models import RemoteAE

SERVICES = ("store", "find", "move", "get")


def add_remote_ae(ae_title: str, host: str, port: int, allow: set[str]) -> RemoteAE:
    """Register (or update) a remote AE.

    Parameters
    ----------
    ae_title : str
        The peer's AE title (its Calling AE Title, and the C-MOVE destination name).
    host : str
        Address the peer connects from and listens on.
    port : int
        The peer's listening port (C-MOVE destination).
    allow : set of str
        Services beyond C-ECHO it may use: a subset of ``SERVICES``.
    """
    unknown = set(allow) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}; choose from {SERVICES}")
    allow_text = ",".join(s for s in SERVICES if s in allow)
    existing = RemoteAE.get_or_none(RemoteAE.ae_title == ae_title)
    if existing is not None:
        existing.host, existing.port, existing.allow = host, port, allow_text
        existing.save()
        return existing
    return RemoteAE.create(
        ae_title=ae_title, host=host, port=port, allow=allow_text, created_at=time.time()
    )


def remove_remote_ae(ae_title: str) -> bool:
    """Unregister a remote AE; return ``False`` if it was not registered."""
    return RemoteAE.delete().where(RemoteAE.ae_title == ae_title).execute() > 0


def list_remote_aes() -> list[RemoteAE]:
    """Return every registered remote AE, by title."""
    return list(RemoteAE.select().order_by(RemoteAE.ae_title))


def get_remote_ae(ae_title: str) -> RemoteAE | None:
    """Return the registered AE with this title, or ``None``."""
    return RemoteAE.get_or_none(RemoteAE.ae_title == ae_title)
