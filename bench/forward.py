"""Forward benchmark: send a CT study to dcmtk storescp from iepnode, storescu and Orthanc.

All three senders hold the same fresh synthetic study (new UIDs, 512x512 int16
slices, ``../shared/bench/make_ct.py``) and send it to a freshly started dcmtk
``storescp`` (``--fork +B``, its own empty folder) on loopback, in the same run:

- **iepnode**: ``iepnode serve`` with the study imported and the receiver
  registered (``iepnode ae add STORESCP ... --send-to``); ``iepnode send UID --to
  STORESCP`` queues the job and the node's send runner does the work. Timed from
  the job's ``created_at`` (queued) to its ``finished_at`` (done), as recorded in
  the database; the command's wall time is reported too.
- **storescu**: dcmtk ``storescu`` with the files (one association), wall time.
- **orthanc**: Debian's Orthanc holding the study (sent to it first with
  storescu), ``POST /modalities/x/store {"Resources": [study], "Synchronous":
  true}``, wall time of the request.

Each sender first sends a small warm-up study (untimed); ``sync`` runs before
each timed send; the order rotates between repetitions and medians are reported.
Every receiver must hold warm-up + study afterwards.

Usage (from the repository root)::

    python -m bench.forward                      # 1000 slices, once
    python -m bench.forward --repeat 3 --json /tmp/forward.json

Prints one line, e.g.::

    forward 1000 slices -> storescp: iepnode 400 img/s | storescu 1100 img/s |
    orthanc 450 img/s | iepnode/orthanc 0.89x | iepnode/storescu 0.36x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, Study, make_study

SENDERS = ("iepnode", "storescu", "orthanc")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def iepnode(data_dir: Path, *args: str, timeout: float = 600) -> str:
    """Run an iepnode admin command on ``data_dir``; return its stdout."""
    res = subprocess.run([*bp.iepnode_cmd(), *args, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=timeout, env=bp.iepnode_env(),
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise BenchError(f"iepnode {args[0]} failed ({res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res.stdout


def check_received(receiver: bp.Peer, expected: int, sender: str) -> None:
    got = receiver.count_instances()
    if got != expected:
        raise BenchError(f"storescp got {got} files from {sender}, expected {expected}")


def run_iepnode(study: Study, warm: Study, base: Path, args: argparse.Namespace) -> dict:
    with bp.make_peer("storescp", base, max_pdu=args.max_pdu) as receiver:
        node = bp.IepnodePeer(base, max_pdu=args.max_pdu, allow="store")
        try:
            node.prepare()
            data = node.data_dir
            iepnode(data, "ae", "add", receiver.aet, receiver.host, str(receiver.port),
                    "--send-to")
            for s in (warm, study):
                iepnode(data, "import", str(s.directory), "--no-progress")
            node.prepare = lambda: None  # type: ignore[method-assign] - done above
            node.start()
            iepnode(data, "send", warm.study_uid, "--to", receiver.aet, "--no-progress")
            os.sync()
            t0 = time.perf_counter()
            out = iepnode(data, "send", study.study_uid, "--to", receiver.aet, "--no-progress")
            wall = time.perf_counter() - t0
            check_received(receiver, len(warm) + len(study), "iepnode")
            with sqlite3.connect(data / "index.sqlite3") as db:
                created, finished, sent = db.execute(
                    "SELECT created_at, finished_at, sent FROM sendjob ORDER BY id DESC LIMIT 1"
                ).fetchone()
            if sent != len(study):
                raise BenchError(f"iepnode job: {out.strip()}")
        finally:
            node.stop()
    seconds = finished - created
    return {"seconds": round(seconds, 3), "img_s": round(len(study) / seconds, 1),
            "command_wall_s": round(wall, 3)}


def run_storescu(study: Study, warm: Study, base: Path, args: argparse.Namespace) -> dict:
    with bp.make_peer("storescp", base, max_pdu=args.max_pdu) as receiver:
        bp.send_storescu(receiver, warm.files, 1, max_pdu=args.max_pdu)
        os.sync()
        seconds = bp.send_storescu(receiver, study.files, 1, max_pdu=args.max_pdu)
        check_received(receiver, len(warm) + len(study), "storescu")
    return {"seconds": round(seconds, 3), "img_s": round(len(study) / seconds, 1)}


def _orthanc_study(orthanc: bp.OrthancPeer, study_uid: str) -> str:
    found = _post(orthanc, "/tools/lookup", study_uid)
    ids = [f["ID"] for f in found if f.get("Type") == "Study"]
    if not ids:
        raise BenchError(f"Orthanc does not hold study {study_uid}")
    return ids[0]


def _post(orthanc: bp.OrthancPeer, path: str, body: object) -> object:
    import urllib.request

    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{bp.HOST}:{orthanc.http_port}{path}", data=data,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=900) as response:
        return json.load(response)


def run_orthanc(study: Study, warm: Study, base: Path, args: argparse.Namespace) -> dict:
    with bp.make_peer("storescp", base, max_pdu=args.max_pdu) as receiver:
        modalities = {"bench": [bp.SENDER_AET, bp.HOST, 104],
                      "x": [receiver.aet, receiver.host, receiver.port]}
        with bp.make_peer("orthanc", base, max_pdu=args.max_pdu,
                          overrides={"DicomModalities": modalities}) as orthanc:
            for s in (warm, study):
                bp.send_storescu(orthanc, s.files, 1, max_pdu=args.max_pdu)
            warm_id = _orthanc_study(orthanc, warm.study_uid)
            study_id = _orthanc_study(orthanc, study.study_uid)
            _post(orthanc, "/modalities/x/store", {"Resources": [warm_id], "Synchronous": True})
            os.sync()
            t0 = time.perf_counter()
            answer = _post(orthanc, "/modalities/x/store",
                           {"Resources": [study_id], "Synchronous": True})
            seconds = time.perf_counter() - t0
            if answer.get("FailedInstancesCount"):
                raise BenchError(f"Orthanc failed to send: {answer}")
        check_received(receiver, len(warm) + len(study), "orthanc")
    return {"seconds": round(seconds, 3), "img_s": round(len(study) / seconds, 1)}


RUNNERS = {"iepnode": run_iepnode, "storescu": run_storescu, "orthanc": run_orthanc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1000, help="slices in the study (1000)")
    ap.add_argument("--warmup", type=int, default=40, help="slices in the warm-up study (40)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per sender; medians reported")
    ap.add_argument("--max-pdu", type=int, default=bp.DEFAULT_MAX_PDU)
    ap.add_argument("--senders", default=",".join(SENDERS),
                    help="comma list of iepnode,storescu,orthanc")
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    args = ap.parse_args(argv)
    senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    if not senders or set(senders) - set(SENDERS):
        ap.error(f"--senders: choose from {','.join(SENDERS)}")
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-forward-", dir=args.tmp_dir))
    report: dict = {"command": shlex.join([sys.executable, *sys.orig_argv[1:]]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "dcmtk": bp.dcmtk_version(), "orthanc": bp.orthanc_version(),
                                "loadavg_start": os.getloadavg()},
                    "repo": bp.repo_state(), "runs": []}
    code = 0
    try:
        log(f"bench dir {base}; generating {args.size}-slice study and warm-up")
        study = make_study(base / "study", args.size, "FWD1000")
        warm = make_study(base / "warm", args.warmup, "FWDWARM")
        for rep in range(args.repeat):
            k = rep % len(senders)
            for name in senders[k:] + senders[:k]:
                try:
                    result = RUNNERS[name](study, warm, base, args)
                except BenchError as exc:
                    result = {"error": str(exc)}
                    code = 1
                result.update(sender=name, rep=rep)
                report["runs"].append(result)
                log(f"  [{rep}] {name}: " + (f"ERROR {result['error']}" if "error" in result
                                              else f"{result['seconds']:.2f} s, "
                                                   f"{result['img_s']:.0f} img/s"))
        rates = {}
        for name in senders:
            ok = [r["img_s"] for r in report["runs"] if r["sender"] == name and "img_s" in r]
            rates[name] = statistics.median(ok) if ok else None
        parts = [f"{n} {rates[n]:.0f} img/s" if rates[n] else f"{n} n/a" for n in senders]
        for ref in ("orthanc", "storescu"):
            if ref in senders and "iepnode" in senders and rates[ref] and rates["iepnode"]:
                parts.append(f"iepnode/{ref} {rates['iepnode'] / rates[ref]:.2f}x")
        line = f"forward {args.size} slices -> storescp: " + " | ".join(parts)
        report["line"], report["medians"] = line, rates
        print(line, flush=True)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        code = 2
    finally:
        shutil.rmtree(base, ignore_errors=True)
        report["machine"]["loadavg_end"] = os.getloadavg()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
