"""Staff-side services: studies, transfers, audit trail, remote AEs and users."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iepnode.node import Node


class AdminService:
    """What the /admin pages do, behind the Node façade (``node.admin``).

    Parameters
    ----------
    node : Node
        The node whose index, store and messenger are used.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
