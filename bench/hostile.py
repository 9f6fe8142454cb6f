"""Hostile-peer benchmark: a registered peer's ingest rate while 100 attackers connect.

A fresh ``iepnode serve`` (defaults: 2 SCP workers) receives 300-slice synthetic CT
studies from dcmtk ``storescu`` (one association, TCP_NODELAY=1) at 127.0.0.1, first
with nobody else connecting (*clean*), then while hostile connections from
127.0.0.2 keep hitting the DICOM port (*attack*); the two alternate ``--repeat``
times, each with a fresh study (new UIDs), and the medians are compared in the same
run. The attackers, 100 connections kept open at all times by one asyncio thread
in this process, are the two attacks of issue 13:

* **slot** (half of them): connect, send ``\\x01``, wait for the node to hang up,
  reconnect. Without limits these held every association slot.
* **pdu** (the other half): connect, send an A-ASSOCIATE-RQ header announcing
  4,294,967,280 bytes (``01 00 FF FF FF F0``) and stream zeros until the node
  hangs up (at most ``--pdu-kb``, 256 KiB, per connection: on loopback an unbounded
  stream into sockets the node has already closed only measures how fast this
  process fills kernel buffers), reconnect. Without limits a worker buffered it all.

Each attacker waits ``--reconnect-ms`` (default 20) between connections, so they
do not just burn this machine's two cores in a connect loop. Reported: the clean
and attack ingest rates and their ratio (target >= 0.8x), each SCP worker's peak
RSS above its idle RSS during the attack (target < +50 MB), and what the attackers
saw (connections, rejections, aborts, bytes written before the node hung up).

Usage (from the repository root)::

    python -m bench.hostile
    python -m bench.hostile --repeat 3 --json /tmp/hostile.json

One line of results goes to stdout; details to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, make_study

ATTACKER = "127.0.0.2"
PDU_HEADER = b"\x01\x00\xff\xff\xff\xf0"
LOCAL_LIMIT_RJ = bytes.fromhex("03000000000400020302")
MB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class AttackStats:
    """What the attackers saw."""

    connections: int = 0
    rejected: int = 0
    aborted: int = 0
    bytes_sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Attackers:
    """``count`` hostile connections to ``port``, kept up by one asyncio thread."""

    def __init__(self, port: int, count: int, reconnect: float, pdu_bytes: int,
                 kinds: tuple[str, ...] = ("slot", "pdu")) -> None:
        self.kinds = kinds
        self.port = port
        self.count = count
        self.reconnect = reconnect
        self.pdu_bytes = pdu_bytes
        self.stats = AttackStats()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="attackers", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> Attackers:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._ready.set()
        kinds = self.kinds
        tasks = [asyncio.create_task(self._attacker(kinds[i % len(kinds)] == "slot"))
                 for i in range(self.count)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _attacker(self, slot: bool) -> None:
        zeros = b"\0" * (1 << 16)
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    bp.HOST, self.port, local_addr=(ATTACKER, 0))
                self.stats.connections += 1
                if slot:
                    writer.write(b"\x01")
                    await writer.drain()
                    answer = await reader.read(64)
                else:
                    writer.write(PDU_HEADER)
                    reply = asyncio.create_task(reader.read(64))
                    with contextlib.suppress(ConnectionError):
                        for _ in range(self.pdu_bytes // len(zeros)):
                            if reply.done():
                                break
                            writer.write(zeros)
                            await writer.drain()
                            self.stats.bytes_sent += len(zeros)
                            await asyncio.sleep(0)  # let the node's answer in
                    try:
                        answer = await asyncio.wait_for(reply, 5)
                    except (ConnectionError, TimeoutError):
                        answer = b""
                if answer.startswith(LOCAL_LIMIT_RJ):
                    self.stats.rejected += 1
                elif answer[:1] == b"\x07":
                    self.stats.aborted += 1
            except asyncio.CancelledError:
                if writer is not None:
                    writer.close()
                raise
            except OSError as exc:
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(self.reconnect)


def scp_workers(main_pid: int, port: int) -> list:
    """The node's processes listening on the DICOM ``port``."""
    import psutil

    out = []
    for proc in psutil.Process(main_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp")):
                out.append(proc)
    return out


class PeakRss:
    """Sample each worker's RSS every 20 ms in a thread; ``peak[pid]`` in bytes."""

    def __init__(self, procs: list) -> None:
        self.procs = procs
        self.peak = {p.pid: p.memory_info().rss for p in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.02):
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)


