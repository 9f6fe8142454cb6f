"""C-FIND latency benchmark on a large iepnode index.

Fills an iepnode data directory with synthetic instance rows (default
1,000,000 instances: 100 per series, 2 series per study, 2 studies per
patient = 5,000 studies, 2,500 patients), starts ``iepnode serve`` on it and
times Study Root C-FIND at STUDY level with pynetdicom's SCU:

* by PatientID (exact match, one patient), and
* by PatientName prefix wildcard (``NAME01234*``, ten patients),

each with a different random patient every time, on one open association
(plus a few runs that open a new association per query). The return keys
include NumberOfStudyRelatedInstances/Series and ModalitiesInStudy, which make
the SCP aggregate over the instance rows. Every answer is checked against the
expected number of matches. Target: p95 under 50 ms.

Usage (from the repository root)::

    python -m bench.cfind                          # 1,000,000 rows via the bulk-fill hook
    python -m bench.cfind --data-dir DIR           # reuse a data dir filled earlier
    python -m bench.cfind --fill store --instances 2000 --peer orthanc   # harness smoke test

``--fill store`` sends small spec-conformant instances through the real
C-STORE path instead (slow: only for checking the harness; it also works
against Orthanc for a reference point).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import peers as bp
from bench._ct import BenchError


@dataclass(frozen=True)
class Synthetic:
    """The synthetic index the bench queries. Any fill must follow these rules.

    Instance ``i`` belongs to series ``i // instances_per_series``; series ``s``
    to study ``s // series_per_study``; study ``t`` to patient
    ``t // studies_per_patient``. Patient ``p`` has PatientID
    :meth:`patient_id` and PatientName :meth:`patient_name`; every study is CT.
    """

    instances: int = 1_000_000
    instances_per_series: int = 100
    series_per_study: int = 2
    studies_per_patient: int = 2

    @property
    def series(self) -> int:
        return math.ceil(self.instances / self.instances_per_series)

    @property
    def studies(self) -> int:
        return math.ceil(self.series / self.series_per_study)

    @property
    def patients(self) -> int:
        return math.ceil(self.studies / self.studies_per_patient)

    @staticmethod
    def patient_id(p: int) -> str:
        return f"SYN{p:07d}"

    @staticmethod
    def patient_name(p: int) -> str:
        return f"NAME{p:06d}^BENCH"

    def name_prefix_query(self, p: int) -> str:
        """A prefix wildcard matching patient ``p`` and its nine decimal neighbours."""
        return f"NAME{p // 10:05d}*"

    def studies_of(self, p: int) -> int:
        first = p * self.studies_per_patient
        return max(0, min(self.studies, first + self.studies_per_patient) - first)

    def expected_by_id(self, p: int) -> int:
        return self.studies_of(p)

    def expected_by_name_prefix(self, p: int) -> int:
        lo = (p // 10) * 10
        return sum(self.studies_of(q) for q in range(lo, min(lo + 10, self.patients)))


def fill_index(data_dir: Path, spec: Synthetic) -> None:
    """Bulk-fill the iepnode index in ``data_dir`` with ``spec.instances`` instance rows.

    Rows follow :class:`Synthetic`; counters on patient/study/series rows are set as
    ingest would set them. No files are written: C-FIND reads only the index.
    """
    import secrets

    from config import load_settings
    from storage.db import open_database
    from storage.index import name_key
    from storage.models import Instance, Patient, Series, Study

    settings = load_settings(overrides={"data_dir": data_dir})
    db = open_database(settings.resolved_database_url)
    now = time.time()
    root = "1.2.826.0.1.3680043.10.1134"  # bench-only UID root
    run = secrets.randbelow(10**9)

    def chunks(rows, size=5000):
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    with db.atomic():
        for batch in chunks(
            {"id": p + 1, "patient_id": spec.patient_id(p), "issuer": "",
             "name": spec.patient_name(p), "name_key": name_key(spec.patient_name(p)),
             "birth_date": "19700101", "sex": "O", "num_studies": spec.studies_of(p)}
            for p in range(spec.patients)
        ):
            Patient.insert_many(batch).execute()
        per_study = spec.series_per_study * spec.instances_per_series
        for batch in chunks(
            {"id": t + 1, "study_uid": f"{root}.{run}.1.{t}",
             "patient": t // spec.studies_per_patient + 1,
             "key": f"S{t:07d}", "study_date": f"2025{1 + t % 12:02d}{1 + t % 28:02d}",
             "study_time": "120000", "accession": f"A{t:08d}", "study_id": str(t),
             "description": "Synthetic CT", "modalities": "CT",
             "num_series": spec.series_per_study, "num_instances": per_study,
             "size_bytes": per_study * 1000, "first_received": now, "last_received": now,
             "fileset_built_from": now}
            for t in range(spec.studies)
        ):
            Study.insert_many(batch).execute()
        for batch in chunks(
            {"id": r + 1, "series_uid": f"{root}.{run}.2.{r}",
             "study": r // spec.series_per_study + 1,
             "modality": "CT", "series_number": str(r % spec.series_per_study + 1),
             "description": "Axial", "num_instances": spec.instances_per_series,
             "size_bytes": spec.instances_per_series * 1000}
            for r in range(spec.series)
        ):
            Series.insert_many(batch).execute()
        for batch in chunks(
            (f"{root}.{run}.3.{i}", i // spec.instances_per_series + 1, "1.2.840.10008.5.1.4.1.1.2",
             str(i % spec.instances_per_series + 1), "1.2.840.10008.1.2.1", f"K{i:015d}", 1000,
             now, "BENCH")
            for i in range(spec.instances)
        ):
            Instance.insert_many(
                batch,
                fields=[Instance.sop_uid, Instance.series, Instance.sop_class,
                        Instance.instance_number, Instance.transfer_syntax, Instance.key,
                        Instance.size_bytes, Instance.received_at, Instance.source_ae],
            ).execute()
    db.execute_sql("ANALYZE")
    db.close()


def write_small_instances(out_dir: Path, spec: Synthetic) -> list[Path]:
    """Tiny CT instances (16x16 pixels) following ``spec``, for ``--fill store``."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((16, 16), dtype=np.int16).tobytes()
    study_uids: dict[int, str] = {}
    series_uids: dict[int, str] = {}
    files = []
    for i in range(spec.instances):
        series = i // spec.instances_per_series
        study = series // spec.series_per_study
        p = study // spec.studies_per_patient
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uids.setdefault(study, generate_uid())
        ds.SeriesInstanceUID = series_uids.setdefault(series, generate_uid())
        ds.PatientName = spec.patient_name(p)
        ds.PatientID = spec.patient_id(p)
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = f"2025{1 + study % 12:02d}{1 + study % 28:02d}"
        ds.StudyTime = "120000"
        ds.StudyID = str(study)
        ds.AccessionNumber = f"ACC{study:07d}"
        ds.StudyDescription = "Synthetic CT"
        ds.Modality = "CT"
        ds.SeriesNumber = series % spec.series_per_study + 1
        ds.InstanceNumber = i % spec.instances_per_series + 1
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"I{i:07d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "PatientBirthDate",
    "PatientSex",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)


