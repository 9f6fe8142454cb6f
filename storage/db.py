"""Open the index database from a URL: SQLite (WAL) by default, PostgreSQL for scale."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import peewee

from storage.models import ALL_MODELS, database_proxy

#: SQLite pragmas: WAL lets readers run beside the writer; synchronous=FULL makes a
#: commit durable before it returns (a C-STORE success promises exactly that).
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 60_000,
    "cache_size": -64_000,
}


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
    if parsed.scheme == "sqlite":
        Path(unquote(parsed.path)).parent.mkdir(parents=True, exist_ok=True)
        database: peewee.Database = peewee.SqliteDatabase(
            unquote(parsed.path), pragmas=SQLITE_PRAGMAS, timeout=60
        )
    elif parsed.scheme in ("postgresql", "postgres"):
        database = peewee.PostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname,
            port=parsed.port,
            autoconnect=True,
        )
    else:
        raise ValueError(f"unsupported database URL scheme: {parsed.scheme!r}")
    database_proxy.initialize(database)
    if create:
        with database.connection_context():
            database.create_tables(ALL_MODELS, safe=True)
    return database


def is_sqlite(database: peewee.Database) -> bool:
    """Return ``True`` when ``database`` is SQLite (which needs ``BEGIN IMMEDIATE``)."""
    return isinstance(database, peewee.SqliteDatabase)
