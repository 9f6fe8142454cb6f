"""DICOMweb benchmark: iepnode's QIDO-RS / WADO-RS vs Orthanc's DICOMweb plugin.

One fresh synthetic CT series (``--slices``, default 1000, via
``../shared/bench/make_ct.py``) is sent with dcmtk ``storescu`` to a fresh
``iepnode serve`` and a fresh Orthanc with Debian's ``orthanc-dicomweb`` plugin
(``--no-orthanc`` skips it), both on ephemeral loopback ports. On iepnode the study
is shared with ``iepnode transfer create``, a recipient signs in through the real
link + passcode flow and asks for a DICOMweb key on the "Open in another viewer"
page; every iepnode request carries that bearer token under the transaction's base
URL (the path a viewer takes). Then, over one keep-alive connection per server,
each request ``--repeat`` times (medians, order rotated):

- QIDO ``/studies`` and ``/studies/{s}/series/{se}/instances`` (all instances);
- WADO ``/studies/{s}/series/{se}/metadata`` (DICOM JSON of every instance; the
  first, untimed-in-the-medians request is reported apart: iepnode then reads every
  file's header, later ones come from its metadata cache);
- WADO ``.../instances/{i}/metadata`` of one instance;
- WADO ``.../instances/{i}/frames/1`` of ``--frames`` different instances (the
  median per frame; ``Accept: multipart/related; type="application/octet-stream";
  transfer-syntax=*``).

Usage (from the repository root; never beside another bench)::

    flock /tmp/iepnode-bench.lock python -m bench.dicomweb
    flock /tmp/iepnode-bench.lock python -m bench.dicomweb --slices 300 --repeat 5

Prints one line, e.g.::

    dicomweb 1000 slices: qido-studies iepnode 2.1 ms / orthanc 3.0 ms (1.4x) | ...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError, make_study
from bench.download import recipient_session, request

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=1000, help="CT slices in the series")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per request (medians)")
    ap.add_argument("--frames", type=int, default=50, help="instances whose frame 1 is fetched")
    ap.add_argument("--no-orthanc", dest="orthanc", action="store_false",
                    help="skip Orthanc (iepnode only)")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent for study and stores")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    return ap.parse_args(argv)


class Server:
    """One DICOMweb server over one keep-alive HTTP connection."""

    def __init__(self, name: str, port: int, root: str, headers: dict[str, str]) -> None:
        self.name, self.root, self.headers = name, root.rstrip("/"), headers
        self.conn = http.client.HTTPConnection(bp.HOST, port, timeout=600)

    def get(self, path: str, accept: str = "application/dicom+json") -> tuple[float, bytes]:
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self.conn.request("GET", self.root + path,
                                  headers={**self.headers, "Accept": accept})
                response = self.conn.getresponse()
                body = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError) as exc:
                # An idle keep-alive connection closed by the server: open a new one.
                self.conn.close()
                if attempt == 2:
                    raise BenchError(f"{self.name} GET {path}: {exc}") from exc
        seconds = time.perf_counter() - started
        if response.status != 200:
            raise BenchError(f"{self.name} GET {path}: HTTP {response.status} {body[:200]!r}")
        return seconds, body


def dicomweb_token(peer: bp.IepnodePeer, public_id: str, cookie: str) -> str:
    """Ask for a DICOMweb key on the recipient's "Open in another viewer" page."""
    status, _, html = request(peer.http_port, "GET", f"/transactions/{public_id}",
                              cookie=cookie)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    if status != 200 or csrf is None:
        raise BenchError(f"transaction page answered {status}")
    status, _, html = request(peer.http_port, "POST", f"/transactions/{public_id}/dicomweb-token",
                              cookie=cookie, form={"csrf": csrf.group(1)})
    token = re.search(r'id="dicomweb-token">([^<]+)<', html)
    if status != 200 or token is None:
        raise BenchError(f"token page answered {status}")
    return token.group(1)


