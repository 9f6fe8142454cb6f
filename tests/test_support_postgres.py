"""The throw-away PostgreSQL server used by the storage tests really runs and really goes away."""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlsplit

import psycopg2
import pytest

from tests.support.postgres import (
    PostgresServer,
    create_database,
    drop_database,
    running_postgres,
)

pytestmark = pytest.mark.postgres

NON_ASCII = "Müller^Zoë 李雷 Ωμέγα Ñandú 🩻"


def _refuses(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_server_round_trips_utf8_and_is_gone_after_teardown() -> None:
    with running_postgres() as url:
        parts = urlsplit(url)
        assert parts.scheme == "postgresql"
        assert parts.hostname == "127.0.0.1"
        assert parts.username == "postgres"
        assert parts.port is not None
        port = parts.port

        fresh = create_database(url, "roundtrip")
        assert urlsplit(fresh).path == "/roundtrip"
        with contextlib.closing(psycopg2.connect(fresh)) as conn, conn.cursor() as cur:
            cur.execute("SHOW server_encoding")
            assert cur.fetchone() == ("UTF8",)
            cur.execute("CREATE TABLE patient (id serial PRIMARY KEY, name text NOT NULL)")
            cur.execute("INSERT INTO patient (name) VALUES (%s) RETURNING id", (NON_ASCII,))
            (row_id,) = cur.fetchone()
            conn.commit()
            cur.execute("SELECT name, octet_length(name) FROM patient WHERE id = %s", (row_id,))
            assert cur.fetchone() == (NON_ASCII, len(NON_ASCII.encode("utf-8")))

        assert not _refuses(port)

    assert _refuses(port)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=2)


def test_fresh_databases_are_isolated_and_server_leaves_nothing_behind() -> None:
    with PostgresServer() as server:
        assert server.url is not None and server.base_dir is not None and server.pid
        base_dir, pid = server.base_dir, server.pid
        assert (base_dir / "data" / "PG_VERSION").is_file()

        one = create_database(server.url, "one")
        two = create_database(server.url, "two")
        with contextlib.closing(psycopg2.connect(one)) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE only_in_one (x int)")
            conn.commit()
        with contextlib.closing(psycopg2.connect(two)) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('only_in_one')")
            assert cur.fetchone() == (None,)

        # drop_database disconnects open sessions instead of failing.
        lingering = psycopg2.connect(one)
        try:
            drop_database(one)
        finally:
            lingering.close()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(one, connect_timeout=2)

    assert not base_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("name", ["", "1abc", "a-b", 'x"; DROP', "a" * 64])
def test_create_database_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError, match="database name"):
        create_database("postgresql://postgres@127.0.0.1:1/postgres", name)
