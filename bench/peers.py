"""DICOM receivers for the bench: dcmtk ``storescp``, Orthanc and iepnode.

Each peer is started on an ephemeral loopback port, stores into its own fresh
temporary directory, is polled with dcmtk ``echoscu`` until it answers (no fixed
sleeps) and is stopped with SIGTERM. Use them as context managers::

    with make_peer("orthanc", base_dir) as peer:
        send_storescu(peer, files, groups=4)
        assert peer.count_instances() == len(files)

Notes that matter for fair numbers:

* Debian builds dcmtk (and so Orthanc's DICOM layer) with Nagle's algorithm on;
  every dcmtk/Orthanc process gets ``TCP_NODELAY=1`` in its environment
  (:func:`dcmtk_env`), otherwise they run at ~20 images/s.
* dcmtk tools are always called by absolute path: pynetdicom installs Python
  scripts named ``storescu``/``storescp``/``echoscu`` that shadow them on PATH.
* All receivers accept the same maximum PDU (``max_pdu``, default 131072, the
  largest value dcmtk allows); storescu sends PDUs of the receiver's size.
* Durability differs: Orthanc (``SyncStorageArea``, default on) and iepnode
  (``fsync``, default on) flush each file before answering; ``storescp`` never
  calls fsync. It is the upper bound, not a like-for-like peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _ct import REPO_ROOT, BenchError

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

HOST = "127.0.0.1"
SENDER_AET = "BENCHSCU"
DEFAULT_MAX_PDU = 131072  # dcmtk's upper limit for -pdu / --max-pdu


def dcmtk_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for any dcmtk or Orthanc process: Nagle off."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def echo(port: int, called_aet: str, calling_aet: str = SENDER_AET, host: str = HOST) -> bool:
    """One C-ECHO with dcmtk echoscu; True if it succeeded."""
    try:
        res = subprocess.run(
            [
                ECHOSCU,
                "-aet",
                calling_aet,
                "-aec",
                called_aet,
                "-to",
                "2",
                "-ta",
                "5",
                "-ts",
                "5",
                host,
                str(port),
            ],
            env=dcmtk_env(),
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


# --------------------------------------------------------------------------- process trees


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RssSampler:
    """Background thread sampling a process tree: summed RSS and CPU time.

    ``reset()`` starts a new window. ``peak`` is the largest summed RSS sampled
    in it (bytes); ``cpu`` the CPU seconds (user+system) the tree used in it,
    counting short-lived children (e.g. storescp's forked ones) up to their
    last sample. Sampling every 50 ms can miss very short spikes.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.max_procs = 0
        self._cpu: dict[tuple[int, float], list[float]] = {}  # (pid, created) -> [first, last]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self.peak = 0
            self.max_procs = 0
            self._cpu = {}
        self.sample(first=True)

    @property
    def cpu(self) -> float:
        with self._lock:
            return sum(last - first for first, last in self._cpu.values())

    def sample(self, first: bool = False) -> None:
        import psutil

        procs = _tree(self.pid)
        total = 0
        seen = []
        for p in procs:
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    seen.append(((p.pid, p.create_time()), t.user + t.system))
            except psutil.Error:
                pass
        with self._lock:
            self.peak = max(self.peak, total)
            self.max_procs = max(self.max_procs, len(procs))
            for key, cpu in seen:
                if key in self._cpu:
                    self._cpu[key][1] = cpu
                else:  # baseline at reset; a process born later counts from zero
                    self._cpu[key] = [cpu if first else 0.0, cpu]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# --------------------------------------------------------------------------- peers


class Peer:
    """A receiver process storing into its own temporary directory."""

    name = "peer"
    aet = "PEER"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        max_pdu: int = DEFAULT_MAX_PDU,
        sender_aet: str = SENDER_AET,
        start_timeout: float = 60.0,
        keep: bool = False,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-", dir=base_dir))
        self.max_pdu = max_pdu
        self.sender_aet = sender_aet
        self.start_timeout = start_timeout
        self.keep = keep
        self.host = HOST
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self._log = None
        self.warnings: list[str] = []

    # -- to be provided by subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def prepare(self) -> None:
        """Create directories/config before the process starts."""

    def count_instances(self) -> int:
        raise NotImplementedError

    def _wait_listening(self, deadline: float) -> None:
        """Wait until the process says or shows it listens (default: nothing to wait for)."""

    # -- lifecycle
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Peer:
        self.prepare()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.workdir,
            start_new_session=True,  # own process group: leftovers can be found and ended
        )
        deadline = time.monotonic() + self.start_timeout
        self._wait_listening(deadline)
        delay = 0.02
        while True:
            self._check_alive()
            if self.port and echo(self.port, self.aet, self.sender_aet, self.host):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(
                    f"{self.name} did not answer C-ECHO within {self.start_timeout:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_tail()
            self._close_log()
            raise BenchError(f"{self.name} exited early with code {self.proc.returncode}:\n{tail}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.warnings.append(f"did not exit {timeout:.0f} s after SIGTERM; killed")
                    _killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            # Anything left in the process group we created (e.g. orphaned workers)?
            if _group_alive(proc.pid):
                self.warnings.append("processes left in its group after the main process exited")
                _killpg(proc.pid, signal.SIGKILL)
            self.proc = None
        self._close_log()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> dict:
        return {"name": self.name, "aet": self.aet, "port": self.port, "max_pdu": self.max_pdu}


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


class StorescpPeer(Peer):
    """dcmtk storescp, bit-preserving (``+B``), one forked child per association."""

    name = "storescp"
    aet = "STORESCP"

    def prepare(self) -> None:
        self.out_dir = self.workdir / "out"
        self.out_dir.mkdir()
        self.port = free_port()

    def command(self) -> list[str]:
        # NB: in dcmtk 3.6 "-B" is --normal (the default); bit-preserving is "+B".
        # --fork: without it storescp serves one association at a time and the
        # "4 parallel associations" case would be serialised.
        return [
            STORESCP, "--fork", "+B",
            "-aet", self.aet, "-pdu", str(self.max_pdu),
            "-od", str(self.out_dir), str(self.port),
        ]  # fmt: skip

    def count_instances(self) -> int:
        return _count_files(self.out_dir)


class OrthancPeer(Peer):
    """Orthanc from Debian with a generated configuration (defaults otherwise)."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, *args, overrides: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overrides = dict(overrides or {})

    def prepare(self) -> None:
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        cfg = {
            "Name": "bench-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            # Orthanc defaults kept on purpose: durable and fully indexed.
            "StorageCompression": False,
            "SyncStorageArea": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"bench": [self.sender_aet, HOST, 104]},
            "MaximumPduLength": self.max_pdu,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "Plugins": [],
        }
        cfg.update(self.overrides)  # only for experiments (ingest.py --orthanc-set)
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def command(self) -> list[str]:
        return [ORTHANC, str(self.config_path)]

    def statistics(self) -> dict:
        url = f"http://{HOST}:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def describe(self) -> dict:
        return {
            **super().describe(),
            "http_port": self.http_port,
            "version": orthanc_version(),
            "overrides": self.overrides,
        }


READY_RE = re.compile(rb"READY dicom=([0-9.]+):(\d+) http=([0-9.]+):(\d+)")


def iepnode_cmd() -> list[str]:
    """How to run the iepnode CLI: the same interpreter, importing ``iepnode.cli``.

    Equivalent to the ``iepnode`` console script, but also works from a plain
    checkout (``PYTHONPATH`` is set to the repository root).
    """
    return [sys.executable, "-c", "import sys; from iepnode.cli import main; sys.exit(main())"]


def iepnode_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Drop inherited IEPNODE_* settings so the bench is reproducible.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IEPNODE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def iepnode_available() -> tuple[bool, str]:
    """True if ``iepnode.cli`` imports and its help lists ``serve``."""
    try:
        res = subprocess.run(
            [*iepnode_cmd(), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=iepnode_env(),
            cwd=tempfile.gettempdir(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, "iepnode --help timed out"
    if res.returncode != 0:
        return False, (res.stderr.strip().splitlines() or ["iepnode --help failed"])[-1]
    if "serve" not in res.stdout:
        return False, "iepnode --help does not list 'serve'"
    return True, ""


class IepnodePeer(Peer):
    """``iepnode serve`` (a main process plus DICOM worker processes)."""

    name = "iepnode"
    aet = "IEPNODE"

    def __init__(
        self,
        *args,
        workers: int | None = None,
        data_dir: Path | None = None,
        allow: str = "store,find",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        self.allow = allow
        self._own_data = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else self.workdir / "data"

    def env(self) -> dict[str, str]:
        # The CLI has no PDU flag; the setting is read from IEPNODE_MAX_PDU.
        return iepnode_env({"IEPNODE_MAX_PDU": str(self.max_pdu)})

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            [*iepnode_cmd(), "ae", "add", self.sender_aet, HOST, "0",
             "--allow", self.allow, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=120, env=self.env(), cwd=self.workdir,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if res.returncode != 0:
            raise BenchError(
                f"iepnode ae add failed ({res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )

    def command(self) -> list[str]:
        cmd = [
            *iepnode_cmd(), "serve", "--data-dir", str(self.data_dir),
            "--dicom-port", "0", "--http-port", "0", "--bind", HOST, "--ae-title", self.aet,
        ]  # fmt: skip
        if self.workers:
            cmd += ["--dicom-workers", str(self.workers)]
        return cmd

    def _wait_listening(self, deadline: float) -> None:
        delay = 0.02
        while True:
            m = READY_RE.search(self.log_path.read_bytes())
            if m:
                self.port = int(m.group(2))
                self.http_port = int(m.group(4))
                return
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"iepnode printed no READY line within {self.start_timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def count_instances(self) -> int:
        return _count_files(self.data_dir / "objects")

    def stop(self, timeout: float = 30.0) -> None:
        if not self._own_data:
            self.keep = True  # never delete a data dir we were given
            super().stop(timeout)
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            super().stop(timeout)

    def describe(self) -> dict:
        return {**super().describe(), "workers": self.workers or "default"}


PEERS = {"storescp": StorescpPeer, "orthanc": OrthancPeer, "iepnode": IepnodePeer}


def make_peer(name: str, base_dir: Path | None = None, **kwargs) -> Peer:
    try:
        cls = PEERS[name]
    except KeyError:
        raise BenchError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}") from None
    if cls is not IepnodePeer:
        kwargs.pop("workers", None)
    if cls is not OrthancPeer:
        kwargs.pop("overrides", None)
    return cls(base_dir, **kwargs)


# --------------------------------------------------------------------------- sending


def send_storescu(
    peer: Peer,
    files: list[Path] | tuple[Path, ...],
    groups: int = 1,
    *,
    timeout: float | None = None,
    max_pdu: int = DEFAULT_MAX_PDU,
    log_dir: Path | None = None,
) -> float:
    """Send ``files`` with ``groups`` concurrent dcmtk storescu processes (one association each).

    Returns the wall time in seconds from starting the first process to the
    last one exiting. Raises :class:`BenchError` if any exits non-zero or the
    send exceeds ``timeout``.
    """
    from _ct import split

    parts = split(files, groups)
    if timeout is None:
        timeout = 60 + 0.25 * len(files)
    log_dir = Path(log_dir or peer.workdir)
    logs = [open(log_dir / f"storescu-{i}.log", "w+b") for i in range(len(parts))]  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        env = dcmtk_env()
        t0 = time.perf_counter()
        for part, log in zip(parts, logs, strict=True):
            procs.append(subprocess.Popen(
                [STORESCU, "-aet", peer.sender_aet, "-aec", peer.aet,
                 "-xe",           # propose explicit VR little endian (what the files are) first
                 "-R",            # propose only the presentation contexts the files need
                 "-pdu", str(max_pdu), "--max-send-pdu", str(max_pdu),
                 "-to", "10", "-ta", "30", "-ts", "60",
                 peer.host, str(peer.port), *map(str, part)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            ))  # fmt: skip
        deadline = t0 + timeout
        for p in procs:
            p.wait(max(0.1, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        raise BenchError(f"storescu to {peer.name} timed out after {timeout:.0f} s") from exc
    finally:
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().decode(errors="replace"))
            log.close()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        i, rc = bad[0]
        raise BenchError(
            f"storescu #{i} to {peer.name} exited {rc} ({len(bad)} of {len(procs)} failed):\n"
            f"{outputs[i][-2000:]}"
        )
    return elapsed


# --------------------------------------------------------------------------- versions


def _first_line(args: list[str]) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=10, env=dcmtk_env())
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "?"


def dcmtk_version() -> str:
    return _first_line([STORESCU, "--version"]).strip("$ ")


def orthanc_version() -> str:
    return _first_line([ORTHANC, "--version"])


def repo_state() -> dict:
    """Commit of the checkout being measured and how many files differ from it."""

    def git(*args: str) -> str:
        try:
            res = subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return res.stdout.strip() if res.returncode == 0 else ""

    changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "changed_files": len(changed)}


def run_report(args, base: Path, **machine: str) -> dict:
    """The head of a benchmark's JSON report: command, start, machine, settings, checkout.

    ``machine`` adds tool versions beside the host, cores, Python and Orthanc.
    """
    import platform
    import shlex

    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "orthanc": orthanc_version(),
                    **machine, "loadavg_start": os.getloadavg()},
        "settings": vars(args) | {"tmp_dir": str(base), "json": str(args.json)},
        "repo": repo_state(),
    }
