"""Dashboard latency under load: 10,000 transactions, 50 concurrent recipient sessions.

The index is filled directly (one study, 10,000 transactions spread over
recipients), 50 recipient sessions are opened, then ``iepnode serve`` runs on
loopback and 50 concurrent connections load dashboards (``/dashboard?tab=all``) in
a closed loop for ``--seconds``, each request with the next of the 50 session
cookies. Prints p50/p99 latency and throughput; the target is p99 < 100 ms.

Two load clients: ``wrk`` (default when ``/usr/bin/wrk`` exists, Debian package
``wrk``; C, so it leaves the CPU to the server) with a Lua script rotating the
cookies, or ``--client aiohttp`` (50 Python coroutines, one session each).

Usage (from the repository root)::

    python -m bench.portal [--transactions 10000] [--sessions 50] [--seconds 20]
                           [--client wrk|aiohttp] [--paced SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench._ct import REPO_ROOT


def fill(data_dir: Path, transactions: int, sessions: int) -> list[str]:
    """Create ``transactions`` transactions and return ``sessions`` session tokens."""
    from config import load_settings
    from iepnode.security import token_hash
    from iepnode.sharing import logins
    from iepnode.wiring import build_services
    from storage.models import Patient, Recipient, Study, Transaction, TransactionStudy

    node = build_services(load_settings(overrides={"data_dir": data_dir}, environ={}))
    now = time.time()
    patient = Patient.create(patient_id="BENCH", name="Bench^Patient", name_key="BENCH^PATIENT")
    study = Study.create(study_uid="1.2.826.0.1.3680043.10.1134.9", patient=patient,
                         key="BENCH001", study_date="20260101", modalities="CT",
                         description="Synthetic CT", num_series=1, num_instances=300,
                         first_received=now, last_received=now)
    recipients = max(sessions, transactions // 4)
    with node.database.atomic():
        Recipient.insert_many(
            [{"email": f"r{i}@bench.example", "name": f"Recipient {i}",
              "otp_mobile": "+447700900000", "created_at": now} for i in range(recipients)]
        ).execute()
        ids = [r.id for r in Recipient.select(Recipient.id).order_by(Recipient.id)]
        rows = []
        for i in range(transactions):
            rows.append({
                "public_id": f"IEP{i:08d}", "kind": "TRANSFER", "direction": "IN",
                "recipient": ids[i % recipients], "status": "NEW" if i % 3 else "COMPLETE",
                "priority": "NORMAL", "created_at": now - (i % 40) * 86400 / 2,
                "expires_at": now + 14 * 86400, "patient_name": "Bench^Patient",
                "patient_id": "BENCH", "institution": "Bench Hospital",
                "contact_name": "Dr Bench", "contact_email": "rad@bench.example",
                "link_token_hash": token_hash(f"bench-{i}"),
            })
        for start in range(0, len(rows), 2000):
            Transaction.insert_many(rows[start:start + 2000]).execute()
        TransactionStudy.insert_many(
            [{"transaction": t.id, "study_uid": study.study_uid, "modality": "CT",
              "exam_date": "20260101", "description": "Synthetic CT", "images_expected": 300}
             for t in Transaction.select(Transaction.id)]
        ).execute()
    tokens = [logins.open_session(Recipient.get_by_id(ids[i])).token for i in range(sessions)]
    node.close()
    return tokens


async def load(base: str, tokens: list[str], seconds: float) -> tuple[list[float], int]:
    """Run one client loop per session; return all latencies (s) and the error count."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(token: str) -> None:
        nonlocal errors
        headers = {"Cookie": f"__Host-iepnode={token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.get(f"{base}/dashboard?tab=all",
                                       allow_redirects=False) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(t) for t in tokens))
    return latencies, errors


WRK_SCRIPT = """
local tokens = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/dashboard?tab=all",
                    {["Cookie"] = "__Host-iepnode=" .. tokens[(n %% #tokens) + 1]})
end
response = function(status, headers, body)
  if status ~= 200 then errors = (errors or 0) + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("WRK p50_us=%%d p99_us=%%d requests=%%d non2xx=%%d\\n",
           latency:percentile(50), latency:percentile(99), summary.requests,
           summary.errors.status))
end
"""


