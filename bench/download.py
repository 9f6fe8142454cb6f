"""Download benchmark: iepnode's recipient zip vs ``cat`` of the same files vs Orthanc.

One fresh synthetic CT study (``--slices``, default 1000, ~525 MB, via
``../shared/bench/make_ct.py``) is sent with dcmtk ``storescu`` to a fresh
``iepnode serve`` and a fresh Orthanc, both on ephemeral loopback ports. On
iepnode it is shared with ``iepnode transfer create`` and a recipient signs in
through the real link + passcode flow (read from the outbox). Then, in the same
run, each measured ``--repeat`` times with ``curl -o /dev/null`` (rotating order):

- ``cat`` of iepnode's stored files of the study (the disk / page-cache limit);
- iepnode ``GET /transactions/{id}/download`` (the PDI zip, recipient session);
- Orthanc ``GET /studies/{id}/archive`` and ``GET /studies/{id}/media`` (its zip and
  its zip with a DICOMDIR).

The first iepnode download is reported apart (it plans the package: DICOMDIR,
previews, and the CRC-32 of every file, which the node otherwise computes in the
background once a study is stable); it is written to a file and checked (zip
test, instance count). Peak RSS of iepnode's process tree is sampled every 50 ms
during the downloads; the growth over its RSS just before is reported.

Usage (from the repository root; never beside another bench: the machine has
two cores)::

    flock /tmp/iepnode-bench.lock python -m bench.download
    flock /tmp/iepnode-bench.lock python -m bench.download --slices 300 --repeat 5
    python -m bench.download --drop-caches     # cold page cache before each timing (root)

Prints one line, e.g.::

    download 1000 slices (525 MB): cat 0.31 s | iepnode 0.62 s (850 MB/s, 0.50x cat) |
    orthanc archive 21.0 s | orthanc media 24.9 s | iepnode/orthanc-archive 34x | ...
"""

from __future__ import annotations

import argparse
import email
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from email import policy
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, make_study

MB = 1e6
CURL = "/usr/bin/curl"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=1000, help="CT slices (1000, ~525 MB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (medians)")
    ap.add_argument("--no-orthanc", dest="orthanc", action="store_false",
                    help="skip Orthanc (iepnode and cat only)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="sync and drop the page cache before each timing (root; cold reads)")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent for study and stores")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.slices < 1:
        ap.error("--repeat and --slices must be >= 1")
    return args


# -- plumbing ---------------------------------------------------------------------------


def settle(drop: bool) -> None:
    os.sync()
    if drop:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def curl(url: str, out: str = "/dev/null", cookie: str = "", timeout: float = 900,
         ) -> dict[str, float]:
    """Download ``url`` with curl; return status, bytes, time to first byte and total."""
    cmd = [CURL, "-sS", "-o", out, "-w", "%{http_code} %{size_download} %{time_starttransfer} "
           "%{time_total}", "--max-time", str(int(timeout))]
    if cookie:
        cmd += ["-H", f"Cookie: {cookie}"]
    res = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout + 30)
    if res.returncode != 0:
        raise BenchError(f"curl {url} failed ({res.returncode}): {res.stderr.strip()}")
    code, size, first, total = res.stdout.split()
    if code != "200":
        raise BenchError(f"curl {url}: HTTP {code}")
    return {"bytes": int(size), "ttfb_s": float(first), "seconds": float(total)}


def time_cat(files: list[Path]) -> float:
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        for start in range(0, len(files), 500):
            subprocess.run(["cat", *map(str, files[start:start + 500])], stdout=sink,
                           check=True)
    return time.perf_counter() - started


def request(port: int, method: str, path: str, *, cookie: str = "", form: dict | None = None,
            ) -> tuple[int, dict[str, list[str]], str]:
    """One HTTP request to the node (no redirects followed); status, headers, text."""
    conn = http.client.HTTPConnection(bp.HOST, port, timeout=120)
    headers = {"Cookie": cookie} if cookie else {}
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    out: dict[str, list[str]] = {}
    for name, value in response.getheaders():
        out.setdefault(name.lower(), []).append(value)
    text = response.read().decode("utf-8", "replace")
    conn.close()
    return response.status, out, text


