"""Open the index database from a URL: SQLite (WAL) by default, PostgreSQL for scale."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import peewee
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from storage.models import (
    ALL_MODELS,
    Attachment,
    Recipient,
    RemoteAE,
    StaffUser,
    Study,
    Transaction,
    database_proxy,
)

#: SQLite pragmas: WAL lets readers run beside the writer; synchronous=FULL makes a
#: commit durable before it returns (a C-STORE success promises exactly that).
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 60_000,
    "cache_size": -64_000,
}


#: Columns added to existing tables after their first release: ``create_tables`` makes
#: missing tables only, so :func:`open_database` adds these when a table lacks them
#: (before ``create_tables``, which then adds their indexes).
ADDED_COLUMNS: tuple[tuple[type[peewee.Model], str, str], ...] = (
    (Recipient, "totp_last_step", "INTEGER"),
    (StaffUser, "must_change_password", "BOOLEAN NOT NULL DEFAULT FALSE"),
    (Recipient, "address", "TEXT NOT NULL DEFAULT ''"),
    (Recipient, "phone", "VARCHAR(32) NOT NULL DEFAULT ''"),
    (Transaction, "forwarded_from_id",
     'INTEGER REFERENCES "transaction" ("id") ON DELETE CASCADE'),
    (RemoteAE, "send_to", "BOOLEAN NOT NULL DEFAULT FALSE"),
    (RemoteAE, "tls", "BOOLEAN NOT NULL DEFAULT FALSE"),
    (RemoteAE, "tls_ca", "VARCHAR(1024) NOT NULL DEFAULT ''"),
    (RemoteAE, "tls_cert", "VARCHAR(1024) NOT NULL DEFAULT ''"),
    (RemoteAE, "tls_key", "VARCHAR(1024) NOT NULL DEFAULT ''"),
    # requests (issue 7)
    (Transaction, "request_reason", "TEXT NOT NULL DEFAULT ''"),
    (Transaction, "patient_id_issuer", "VARCHAR(64) NOT NULL DEFAULT ''"),
    # -- hardening (issue 13): bad files (file-set build back-off) --
    (Study, "fileset_attempts", "INTEGER NOT NULL DEFAULT 0"),
    (Study, "fileset_retry_at", "DOUBLE PRECISION"),
    (Study, "fileset_error", "TEXT NOT NULL DEFAULT ''"),
    # -- hardening (issue 13): attachments held by their transaction --
    (Attachment, "key", "VARCHAR(32)"),
    (Attachment, "filed_at", "DOUBLE PRECISION"),
    (Attachment, "filed_by", "VARCHAR(64) NOT NULL DEFAULT ''"),
    # hardening (issue 13): limits decided in the database
    (Recipient, "last_passcode_at", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
)

#: Connections per process: more than the associations a worker serves at once.
POOL_SIZE = 80
POOL_STALE_SECONDS = 300


def open_database(url: str, *, create: bool = True) -> peewee.Database:
    """Connect the models to the database at ``url`` and create missing tables.

    Parameters
    ----------
    url : str
        ``sqlite:///ABSOLUTE/PATH`` or ``postgresql://user:pw@host:port/name``.
    create : bool, optional
        Create tables and indexes that do not exist yet (default ``True``).

    Returns
    -------
    peewee.Database
        The database the models are now bound to.
    """
    parsed = urlparse(url)
    # Pools: every DICOM association runs in a thread of its own and peewee keeps
    # one connection per thread; closing it at the association's end returns it
    # to the pool instead of opening a new one (a new PostgreSQL connection costs
    # milliseconds) for every association.
    if parsed.scheme == "sqlite":
        Path(unquote(parsed.path)).parent.mkdir(parents=True, exist_ok=True)
        database: peewee.Database = PooledSqliteDatabase(
            unquote(parsed.path), pragmas=SQLITE_PRAGMAS, timeout=60,
            max_connections=POOL_SIZE, stale_timeout=POOL_STALE_SECONDS,
            check_same_thread=False,
        )
    elif parsed.scheme in ("postgresql", "postgres"):
        database = PooledPostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname,
            port=parsed.port,
            max_connections=POOL_SIZE,
            stale_timeout=POOL_STALE_SECONDS,
        )
    else:
        raise ValueError(f"unsupported database URL scheme: {parsed.scheme!r}")
    database_proxy.initialize(database)
    if create:
        with database.connection_context():
            # Columns first: the indexes create_tables makes may be on added columns.
            add_missing_columns(database)
            database.create_tables(ALL_MODELS, safe=True)
    return database


def add_missing_columns(database: peewee.Database) -> None:
    """Add the :data:`ADDED_COLUMNS` a table created by an older release lacks (idempotent).

    Tables that do not exist yet are left to ``create_tables``. Several processes may
    open the database at once: PostgreSQL's ``ADD COLUMN IF NOT EXISTS`` tolerates that;
    on SQLite a concurrent ``duplicate column`` is checked away.
    """
    for model, column, sql_type in ADDED_COLUMNS:
        table = model._meta.table_name
        present = {c.name for c in database.get_columns(table)}
        if not present or column in present:
            continue
        if is_sqlite(database):
            try:
                database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type}')
            except peewee.OperationalError:
                if column not in {c.name for c in database.get_columns(table)}:
                    raise
        else:
            with database.atomic():
                database.execute_sql(
                    f'ALTER TABLE "{table}" ADD COLUMN IF NOT EXISTS "{column}" {sql_type}')


#: Writers of one process queue here before the cross-process lock and SQLite's own.
_SQLITE_WRITERS = threading.RLock()
#: Nesting depth of write transactions of the thread holding ``_SQLITE_WRITERS``.
_write_depth = 0
#: Open lock files (one per database file) of this process.
_lock_files: dict[str, int] = {}


def _lock_file(database: peewee.SqliteDatabase) -> int | None:
    """The descriptor of ``DATABASE.writelock`` (``None`` for in-memory databases)."""
    path = str(database.database)
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    fd = _lock_files.get(path)
    if fd is None:
        fd = os.open(f"{path}.writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _lock_files[path] = fd
    return fd


@contextlib.contextmanager
def _sqlite_writer(database: peewee.SqliteDatabase) -> Iterator[None]:
    """Queue for the right to write: threads on a Python lock, processes on ``flock``.

    SQLite's busy handler retries with sleeps growing to 100 ms, so writers that
    meet a held lock sleep far longer than it is held (py-spy showed dashboard
    pages waiting there). A blocking ``flock`` on a lock file beside the database
    wakes the next writer, of any process, as soon as the lock is released.
    Writers that bypass this (other programs) still meet SQLite's own locking.
    """
    global _write_depth
    with _SQLITE_WRITERS:
        fd = _lock_file(database) if _write_depth == 0 else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_depth += 1
        try:
            yield
        finally:
            _write_depth -= 1
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def write_transaction(database: peewee.Database | None = None) -> Iterator[None]:
    """Run a block that writes in one transaction: ``BEGIN IMMEDIATE`` on SQLite.

    A deferred SQLite transaction that reads first and writes later fails at once
    with "database is locked" when another connection writes meanwhile (the busy
    timeout does not apply to lock upgrades), so the write lock is taken up front,
    after queueing fairly with the other writers of every process (see
    :func:`_sqlite_writer`). Nested calls join the outer transaction.
    """
    database = database or database_proxy.obj
    if is_sqlite(database):
        with _sqlite_writer(database), database.atomic("IMMEDIATE"):
            yield
    else:
        with database.atomic():
            yield


def close_database() -> None:
    """Close every connection to the database the models are bound to, and its lock file.

    For the end of a process, or of a test that opened a database in the test runner's
    own process: a pooled connection stays open in every thread that used one (3 file
    descriptors each with SQLite: the file, its WAL and shared memory), and
    pynetdicom's ``select()`` cannot watch a socket numbered 1024 or more.
    """
    database = database_proxy.obj
    if database is None:
        return
    if hasattr(database, "close_all"):
        database.close_all()
    elif not database.is_closed():
        database.close()
    if is_sqlite(database):
        fd = _lock_files.pop(str(database.database), None)
        if fd is not None:
            os.close(fd)


def is_sqlite(database: peewee.Database) -> bool:
    """Return ``True`` when ``database`` is SQLite (which needs ``BEGIN IMMEDIATE``)."""
    return isinstance(database, peewee.SqliteDatabase)