async def load_paced(base: str, tokens: list[str], seconds: float, interval: float
                     ) -> tuple[list[float], int]:
    """Each session loads its dashboard every ``interval`` s (open loop, random phase).

    Models people using the portal (a page per second per session is brisk
    clicking) rather than the saturation that a closed loop measures.
    """
    import random

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()

    async def client(token: str) -> None:
        nonlocal errors
        headers = {"Cookie": f"__Host-iepnode={token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            due = start + random.uniform(0, interval)
            while due < start + seconds:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                t0 = time.perf_counter()
                async with session.get(f"{base}/dashboard?tab=all",
                                       allow_redirects=False) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)
                due += interval

    await asyncio.gather(*(client(t) for t in tokens))
    return latencies, errors


def load_wrk(base: str, tokens: list[str], seconds: float, workdir: Path
             ) -> tuple[float, float, int, int]:
    """Run wrk; return p50 (ms), p99 (ms), request count and non-2xx count."""
    script = workdir / "dashboard.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f'"{t}"' for t in tokens))
    out = subprocess.run(
        ["/usr/bin/wrk", "-t", "2", "-c", str(len(tokens)), "-d", f"{seconds:.0f}s",
         "-s", str(script), f"{base}/dashboard?tab=all"],
        capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    match = re.search(r"WRK p50_us=(\d+) p99_us=(\d+) requests=(\d+) non2xx=(\d+)", out)
    if not match:
        raise RuntimeError(f"unexpected wrk output: {out}")
    p50, p99, requests, bad = (int(g) for g in match.groups())
    return p50 / 1000, p99 / 1000, requests, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transactions", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--paced", type=float, metavar="SECONDS", default=0.0,
                    help="instead of a closed loop, each session loads a page every "
                         "SECONDS (aiohttp client, open loop)")
    ap.add_argument("--client", choices=("wrk", "aiohttp"),
                    default="wrk" if Path("/usr/bin/wrk").exists() else "aiohttp")
    ap.add_argument("--http-workers", type=int, default=1,
                    help="processes answering HTTP (iepnode serve --http-workers)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    base_dir = Path(tempfile.mkdtemp(prefix="iepnode-bench-portal-"))
    proc = None
    try:
        data = base_dir / "data"
        t0 = time.perf_counter()
        tokens = fill(data, args.transactions, args.sessions)
        print(f"filled {args.transactions} transactions in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        proc = subprocess.Popen(
            [sys.executable, "-m", "iepnode.cli", "serve", "--data-dir", str(data), "--bind",
             "127.0.0.1", "--dicom-port", "0", "--http-port", "0", "--dicom-workers", "1",
             "--http-workers", str(args.http_workers)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
        line = proc.stdout.readline()
        match = re.search(r"http=([^:]+):(\d+)", line)
        if not match:
            raise RuntimeError(f"iepnode serve did not start: {line!r}")
        base = f"http://127.0.0.1:{match.group(2)}"
        if args.paced:
            args.client = f"paced {args.paced:g} s/session"
            latencies, errors = asyncio.run(load_paced(base, tokens, args.seconds, args.paced))
            ms = sorted(x * 1000 for x in latencies)
            p50, p99, requests = statistics.median(ms), ms[int(len(ms) * 0.99) - 1], len(ms)
        elif args.client == "wrk":
            p50, p99, requests, errors = load_wrk(base, tokens, args.seconds, base_dir)
        else:
            latencies, errors = asyncio.run(load(base, tokens, args.seconds))
            ms = sorted(x * 1000 for x in latencies)
            p50, p99, requests = statistics.median(ms), ms[int(len(ms) * 0.99) - 1], len(ms)
        verdict = "PASS" if p99 < 100 and not errors else "FAIL"
        print(f"portal dashboard ({args.client}, {args.http_workers} HTTP processes), "
              f"{args.transactions} transactions, "
              f"{args.sessions} sessions: p50 {p50:.1f} ms p99 {p99:.1f} ms | "
              f"{requests / args.seconds:.0f} pages/s | {errors} errors | "
              f"target p99 < 100 ms: {verdict}")
        if args.json:
            args.json.write_text(json.dumps({"p50_ms": p50, "p99_ms": p99, "requests": requests,
                                             "errors": errors, "args": vars(args) | {
                                                 "json": str(args.json)}}, indent=2))
        return 0 if verdict == "PASS" else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
