"""Start the real ``iepnode serve`` as a subprocess on ephemeral loopback ports."""

from __future__ import annotations

import contextlib
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(
    r"READY dicom=(?P<dhost>[^:]+):(?P<dport>\d+) http=(?P<hhost>[^:]+):(?P<hport>\d+)"
)
REPO = Path(__file__).resolve().parents[2]


def run_cli(data_dir: Path, *args: str, check: bool = True, extra: list[str] | None = None,
            timeout: float = 120, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``iepnode ARGS --data-dir DATA_DIR`` and return the finished process.

    ``prefix`` goes before the command (e.g. ``setpriv ...`` to drop capabilities).
    """
    cmd = [*prefix, sys.executable, "-m", "iepnode.cli", *args, "--data-dir", str(data_dir),
           *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def add_staff_user(data_dir: Path, username: str, *args: str) -> None:
    """``iepnode user add`` with the password on standard input (the contact of transfers)."""
    proc = subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", username, *args,
         "--password-stdin", "--data-dir", str(data_dir)],
        input="correct horse battery staple\n", capture_output=True, text=True, timeout=60,
        cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition", *, max_interval: float | None = None) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    Parameters
    ----------
    predicate : callable
        Called without arguments; its first truthy answer is returned.
    interval : float
        Seconds between calls.
    max_interval : float, optional
        Double the interval after every call, up to this (default: a fixed interval).

    Raises
    ------
    AssertionError
        ``predicate`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        if max_interval is not None:
            interval = min(interval * 2, max_interval)


@dataclass
class RunningNode:
    """A running ``iepnode serve`` and how to reach it."""

    data_dir: Path
    ae_title: str
    host: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen[str]
    extra: list[str] = field(default_factory=list)
    prefix: tuple[str, ...] = ()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run an admin command against this node's data folder (beside the live node)."""
        return run_cli(self.data_dir, *args, check=check, extra=self.extra, prefix=self.prefix)

    @property
    def log_text(self) -> str:
        """The node's log file so far."""
        path = self.data_dir / "logs" / "iepnode.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def object_files(self) -> list[Path]:
        """Every file in the file store."""
        root = self.data_dir / "objects"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def staging_files(self) -> list[Path]:
        """Files left in the staging folder."""
        root = self.data_dir / "tmp"
        return sorted(root.iterdir()) if root.exists() else []


@contextlib.contextmanager
def running_node(
    data_dir: Path,
    *,
    ae_title: str = "IEPNODE",
    workers: int = 2,
    stable_age: float = 3600,
    extra: list[str] | None = None,
    register: list[tuple[str, str, int, str]] | None = None,
    timeout: float = 60,
    prefix: Sequence[str] = (),
) -> Iterator[RunningNode]:
    """Start ``iepnode serve`` on loopback with ephemeral ports and stop it afterwards.

    Parameters
    ----------
    data_dir : Path
        The node's data folder.
    register : list of (AE title, host, port, allow)
        Remote AEs to register with ``iepnode ae add`` before start.
    extra : list of str
        More command-line arguments (e.g. ``--database-url``), also used for ``cli``.
    prefix : sequence of str
        Put before the node's command and its ``cli`` commands (e.g. ``setpriv ...``).
    """
    extra = list(extra or [])
    for title, host, port, allow in register or []:
        run_cli(data_dir, "ae", "add", title, host, str(port), "--allow", allow, extra=extra)
    cmd = [*prefix, sys.executable, "-m", "iepnode.cli", "serve", "--data-dir", str(data_dir),
           "--bind", "127.0.0.1", "--dicom-port", "0", "--http-port", "0",
           "--ae-title", ae_title, "--dicom-workers", str(workers),
           "--stable-age", str(stable_age), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        match = _wait_ready(proc, timeout)
        yield RunningNode(data_dir, ae_title, match["dhost"], int(match["dport"]),
                          int(match["hport"]), proc, extra, tuple(prefix))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> re.Match[str]:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = READY.search(line)
        if match:
            selector.close()
            return match
    selector.close()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"iepnode serve did not become ready:\n{''.join(seen)}\n{err}")