def cookies(headers: dict[str, list[str]]) -> dict[str, str]:
    return dict(c.split(";", 1)[0].split("=", 1) for c in headers.get("set-cookie", []))


def newest_mail(outbox: Path, to: str) -> str:
    for path in sorted(outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        if to in str(message["To"]):
            return message.get_body(preferencelist=("plain",)).get_content()
    raise BenchError(f"no mail to {to} in {outbox}")


def recipient_session(peer: bp.IepnodePeer, study_uid: str) -> tuple[str, str]:
    """Share the study and sign in as its recipient; return (transaction ID, cookie)."""
    res = subprocess.run(
        [*bp.iepnode_cmd(), "transfer", "create", "--study", study_uid, "--to",
         "bench@example.org", "--otp-mobile", "+447700900123", "--data-dir", str(peer.data_dir)],
        capture_output=True, text=True, timeout=120, env=peer.env(), cwd=peer.workdir)
    if res.returncode != 0:
        raise BenchError(f"transfer create failed: {res.stderr.strip()[-2000:]}")
    public_id = res.stdout.strip()
    outbox = peer.data_dir / "outbox"
    token = re.search(r"/t/([A-Za-z0-9_-]+)", newest_mail(outbox, "bench@example.org")).group(1)
    status, headers, html = request(peer.http_port, "GET", f"/t/{token}")
    if status != 200:
        raise BenchError(f"link page answered {status}")
    prelogin = "; ".join(f"{k}={v}" for k, v in cookies(headers).items())
    attempt = re.search(r'name="attempt" value="(\d+)"', html).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    code = re.search(r"\b(\d{6})\b", newest_mail(outbox, "sms:")).group(1)
    status, headers, _ = request(peer.http_port, "POST", f"/t/{token}/login", cookie=prelogin,
                                 form={"attempt": attempt, "code": code, "csrf": csrf})
    session = cookies(headers).get("__Host-iepnode")
    if status != 303 or not session:
        raise BenchError(f"login answered {status}")
    return public_id, f"__Host-iepnode={session}"


def orthanc_study_id(peer: bp.OrthancPeer) -> str:
    with urllib.request.urlopen(f"http://{bp.HOST}:{peer.http_port}/studies", timeout=60) as r:
        ids = json.load(r)
    if len(ids) != 1:
        raise BenchError(f"Orthanc holds {len(ids)} studies, expected 1")
    return ids[0]


# -- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(CURL).exists():
        log(f"{CURL} not found: apt-get install curl")
        return 2
    ok, why = bp.iepnode_available()
    if not ok:
        log(f"iepnode unavailable: {why}")
        return 2
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-download-", dir=args.tmp_dir))
    report: dict = bp.run_report(args, base, curl=subprocess.run(
        [CURL, "--version"], capture_output=True, text=True).stdout.split("\n")[0])
    iepnode = orthanc = None
    try:
        log(f"bench dir {base}; generating a {args.slices}-slice CT study")
        study = make_study(base / "study", args.slices, "BENCHDL")
        iepnode = bp.make_peer("iepnode", base, max_pdu=bp.DEFAULT_MAX_PDU)
        iepnode.start()
        bp.send_storescu(iepnode, study.files, 1)
        stored = sorted(p for p in (iepnode.data_dir / "objects").rglob("*") if p.is_file())
        if len(stored) != args.slices:
            raise BenchError(f"iepnode holds {len(stored)} files, expected {args.slices}")
        study_bytes = sum(p.stat().st_size for p in stored)
        public_id, cookie = recipient_session(iepnode, study.study_uid)
        url = f"http://{bp.HOST}:{iepnode.http_port}/transactions/{public_id}/download"
        urls = {"iepnode": (url, cookie)}
        if args.orthanc:
            orthanc = bp.make_peer("orthanc", base, max_pdu=bp.DEFAULT_MAX_PDU)
            orthanc.start()
            bp.send_storescu(orthanc, study.files, 1)
            sid = orthanc_study_id(orthanc)
            root = f"http://{bp.HOST}:{orthanc.http_port}/studies/{sid}"
            urls["orthanc-archive"] = (f"{root}/archive", "")
            urls["orthanc-media"] = (f"{root}/media", "")

        with bp.RssSampler(iepnode.pid) as rss:
            # First download: plans the package (DICOMDIR, previews, CRCs); checked.
            settle(args.drop_caches)
            rss.reset()
            before = rss.peak
            check = base / "first.zip"
            first = curl(url, out=str(check), cookie=cookie)
            with zipfile.ZipFile(check) as zf:
                names = zf.namelist()
                bad = zf.testzip()
            dicom = [n for n in names if n.startswith("DICOM/")]
            if bad is not None or len(dicom) != args.slices or first["bytes"] != \
                    check.stat().st_size:
                raise BenchError(f"first download is wrong: bad={bad} dicom={len(dicom)}")
            check.unlink()
            report["first_download"] = first | {"rss_before_mb": round(before / MB, 1),
                                                "rss_peak_mb": round(rss.peak / MB, 1)}
            log(f"  iepnode first download (plans the package): {first['seconds']:.2f} s, "
                f"first byte after {first['ttfb_s']:.2f} s, {first['bytes'] / MB:.0f} MB")

            runs: dict[str, list[dict]] = {name: [] for name in ["cat", *urls]}
            methods = ["cat", *urls]
            for rep in range(args.repeat):
                order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                for name in order:
                    settle(args.drop_caches)
                    if name == "cat":
                        seconds = time_cat(stored)
                        runs["cat"].append({"seconds": seconds, "bytes": study_bytes})
                    else:
                        url_, cookie_ = urls[name]
                        result = curl(url_, cookie=cookie_)
                        runs[name].append(result)
                        seconds = result["seconds"]
                    log(f"  [{rep}] {name}: {seconds:.2f} s")
            rss.sample()
            peak_download = rss.peak  # over the first and every timed download
            report["runs"] = runs
            report["rss_before_download_mb"] = round(before / MB, 1)
            report["rss_peak_download_mb"] = round(peak_download / MB, 1)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 2
    finally:
        for peer in (iepnode, orthanc):
            if peer is not None:
                peer.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    zip_bytes = runs["iepnode"][0]["bytes"]
    rate = {name: (zip_bytes if name != "cat" else study_bytes) / med[name] / MB for name in med}
    growth = report["rss_peak_download_mb"] - report["rss_before_download_mb"]
    parts = [f"cat {med['cat']:.2f} s ({rate['cat']:.0f} MB/s)",
             f"iepnode {med['iepnode']:.2f} s ({rate['iepnode']:.0f} MB/s, "
             f"{rate['iepnode'] / rate['cat']:.2f}x cat)",
             f"first iepnode download {report['first_download']['seconds']:.2f} s"]
    for name in ("orthanc-archive", "orthanc-media"):
        if name in med:
            parts.append(f"{name} {med[name]:.2f} s ({rate[name]:.0f} MB/s, "
                         f"iepnode {med[name] / med['iepnode']:.0f}x faster)")
    parts.append(f"iepnode RSS {report['rss_before_download_mb']:.0f} -> "
                 f"{report['rss_peak_download_mb']:.0f} MB (+{growth:.0f} MB)")
    line = (f"download {args.slices} slices ({study_bytes / MB:.0f} MB, zip "
            f"{zip_bytes / MB:.0f} MB): " + " | ".join(parts))
    print(line, flush=True)
    report.update(line=line, medians_s=med, rates_mb_s=rate,
                  loadavg_end=os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