def study_query(patient_id: str = "", patient_name: str = ""):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    for key in STUDY_KEYS:
        setattr(ds, key, "")
    return ds


def client_nodelay() -> None:
    """Make pynetdicom's SCU sockets use TCP_NODELAY (pynetdicom 3.0 never sets it).

    A C-FIND request is two PDUs (command, then identifier). With Nagle on, the
    second small write waits for the peer's (delayed, up to 40 ms) ACK of the
    first, so every query would include a ~40 ms stall that belongs to the
    client, not to the SCP being measured. pynetdicom has no public socket
    option hook, so this wraps its private ``AssociationSocket._create_socket``.
    """
    import socket

    from pynetdicom import transport

    orig = transport.AssociationSocket._create_socket
    if getattr(orig, "_bench_nodelay", False):
        return

    def _create_socket(self, address):
        sock = orig(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    _create_socket._bench_nodelay = True
    transport.AssociationSocket._create_socket = _create_socket


class FindClient:
    """pynetdicom Study Root C-FIND SCU."""

    def __init__(self, port: int, called_aet: str, calling_aet: str = bp.SENDER_AET) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.model = StudyRootQueryRetrieveInformationModelFind
        self.ae = AE(ae_title=calling_aet)
        self.ae.add_requested_context(self.model)
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 120
        self.ae.network_timeout = 120
        self.port = port
        self.called = called_aet

    def associate(self):
        assoc = self.ae.associate(bp.HOST, self.port, ae_title=self.called)
        if not assoc.is_established:
            raise BenchError(f"C-FIND association to {self.called} on port {self.port} failed")
        return assoc

    @staticmethod
    def pause_reactor(assoc) -> None:
        """Park pynetdicom's association reactor before a request (outside the timing).

        Works around a race in pynetdicom 3.0: ``send_c_find`` clears the
        reactor checkpoint and proceeds as soon as it sees ``_is_paused``, which
        can still be True from before the reactor's last ``wait()`` returned.
        The reactor then takes a fast peer's response off the DIMSE queue and
        drops it ("Received unexpected C-FIND service message"), so a match
        goes missing. Seen against Orthanc on loopback in ~1 of 100 queries.
        """
        assoc._reactor_checkpoint.clear()
        time.sleep(0.005)  # > one reactor iteration (1 ms sleep) so it is parked in wait()
        deadline = time.monotonic() + 1.0
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0005)

    def find(self, assoc, query) -> tuple[float, list]:
        """Run one C-FIND to completion; (seconds, the matching identifiers)."""
        self.pause_reactor(assoc)
        t0 = time.perf_counter()
        matches = []
        final = None
        for status, identifier in assoc.send_c_find(query, self.model):
            if not status:  # no response (timeout/abort)
                raise BenchError("C-FIND got no response (association aborted or timed out)")
            code = status.Status
            if code in (0xFF00, 0xFF01):
                matches.append(identifier)
            else:
                final = code
        elapsed = time.perf_counter() - t0
        if final != 0x0000:
            raise BenchError(f"C-FIND ended with status 0x{final or 0:04X}")
        return elapsed, matches


