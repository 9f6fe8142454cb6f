"""The ``iepnode`` command line: serve, manage remote AEs, import, build file-sets, export.

This package holds :func:`main` and the argument parser; the commands live in one
module per area (:mod:`iepnode.cli.archive`, :mod:`~iepnode.cli.outbound`,
:mod:`~iepnode.cli.people`, :mod:`~iepnode.cli.sharing`, :mod:`~iepnode.cli.uploads`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from config import ConfigError, Settings, load_settings
from iepnode.cli.archive import cmd_ae, cmd_fileset, cmd_import, cmd_studies
from iepnode.cli.outbound import cmd_route, cmd_send
from iepnode.cli.people import cmd_user
from iepnode.cli.sharing import cmd_export, cmd_recipient, cmd_transfer
from iepnode.cli.uploads import cmd_request
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
    serve.add_argument("--http-workers", type=int, help="processes answering HTTP")
    serve.add_argument("--stable-age", type=float,
                       help="seconds without new instances before a study's DICOMDIR is built")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    ae = sub.add_parser(
        "ae", help="manage the remote AEs allowed to connect",
        description="Manage the remote AEs allowed to connect, with the checks of the staff "
                    "page. Changes are audited (admin-change) with the operating-system user "
                    "as the actor (kind cli). A rejected value exits with status 2.")
    ae_sub = ae.add_subparsers(dest="ae_command", required=True)
    add = ae_sub.add_parser(
        "add", help="register (or update) a remote AE",
        description="Register (or update) a remote AE, checked as on the staff page (an AE "
                    "title of 1 to 16 characters without backslash or control characters, a "
                    "host, a port; port 0 for an AE that never listens). Audited as "
                    "admin-change by the operating-system user (actor kind cli); a rejected "
                    "value exits with status 2 and changes nothing.")
    _common(add)
    add.add_argument("name", help="the remote AE title")
    add.add_argument("host", help="its address (* accepts any address)")
    add.add_argument("port", type=int, help="its listening port (for C-MOVE)")
    add.add_argument("--allow", default="",
                     help="comma list of store,find,move,get (C-ECHO is always allowed)")
    add.add_argument("--send-to", action=argparse.BooleanOptionalAction, default=None,
                     help="the node may send studies to it (iepnode send, web, routing)")
    add.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                     help="send to it over DICOM TLS (BCP 195); --no-tls turns TLS off")
    add.add_argument("--tls-ca", default="", metavar="PEM",
                     help="CA certificates to check its certificate (default: system CAs)")
    add.add_argument("--tls-cert", default="", metavar="PEM",
                     help="the node's client certificate for it (if it asks for one)")
    add.add_argument("--tls-key", default="", metavar="PEM", help="the key of --tls-cert")
    lst = ae_sub.add_parser("list", help="list registered AEs")
    _common(lst)
    rm = ae_sub.add_parser("remove", help="unregister a remote AE")
    _common(rm)
    rm.add_argument("name")

    imp = sub.add_parser("import", help="import a folder, DICOMDIR or zip (e.g. a CD)")
    _common(imp)
    imp.add_argument("path", type=Path)
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    send = sub.add_parser("send", help="send studies to a remote AE (C-STORE), with progress")
    _common(send)
    send.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    send.add_argument("--to", required=True, metavar="AE",
                      help="a registered remote AE marked --send-to")
    send.add_argument("--no-wait", action="store_true",
                      help="queue the send for the running node and print its job number")
    send.add_argument("--no-progress", action="store_true", help="no progress bar")

    route = sub.add_parser("route", help="auto-routing rules: send matching studies on")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    radd = route_sub.add_parser("add", help="send stable studies that match to an AE")
    _common(radd)
    radd.add_argument("--to", required=True, metavar="AE", help="the destination AE")
    radd.add_argument("--from", dest="calling_ae", default="", metavar="AE",
                      help="only studies (an instance of which was) sent by this calling AE")
    radd.add_argument("--accession-prefix", default="", metavar="PREFIX")
    radd.add_argument("--modality", default="", metavar="CODE", help="e.g. CT")
    rlist = route_sub.add_parser("list", help="list routing rules")
    _common(rlist)
    rrm = route_sub.add_parser("remove", help="delete a routing rule")
    _common(rrm)
    rrm.add_argument("rule_id", type=int)

    fs = sub.add_parser("fileset", help="build a study's DICOMDIR file-set now")
    _common(fs)
    fs.add_argument("study_uid")

    studies = sub.add_parser("studies", help="list indexed studies")
    _common(studies)

    user = sub.add_parser(
        "user", help="manage staff users and recipients",
        description="Manage staff users and recipients, with the checks of the staff pages. "
                    "Changes are audited with the operating-system user as the actor (kind "
                    "cli).")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    uadd = user_sub.add_parser(
        "add", help="create a staff user (prints the TOTP enrolment URI)",
        description="Create a staff user, checked as on the staff page; audited as "
                    "admin-change by the operating-system user (actor kind cli).")
    _common(uadd)
    uadd.add_argument("username")
    uadd.add_argument("--admin", action="store_true", help="may manage users and AEs")
    uadd.add_argument("--name", default="", help="display name shown to recipients")
    uadd.add_argument("--email", default="", help="contact email shown to recipients")
    uadd.add_argument("--department", default="")
    uadd.add_argument("--phone", default="")
    uadd.add_argument("--password-stdin", action="store_true",
                      help="read the password from standard input instead of prompting")
    unlock = user_sub.add_parser("unlock", help="unlock a recipient locked by failed passcodes")
    _common(unlock)
    unlock.add_argument("email")

    recipient = sub.add_parser("recipient", help="recipients' accounts")
    recipient_sub = recipient.add_subparsers(dest="recipient_command", required=True)
    rchan = recipient_sub.add_parser(
        "channel", help="change where a recipient's passcodes go (tells the old channel)")
    _common(rchan)
    rchan.add_argument("email", help="the recipient's email")
    new_channel = rchan.add_mutually_exclusive_group(required=True)
    new_channel.add_argument("--otp-mobile", metavar="NUMBER", help="passcodes by SMS")
    new_channel.add_argument("--otp-email", metavar="EMAIL", help="passcodes to a second email")
    rchan.add_argument("--as-user", required=True, metavar="USERNAME",
                       help="the staff user making the change: an administrator, or the "
                            "hospital contact of the recipient's first transaction or of one "
                            "they have signed in through")

    transfer = sub.add_parser("transfer", help="share studies with a recipient")
    transfer_sub = transfer.add_subparsers(dest="transfer_command", required=True)
    create = transfer_sub.add_parser("create", help="create a transfer and email its link")
    _common(create)
    create.add_argument("--study", action="append", required=True, dest="studies",
                        metavar="UID", help="Study Instance UID (repeat for several)")
    create.add_argument("--to", required=True, metavar="EMAIL", help="the recipient's email")
    channel = create.add_mutually_exclusive_group(required=True)
    channel.add_argument("--otp-mobile", metavar="NUMBER", help="passcodes by SMS")
    channel.add_argument("--otp-email", metavar="EMAIL", help="passcodes to a second email")
    create.add_argument("--name", default="", help="the recipient's name")
    create.add_argument("--message", default="", help="a message shown with the transfer")
    create.add_argument("--priority", choices=("NORMAL", "URGENT"), default="NORMAL")
    create.add_argument("--expiry-days", type=int, help="days until the package expires")
    create.add_argument("--nhs-number", default="")
    create.add_argument("--as-user", default="", metavar="USERNAME",
                        help="staff user shown as the hospital contact")

    # -- requests (issue 7) --
    req = sub.add_parser("request", help="ask an individual to upload images they hold")
    req_sub = req.add_subparsers(dest="request_command", required=True)
    rcreate = req_sub.add_parser("create", help="create a request and email its link")
    _common(rcreate)
    rcreate.add_argument("--to", required=True, metavar="EMAIL", help="the individual's email")
    rchannel = rcreate.add_mutually_exclusive_group(required=True)
    rchannel.add_argument("--otp-mobile", metavar="NUMBER", help="passcodes by SMS")
    rchannel.add_argument("--otp-email", metavar="EMAIL", help="passcodes to a second email")
    rcreate.add_argument("--name", default="", help="the individual's name")
    rcreate.add_argument("--last-name", required=True, help="the patient's last name")
    rcreate.add_argument("--first-name", default="", help="the patient's first name")
    rcreate.add_argument("--birth-date", default="", metavar="DD/MM/YYYY")
    rcreate.add_argument("--sex", choices=("F", "M", "O"), default=None)
    rcreate.add_argument("--patient-id", required=True,
                         help="the hospital's Patient ID (the images are reconciled to it)")
    rcreate.add_argument("--issuer", default="", help="Issuer of Patient ID")
    rcreate.add_argument("--nhs-number", default="")
    rcreate.add_argument("--reason", default="", help="why the images are needed")
    rcreate.add_argument("--message", default="", help="a message shown with the request")
    rcreate.add_argument("--priority", choices=("NORMAL", "URGENT"), default="NORMAL")
    rcreate.add_argument("--expiry-days", type=int, help="days the request stays open")
    rcreate.add_argument("--as-user", default="", metavar="USERNAME",
                         help="staff user shown as the hospital contact")

    export = sub.add_parser("export", help="write the download zip of a transaction or study")
    _common(export)
    export.add_argument("what", metavar="TRANSACTION_OR_STUDY",
                        help="a transaction ID (IEP...) or a Study Instance UID")
    export.add_argument("--out", type=Path, required=True, metavar="FILE.zip",
                        help="where to write the zip")
    export.add_argument("--password", action="store_true",
                        help="encrypt with AES-256 and a generated password (printed once)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser



def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir,
        "database_url": args.database_url,
    }
    for name in ("ae_title", "bind", "dicom_port", "http_port", "dicom_workers", "http_workers",
                 "stable_age", "log_level"):
        overrides[name] = getattr(args, name, None)
    return load_settings(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Run the ``iepnode`` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "serve":
            from iepnode.serve import serve

            return serve(settings)
        handler = {"ae": cmd_ae, "import": cmd_import, "fileset": cmd_fileset,
                   "studies": cmd_studies, "user": cmd_user,
                   "transfer": cmd_transfer, "export": cmd_export, "send": cmd_send,
                   "route": cmd_route, "request": cmd_request,
                   "recipient": cmd_recipient}[args.command]
        return handler(args, settings)
    except ConfigError as exc:
        print(f"iepnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except (NodeError, ValueError, FileNotFoundError) as exc:
        print(f"iepnode: {exc}", file=sys.stderr)
        return 1
