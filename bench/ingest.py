"""Ingest benchmark: dcmtk storescu -> storescp / Orthanc / iepnode, same run, same data.

For every scenario (study size x parallel associations x repetition) a fresh
synthetic CT study (new UIDs, 512x512 int16 slices) is generated with
``../shared/bench/make_ct.py``. Each peer is then started fresh on an ephemeral
loopback port with an empty temporary store, warmed up with a small study,
and timed receiving the scenario's study from N concurrent ``storescu``
processes (the files split into N contiguous groups, one association each).
Time runs from starting the first storescu to the last one exiting; all must
exit 0 and the peer must then hold every instance. Peer order rotates between
runs, and ``sync`` is called before each timed send so earlier writes do not
bleed into it.

Usage (from the repository root)::

    python -m bench.ingest                         # 300,1000 x 1,4 x all peers
    python -m bench.ingest --sizes 300 --assocs 1,4 --peers storescp,orthanc
    python -m bench.ingest --repeat 3 --json /tmp/ingest.json

Prints one line per scenario (medians over --repeat), e.g.::

    ingest 300x1assoc: storescp 980 img/s | orthanc 240 img/s | iepnode 300 img/s |
    iepnode/orthanc 1.25x | iepnode/storescp 0.31x | iepnode peak RSS 180 MB

Progress and per-run details go to stderr. Only loopback is used; every step
has a timeout and ``--max-minutes`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, make_study

ALL_PEERS = ("storescp", "orthanc", "iepnode")
MB = 1024 * 1024


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _peer_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ALL_PEERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"peers must be among {','.join(ALL_PEERS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", type=_int_list, default=[300, 1000], help="slices per study (300,1000)"
    )
    ap.add_argument(
        "--assocs",
        type=_int_list,
        default=[1, 4],
        help="parallel associations / storescu processes (1,4)",
    )
    ap.add_argument(
        "--peers",
        type=_peer_list,
        default=list(ALL_PEERS),
        help="receivers to compare (storescp,orthanc,iepnode)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario; medians are reported")
    ap.add_argument("--warmup", type=int, default=40, help="slices in the warm-up study (40)")
    ap.add_argument(
        "--max-pdu",
        type=int,
        default=bp.DEFAULT_MAX_PDU,
        help="max PDU for every receiver and storescu (131072, dcmtk's maximum)",
    )
    ap.add_argument(
        "--iepnode-workers",
        type=int,
        default=None,
        help="iepnode serve --dicom-workers (default: iepnode's own default)",
    )
    ap.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="parent for studies and peer stores (default: system temp dir)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=60.0,
        help="stop starting new runs after this long (60)",
    )
    ap.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="skip the untimed settle round (first scenario once, all peers, not reported)",
    )
    ap.add_argument(
        "--orthanc-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override an Orthanc configuration key (experiments only), e.g. SyncStorageArea=false",
    )
    ap.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep studies and peer stores (debugging)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not 4096 <= args.max_pdu <= 131072:
        ap.error("--max-pdu must be within 4096..131072 (dcmtk's limits)")
    args.orthanc_overrides = {}
    for item in args.orthanc_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--orthanc-set expects KEY=JSON, got {item!r}")
        try:
            args.orthanc_overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            args.orthanc_overrides[key] = value
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_peer(name: str, study, warm, assocs: int, args, base: Path) -> dict:
    """Start ``name`` fresh, warm it up, time sending ``study``; return a result dict."""
    res: dict = {"peer": name}
    peer = bp.make_peer(
        name,
        base,
        max_pdu=args.max_pdu,
        workers=args.iepnode_workers,
        overrides=args.orthanc_overrides,
        keep=args.keep,
    )
    try:
        t_start = time.perf_counter()
        peer.start()
        res["startup_s"] = round(time.perf_counter() - t_start, 3)
        res["config"] = peer.describe()
        with bp.RssSampler(peer.pid) as rss:
            bp.send_storescu(peer, warm.files, assocs, max_pdu=args.max_pdu)
            got = peer.count_instances()
            if got != len(warm):
                raise BenchError(
                    f"{name} holds {got} instances after warm-up, expected {len(warm)}"
                )
            os.sync()  # flush the study just written and earlier peers' writes
            rss.reset()
            seconds = bp.send_storescu(peer, study.files, assocs, max_pdu=args.max_pdu)
            rss.sample()
            peak, procs, cpu = rss.peak, rss.max_procs, rss.cpu
        expected = len(warm) + len(study)
        got = peer.count_instances()
        if got != expected:
            raise BenchError(f"{name} holds {got} instances after the send, expected {expected}")
        res.update(
            seconds=round(seconds, 3),
            img_s=round(len(study) / seconds, 1),
            peak_rss_mb=round(peak / MB, 1),
            processes=procs,
            cpu_s=round(cpu, 2),
        )
    except BenchError as exc:
        res["error"] = str(exc)
    finally:
        peer.stop()
        if peer.warnings:
            res["warnings"] = peer.warnings
    return res


def fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} img/s"


def summarize(size: int, assocs: int, runs: list[dict], peers: list[str]) -> tuple[str, dict]:
    summary: dict = {"size": size, "assocs": assocs, "peers": {}}
    for name in peers:
        ok = [r for r in runs if r["peer"] == name and "img_s" in r]
        errs = [r["error"] for r in runs if r["peer"] == name and "error" in r]
        summary["peers"][name] = {
            "img_s_median": round(statistics.median(r["img_s"] for r in ok), 1) if ok else None,
            "img_s_runs": [r["img_s"] for r in ok],
            "peak_rss_mb_max": max((r["peak_rss_mb"] for r in ok), default=None),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in ok), 2) if ok else None,
            "errors": errs,
        }
    rate = {n: summary["peers"][n]["img_s_median"] for n in peers}
    parts = [f"{n} {fmt_rate(rate[n])}" for n in peers]
    if "iepnode" in peers:
        for ref in ("orthanc", "storescp"):
            if ref in peers:
                r = (rate["iepnode"] / rate[ref]) if rate["iepnode"] and rate[ref] else None
                summary[f"iepnode/{ref}"] = round(r, 3) if r else None
                parts.append(f"iepnode/{ref} " + (f"{r:.2f}x" if r else "n/a"))
        peak = summary["peers"]["iepnode"]["peak_rss_mb_max"]
        parts.append("iepnode peak RSS " + (f"{peak:.0f} MB" if peak is not None else "n/a"))
    line = f"ingest {size}x{assocs}assoc: " + " | ".join(parts)
    return line, summary


def run_round(
    size: int,
    assocs: int,
    tag: str,
    order: list[str],
    warm,
    args,
    base: Path,
    skipped: dict[str, str],
) -> list[dict]:
    """Generate a fresh study and send it to every peer in ``order``; one result per peer."""
    runs: list[dict] = []
    study = make_study(base / f"study-{size}x{assocs}-{tag}", size, f"B{size}A{assocs}{tag}")
    try:
        for name in order:
            if name in skipped:
                runs.append({"peer": name, "error": f"skipped: {skipped[name]}"})
                continue
            r = run_peer(name, study, warm, assocs, args, base)
            r.update(size=size, assocs=assocs, rep=tag)
            runs.append(r)
            head = f"  [{size}x{assocs} {tag}] {name}:"
            if "error" in r:
                log(f"{head} ERROR {r['error']}")
            else:
                log(
                    f"{head} {r['seconds']:.2f} s, {r['img_s']:.0f} img/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['processes']} proc), "
                    f"CPU {r['cpu_s']:.1f} s, start {r['startup_s']:.2f} s"
                )
    finally:
        if not args.keep:
            shutil.rmtree(study.directory, ignore_errors=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    peers = list(args.peers)
    skipped: dict[str, str] = {}
    if "iepnode" in peers:
        ok, why = bp.iepnode_available()
        if not ok:
            log(f"iepnode unavailable, skipping it: {why}")
            skipped["iepnode"] = why
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-ingest-", dir=args.tmp_dir))
    report: dict = {
        "command": shlex.join([sys.executable, *sys.orig_argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "dcmtk": bp.dcmtk_version(),
            "orthanc": bp.orthanc_version(),
            "loadavg_start": os.getloadavg(),
        },
        "settings": {
            "sizes": args.sizes,
            "assocs": args.assocs,
            "peers": peers,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "settle": args.settle,
            "max_pdu": args.max_pdu,
            "iepnode_workers": args.iepnode_workers,
            "orthanc_overrides": args.orthanc_overrides,
            "tmp_dir": str(base),
        },
        "repo": bp.repo_state(),
        "skipped": skipped,
        "settle_runs": [],
        "runs": [],
        "summaries": [],
    }
    lines: list[str] = []
    exit_code = 0

    def out_of_time() -> bool:
        if time.monotonic() - t_begin > args.max_minutes * 60:
            log(f"--max-minutes {args.max_minutes:g} reached; stopping")
            return True
        return False

    try:
        log(f"bench dir {base}; generating warm-up study ({args.warmup} slices)")
        warm = make_study(base / "warmup", args.warmup, "BENCHWARM")
        if args.settle:
            # One untimed round first: the first writes after a quiet spell are
            # often slow on this kind of VM disk and would skew whoever goes first.
            log("settle round (not reported)")
            report["settle_runs"] = run_round(
                args.sizes[0], args.assocs[0], "settle", peers, warm, args, base, skipped
            )
        timed_out = False
        scenarios = [(size, assocs) for size in args.sizes for assocs in args.assocs]
        for i, (size, assocs) in enumerate(scenarios):
            runs: list[dict] = []
            for rep in range(args.repeat):
                timed_out = out_of_time()
                if timed_out:
                    break
                k = (i + rep) % len(peers)
                order = peers[k:] + peers[:k]  # rotate who goes first
                runs += run_round(size, assocs, f"r{rep}", order, warm, args, base, skipped)
            report["runs"] += runs
            if runs:
                line, summary = summarize(size, assocs, runs, peers)
                lines.append(line)
                report["summaries"].append(summary)
                print(line, flush=True)
                if any(v["errors"] for n, v in summary["peers"].items() if n not in skipped):
                    exit_code = 1
            if timed_out:
                exit_code = 1
                break
    except BenchError as exc:
        log(f"bench failed: {exc}")
        exit_code = 2
    except KeyboardInterrupt:
        log("interrupted")
        exit_code = 130
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        report["elapsed_s"] = round(time.monotonic() - t_begin, 1)
        report["machine"]["loadavg_end"] = os.getloadavg()
        report["lines"] = lines
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {args.json}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
