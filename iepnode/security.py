"""Secrets, tokens and one-time passcodes: the few primitives login is built on.

Link tokens and session cookies carry at least 128 bits from the OS CSPRNG and
are stored only as SHA-256 hashes. Passcodes are short, so they are stored as
HMAC-SHA256 keyed with the node's secret and bound to one login attempt: a
leaked database does not give them away, nor can a code be replayed on another
attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from config.settings import Layout
from iepnode.rules.identifiers import TOKEN_BYTES, new_token

__all__ = ["TOKEN_BYTES", "load_or_create_secret", "new_passcode", "new_token",
           "passcode_hash", "passcode_matches", "token_hash"]

PASSCODE_DIGITS = 6


def load_or_create_secret(data_dir: Path) -> bytes:
    """Return the node's 32-byte secret, creating ``DATA_DIR/secret.key`` (0600) once."""
    path = Layout(data_dir).secret_file
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        return secret
    if len(secret) != 32:
        raise ValueError(f"{path} is damaged (expected 32 bytes)")
    return secret


class SecretKey:
    """The node's secret key, read (or created) from ``DATA_DIR/secret.key`` on first use.

    A process that never needs it (``iepnode import``, ``iepnode ae``) leaves no key
    file behind.

    Parameters
    ----------
    data_dir : Path
        The node's data folder.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._value: bytes | None = None
        self._lock = threading.Lock()

    def get(self) -> bytes:
        """Return the 32-byte secret (see :func:`load_or_create_secret`)."""
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = load_or_create_secret(self.data_dir)
        return self._value


def token_hash(token: str) -> str:
    """Return the SHA-256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_passcode(digits: int = PASSCODE_DIGITS) -> str:
    """Return a random numeric passcode of ``digits`` digits (CSPRNG)."""
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def passcode_hash(secret: bytes, attempt_key: str, code: str) -> str:
    """Return the keyed hash of ``code`` bound to one login attempt."""
    message = f"{attempt_key}:{code.strip()}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def passcode_matches(secret: bytes, attempt_key: str, code: str, stored: str) -> bool:
    """Compare a typed passcode with the stored hash in constant time."""
    return hmac.compare_digest(passcode_hash(secret, attempt_key, code), stored)
