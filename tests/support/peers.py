"""Real DICOM peers for tests and benches: dcmtk ``storescp``, Orthanc, free ports.

One harness for both: the tests use it directly, the benches import it as
``tests.support.peers``. Every peer is a process started in its own session
(process group), on loopback, polled until it answers (no fixed sleeps) and
stopped with SIGTERM (SIGKILL for its group if anything is left). Use them as
context managers::

    with StorescpPeer(base_dir) as peer:       # or storescp_on(port, out_dir)
        ...send to peer.host, peer.port, peer.aet...
        assert peer.count_instances() == n

Notes that matter for tests and fair numbers alike:

* Debian builds dcmtk (and so Orthanc's DICOM layer) with Nagle's algorithm on;
  every dcmtk/Orthanc process gets ``TCP_NODELAY=1`` in its environment
  (:func:`peer_env`), otherwise they run at ~20 images/s.
* dcmtk tools are always called by absolute path (:func:`tests.support.tools.dcmtk`):
  pynetdicom installs Python scripts named ``storescu``/``storescp``/``echoscu``
  that shadow them on PATH.
* Durability differs: Orthanc (``SyncStorageArea``, default on) flushes each file
  before answering; ``storescp`` never calls fsync.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.node import wait_for
from tests.support.tools import dcmtk

ORTHANC = Path("/usr/sbin/Orthanc")

HOST = "127.0.0.1"
SENDER_AET = "BENCHSCU"
DEFAULT_MAX_PDU = 131072  # dcmtk's upper limit for -pdu / --max-pdu


class PeerError(RuntimeError):
    """A peer did not start, did not answer in time, or failed."""


class PeerExitedError(PeerError):
    """A peer's process ended while it was starting (e.g. its port was taken)."""


def peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for any dcmtk or Orthanc process: Nagle off (``TCP_NODELAY=1``).

    Parameters
    ----------
    extra : dict, optional
        More variables to set on top.
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free right now on the loopback interface (a process binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def echo(port: int, called_aet: str, calling_aet: str = SENDER_AET, host: str = HOST,
         tls: tuple[str, ...] = ()) -> bool:
    """One C-ECHO with dcmtk ``echoscu``; True if it succeeded.

    Parameters
    ----------
    tls : tuple of str
        ``echoscu`` TLS options (e.g. ``+tls KEY CERT +cf CA``), empty for plain DICOM.
    """
    try:
        res = subprocess.run(
            [dcmtk("echoscu"), "-aet", calling_aet, "-aec", called_aet,
             "-to", "2", "-ta", "5", "-ts", "5", *tls, host, str(port)],
            env=peer_env(), capture_output=True, timeout=15, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def _first_line(args: list[str]) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=10, env=peer_env())
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "?"


def dcmtk_version() -> str:
    """dcmtk's version line (from ``storescu --version``), ``?`` if it cannot be run."""
    return _first_line([dcmtk("storescu"), "--version"]).strip("$ ")


def orthanc_version() -> str:
    """Orthanc's version line, ``?`` if it cannot be run."""
    return _first_line([str(ORTHANC), "--version"])


# --------------------------------------------------------------------------- process lifecycle


class Peer:
    """A peer process working in its own directory.

    Parameters
    ----------
    base_dir : Path, optional
        Where to create a fresh temporary working directory (default: the system's).
        It is deleted when the peer stops, unless ``keep``.
    workdir : Path, optional
        Work in this directory instead (created if missing, never deleted).
    max_pdu : int or None
        The largest PDU the peer accepts (None: the peer's own default).
    sender_aet : str
        The calling AE title the peer is told about and probed with.
    start_timeout : float
        Seconds to wait until the peer answers.
    keep : bool
        Keep the temporary working directory after stopping.
    """

    name = "peer"
    aet = "PEER"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        workdir: Path | None = None,
        max_pdu: int | None = DEFAULT_MAX_PDU,
        sender_aet: str = SENDER_AET,
        start_timeout: float = 60.0,
        keep: bool = False,
    ) -> None:
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"peer-{self.name}-", dir=base_dir))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
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
        return peer_env()

    def prepare(self) -> None:
        """Create directories/config before the process starts."""

    def count_instances(self) -> int:
        raise NotImplementedError

    def _wait_listening(self, deadline: float) -> None:
        """Wait until the process says or shows it listens (default: nothing to wait for)."""

    def ready(self) -> bool:
        """True once the peer answers (default: a C-ECHO succeeds)."""
        return bool(self.port) and echo(self.port, self.aet, self.sender_aet, self.host)

    # -- lifecycle
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Peer:
        """Start the process and return once :meth:`ready` says it answers.

        Raises
        ------
        PeerExitedError
            The process ended while starting (its log's tail is in the message).
        PeerError
            It did not answer within ``start_timeout`` seconds (it is stopped).
        """
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

        def answers() -> bool:
            self._check_alive()
            return self.ready()

        try:
            self._wait_listening(deadline)
            wait_for(answers, timeout=max(0.0, deadline - time.monotonic()), interval=0.02,
                     max_interval=0.25, what=f"{self.name} to answer")
        except AssertionError:
            self.stop()
            raise PeerError(
                f"{self.name} did not answer within {self.start_timeout:.0f} s"
            ) from None
        except PeerError:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_tail()
            self._close_log()
            raise PeerExitedError(
                f"{self.name} exited early with code {self.proc.returncode}:\n{tail}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process (SIGKILL its group after ``timeout``); tidy the directory."""
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
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
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


def count_files(root: Path) -> int:
    """How many files are below ``root`` (0 if it does not exist)."""
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# --------------------------------------------------------------------------- dcmtk storescp


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI: a CA, the server's and a client's key and certificate."""

    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path


def make_pki(directory: Path) -> TlsFiles:
    """Create a CA and server/client certificates (server valid for 127.0.0.1) with openssl."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=iepnode test CA")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"),
                        ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=iepnode test {name}")
        (directory / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return TlsFiles(directory / "ca.pem", directory / "server.key", directory / "server.pem",
                    directory / "client.key", directory / "client.pem")


class StorescpPeer(Peer):
    """dcmtk ``storescp``, bit-preserving (``+B``), writing every file it receives.

    Parameters
    ----------
    out_dir : Path, optional
        Where the received files go (default: ``out`` in the working directory).
    port : int
        The port to listen on (0: a free one).
    aet : str
        Its AE title.
    fork : bool
        One forked child per association (``--fork``); without it storescp serves
        one association after the other.
    options : tuple of str
        Transfer syntax options (e.g. ``+xa`` to accept all; default: dcmtk's).
    tls : TlsFiles, optional
        Serve DICOM TLS (dcmtk's default BCP 195 profile) and require a client
        certificate signed by the CA; the readiness probe uses ``echoscu`` over TLS.
    """

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, *args, out_dir: Path | None = None, port: int = 0, aet: str | None = None,
                 fork: bool = True, options: tuple[str, ...] = (),
                 tls: TlsFiles | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out_dir = Path(out_dir) if out_dir is not None else self.workdir / "out"
        self.port = port
        if aet is not None:
            self.aet = aet
        self.fork = fork
        self.options = tuple(options)
        self.tls = tls

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()

    def command(self) -> list[str]:
        # NB: in dcmtk 3.6 "-B" is --normal (the default); bit-preserving is "+B".
        cmd = [dcmtk("storescp"), *(["--fork"] if self.fork else []), "+B", "-aet", self.aet]
        if self.max_pdu is not None:
            cmd += ["-pdu", str(self.max_pdu)]
        cmd += [*self.options, *self._server_tls(), "-od", str(self.out_dir), str(self.port)]
        return cmd

    def _server_tls(self) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        return ("+tls", str(self.tls.server_key), str(self.tls.server_cert),
                "+cf", str(self.tls.ca), "-rc")

    def ready(self) -> bool:
        probe: tuple[str, ...] = ()
        if self.tls is not None:
            probe = ("+tls", str(self.tls.client_key), str(self.tls.client_cert),
                     "+cf", str(self.tls.ca))
        return echo(self.port, self.aet, self.sender_aet, self.host, tls=probe)

    def count_instances(self) -> int:
        return count_files(self.out_dir)

    def received(self) -> list[Path]:
        """The files it wrote, sorted."""
        return received(self.out_dir)


def received(out_dir: Path) -> list[Path]:
    """Files storescp wrote into ``out_dir``."""
    return sorted(p for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []


@contextlib.contextmanager
def storescp_on(port: int, out_dir: Path, ae_title: str = "DEST", *,
                options: tuple[str, ...] = ("+xa",),
                tls: TlsFiles | None = None) -> Iterator[StorescpPeer]:
    """Run dcmtk storescp (bit-preserving, one association at a time) until the block ends.

    Parameters
    ----------
    port : int
        The port to listen on; 0 picks a free one (tried again, up to five times,
        if another process takes it first).
    options : tuple of str
        Transfer syntax options (default ``+xa``: accept all).
    tls : TlsFiles, optional
        See :class:`StorescpPeer`.
    """
    for attempt in range(5 if port == 0 else 1):
        peer = StorescpPeer(out_dir.parent, out_dir=out_dir, port=port, aet=ae_title,
                            fork=False, options=options, tls=tls, max_pdu=None,
                            sender_aet="PROBE", start_timeout=20)
        try:
            peer.start()
        except PeerExitedError:
            if port or attempt == 4:
                raise
            continue
        try:
            yield peer
        finally:
            peer.stop(10)
        return


# --------------------------------------------------------------------------- Orthanc


class OrthancPeer(Peer):
    """Debian's Orthanc with a generated configuration (Orthanc's defaults otherwise).

    Durable and fully indexed on purpose (``SyncStorageArea``, no compression).
    Ready once its REST API and its DICOM port both answer.

    Parameters
    ----------
    aet : str
        Its AE title (``DicomCheckCalledAet`` is on).
    modalities : dict, optional
        ``DicomModalities`` (default: the sender at 127.0.0.1).
    overrides : dict, optional
        More configuration keys (experiments only, e.g. ``ingest.py --orthanc-set``).
    """

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, *args, aet: str | None = None,
                 modalities: dict[str, list[object]] | None = None,
                 overrides: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if aet is not None:
            self.aet = aet
        self.modalities = modalities
        self.overrides = dict(overrides or {})
        self.http_port = 0

    def prepare(self) -> None:
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        modalities = self.modalities
        if modalities is None:
            modalities = {"bench": [self.sender_aet, HOST, 104]}
        cfg = {
            "Name": f"peer-{self.name}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": True,
            "DicomModalities": modalities,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "Plugins": [],
        }
        if self.max_pdu is not None:
            cfg["MaximumPduLength"] = self.max_pdu
        cfg.update(self.overrides)
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def command(self) -> list[str]:
        return [str(ORTHANC), str(self.config_path)]

    def ready(self) -> bool:
        try:
            self.get("/system")
        except OSError:
            return False
        return super().ready()

    @property
    def url(self) -> str:
        """Base URL of its REST API."""
        return f"http://{self.host}:{self.http_port}"

    def get(self, path: str, timeout: float = 60) -> object:
        """GET ``path`` of the REST API and decode the JSON answer."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.load(response)

    def post(self, path: str, body: object, timeout: float = 900) -> object:
        """POST ``body`` (bytes as they are, str as UTF-8, else JSON) and decode the answer."""
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def file(self, instance_id: str) -> bytes:
        """The stored Part-10 file of an instance."""
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file",
                                    timeout=60) as response:
            return response.read()

    def statistics(self) -> dict:
        return self.get("/statistics", timeout=30)  # type: ignore[return-value]

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def describe(self) -> dict:
        return {**super().describe(), "http_port": self.http_port,
                "version": orthanc_version(), "overrides": self.overrides}


@contextlib.contextmanager
def running_orthanc(workdir: Path, modalities: dict[str, list[object]] | None = None,
                    ae_title: str = "ORTHANC") -> Iterator[OrthancPeer]:
    """Run Orthanc with its storage and index under ``workdir`` until the block ends.

    Parameters
    ----------
    modalities : dict, optional
        ``DicomModalities``: name -> [AE title, host, port].
    """
    with OrthancPeer(workdir=workdir, aet=ae_title, modalities=modalities or {},
                     max_pdu=None, sender_aet="PROBE") as peer:
        yield peer
