"""Staff passwords: the one argon2id hasher, the password policy, and bounded hashing.

argon2id (argon2-cffi's defaults: 64 MiB, 3 passes, 4 lanes) is slow and large on
purpose: one hash takes ~0.1 s of CPU and :data:`HASH_MEMORY` of memory. Every
failed staff login costs one, known username or not (an unknown one is hashed
too, so the answer takes as long). Run where page views share threads, a flood
of failed logins would fill the thread pool and the memory of a web process, so
web views run password work through :class:`PasswordWork`: at most
``concurrency`` hashes at once on threads of their own, at most ``queue`` more
waiting (as cheap futures, not threads), and anything beyond refused at once with
:class:`~iepnode.errors.Busy` (HTTP 503, "try again shortly").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from iepnode.errors import Busy, InvalidRequest

#: Shortest password a staff user may have.
MIN_LENGTH = 12
#: Memory one hash takes (argon2-cffi's default ``memory_cost``, 64 MiB).
HASH_MEMORY = PasswordHasher().memory_cost * 1024

_hasher = PasswordHasher()
P = ParamSpec("P")
T = TypeVar("T")


def check_policy(password: str) -> None:
    """Raise :class:`InvalidRequest` for a password staff may not choose (too short)."""
    if len(password) < MIN_LENGTH:
        raise InvalidRequest(f"passwords have at least {MIN_LENGTH} characters")


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (argon2-cffi's encoded form, salt included)."""
    return _hasher.hash(password)


def verify_password(encoded: str, password: str) -> bool:
    """Whether ``password`` matches the stored hash ``encoded`` (``False`` for a bad hash)."""
    try:
        return _hasher.verify(encoded, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(encoded: str) -> bool:
    """Whether ``encoded`` was made with weaker parameters than today's."""
    return _hasher.check_needs_rehash(encoded)


def spend_one_hash(password: str) -> None:
    """Take as long as a real check (for an unknown username: nothing to enumerate)."""
    _hasher.hash(password)


class PasswordWork:
    """Run blocking work that hashes passwords: a few at once, a few waiting, no more.

    Parameters
    ----------
    concurrency : int
        Threads of this pool: hashes running at once in this process.
    queue : int
        Jobs that may wait for a thread; a job beyond them is refused.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="password-hash")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Jobs running or waiting now."""
        return self._admitted

    async def run(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work(*args, **kwargs)`` on the pool's threads and return its result.

        Raises
        ------
        Busy
            ``concurrency + queue`` jobs are running or waiting already: nothing is done.
        """
        with self._lock:
            if self._admitted >= self.concurrency + self.queue:
                raise Busy("Many passwords are being checked just now: please try again "
                           "in a few seconds.")
            self._admitted += 1
        try:
            future = self._executor.submit(functools.partial(work, *args, **kwargs))
        except BaseException:
            self._release()
            raise
        # Counted until the job is done (or cancelled before it started), not until
        # the caller stops waiting: the bound is on real work.
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        """Stop the threads once the running jobs are done (waiting ones are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
