"""Domain errors, one tree; the edges (DICOM handlers, HTTP views, CLI) translate them.

::

    NodeError
    ├── BadDataset            the received object cannot be understood   -> DIMSE 0xC000
    │   └── DatasetMismatch   it does not match the request's SOP class/instance UID,
    │                         or its pixel data does not fit its image attributes -> 0xA900
    ├── OutOfResources        disk full, index unavailable, I/O failure   -> 0xA700
    ├── NotAuthorized         the peer is not allowed this service        -> 0x0124
    ├── UnknownDestination    C-MOVE destination not registered           -> 0xA801
    ├── BadQuery              an identifier that cannot be answered       -> 0xA900 / 0xC000
    ├── NotFound              no such transaction/study for this user     -> HTTP 404
    ├── Gone                  the user's package, no longer available      -> HTTP 410
    ├── InvalidRequest        a transfer or message that breaks a rule    -> HTTP 400
    │   ├── InProgress        the same work is being done already (one at a time) -> HTTP 409
    │   ├── OffsetMismatch    an upload chunk does not start where the file ends -> HTTP 409
    │   │                     (iepnode.uploads.chunks, as are the next two)
    │   ├── TooLarge          an upload over its limits, or a chunk overrunning its file
    │   ├── FileBusy          another request is writing this upload file -> HTTP 409
    │   ├── AttachmentRefused a file that cannot be wrapped as a document
    │   │                     (iepnode.viewing.wrapped_object)
    │   ├── ForwardInvalid    a forward dialog field is wrong; ``step`` says where
    │   │                     (iepnode.sharing.forwarding, as is the next one)
    │   └── ForwardRefused    the rules do not allow forwarding this package
    ├── Busy                  a bounded resource is full right now: try again shortly -> HTTP 503
    ├── DeliveryError         mail/SMS not sent (iepnode.outbound.messaging) -> CLI/HTTP error
    ├── PeerUnavailable       a send's remote AE cannot be reached or dropped the association
    │                         -> the send job is retried with back-off (iepnode.outbound.sending)
    ├── NotAcceptableMedia    a DICOMweb client accepts no media type the node gives -> HTTP 406
    │                         (iepnode.viewing.dicomweb_rendered)
    ├── TokenRefused          a DICOMweb bearer token unknown, expired or revoked -> HTTP 401
    │                         (iepnode.viewing.dicomweb_access)
    └── LoginRefused          passcode login failed                       -> HTTP 403
        ├── PasscodeRejected  wrong, expired, reused or dead passcode
        ├── RecipientLocked   too many consecutive failures: staff must unlock
        ├── RateLimited       a passcode was sent moments ago
        └── LoginThrottled    too many failed logins for a username (iepnode.people.staff_logins)

Classes drawn without a module live here; the others live beside the code that raises
them (the module is named). ``tests/test_errors_tree.py`` checks that every subclass of
:class:`NodeError` in the package is drawn, under its real parent.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node reports to a peer or user."""


class BadDataset(NodeError):
    """A received or imported object is not a usable DICOM instance."""


class DatasetMismatch(BadDataset):
    """The dataset's SOP Class/Instance UID differ from the C-STORE request's, or its
    native pixel data's length does not fit Rows, Columns, Bits Allocated... (the
    dataset parses but does not match its SOP class's Image Pixel module)."""


class OutOfResources(NodeError):
    """The node could not store or index the object (disk full, I/O, database)."""


class NotAuthorized(NodeError):
    """The calling AE is not registered, or not allowed this service."""


class UnknownDestination(NodeError):
    """A C-MOVE destination that is not a registered remote AE."""


class BadQuery(NodeError):
    """A C-FIND/C-MOVE/C-GET identifier the node cannot answer."""


class NotFound(NodeError):
    """The thing asked for does not exist, or is not this user's (never say which)."""


class Gone(NodeError):
    """The user's own transaction exists but its package is no longer available
    (expired, declined or purged)."""


class InvalidRequest(NodeError):
    """A request that breaks a domain rule (e.g. studies of two patients in one transfer)."""


class InProgress(InvalidRequest):
    """The same work (e.g. a password-protected copy) is being done already: one at a time."""


class Busy(NodeError):
    """A bounded resource (e.g. password hashing) is full just now: try again in a moment."""


class LoginRefused(NodeError):
    """A recipient login step failed."""


class PasscodeRejected(LoginRefused):
    """The passcode is wrong, expired, already used, or its attempt is dead."""


class RecipientLocked(LoginRefused):
    """Too many consecutive failed passcodes: the recipient must be unlocked by staff."""


class RateLimited(LoginRefused):
    """A passcode was sent moments ago; wait before asking for another."""


class PeerUnavailable(NodeError):
    """A remote AE could not be reached, refused the association, or dropped it."""
