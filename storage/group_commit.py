"""Group commit: small write jobs of many threads share one transaction and one flush.

Every page view writes a little (audit events, read marks, session activity). Each
in its own transaction, pages queue for the database's single write lock and pay
one durable commit (an fsync) each. Here one committer thread per process takes
whatever jobs are waiting, runs them in one write transaction (each in a
savepoint, so one failing job does not undo the others) and commits once; every
caller returns only after that commit, so nothing is acknowledged before it is
on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import peewee

from storage.db import write_transaction

log = logging.getLogger("iepnode.storage")

T = TypeVar("T")

#: Most jobs committed together (bounds the time the write lock is held).
MAX_BATCH = 256


@dataclass
class _Job(Generic[T]):
    run: Callable[[], T]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class GroupCommitter:
    """Run write jobs of any thread in shared transactions (one committer thread).

    Parameters
    ----------
    database : peewee.Database
        The database the jobs write to.
    """

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0
        self.jobs = 0

    def run(self, job: Callable[[], T]) -> T:
        """Run ``job`` inside a shared write transaction; return once it is committed.

        Parameters
        ----------
        job : callable
            Writes through the models; must not start its own transaction.

        Returns
        -------
        object
            What ``job`` returned.

        Raises
        ------
        Exception
            Whatever ``job`` raised (its writes are rolled back), or the commit's error.
        """
        self._ensure_thread()
        item: _Job[T] = _Job(job)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def close(self) -> None:
        """Stop the committer thread after the jobs already queued."""
        with self._start_lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(10)
                self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="group-commit",
                                                    daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job[Any]]) -> None:
        try:
            with self.database.connection_context(), write_transaction(self.database):
                for item in batch:
                    try:
                        with self.database.atomic():
                            item.result = item.run()
                    except Exception as exc:  # the job's own failure, reported to it
                        item.error = exc
        except Exception as exc:  # the commit failed: no job of the batch is stored
            log.exception("group commit of %d jobs failed", len(batch))
            for item in batch:
                item.error = exc
        self.batches += 1
        self.jobs += len(batch)
        for item in batch:
            item.done.set()
