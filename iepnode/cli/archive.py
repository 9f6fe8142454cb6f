"""``iepnode ae``, ``import``, ``fileset``, ``studies``: the archive's commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import Settings
from iepnode.cli.people import cli_actor


def cmd_ae(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode ae add|list|remove``: the remote AEs allowed to connect (audited)."""
    from iepnode.errors import InvalidRequest, NotFound
    from iepnode.wiring import build_services
    from storage import registry

    peers = build_services(settings).admin.peers
    if args.ae_command == "add":
        tls: registry.TlsFiles | bool | None = False
        if args.tls:
            for path in (args.tls_ca, args.tls_cert, args.tls_key):
                if path and not Path(path).is_file():
                    raise FileNotFoundError(f"TLS file {path} does not exist")
            if bool(args.tls_cert) != bool(args.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            tls = registry.TlsFiles(*(str(Path(p).resolve()) if p else "" for p in
                                      (args.tls_ca, args.tls_cert, args.tls_key)))
        elif args.tls is False:
            tls = None
        try:
            ae, _ = peers.add_remote_ae(args.name, args.host, str(args.port),
                                        args.allow.split(","), cli_actor(),
                                        send_to=args.send_to, tls=tls, port_zero=True)
        except InvalidRequest as exc:
            print(f"iepnode: ae add: {exc}", file=sys.stderr)
            return 2
        print(f"registered {ae.ae_title} {ae.host}:{ae.port} allow=echo"
              f"{',' + ae.allow if ae.allow else ''}"
              f"{' send-to' if ae.send_to else ''}{' tls' if ae.tls else ''}")
    elif args.ae_command == "remove":
        try:
            peers.remove_remote_ae(args.name, cli_actor())
        except NotFound:
            print(f"iepnode: no remote AE named {args.name!r}", file=sys.stderr)
            return 1
        print(f"removed {args.name}")
    else:
        rows = peers.remote_aes()
        print(f"{'AE TITLE':<16}  {'HOST':<24}  {'PORT':>5}  ALLOW  [SENDS]")
        for ae in rows:
            send = f"  send-to{' tls' if ae.tls else ''}" if ae.send_to else ""
            print(f"{ae.ae_title:<16}  {ae.host:<24}  {ae.port:>5}  echo"
                  f"{',' + ae.allow if ae.allow else ''}{send}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode import PATH``: import a folder, DICOMDIR or zip; print a summary."""
    from tqdm import tqdm

    from iepnode.archive.importer import import_path
    from iepnode.logs import setup_logging
    from iepnode.wiring import build_services

    # Refusals are printed in the summary below; the log file keeps the details.
    setup_logging(settings, process_name="import", to_stderr=False)
    node = build_services(settings)
    bar = tqdm(unit="obj", desc="import", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = import_path(node.ingester, args.path, progress=progress)
    finally:
        bar.close()
    print(f"imported {report.stored}, duplicates {report.duplicates}, "
          f"refused {len(report.rejected)}, not DICOM {report.skipped_not_dicom}")
    for name, reason in report.rejected:
        print(f"  refused {name}: {reason}")
    return 0 if not report.rejected else 2


def cmd_fileset(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode fileset UID``: build a study's DICOMDIR file-set now."""
    from iepnode.wiring import build_services
    from storage.fileset import FilesetError

    node = build_services(settings)
    try:
        path = node.filesets.build_fileset(args.study_uid)
    except KeyError:
        print(f"iepnode: no study {args.study_uid}", file=sys.stderr)
        return 1
    except (FilesetError, OSError) as exc:
        print(f"iepnode: the file-set of {args.study_uid} cannot be built: {exc}",
              file=sys.stderr)
        return 1
    print(path / "DICOMDIR")
    return 0


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode studies``: list the indexed studies, most recently received first."""
    from iepnode.wiring import build_services
    from storage.models import Patient, Study

    build_services(settings)  # opens the database
    query = Study.select(Study, Patient).join(Patient).order_by(Study.last_received.desc())
    for study in query:
        print(f"{study.study_uid}  {study.patient.patient_id:<16} {study.patient.name:<30} "
              f"{study.study_date:<8} {study.modalities:<8} {study.num_series:>3} series "
              f"{study.num_instances:>6} instances")
    return 0
