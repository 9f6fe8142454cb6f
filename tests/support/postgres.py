"""A real, throw-away PostgreSQL server for tests.

``running_postgres()`` runs ``initdb`` into a fresh temporary directory, starts
``postgres`` on 127.0.0.1 at an ephemeral port (plus a unix socket in the same
temporary directory) with trust authentication, creates a database, and yields
its URL ``postgresql://postgres@127.0.0.1:PORT/DBNAME``. On exit the server is
stopped and the directory deleted.

The server binaries come from Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``; ``IEPNODE_PG_BINDIR`` overrides).
``initdb`` refuses to run as root, so as root the server runs as the
``postgres`` system user (created by the Debian package); as any other user it
runs as that user. Nothing here skips: a missing server is an error, with the
fix in the message.

``create_database(url, name)`` makes a fresh empty database on the same server
(one per test is cheap), ``drop_database(url)`` removes one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.support.peers import free_port

SUPERUSER = "postgres"
DEFAULT_DBNAME = "iepnode_test"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 5


class PostgresUnavailableError(RuntimeError):
    """The test PostgreSQL server cannot be found or started."""


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: the newest installed version."""
    override = os.environ.get("IEPNODE_PG_BINDIR")
    candidates = [override] if override else glob.glob("/usr/lib/postgresql/*/bin")

    def version(path: str) -> tuple[int, ...]:
        digits = re.findall(r"\d+", Path(path).parent.name)
        return tuple(int(d) for d in digits)

    for bindir in sorted(candidates, key=version, reverse=True):
        path = Path(bindir)
        if all(os.access(path / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return path
    where = override or "/usr/lib/postgresql/*/bin"
    raise PostgresUnavailableError(
        f"PostgreSQL server binaries (initdb, postgres) not found in {where}: install the "
        "Debian package 'postgresql' (run scripts/install-system-deps)"
    )


def _run_as() -> tuple[dict[str, Any], tuple[int, int] | None]:
    """subprocess keyword arguments that drop root to the ``postgres`` user (if root)."""
    if os.geteuid() != 0:
        return {}, None
    try:
        pw = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailableError(
            "tests run as root, initdb refuses root, and there is no 'postgres' system user "
            "to run the server as: install the Debian package 'postgresql' "
            "(run scripts/install-system-deps), which creates it"
        ) from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}, (pw.pw_uid, pw.pw_gid)


def _psycopg2() -> Any:
    try:
        import psycopg2
    except ImportError as exc:
        raise PostgresUnavailableError(
            "psycopg2 is not installed: pip install -e '.[test]' (scripts/test does it)"
        ) from exc
    return psycopg2


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"database name {name!r}: use letters, digits and '_' (not first), at most 63"
        )


def _admin_connect(url: str) -> Any:
    psycopg2 = _psycopg2()
    conn = psycopg2.connect(_with_dbname(url, "postgres"), connect_timeout=10)
    conn.autocommit = True
    return conn


def create_database(url: str, name: str) -> str:
    """Create an empty UTF-8 database ``name`` on the server of ``url``; return its URL."""
    _check_name(name)
    conn = _admin_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
    finally:
        conn.close()
    return _with_dbname(url, name)


def drop_database(url: str) -> None:
    """Drop the database named by ``url``'s path, disconnecting its sessions."""
    name = urlsplit(url).path.lstrip("/")
    _check_name(name)
    conn = _admin_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


class PostgresServer:
    """One throw-away server. ``start()`` returns the database URL; ``stop()`` removes all.

    Usable as a context manager. Attributes after ``start()``: ``url``, ``port``,
    ``base_dir`` (temp dir: ``data/``, unix socket, ``postgres.log``), ``pid``.
    """

    def __init__(self, dbname: str = DEFAULT_DBNAME, startup_timeout: float = 60.0) -> None:
        _check_name(dbname)
        self.dbname = dbname
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self.port: int | None = None
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------

    def start(self) -> str:
        if self.base_dir is not None:
            raise RuntimeError("server already started")
        bindir = find_bindir()
        run_as, owner = _run_as()
        self.base_dir = Path(tempfile.mkdtemp(prefix="iepnode-pg-"))
        try:
            if owner is not None:
                os.chown(self.base_dir, *owner)
            os.chmod(self.base_dir, 0o700)
            env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
            common = {"cwd": self.base_dir, "env": env, "stdin": subprocess.DEVNULL, **run_as}
            self._initdb(bindir, common)
            self._log = open(self.base_dir / "postgres.log", "ab")  # noqa: SIM115
            self._launch(bindir, common)
            admin_url = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"
            self.url = create_database(admin_url, self.dbname)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _initdb(self, bindir: Path, common: dict[str, Any]) -> None:
        assert self.base_dir is not None
        cmd = [
            str(bindir / "initdb"),
            "--pgdata",
            str(self.base_dir / "data"),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, timeout=self.startup_timeout, check=False, **common
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresUnavailableError(f"could not run {cmd[0]}: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise PostgresUnavailableError(
                f"initdb failed (exit {result.returncode}) in {self.base_dir} "
                f"(must be reachable by the server's user):\n{output}"
            )

    def _launch(self, bindir: Path, common: dict[str, Any]) -> None:
        assert self.base_dir is not None
        for _attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            log_start = self._log.tell()
            cmd = [
                str(bindir / "postgres"),
                "-D",
                str(self.base_dir / "data"),
                "-c", f"port={port}",
                "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.base_dir}",
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "TimeZone=UTC",
            ]  # fmt: skip
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C goes to pytest, which stops us
                    **common,
                )
            except OSError as exc:
                raise PostgresUnavailableError(f"could not run {cmd[0]}: {exc}") from exc
            self.port = port
            if self._wait_ready():
                return
            # The server exited during start-up: retry on another port if the port was taken.
            log = self._read_log(log_start)
            self._proc = None
            if "could not bind" not in log and "already in use" not in log:
                raise PostgresUnavailableError(f"postgres exited during start-up:\n{log}")
        raise PostgresUnavailableError(f"no free port after {_PORT_ATTEMPTS} attempts:\n{log}")

    def _wait_ready(self) -> bool:
        """Poll until the server accepts connections (True) or exits (False)."""
        assert self._proc is not None
        psycopg2 = _psycopg2()
        dsn = f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres connect_timeout=5"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                return False
            try:
                psycopg2.connect(dsn).close()
                return True
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailableError(
                        f"postgres not accepting connections after {self.startup_timeout}s: "
                        f"{exc}\n{self._read_log(0)}"
                    ) from exc
            time.sleep(_POLL_INTERVAL)

    def _read_log(self, start: int) -> str:
        assert self.base_dir is not None
        try:
            with open(self.base_dir / "postgres.log", "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- stop ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop the server (fast shutdown, escalating) and delete its directory. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0)):
                proc.send_signal(sig)  # SIGINT: fast shutdown; SIGQUIT: immediate
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(dbname: str = DEFAULT_DBNAME) -> Iterator[str]:
    """Run a throw-away server; yield ``postgresql://postgres@127.0.0.1:PORT/DBNAME``."""
    server = PostgresServer(dbname)
    server.start()
    try:
        assert server.url is not None
        yield server.url
    finally:
        server.stop()