def stats_ms(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(p95, 2),
        "max_ms": round(ms[-1], 2),
        "min_ms": round(ms[0], 2),
    }


def check(kind: str, query, matches: list, expected: int) -> None:
    """Raise if the answer to ``query`` does not hold exactly ``expected`` studies."""
    uids = {getattr(m, "StudyInstanceUID", None) for m in matches if m is not None}
    if len(matches) != expected or len(uids) != expected:
        ids = sorted({str(getattr(m, "PatientID", "?")) for m in matches if m is not None})
        value = query.PatientID or str(query.PatientName)
        raise BenchError(
            f"C-FIND by {kind} {value!r}: {len(matches)} responses ({len(uids)} distinct "
            f"studies), expected {expected}; PatientIDs returned: {', '.join(ids[:20])}"
        )


def run_queries(client: FindClient, spec: Synthetic, n: int, n_fresh: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = {
        "PatientID": lambda p: (study_query(patient_id=spec.patient_id(p)), spec.expected_by_id(p)),
        "PatientName": lambda p: (
            study_query(patient_name=spec.name_prefix_query(p)),
            spec.expected_by_name_prefix(p),
        ),
    }
    results: dict = {}
    assoc = client.associate()
    try:
        for kind, build in kinds.items():
            q, expected = build(rng.randrange(spec.patients))
            cold, got = client.find(assoc, q)  # first query of this kind: reported apart
            check(kind, q, got, expected)
            times = []
            for _ in range(n):
                q, expected = build(rng.randrange(spec.patients))
                t, got = client.find(assoc, q)
                check(kind, q, got, expected)
                times.append(t)
            results[kind] = {"first_ms": round(cold * 1000, 2), **stats_ms(times)}
    finally:
        assoc.release()
    for kind, build in kinds.items():
        times = []
        for _ in range(n_fresh):
            q, expected = build(rng.randrange(spec.patients))
            # associate + C-FIND + release, without find()'s reactor pause
            t0 = time.perf_counter()
            a = client.associate()
            t_assoc = time.perf_counter() - t0
            try:
                t_find, got = client.find(a, q)
            finally:
                t1 = time.perf_counter()
                a.release()
                t_release = time.perf_counter() - t1
            times.append(t_assoc + t_find + t_release)
            check(kind, q, got, expected)
        if times:
            results[kind]["with_association"] = stats_ms(times)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1_000_000, help="instance rows (1000000)")
    ap.add_argument("--instances-per-series", type=int, default=100)
    ap.add_argument("--series-per-study", type=int, default=2)
    ap.add_argument("--studies-per-patient", type=int, default=2)
    ap.add_argument("--peer", choices=("iepnode", "orthanc"), default="iepnode")
    ap.add_argument(
        "--fill",
        choices=("hook", "store"),
        default="hook",
        help="hook: bulk-fill the index directly (iepnode); store: C-STORE small instances",
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="use this iepnode data dir as already filled (skips filling; never deleted)",
    )
    ap.add_argument("--queries", type=int, default=50, help="timed queries per kind (50)")
    ap.add_argument(
        "--fresh-assoc", type=int, default=5, help="queries per kind on a new association (5)"
    )
    ap.add_argument("--target-ms", type=float, default=50.0, help="p95 target (50 ms)")
    ap.add_argument("--iepnode-workers", type=int, default=None)
    ap.add_argument(
        "--no-client-nodelay",
        dest="client_nodelay",
        action="store_false",
        help="leave Nagle on in the SCU socket (adds ~40 ms per query; see client_nodelay())",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    args = ap.parse_args(argv)
    if args.peer == "orthanc" and args.fill != "store":
        ap.error("--peer orthanc needs --fill store")
    if args.data_dir and args.peer != "iepnode":
        ap.error("--data-dir is for iepnode")
    if args.fill == "store" and args.instances > 50_000 and not args.data_dir:
        ap.error("--fill store is for smoke runs (at most 50000 instances)")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def findscu_timings(port: int, called_aet: str, spec: Synthetic, queries: int) -> dict:
    """Mean ms per query with dcmtk's findscu repeating one query on one association.

    A C-based client isolates the server's share: the pynetdicom client decodes every
    response in Python on the same two cores. Association set-up and process start
    are removed by subtracting a one-query run from a ``queries + 1`` run.
    """
    import subprocess

    p = spec.patients // 2
    kinds = {"PatientID": f"PatientID={spec.patient_id(p)}",
             "PatientName": f"PatientName={spec.name_prefix_query(p)}"}
    means = {}
    for kind, match in kinds.items():
        elapsed = []
        for repeat in (1, queries + 1):
            args = ["/usr/bin/findscu", "-aet", bp.SENDER_AET, "-aec", called_aet, "-S",
                    "--repeat", str(repeat), "-k", "QueryRetrieveLevel=STUDY", "-k", match]
            for key in STUDY_KEYS:
                args += ["-k", key]
            t0 = time.perf_counter()
            subprocess.run([*args, "127.0.0.1", str(port)], check=True, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "TCP_NODELAY": "1"})
            elapsed.append(time.perf_counter() - t0)
        means[kind] = (elapsed[1] - elapsed[0]) / queries * 1000
    return means


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # pynetdicom warnings (e.g. unexpected or undecodable responses) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    spec = Synthetic(
        args.instances, args.instances_per_series, args.series_per_study, args.studies_per_patient
    )
    base = Path(tempfile.mkdtemp(prefix="iepnode-bench-cfind-", dir=args.tmp_dir))
    report: dict = {
        "command": shlex.join([sys.executable, *sys.orig_argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "peer": args.peer,
        "fill": "existing" if args.data_dir else args.fill,
        "spec": {
            **asdict(spec),
            "series": spec.series,
            "studies": spec.studies,
            "patients": spec.patients,
        },
        "target_ms": args.target_ms,
        "client_nodelay": args.client_nodelay,
        "repo": bp.repo_state(),
        "machine": {"cpus": os.cpu_count(), "dcmtk": bp.dcmtk_version()},
    }
    exit_code = 0
    peer = None
    try:
        if args.peer == "iepnode":
            ok, why = bp.iepnode_available()
            if not ok:
                raise BenchError(f"iepnode unavailable: {why}")
            data_dir = args.data_dir or base / "data"
            if not args.data_dir and args.fill == "hook":
                log(f"filling {data_dir} with {spec.instances} instance rows")
                t0 = time.perf_counter()
                data_dir.mkdir(parents=True, exist_ok=True)
                fill_index(data_dir, spec)
                report["fill_s"] = round(time.perf_counter() - t0, 1)
            peer = bp.IepnodePeer(base, workers=args.iepnode_workers, data_dir=data_dir)
        else:
            peer = bp.OrthancPeer(base)
        peer.start()
        report["config"] = peer.describe()
        if args.fill == "store" and not args.data_dir:
            log(f"writing {spec.instances} small instances and sending them to {peer.name}")
            files = write_small_instances(base / "instances", spec)
            t0 = time.perf_counter()
            bp.send_storescu(peer, files, 2, timeout=120 + 0.1 * len(files))
            report["fill_s"] = round(time.perf_counter() - t0, 1)
            shutil.rmtree(base / "instances", ignore_errors=True)
            got = peer.count_instances()
            if got != spec.instances:
                raise BenchError(f"{peer.name} holds {got} instances, expected {spec.instances}")
        if args.client_nodelay:
            client_nodelay()
        client = FindClient(peer.port, peer.aet)
        results = run_queries(client, spec, args.queries, args.fresh_assoc, args.seed)
        report["results"] = results
        verdict = all(r["p95_ms"] < args.target_ms for r in results.values())
        report["pass"] = verdict
        pid_r, name_r = results["PatientID"], results["PatientName"]
        line = (
            f"cfind {spec.instances} instances ({spec.studies} studies, {spec.patients} patients) "
            f"on {peer.name}: by PatientID median {pid_r['median_ms']:.1f} ms "
            f"p95 {pid_r['p95_ms']:.1f} ms | by PatientName 'NAMEnnnnn*' median "
            f"{name_r['median_ms']:.1f} ms p95 {name_r['p95_ms']:.1f} ms | "
            f"with new association p95 {pid_r['with_association']['p95_ms']:.0f}/"
            f"{name_r['with_association']['p95_ms']:.0f} ms | "
            f"target p95 < {args.target_ms:g} ms: {'PASS' if verdict else 'FAIL'}"
        )
        report["line"] = line
        print(line, flush=True)
        findscu = findscu_timings(peer.port, peer.aet, spec, args.queries)
        report["findscu"] = findscu
        print(
            f"cfind with dcmtk findscu ({args.queries} queries on one association, mean): "
            f"by PatientID {findscu['PatientID']:.1f} ms | by PatientName 'NAMEnnnnn*' "
            f"{findscu['PatientName']:.1f} ms",
            flush=True,
        )
        if not verdict:
            exit_code = 1
    except (BenchError, NotImplementedError) as exc:
        log(f"cfind bench failed: {exc}")
        report["error"] = str(exc)
        exit_code = 2
    except KeyboardInterrupt:
        log("interrupted")
        exit_code = 130
    finally:
        if peer is not None:
            peer.stop()
        shutil.rmtree(base, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {args.json}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
