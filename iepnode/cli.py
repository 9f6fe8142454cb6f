"""The ``iepnode`` command line: serve, manage remote AEs, import, build file-sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from config import ConfigError, Settings, load_settings
from iepnode.errors import NodeError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, help="folder for index, store and logs")
    parser.add_argument("--database-url", help="sqlite:///PATH or postgresql://...")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iepnode", description="DICOM image exchange node."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DICOM node and web server")
    _common(serve)
    serve.add_argument("--ae-title", help="the node's AE title (default IEPNODE)")
    serve.add_argument("--bind", help="listen address (default 0.0.0.0)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (0: pick a free one)")
    serve.add_argument("--http-port", type=int, help="HTTP port (0: pick a free one)")
    serve.add_argument("--dicom-workers", type=int, help="SCP worker processes")
    serve.add_argument("--stable-age", type=float,
                       help="seconds without new instances before a study's DICOMDIR is built")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    ae = sub.add_parser("ae", help="manage the remote AEs allowed to connect")
    ae_sub = ae.add_subparsers(dest="ae_command", required=True)
    add = ae_sub.add_parser("add", help="register (or update) a remote AE")
    _common(add)
    add.add_argument("name", help="the remote AE title")
    add.add_argument("host", help="its address (* accepts any address)")
    add.add_argument("port", type=int, help="its listening port (for C-MOVE)")
    add.add_argument("--allow", default="",
                     help="comma list of store,find,move,get (C-ECHO is always allowed)")
    lst = ae_sub.add_parser("list", help="list registered AEs")
    _common(lst)
    rm = ae_sub.add_parser("remove", help="unregister a remote AE")
    _common(rm)
    rm.add_argument("name")

    imp = sub.add_parser("import", help="import a folder, DICOMDIR or zip (e.g. a CD)")
    _common(imp)
    imp.add_argument("path", type=Path)
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    fs = sub.add_parser("fileset", help="build a study's DICOMDIR file-set now")
    _common(fs)
    fs.add_argument("study_uid")

    studies = sub.add_parser("studies", help="list indexed studies")
    _common(studies)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir,
        "database_url": args.database_url,
    }
    for name in ("ae_title", "bind", "dicom_port", "http_port", "dicom_workers", "stable_age",
                 "log_level"):
        overrides[name] = getattr(args, name, None)
    return load_settings(args.config, overrides)


def _cmd_ae(args: argparse.Namespace, settings: Settings) -> int:
    from storage import registry
    from storage.db import open_database

    open_database(settings.resolved_database_url)
    if args.ae_command == "add":
        allow = {s.strip().lower() for s in args.allow.split(",") if s.strip()}
        ae = registry.add_remote_ae(args.name, args.host, args.port, allow)
        print(f"registered {ae.ae_title} {ae.host}:{ae.port} allow=echo"
              f"{',' + ae.allow if ae.allow else ''}")
    elif args.ae_command == "remove":
        if not registry.remove_remote_ae(args.name):
            print(f"iepnode: no remote AE named {args.name!r}", file=sys.stderr)
            return 1
        print(f"removed {args.name}")
    else:
        rows = registry.list_remote_aes()
        print(f"{'AE TITLE':<16}  {'HOST':<24}  {'PORT':>5}  ALLOW")
        for ae in rows:
            print(f"{ae.ae_title:<16}  {ae.host:<24}  {ae.port:>5}  echo"
                  f"{',' + ae.allow if ae.allow else ''}")
    return 0


def _cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from iepnode.importer import import_path
    from iepnode.logs import setup_logging
    from iepnode.node import Node

    # Refusals are printed in the summary below; the log file keeps the details.
    setup_logging(settings, process_name="import", to_stderr=False)
    node = Node(settings)
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


def _cmd_fileset(args: argparse.Namespace, settings: Settings) -> int:
    from iepnode.node import Node

    node = Node(settings)
    try:
        path = node.build_fileset(args.study_uid)
    except KeyError:
        print(f"iepnode: no study {args.study_uid}", file=sys.stderr)
        return 1
    print(path / "DICOMDIR")
    return 0


def _cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    from storage.db import open_database
    from storage.models import Patient, Study

    open_database(settings.resolved_database_url)
    query = Study.select(Study, Patient).join(Patient).order_by(Study.last_received.desc())
    for study in query:
        print(f"{study.study_uid}  {study.patient.patient_id:<16} {study.patient.name:<30} "
              f"{study.study_date:<8} {study.modalities:<8} {study.num_series:>3} series "
              f"{study.num_instances:>6} instances")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``iepnode`` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "serve":
            from iepnode.serve import serve

            return serve(settings)
        handler = {"ae": _cmd_ae, "import": _cmd_import, "fileset": _cmd_fileset,
                   "studies": _cmd_studies}[args.command]
        return handler(args, settings)
    except ConfigError as exc:
        print(f"iepnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except (NodeError, ValueError, FileNotFoundError) as exc:
        print(f"iepnode: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
