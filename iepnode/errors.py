"""Domain errors, one tree; the edges (DICOM handlers, HTTP views, CLI) translate them.

::

    NodeError
    ├── BadDataset            the received object cannot be understood   -> DIMSE 0xC000
    │   └── DatasetMismatch   it does not match the request's SOP class/instance UID -> 0xA900
    ├── OutOfResources        disk full, index unavailable, I/O failure   -> 0xA700
    ├── NotAuthorized         the peer is not allowed this service        -> 0x0124
    ├── UnknownDestination    C-MOVE destination not registered           -> 0xA801
    └── BadQuery              an identifier that cannot be answered       -> 0xA900 / 0xC000
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node reports to a peer or user."""


class BadDataset(NodeError):
    """A received or imported object is not a usable DICOM instance."""


class DatasetMismatch(BadDataset):
    """The dataset's SOP Class/Instance UID differ from the C-STORE request's."""


class OutOfResources(NodeError):
    """The node could not store or index the object (disk full, I/O, database)."""


class NotAuthorized(NodeError):
    """The calling AE is not registered, or not allowed this service."""


class UnknownDestination(NodeError):
    """A C-MOVE destination that is not a registered remote AE."""


class BadQuery(NodeError):
    """A C-FIND/C-MOVE/C-GET identifier the node cannot answer."""
