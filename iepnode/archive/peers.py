"""The remote AEs allowed to connect (and to be sent to): listed, validated, audited.

The staff pages and the ``iepnode ae`` command both change the registry through
:class:`RemotePeers`, so the same checks apply and every change is audited as
``admin-change`` (110113 Security Alert): ``ae-add``, ``ae-update``, ``ae-remove``.
"""

from __future__ import annotations

import re

from iepnode.errors import InvalidRequest, NotFound
from iepnode.people import audit
from iepnode.people.audit import ADMIN_CHANGE, Actor, actor_of
from iepnode.rules.identifiers import is_ae_title
from storage import registry
from storage.models import RemoteAE, StaffUser

#: Where a peer connects from: an IP address, a host name, or ``*`` for any address.
HOST = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9.:-]{0,254})$")


class RemotePeers:
    """List, register or update, and unregister remote AEs (no dependencies: the index)."""

    def remote_aes(self) -> list[RemoteAE]:
        """The registered remote AEs, by title."""
        return registry.list_remote_aes()

    def add_remote_ae(self, ae_title: str, host: str, port: str, allow: list[str],
                      user: StaffUser | Actor, source_ip: str = "", *,
                      send_to: bool | None = None,
                      tls: registry.TlsFiles | bool | None = False,
                      port_zero: bool = False) -> tuple[RemoteAE, bool]:
        """Register or update a remote AE (audited); return it and whether it is new.

        Parameters
        ----------
        ae_title, host, port : str
            As typed: the AE title, where it connects from, and its listening port.
        allow : list of str
            Services beyond C-ECHO it may use (see ``storage.registry.SERVICES``).
        user : StaffUser or Actor
            The administrator (from ``source_ip``), or the command line's actor.
        send_to : bool, optional
            Whether the node may send studies to it (``None``: keep the current value).
        tls : TlsFiles, None or False, optional
            TLS for sends (see :func:`storage.registry.add_remote_ae`; ``False`` keeps it).
        port_zero : bool, optional
            Accept port 0 for an AE that never listens (it only sends in); the
            command line allows it, the staff page asks for a real port.

        Raises
        ------
        InvalidRequest
            A bad AE title, host, port or service.
        """
        title = ae_title.strip()
        if not is_ae_title(title):
            raise InvalidRequest("an AE title has 1 to 16 characters, no backslash or "
                                 "control characters")
        host = host.strip()
        if not HOST.match(host):
            raise InvalidRequest("the host is an IP address, a host name, or * for any")
        try:
            port_number = int(port.strip())
        except ValueError:
            raise InvalidRequest("the port is a number from 1 to 65535") from None
        if not (1 <= port_number <= 65535 or (port_zero and port_number == 0)):
            raise InvalidRequest("the port is a number from 1 to 65535")
        services = {s.strip().lower() for s in allow if s.strip()}
        created = registry.get_remote_ae(title) is None
        try:
            ae = registry.add_remote_ae(title, host, port_number, services, send_to=send_to,
                                        tls=tls)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        verb = "ae-add" if created else "ae-update"
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"{verb} {ae.ae_title} {ae.host}:{ae.port} "
                            f"allow=echo{',' + ae.allow if ae.allow else ''}"
                            f"{' send-to' if ae.send_to else ''}{' tls' if ae.tls else ''}")
        return ae, created

    def remove_remote_ae(self, ae_title: str, user: StaffUser | Actor,
                         source_ip: str = "") -> None:
        """Unregister a remote AE (audited); ``user`` as in :meth:`add_remote_ae`.

        Raises
        ------
        NotFound
            No such AE.
        """
        title = ae_title.strip()
        if not registry.remove_remote_ae(title):
            raise NotFound(f"no remote AE {title!r}")
        audit.record(audit.SECURITY_ALERT, ADMIN_CHANGE, actor_of(user, source_ip),
                     detail=f"ae-remove {title}")
