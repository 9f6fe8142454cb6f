"""The bench's receivers and senders: dcmtk ``storescp``, Orthanc and ``iepnode serve``.

``storescp`` and Orthanc are the shared peer harness (:mod:`tests.support.peers`,
also used by the tests); this module adds ``iepnode serve`` as a receiver, a
process-tree RSS/CPU sampler, concurrent ``storescu`` sends and the head of a
bench's JSON report. Each peer is started on an ephemeral loopback port, stores
into its own fresh temporary directory, is polled with dcmtk ``echoscu`` until it
answers (no fixed sleeps) and is stopped with SIGTERM. Use them as context
managers::

    with make_peer("orthanc", base_dir) as peer:
        send_storescu(peer, files, groups=4)
        assert peer.count_instances() == len(files)

Notes that matter for fair numbers:

* Every dcmtk/Orthanc process gets ``TCP_NODELAY=1`` in its environment
  (:func:`tests.support.peers.peer_env`), otherwise they run at ~20 images/s.
* dcmtk tools are always called by absolute path: pynetdicom installs Python
  scripts named ``storescu``/``storescp``/``echoscu`` that shadow them on PATH.
* All receivers accept the same maximum PDU (``max_pdu``, default 131072, the
  largest value dcmtk allows); storescu sends PDUs of the receiver's size.
* Durability differs: Orthanc (``SyncStorageArea``, default on) and iepnode
  (``fsync``, default on) flush each file before answering; ``storescp`` never
  calls fsync. It is the upper bound, not a like-for-like peer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._ct import REPO_ROOT, BenchError, split
from tests.support.node import READY
from tests.support.peers import (
    DEFAULT_MAX_PDU,
    HOST,
    SENDER_AET,
    OrthancPeer,
    Peer,
    StorescpPeer,
    count_files,
    dcmtk_version,
    orthanc_version,
    peer_env,
    wait_for,
)
from tests.support.tools import dcmtk

__all__ = [
    "DEFAULT_MAX_PDU", "HOST", "SENDER_AET", "IepnodePeer", "OrthancPeer", "Peer",
    "RssSampler", "StorescpPeer", "dcmtk_version", "iepnode_available", "iepnode_cmd",
    "iepnode_env", "make_peer", "orthanc_version", "repo_state", "run_report", "send_storescu",
]


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


# --------------------------------------------------------------------------- iepnode


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
        def listening() -> object:
            match = READY.search(self.log_path.read_text(errors="replace"))
            if match is None:
                self._check_alive()
            return match

        try:
            match = wait_for(listening, timeout=max(0.0, deadline - time.monotonic()),
                             interval=0.02, max_interval=0.25, what="iepnode's READY line")
        except AssertionError:
            raise BenchError(
                f"iepnode printed no READY line within {self.start_timeout:.0f} s") from None
        self.port = int(match["dport"])  # type: ignore[index]
        self.http_port = int(match["hport"])  # type: ignore[index]

    def count_instances(self) -> int:
        return count_files(self.data_dir / "objects")

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
    parts = split(files, groups)
    if timeout is None:
        timeout = 60 + 0.25 * len(files)
    log_dir = Path(log_dir or peer.workdir)
    logs = [open(log_dir / f"storescu-{i}.log", "w+b") for i in range(len(parts))]  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        env = peer_env()
        t0 = time.perf_counter()
        for part, log in zip(parts, logs, strict=True):
            procs.append(subprocess.Popen(
                [dcmtk("storescu"), "-aet", peer.sender_aet, "-aec", peer.aet,
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


# --------------------------------------------------------------------------- reports


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
        "command": shlex.join([sys.executable, *sys.orig_argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "orthanc": orthanc_version(),
                    **machine, "loadavg_start": os.getloadavg()},
        "settings": vars(args) | {"tmp_dir": str(base), "json": str(args.json)},
        "repo": repo_state(),
    }