def cpu_seconds(procs: list) -> float:
    """User + system CPU seconds the processes have used so far."""
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def timed_send(peer: bp.Peer, study, args, workers: list) -> dict:
    """Send ``study`` on one association; its rate and the CPU the node and we used."""
    os.sync()
    node_cpu, own_cpu = cpu_seconds(workers), time.process_time()
    seconds = bp.send_storescu(peer, study.files, 1, max_pdu=args.max_pdu)
    return {"img_s": round(len(study) / seconds, 1),
            "scp_cpu_s": round(cpu_seconds(workers) - node_cpu, 2),
            "attacker_cpu_s": round(time.process_time() - own_cpu, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300, help="slices per study (300)")
    ap.add_argument("--repeat", type=int, default=3, help="clean/attack pairs (3)")
    ap.add_argument("--attackers", type=int, default=100, help="hostile connections (100)")
    ap.add_argument("--reconnect-ms", type=float, default=20.0,
                    help="each attacker's pause between connections (20 ms)")
    ap.add_argument("--pdu-kb", type=int, default=256,
                    help="most KiB a pdu attacker streams per connection (256)")
    ap.add_argument("--kinds", type=lambda s: [k for k in s.split(",") if k],
                    default=["slot", "pdu"], help="attacks to run, alternating (slot,pdu)")
    ap.add_argument("--warmup", type=int, default=40, help="slices in the warm-up study (40)")
    ap.add_argument("--max-pdu", type=int, default=bp.DEFAULT_MAX_PDU)
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write all results to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-hostile-", dir=args.tmp_dir))
    report = bp.run_report(args, base, dcmtk=bp.dcmtk_version())
    runs: list[dict] = []
    try:
        warm = make_study(base / "warm", args.warmup, "HOSTWARM")
        with bp.make_peer("iepnode", base, max_pdu=args.max_pdu) as peer:
            bp.send_storescu(peer, warm.files, 1, max_pdu=args.max_pdu)
            workers = scp_workers(peer.pid, peer.port)
            idle = {p.pid: p.memory_info().rss for p in workers}
            log(f"iepnode SCP workers {sorted(idle)}, idle RSS "
                f"{', '.join(f'{v / MB:.0f} MB' for v in idle.values())}")
            for rep in range(args.repeat):
                for phase in (("clean", "attack") if rep % 2 == 0 else ("attack", "clean")):
                    study = make_study(base / f"s{rep}{phase}", args.slices, f"HOST{rep}{phase}")
                    if phase == "clean":
                        run = {"phase": phase, "rep": rep,
                               **timed_send(peer, study, args, workers)}
                    else:
                        with Attackers(peer.port, args.attackers, args.reconnect_ms / 1000,
                                       args.pdu_kb * 1024, tuple(args.kinds)) as attack, \
                                PeakRss(workers) as rss:
                            time.sleep(1.0)  # let the attack reach its steady state
                            sent = timed_send(peer, study, args, workers)
                        stats = attack.stats
                        run = {"phase": phase, "rep": rep, **sent,
                               "peak_rss_over_idle_mb": {
                                   str(pid): round((rss.peak[pid] - idle[pid]) / MB, 1)
                                   for pid in idle},
                               "attack": vars(stats)}
                    shutil.rmtree(study.directory, ignore_errors=True)
                    runs.append(run)
                    log(f"  [{rep}] {phase}: {run['img_s']:.0f} img/s, SCP workers' CPU "
                        f"{run['scp_cpu_s']} s, this process's CPU {run['attacker_cpu_s']} s"
                        + (f", workers +{run['peak_rss_over_idle_mb']} MB, attackers "
                           f"{run['attack']}" if phase == "attack" else ""))
            held = peer.count_instances()
            expected = len(warm) + 2 * args.repeat * args.slices
            if held != expected:
                raise BenchError(f"iepnode holds {held} instances, expected {expected}")
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 2
    finally:
        shutil.rmtree(base, ignore_errors=True)
    clean = statistics.median(r["img_s"] for r in runs if r["phase"] == "clean")
    attacked = [r for r in runs if r["phase"] == "attack"]
    under = statistics.median(r["img_s"] for r in attacked)
    grow = max(v for r in attacked for v in r["peak_rss_over_idle_mb"].values())
    conns = sum(r["attack"]["connections"] for r in attacked)
    rejected = sum(r["attack"]["rejected"] for r in attacked)
    aborted = sum(r["attack"]["aborted"] for r in attacked)
    ratio = under / clean
    line = (f"hostile {args.slices} slices, {args.attackers} hostile connections from "
            f"{ATTACKER}: clean {clean:.0f} img/s | under attack {under:.0f} img/s | "
            f"ratio {ratio:.2f}x (target >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'}) | "
            f"worst SCP worker peak RSS +{grow:.0f} MB (target < +50 MB: "
            f"{'met' if grow < 50 else 'NOT met'}) | attackers: {conns} connections, "
            f"{rejected} rejected at once, {aborted} aborted")
    print(line, flush=True)
    if args.json:
        report.update(runs=runs, line=line, ratio=round(ratio, 3))
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
