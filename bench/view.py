"""Viewer benchmark: time to first image and per further frame, iepnode vs Orthanc's preview.

Two fresh studies of one patient are sent with dcmtk ``storescu`` to a fresh
``iepnode serve`` and a fresh Orthanc (both on ephemeral loopback ports): a
synthetic CT (``--slices``, default 1000, 512x512 int16, via
``../shared/bench/make_ct.py``) and a mammogram series (``--mg`` images of
3328x4096, 16-bit, 12 bits stored: ~27 MB each, generated here). On iepnode both
are shared in one transaction and a recipient signs in through the real link +
passcode flow (read from the outbox). Then, in the same run, over keep-alive HTTP
connections like a browser's:

- **first image**: iepnode = what the viewer fetches before it can draw:
  the page, ``viewer.js``, ``manifest.json`` and the first frame's raw values
  (gzip); Orthanc = ``GET /instances/{id}/preview`` (a PNG) of the same instance;
- **per further frame**: the next ``--frames`` images one after the other, cold
  on the server (never asked before): iepnode raw values (what the viewer
  uses), iepnode rendered PNG (the alternative, measured to decide), Orthanc
  preview;
- **10 clients scrolling**: ``--clients`` threads, each scrolling the whole CT
  series (raw frames, starting at different slices), while the node's process
  tree RSS is sampled every 50 ms: peak RSS, frames/s, median and p95 latency.

Times are to the last byte received, gzip decompressed for iepnode (the browser
does that too); the browser's windowing of a 512x512 frame (a table lookup per
pixel) and PNG decoding for Orthanc are not included.

Usage (from the repository root; never beside another bench: the machine has
two cores)::

    flock /tmp/iepnode-bench.lock .venv/bin/python -m bench.view
    flock /tmp/iepnode-bench.lock .venv/bin/python -m bench.view --slices 300 --frames 30

Prints one line, e.g.::

    view: CT first 25 ms (orthanc 40 ms) | CT per frame raw 6.1 ms, png 12 ms, orthanc 20 ms
    | MG first ... | 10 clients x 1000 CT frames: 900 frames/s, p95 30 ms, peak RSS 250 MB
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, make_study
from bench.download import cookies, newest_mail, request

MB = 1e6
#: The ``max`` the viewer asks for first on a 1920x1080 screen (a power of two).
SCREEN = 2048


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=1000, help="CT slices (default 1000)")
    ap.add_argument("--mg", type=int, default=4, help="mammogram images (default 4)")
    ap.add_argument("--frames", type=int, default=40, help="further frames timed per method")
    ap.add_argument("--clients", type=int, default=10, help="concurrent scrolling clients")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent for studies and stores")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = ap.parse_args(argv)
    if args.slices < 2 or args.mg < 1 or args.frames < 1:
        ap.error("need --slices >= 2, --mg >= 1, --frames >= 1")
    args.frames = min(args.frames, args.slices - 1)
    return args


def make_mammograms(out: Path, n: int, patient_id: str, study_uid: str) -> list[Path]:
    """``n`` digital mammograms for presentation, 3328x4096, 16-bit (12 stored), MONOCHROME2."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalMammographyXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    out.mkdir(parents=True, exist_ok=True)
    rows, cols = 4096, 3328
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    breast = np.clip(1.0 - ((xx / cols) ** 2 + ((yy - rows / 2) / (rows / 2)) ** 2), 0, 1)
    series = generate_uid()
    paths = []
    for i in range(n):
        noise = rng.normal(0, 40, (rows, cols)).astype(np.float32)
        pixels = np.clip(300 + 2800 * breast + noise, 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series
        ds.PatientName, ds.PatientID = "Bench^Patient", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19680102", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20250101", "100000", "ACCMG"
        ds.Modality, ds.StudyDescription, ds.SeriesDescription = "MG", "Mammography", "MG"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2000, 4000
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"MG{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Client:
    """One keep-alive HTTP connection, like one browser's."""

    def __init__(self, port: int, cookie: str = "") -> None:
        self.conn = http.client.HTTPConnection(bp.HOST, port, timeout=120)
        self.cookie = cookie
        self.retries = 0

    def get(self, path: str) -> tuple[bytes, dict[str, str]]:
        headers = {"Accept-Encoding": "gzip"}
        if self.cookie:
            headers["Cookie"] = self.cookie
        try:
            self.conn.request("GET", path, headers=headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            # the server closed an idle keep-alive connection: open another (browsers do)
            self.retries += 1
            self.conn.close()
            self.conn.request("GET", path, headers=headers)
            response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
        found = {k.lower(): v for k, v in response.getheaders()}
        if found.get("content-encoding") == "gzip":
            body = zlib.decompress(body, 31)
        return body, found

    def close(self) -> None:
        self.conn.close()


def recipient_session(peer: bp.IepnodePeer, study_uids: list[str]) -> tuple[str, str]:
    """Share the studies in one transaction, sign in as its recipient: (ID, cookie)."""
    import re
    import subprocess

    studies = [x for uid in study_uids for x in ("--study", uid)]
    res = subprocess.run(
        [*bp.iepnode_cmd(), "transfer", "create", *studies, "--to", "bench@example.org",
         "--otp-mobile", "+447700900123", "--data-dir", str(peer.data_dir)],
        capture_output=True, text=True, timeout=120, env=peer.env(), cwd=peer.workdir)
    if res.returncode != 0:
        raise BenchError(f"transfer create failed: {res.stderr.strip()[-2000:]}")
    public_id = res.stdout.strip()
    outbox = peer.data_dir / "outbox"
    token = re.search(r"/t/([A-Za-z0-9_-]+)", newest_mail(outbox, "bench@example.org")).group(1)
    status, headers, html = request(peer.http_port, "GET", f"/t/{token}")
    prelogin = "; ".join(f"{k}={v}" for k, v in cookies(headers).items())
    attempt = re.search(r'name="attempt" value="(\d+)"', html)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    code = re.search(r"\b(\d{6})\b", newest_mail(outbox, "sms:"))
    if status != 200 or not (attempt and csrf and code):
        raise BenchError(f"link page answered {status}")
    status, headers, _ = request(peer.http_port, "POST", f"/t/{token}/login", cookie=prelogin,
                                 form={"attempt": attempt.group(1), "code": code.group(1),
                                       "csrf": csrf.group(1)})
    session = cookies(headers).get("__Host-iepnode")
    if status != 303 or not session:
        raise BenchError(f"login answered {status}")
    return public_id, f"__Host-iepnode={session}"


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def orthanc_ids(port: int, sop_uids: list[str]) -> list[str]:
    out = []
    for uid in sop_uids:
        request = urllib.request.Request(f"http://{bp.HOST}:{port}/tools/lookup",
                                         data=uid.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:
            found = [x["ID"] for x in json.load(r) if x["Type"] == "Instance"]
        if not found:
            raise BenchError(f"Orthanc does not know {uid}")
        out.append(found[0])
    return out


def measure_series(name: str, iep: Client, orth: Client | None, api: str,
                   uids: list[str], oids: list[str], frames: int) -> dict:
    """First image and further frames of one series, iepnode (raw, png) and Orthanc."""
    result: dict = {}
    first, pieces = timed(lambda: (iep.get(api), iep.get("/static/viewer.js"),
                                   iep.get(f"{api}/manifest.json"),
                                   iep.get(f"{api}/instances/{uids[0]}/frames/1.raw?max={SCREEN}")))
    result["iepnode_first_s"] = first
    result["raw_bytes"] = len(pieces[3][0])
    result["raw_bytes_gzip_header"] = pieces[3][1].get("content-length")
    if orth is not None:
        result["orthanc_first_s"], _ = timed(orth.get, f"/instances/{oids[0]}/preview")
    further = uids[1:frames + 1] if len(uids) > 1 else uids
    ofurther = oids[1:frames + 1] if len(oids) > 1 else oids
    methods = {
        "iepnode_raw": lambda i: iep.get(f"{api}/instances/{further[i]}/frames/1.raw"
                                         f"?max={SCREEN}"),
        "iepnode_raw_full": lambda i: iep.get(f"{api}/instances/{further[i]}/frames/1.raw"),
        "iepnode_png": lambda i: iep.get(f"{api}/instances/{further[i]}/frames/1.png"),
    }
    if orth is not None:
        methods["orthanc_preview"] = lambda i: orth.get(f"/instances/{ofurther[i]}/preview")
    times: dict[str, list[float]] = {m: [] for m in methods}
    sizes: dict[str, int] = {}
    for i in range(len(further)):
        order = list(methods)
        order = order[i % len(order):] + order[:i % len(order)]  # rotate: no method always first
        for method in order:
            if method.startswith("iepnode_raw") and len(uids) == 1:
                continue
            seconds, (body, _) = timed(methods[method], i)
            times[method].append(seconds)
            sizes[method] = len(body)
    for method, values in times.items():
        if values:
            result[f"{method}_per_frame_s"] = statistics.median(values)
            result[f"{method}_bytes"] = sizes[method]
    log(f"  {name}: " + ", ".join(f"{k} {v * 1000:.1f} ms" if k.endswith("_s") else
                                  f"{k} {v}" for k, v in result.items()))
    return result


def scroll_clients(port: int, cookie: str, api: str, uids: list[str], clients: int,
                   pid: int) -> dict:
    """``clients`` threads each scrolling every raw frame; RSS of the node sampled."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def scroll(k: int) -> None:
        client = Client(port, cookie)
        start = k * len(uids) // clients
        mine = []
        try:
            for j in range(len(uids)):
                uid = uids[(start + j) % len(uids)]
                seconds, _ = timed(client.get, f"{api}/instances/{uid}/frames/1.raw"
                                   f"?max={SCREEN}")
                mine.append(seconds)
        except Exception as exc:  # report, do not hang the bench
            errors.append(str(exc))
        finally:
            client.close()
            with lock:
                latencies.extend(mine)

    with bp.RssSampler(pid) as rss:
        rss.reset()
        before = rss.peak
        started = time.perf_counter()
        threads = [threading.Thread(target=scroll, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rss.sample()
        peak = rss.peak
    if errors:
        raise BenchError(f"scrolling clients failed: {errors[:3]}")
    latencies.sort()
    out = {"clients": clients, "frames": len(latencies), "seconds": wall,
           "frames_per_s": len(latencies) / wall,
           "median_s": statistics.median(latencies),
           "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
           "rss_before_mb": before / MB, "rss_peak_mb": peak / MB}
    log(f"  {clients} clients: {out['frames_per_s']:.0f} frames/s, median "
        f"{out['median_s'] * 1000:.1f} ms, p95 {out['p95_s'] * 1000:.1f} ms, RSS "
        f"{out['rss_before_mb']:.0f} -> {out['rss_peak_mb']:.0f} MB")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = bp.iepnode_available()
    if not ok:
        log(f"iepnode unavailable: {why}")
        return 2
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-view-", dir=args.tmp_dir))
    report: dict = bp.run_report(args, base)
    iepnode = orthanc = None
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    try:
        log(f"bench dir {base}; generating a {args.slices}-slice CT and {args.mg} mammograms")
        ct = make_study(base / "ct", args.slices, "BENCHVW")
        mg = make_mammograms(base / "mg", args.mg, "BENCHVW", generate_uid())
        mg_study = str(dcmread(mg[0], stop_before_pixels=True).StudyInstanceUID)
        ct_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in sorted(ct.files)]  # IM00000.. = instance number order
        mg_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mg]
        iepnode = bp.make_peer("iepnode", base, max_pdu=bp.DEFAULT_MAX_PDU)
        iepnode.start()
        bp.send_storescu(iepnode, [*ct.files, *mg], 1)
        public_id, cookie = recipient_session(iepnode, [ct.study_uid, mg_study])
        orth = None
        ct_oids = mg_oids = []
        orthanc = bp.make_peer("orthanc", base, max_pdu=bp.DEFAULT_MAX_PDU)
        orthanc.start()
        bp.send_storescu(orthanc, [*ct.files, *mg], 1)
        ct_oids = orthanc_ids(orthanc.http_port, ct_uids[:args.frames + 1])
        mg_oids = orthanc_ids(orthanc.http_port, mg_uids)
        orth = Client(orthanc.http_port)

        iep = Client(iepnode.http_port, cookie)
        api = f"/transactions/{public_id}/view"
        report["ct"] = measure_series("CT 512x512", iep, orth, api, ct_uids, ct_oids,
                                      args.frames)
        iep_mg = Client(iepnode.http_port, cookie)  # a new connection, as a new page would
        report["mg"] = measure_series("MG 3328x4096", iep_mg, orth, api, mg_uids, mg_oids,
                                      args.mg - 1)
        iep.close()
        iep_mg.close()
        orth.close()
        report["scroll"] = scroll_clients(iepnode.http_port, cookie, api, ct_uids,
                                          args.clients, iepnode.pid)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 2
    finally:
        for peer in (iepnode, orthanc):
            if peer is not None:
                peer.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    ms = lambda s: f"{s * 1000:.0f} ms" if s >= 0.1 else f"{s * 1000:.1f} ms"  # noqa: E731
    parts = []
    for key, label in (("ct", "CT 512x512"), ("mg", "MG 3328x4096")):
        r = report[key]
        part = (f"{label}: first image {ms(r['iepnode_first_s'])} (orthanc preview "
                f"{ms(r['orthanc_first_s'])})")
        if "iepnode_raw_per_frame_s" in r:
            part += (f", per frame raw {ms(r['iepnode_raw_per_frame_s'])} "
                     f"(full {ms(r['iepnode_raw_full_per_frame_s'])}) "
                     f"png {ms(r['iepnode_png_per_frame_s'])} "
                     f"orthanc {ms(r['orthanc_preview_per_frame_s'])} "
                     f"({r['orthanc_preview_per_frame_s'] / r['iepnode_raw_per_frame_s']:.1f}x)")
        parts.append(part)
    s = report["scroll"]
    parts.append(f"{s['clients']} clients x {args.slices} CT frames: {s['frames_per_s']:.0f} "
                 f"frames/s, median {ms(s['median_s'])}, p95 {ms(s['p95_s'])}, node RSS "
                 f"{s['rss_before_mb']:.0f} -> {s['rss_peak_mb']:.0f} MB")
    line = "view: " + " | ".join(parts)
    print(line, flush=True)
    report.update(line=line, loadavg_end=os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
