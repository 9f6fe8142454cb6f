"""Identifiers the node hands out or takes back: public transaction IDs, tokens, AE titles.

UIDs have their own home, :mod:`iepnode.archive.uids` (re-exported here).
"""

from __future__ import annotations

import re
import secrets

from iepnode.archive.uids import LOOSE_UID, is_uid_like

__all__ = [
    "AE_TITLE",
    "LOOSE_UID",
    "PUBLIC_ID",
    "PUBLIC_ID_PATTERN",
    "TOKEN",
    "TOKEN_BYTES",
    "is_ae_title",
    "is_public_id",
    "is_token",
    "is_uid_like",
    "new_public_id",
    "new_token",
]

#: The public ID of a transaction, as shown to people and used in URLs: ``IEP`` and 8
#: digits. A pattern (no anchors) to build URL patterns with.
PUBLIC_ID_PATTERN = r"IEP[0-9]{8}"
PUBLIC_ID = re.compile(PUBLIC_ID_PATTERN)

#: Bytes of randomness in link tokens and session cookies (192 bits).
TOKEN_BYTES = 24
#: A token of :func:`new_token`: URL-safe base64 of :data:`TOKEN_BYTES` bytes.
TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")

#: An AE title (PS3.5 AE): 1-16 characters of the default repertoire, no backslash and
#: no control characters. Leading and trailing spaces are not significant (strip first).
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


def new_public_id() -> str:
    """Return a random public transaction ID (``IEP`` and 8 digits; not yet checked unique)."""
    return f"IEP{secrets.randbelow(10**8):08d}"


def is_public_id(value: str) -> bool:
    """Whether ``value`` is shaped like a public transaction ID (:data:`PUBLIC_ID`)."""
    return PUBLIC_ID.fullmatch(value) is not None


def new_token() -> str:
    """Return a URL-safe random token of :data:`TOKEN_BYTES` bytes (192 bits)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def is_token(value: str) -> bool:
    """Whether ``value`` is shaped like a token of :func:`new_token`."""
    return TOKEN.fullmatch(value) is not None


def is_ae_title(value: str) -> bool:
    """Whether ``value`` is an AE title (:data:`AE_TITLE`) with something but spaces."""
    return AE_TITLE.fullmatch(value) is not None and bool(value.strip())
