"""What the node accepts as a UID in what peers send (one rule for every edge)."""

from __future__ import annotations

import re

#: A UID as peers really send them: digits and dots, at most 64 characters (PS3.5
#: 9.1). Leading zeros in a component are tolerated (common in the field).
LOOSE_UID = re.compile(r"[0-9][0-9.]{0,63}")


def is_uid_like(value: str) -> bool:
    """Return ``True`` if ``value`` can be a UID the node stores (see :data:`LOOSE_UID`)."""
    return LOOSE_UID.fullmatch(value) is not None
