"""Release of a patient upload: reconcile + ingest a 1000-slice CT zip (issue 7).

Stages one upload holding a zip of a fresh synthetic CT (``bench/_ct.py``), then
times, in-process on the node's real code (no HTTP): the inspection of the zip
(``inspect_staged_file``), the intake check and the release (reconcile every object,
ingest through the node's ingest path with fsync as configured). Prints instances/s
and the process peak RSS. For comparison, the same files are imported unchanged with
``iepnode.archive.importer.import_path`` into a second node (same ingest path, no reconciliation).

    python -m bench.release                 # 1000 slices, fsync on
    python -m bench.release --slices 300 --no-fsync
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import tempfile
import time
import zipfile
from pathlib import Path

from bench._ct import make_study
from config import load_settings
from iepnode.archive import importer
from iepnode.people import audit
from iepnode.uploads.intake import inspect_staged_file
from iepnode.wiring import build_services
from storage.models import Recipient, Transaction, Upload, UploadFile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iepnode-release-") as tmp:
        root = Path(tmp)
        study = make_study(root / "ct", args.slices, "CD-BENCH")
        archive = root / "cd.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for number, path in enumerate(study.files):
                zf.write(path, f"DICOM/ST0/IM{number:05d}")
        settings = load_settings(overrides={"data_dir": root / "data",
                                            "fsync": not args.no_fsync}, environ={})
        node = build_services(settings)
        now = time.time()
        recipient = Recipient.create(email="bench@example.org", created_at=now)
        request = Transaction.create(
            public_id="IEPBENCH0001", kind="REQUEST", direction="OUT", recipient=recipient,
            status="NEW", created_at=now, expires_at=now + 86400, patient_name="Bench^Patient",
            patient_id="H-BENCH", link_token_hash=secrets.token_hex(32))
        upload = Upload.create(transaction=request, key=secrets.token_hex(16), status="SENT",
                               created_at=now, updated_at=now, sent_at=now)
        folder = settings.data_dir / "staging" / upload.key
        folder.mkdir(parents=True)
        staged = folder / "f0000000"
        archive.rename(staged)

        t0 = time.perf_counter()
        verdict = inspect_staged_file(staged, "cd.zip")
        t_inspect = time.perf_counter() - t0
        UploadFile.create(upload=upload, display_name="cd.zip", disk_name=staged.name,
                          size=staged.stat().st_size, received=staged.stat().st_size,
                          created_at=now, completed_at=now, detail=json.dumps(verdict.to_dict()))
        t0 = time.perf_counter()
        review = node.requests.intake_upload(upload.id)
        t_intake = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = node.requests.release_upload(upload.id, audit.Actor("staff", "bench"))
        t_release = time.perf_counter() - t0
        assert result.stored == args.slices == verdict.objects == review.objects, result

        other = build_services(load_settings(overrides={"data_dir": root / "data2",
                                              "fsync": not args.no_fsync}, environ={}))
        t0 = time.perf_counter()
        report = importer.import_path(other.ingester, study.directory)
        t_import = time.perf_counter() - t0
        assert report.stored == args.slices, report
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        n = args.slices
        print(f"release {n} slices (fsync {'off' if args.no_fsync else 'on'}): "
              f"inspect {n / t_inspect:.0f} inst/s ({t_inspect:.1f} s) | "
              f"intake {t_intake:.2f} s | release {n / t_release:.0f} inst/s "
              f"({t_release:.1f} s) | plain import {n / t_import:.0f} inst/s "
              f"({t_import:.1f} s) | release/import {t_import / t_release:.2f}x | "
              f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
