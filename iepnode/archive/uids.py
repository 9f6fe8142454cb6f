"""What the node accepts as a UID in what peers send (one rule for every edge)."""

from __future__ import annotations

import re

#: A UID as peers really send them: digits and dots, at most 64 characters (PS3.5
#: 9.1). Leading zeros in a component are tolerated (common in the field).
LOOSE_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: A UID as PS3.5 9.1 writes them: dot-separated components without leading zeros.
CONFORMANT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_uid_like(value: str) -> bool:
    """Return ``True`` if ``value`` can be a UID the node stores (see :data:`LOOSE_UID`)."""
    return LOOSE_UID.fullmatch(value) is not None


def is_conformant_uid(value: str) -> bool:
    """Return ``True`` if ``value`` is a UID as the standard writes them (:data:`CONFORMANT_UID`).

    The length is not checked here: :func:`is_uid_like` does.
    """
    return CONFORMANT_UID.fullmatch(value) is not None
