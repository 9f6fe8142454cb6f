"""Upload on request: a 1000-slice CT zip uploaded over loopback with the page's protocol.

A synthetic CT study (``make_ct.py``, 512x512 16-bit slices) is zipped (stored, as a CD
folder ``CD/DICOM/...``), a request and a recipient session are created in the index,
``iepnode serve`` runs on loopback, and a Python client uploads the zip exactly as the
upload page's script does: announce the file (``POST .../upload/files``), then
``PATCH`` chunks of ``--chunk-mb`` at ``Upload-Offset`` one after the other (the page
runs several files in parallel, never several chunks of one file). The clock runs from
the announce to the answer of the last chunk, which includes the server's fsync and the
file's inspection (the page waits for both to show the check mark).

The node's process tree is sampled every 50 ms (psutil): the peak RSS during the upload
against the RSS before it shows whether memory stays flat (the body is streamed to disk
in 1 MiB blocks). Targets: >= 100 MB/s and a peak within 64 MiB of the baseline.

Usage (from the repository root)::

    python -m bench.upload [--slices 1000] [--chunk-mb 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import aiohttp

from bench._ct import REPO_ROOT, make_study
from bench.peers import RssSampler

SESSION_COOKIE = "__Host-iepnode"


def prepare(data_dir: Path) -> tuple[str, str, str]:
    """Create a request and a session for its recipient; return (public_id, cookie, csrf)."""
    from config import load_settings
    from iepnode.sharing import logins
    from iepnode.sharing.transactions import Contact
    from iepnode.uploads import image_requests
    from iepnode.wiring import build_services
    from storage.models import Recipient

    node = build_services(load_settings(overrides={"data_dir": data_dir}, environ={}))
    request, _ = image_requests.create_request(
        image_requests.NewRequest("bench@example.org", "Bench", "Patient", "01/01/1970", "O",
                                  otp_mobile="+447700900000", patient_id="BENCH0001"),
        contact=Contact("Bench"), institution="Bench Hospital", created_by="bench")
    opened = logins.open_session(Recipient.get(Recipient.email == "bench@example.org"))
    csrf = logins.resume_session(opened.token).csrf_token
    node.close()
    return request.public_id, opened.token, csrf


def make_zip(study_dir: Path, out: Path) -> int:
    """Zip a study's slices (stored) as a CD folder; return the zip's size."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for i, path in enumerate(sorted(study_dir.glob("*.dcm"))):
            archive.write(path, f"CD/DICOM/ST000/SE000/IM{i:05d}")
    return out.stat().st_size


async def upload(base: str, public_id: str, cookie: str, csrf: str, path: Path,
                 chunk: int) -> tuple[float, dict]:
    """Upload ``path`` with the page's protocol; return the seconds and the file's state."""
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    size = path.stat().st_size
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        start = time.perf_counter()
        form = {"csrf": csrf, "name": path.name, "relpath": "", "size": str(size)}
        async with session.post(f"{base}/transactions/{public_id}/upload/files",
                                data=form) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"announce refused: {response.status} {body}")
        url, offset = f"{base}{body['url']}", body["offset"]
        with path.open("rb") as fh:
            while offset < size:
                fh.seek(offset)
                data = fh.read(chunk)
                async with session.patch(url, data=data, headers={
                        "Upload-Offset": str(offset), "X-CSRF-Token": csrf,
                        "Content-Type": "application/offset+octet-stream"}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"chunk at {offset} refused: {response.status} {body}")
                offset = body["offset"]
        if not body["complete"]:
            raise RuntimeError(f"upload not complete: {body}")
        return time.perf_counter() - start, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--chunk-mb", type=int, default=16,
                        help="chunk size (the page's script uses 16 MiB)")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iepnode-bench-upload-", dir=args.keep))
    proc: subprocess.Popen[str] | None = None
    try:
        t0 = time.perf_counter()
        study = make_study(work / "ct", args.slices, "BENCHUP")
        zip_path = work / "cd.zip"
        size = make_zip(study.directory, zip_path)
        warm = work / "warm.zip"
        warm.write_bytes(zip_path.read_bytes()[: 8 << 20])
        print(f"made {args.slices} slices, zip of {size / 1e6:.0f} MB in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        data = work / "data"
        public_id, cookie, csrf = prepare(data)
        proc = subprocess.Popen(
            [sys.executable, "-m", "iepnode.cli", "serve", "--data-dir", str(data), "--bind",
             "127.0.0.1", "--dicom-port", "0", "--http-port", "0", "--dicom-workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http=([^:]+):(\d+)", line)
        if not match:
            raise RuntimeError(f"iepnode serve did not start: {line!r}")
        base = f"http://127.0.0.1:{match.group(2)}"
        chunk = args.chunk_mb << 20
        with RssSampler(proc.pid) as sampler:
            asyncio.run(upload(base, public_id, cookie, csrf, warm, chunk))  # warm-up
            sampler.reset()
            baseline = sampler.peak
            seconds, state = asyncio.run(upload(base, public_id, cookie, csrf, zip_path, chunk))
            sampler.sample()
            peak, cpu = sampler.peak, sampler.cpu
        staged = sorted((data / "staging").rglob("*"), key=lambda p: p.stat().st_size)
        if staged[-1].stat().st_size != size:
            raise RuntimeError("the staged file does not have the zip's size")
        rate = size / seconds / 1e6
        growth = (peak - baseline) / (1 << 20)
        verdict = "PASS" if rate >= 100 and growth <= 64 else "FAIL"
        print(f"upload of a {args.slices}-slice CT zip ({size / 1e6:.0f} MB, "
              f"{args.chunk_mb} MiB chunks, verdict {state['verdict'] or 'none'} with "
              f"{state['objects']} objects): {seconds:.2f} s, {rate:.0f} MB/s | node RSS "
              f"{baseline / (1 << 20):.0f} MiB before, peak {peak / (1 << 20):.0f} MiB "
              f"(+{growth:.0f} MiB) | node CPU {cpu:.1f} s | "
              f"target >= 100 MB/s, flat memory: {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