def uids(server: Server, study_uid: str) -> tuple[str, list[str]]:
    """The series UID and the SOP Instance UIDs of the study (by QIDO)."""
    _, body = server.get(f"/studies/{study_uid}/series")
    series_uid = json.loads(body)[0]["0020000E"]["Value"][0]
    _, body = server.get(f"/studies/{study_uid}/series/{series_uid}/instances")
    return series_uid, sorted(r["00080018"]["Value"][0] for r in json.loads(body))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = bp.iepnode_available()
    if not ok:
        log(f"iepnode unavailable: {why}")
        return 2
    if args.orthanc and not Path(DICOMWEB_PLUGIN).exists():
        log(f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb (or --no-orthanc)")
        return 2
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-dicomweb-", dir=args.tmp_dir))
    report: dict = bp.run_report(args, base)
    peers: list[bp.Peer] = []
    try:
        log(f"bench dir {base}; generating a {args.slices}-slice CT study")
        study = make_study(base / "study", args.slices, "BENCHDW")
        iepnode = bp.make_peer("iepnode", base, max_pdu=bp.DEFAULT_MAX_PDU)
        peers.append(iepnode)
        iepnode.start()
        bp.send_storescu(iepnode, study.files, 1)
        public_id, cookie = recipient_session(iepnode, study.study_uid)
        token = dicomweb_token(iepnode, public_id, cookie)
        servers = [Server("iepnode", iepnode.http_port, f"/dicomweb/t/{public_id}",
                          {"Authorization": f"Bearer {token}"})]
        if args.orthanc:
            orthanc = bp.make_peer("orthanc", base, max_pdu=bp.DEFAULT_MAX_PDU, overrides={
                "Plugins": [DICOMWEB_PLUGIN],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
            peers.append(orthanc)
            orthanc.start()
            bp.send_storescu(orthanc, study.files, 1)
            servers.append(Server("orthanc", orthanc.http_port, "/dicom-web", {}))

        series_uid, sops = uids(servers[0], study.study_uid)
        if len(sops) != args.slices:
            raise BenchError(f"iepnode lists {len(sops)} instances, expected {args.slices}")
        for server in servers[1:]:
            if uids(server, study.study_uid) != (series_uid, sops):
                raise BenchError(f"{server.name} lists other instances")
        s, se = study.study_uid, series_uid
        one = sops[len(sops) // 2]
        step = max(1, len(sops) // max(1, args.frames))
        frame_sops = sops[::step][:args.frames]
        requests = {
            "qido-studies": ["/studies"],
            "qido-instances": [f"/studies/{s}/series/{se}/instances"],
            "series-metadata": [f"/studies/{s}/series/{se}/metadata"],
            "instance-metadata": [f"/studies/{s}/series/{se}/instances/{one}/metadata"],
            "frame": [f"/studies/{s}/series/{se}/instances/{i}/frames/1" for i in frame_sops],
        }
        results: dict[str, dict[str, list[float]]] = {
            name: {srv.name: [] for srv in servers} for name in requests}
        first: dict[str, float] = {}
        for server in servers:  # warm-up: each request once (page cache, caches)
            for name, paths in requests.items():
                seconds, _ = server.get(paths[0], FRAME_ACCEPT if name == "frame" else
                                        "application/dicom+json")
                if name == "series-metadata":
                    first[server.name] = seconds  # iepnode: its metadata cache is empty
        for rep in range(args.repeat):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for name, paths in requests.items():
                accept = FRAME_ACCEPT if name == "frame" else "application/dicom+json"
                for server in order:
                    for path in paths:
                        seconds, _ = server.get(path, accept)
                        results[name][server.name].append(seconds)
            log(f"  repetition {rep + 1}/{args.repeat} done")
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 2
    finally:
        for peer in peers:
            peer.stop()
        shutil.rmtree(base, ignore_errors=True)

    med = {name: {srv: statistics.median(v) for srv, v in by.items()}
           for name, by in results.items()}
    parts = []
    for name, by in med.items():
        text = f"{name} iepnode {by['iepnode'] * 1000:.1f} ms"
        if "orthanc" in by:
            text += (f" / orthanc {by['orthanc'] * 1000:.1f} ms "
                     f"({by['orthanc'] / by['iepnode']:.1f}x)")
        parts.append(text)
    parts.append("first series-metadata " + " / ".join(
        f"{name} {seconds * 1000:.0f} ms" for name, seconds in first.items()))
    line = f"dicomweb {args.slices} slices: " + " | ".join(parts)
    print(line, flush=True)
    report.update(line=line, medians_s=med, first_series_metadata_s=first,
                  loadavg_end=os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
