"""The ``iepnode`` command line: serve, manage remote AEs, import, build file-sets, export."""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
import time
from pathlib import Path
from typing import Any

from config import ConfigError, Settings, load_settings
from iepnode.errors import NodeError
from iepnode.people import passwords
from iepnode.rules.identifiers import is_public_id


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


def _cli_actor() -> Any:  # -> iepnode.people.audit.Actor
    """Who the audit trail names for an admin command: the operating-system user."""
    from iepnode.people.audit import Actor

    return Actor("cli", getpass.getuser())


def _cmd_ae(args: argparse.Namespace, settings: Settings) -> int:
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
                                        args.allow.split(","), _cli_actor(),
                                        send_to=args.send_to, tls=tls, port_zero=True)
        except InvalidRequest as exc:
            print(f"iepnode: ae add: {exc}", file=sys.stderr)
            return 2
        print(f"registered {ae.ae_title} {ae.host}:{ae.port} allow=echo"
              f"{',' + ae.allow if ae.allow else ''}"
              f"{' send-to' if ae.send_to else ''}{' tls' if ae.tls else ''}")
    elif args.ae_command == "remove":
        try:
            peers.remove_remote_ae(args.name, _cli_actor())
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


def _cmd_import(args: argparse.Namespace, settings: Settings) -> int:
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


def _run_local_job(node: Any, runner: Any, job_id: int, stop: threading.Event) -> None:
    """Work on one job in this process until it is finished (retries included)."""
    try:
        while not stop.is_set():
            runner.run_one(stop, job_id=job_id)
            if node.sends.send_progress(job_id).finished:
                return
            stop.wait(0.25)
    except Exception as exc:
        print(f"iepnode: sending failed: {exc}", file=sys.stderr)
    finally:
        node.close()


def _cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    """Queue a send; show its progress until it is done (sending here if no node runs)."""
    from tqdm import tqdm

    from iepnode.logs import setup_logging
    from iepnode.outbound import sending
    from iepnode.people import audit
    from iepnode.wiring import build_services

    setup_logging(settings, process_name="send", to_stderr=False)
    node = build_services(settings)
    job = sending.queue_job(args.study_uids, args.to, audit.Actor("cli", getpass.getuser()))
    if args.no_wait:
        print(job.id)
        return 0
    stop = threading.Event()
    local = None
    if not sending.runner_alive():
        # No node is running (no runner noted itself alive lately): send from here.
        # Should one start meanwhile, the job's lease keeps the two from both sending.
        from scp.sender import make_transport

        runner = node.sends.job_runner(make_transport(settings))
        local = threading.Thread(target=_run_local_job, args=(node, runner, job.id, stop),
                                 name="send-local", daemon=True)
        local.start()
    where = "from this process" if local else "by the running node"
    print(f"send job {job.id}: {job.total} instances to {job.ae_title}, sent {where}",
          file=sys.stderr)
    bar = tqdm(total=job.total, unit="img", desc=f"to {job.ae_title}",
               disable=args.no_progress, file=sys.stderr)
    try:
        while True:
            progress = node.sends.send_progress(job.id)
            bar.update(progress.sent + progress.failed - bar.n)
            if progress.state == sending.QUEUED and progress.attempts:
                bar.set_postfix_str("waiting to retry", refresh=False)
            elif progress.state == sending.RUNNING:
                bar.set_postfix_str("", refresh=False)
            if progress.finished:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"\niepnode: stopped watching; job {job.id} stays queued", file=sys.stderr)
        return 130
    finally:
        bar.close()
        stop.set()
        if local is not None:
            local.join(60)
    print(f"job {job.id} {progress.state}: {progress.sent} of {progress.total} sent, "
          f"{progress.failed} failed{f' ({progress.error})' if progress.error else ''}")
    return 0 if progress.state == sending.DONE else 1


def _cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    from iepnode.outbound import routing
    from iepnode.people import audit
    from iepnode.wiring import build_services

    build_services(settings)  # opens the database
    actor = audit.Actor("cli", getpass.getuser())
    if args.route_command == "add":
        rule = routing.add_rule(args.to, actor, calling_ae=args.calling_ae,
                                accession_prefix=args.accession_prefix, modality=args.modality)
        print(f"rule {rule.id}: {routing.describe(rule)}")
    elif args.route_command == "remove":
        routing.remove_rule(args.rule_id, actor)
        print(f"removed rule {args.rule_id}")
    else:
        for rule in routing.list_rules():
            print(f"{rule.id:>4}  {routing.describe(rule)}"
                  f"{'' if rule.enabled else '  (disabled)'}")
    return 0


def _cmd_fileset(args: argparse.Namespace, settings: Settings) -> int:
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


def _cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    from iepnode.wiring import build_services
    from storage.models import Patient, Study

    build_services(settings)  # opens the database
    query = Study.select(Study, Patient).join(Patient).order_by(Study.last_received.desc())
    for study in query:
        print(f"{study.study_uid}  {study.patient.patient_id:<16} {study.patient.name:<30} "
              f"{study.study_date:<8} {study.modalities:<8} {study.num_series:>3} series "
              f"{study.num_instances:>6} instances")
    return 0


def _cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    from iepnode.wiring import build_services

    staff_side = build_services(settings).admin
    if args.user_command == "unlock":
        email = staff_side.transactions.unlock_recipient_email(args.email, _cli_actor())
        print(f"unlocked {email}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password ({passwords.MIN_LENGTH}+ characters): ")
        if getpass.getpass("Again: ") != password:
            print("iepnode: the passwords differ", file=sys.stderr)
            return 1
    user, uri = staff_side.accounts.add_user(
        args.username, password, is_admin=args.admin, display_name=args.name,
        email=args.email, department=args.department, phone=args.phone, user=_cli_actor())
    print(f"created {'admin' if user.is_admin else 'staff user'} {user.username}")
    print("Add this to an authenticator app (it is shown only now):")
    print(uri)
    return 0


def _acting_user(username: str | None):  # -> tuple[StaffUser | None, bool]
    """The staff user named by ``--as-user`` (``None`` without it); ``False`` if unknown."""
    from storage.models import StaffUser

    if not username:
        return None, True
    user = StaffUser.get_or_none(StaffUser.username == username.strip().lower())
    if user is None:
        print(f"iepnode: no staff user {username}", file=sys.stderr)
    return user, user is not None


def _cmd_transfer(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from iepnode.people import audit
    from iepnode.sharing.transactions import NewTransfer
    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = _acting_user(args.as_user)
    if not known:
        return 1
    request = NewTransfer(
        study_uids=tuple(args.studies), recipient_email=args.to,
        otp_mobile=args.otp_mobile or "", otp_email=args.otp_email or "",
        recipient_name=args.name, message=args.message, priority=args.priority,
        expiry_days=args.expiry_days or settings.transaction_expiry_days,
        nhs_number=args.nhs_number,
    )
    actor = audit.Actor("cli", user.username if user else getpass.getuser())
    transaction = asyncio.run(node.sharing.share(request, actor=actor, user=user))
    _warn_if_channel_kept(transaction, request.otp_mobile, request.otp_email)
    print(transaction.public_id)
    return 0


def _warn_if_channel_kept(transaction: Any, otp_mobile: str, otp_email: str) -> None:
    """Tell the user on stderr that an existing recipient kept their passcode channel."""
    from iepnode.sharing import recipients

    kept = recipients.kept_instead(transaction.recipient, otp_mobile, otp_email)
    if kept:
        email = transaction.recipient.email
        print(f"iepnode: warning: {email} already has an account: their passcodes still go "
              f"to their {kept.masked}; the channel given was not used. To change it "
              f"(an administrator, or the contact of a transaction they signed in through): "
              f"iepnode recipient channel {email} --otp-mobile NUMBER|--otp-email EMAIL "
              f"--as-user USERNAME, or the staff page of that transaction.", file=sys.stderr)


def _cmd_recipient(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = _acting_user(args.as_user)
    if not known:
        return 1
    changed = asyncio.run(node.admin.channels.change_passcode_channel(
        args.email, args.otp_mobile or "", args.otp_email or "", user,
        source_ip=f"cli:{getpass.getuser()}"))
    print(f"passcodes of {changed.email} now go to their {changed.new.masked}; their open "
          f"sessions and unused passcodes have ended")
    if not changed.notified:
        print("iepnode: warning: the notice to their old channel could not be sent (see the "
              "log and the audit trail)", file=sys.stderr)
        return 3
    return 0


def _cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from iepnode.people import audit
    from iepnode.uploads.image_requests import NewRequest
    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = _acting_user(args.as_user)
    if not known:
        return 1
    request = NewRequest(
        recipient_email=args.to, patient_family_name=args.last_name,
        patient_given_name=args.first_name, patient_birth_date=args.birth_date,
        patient_sex=args.sex or "", patient_id=args.patient_id,
        patient_id_issuer=args.issuer, nhs_number=args.nhs_number, reason=args.reason,
        message=args.message, otp_mobile=args.otp_mobile or "",
        otp_email=args.otp_email or "", recipient_name=args.name, priority=args.priority,
        expiry_days=args.expiry_days or settings.transaction_expiry_days,
    )
    actor = audit.Actor("cli", user.username if user else getpass.getuser())
    transaction = asyncio.run(node.requests.create_request(request, actor=actor, user=user))
    _warn_if_channel_kept(transaction, request.otp_mobile, request.otp_email)
    print(transaction.public_id)
    return 0


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from tqdm import tqdm

    from iepnode.logs import setup_logging
    from iepnode.people import audit
    from iepnode.sharing import downloads
    from iepnode.wiring import build_services

    setup_logging(settings, process_name="export", to_stderr=False)
    node = build_services(settings)
    is_transaction = is_public_id(args.what)
    pkg = (node.downloads.transaction_package(args.what) if is_transaction
           else node.downloads.study_package(args.what))
    out = args.out
    partial = out.with_name(out.name + ".part")
    password = downloads.new_password() if args.password else ""
    bar = tqdm(total=pkg.size, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
               disable=args.no_progress, file=sys.stderr)
    try:
        if password:
            downloads.write_protected(pkg, partial, password, progress=bar.update)
        else:
            with open(partial, "wb") as fh:
                downloads.write_zip(pkg.layout, fh, progress=bar.update)
        os.replace(partial, out)
    except OSError as exc:  # e.g. a stored file cut short while copied: no broken zip
        partial.unlink(missing_ok=True)
        bar.close()
        node.downloads.record_download(audit.Actor("cli", getpass.getuser()), pkg,
                             action="export-protected" if password else "export",
                             transaction=args.what if is_transaction else "",
                             outcome=audit.SERIOUS_FAILURE, detail=f"failed: {exc}")
        print(f"iepnode: export failed, nothing written: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    node.downloads.record_download(audit.Actor("cli", getpass.getuser()), pkg,
                         action="export-protected" if password else "export",
                         transaction=args.what if is_transaction else "",
                         detail=f"{out.stat().st_size} bytes written")
    print(f"wrote {out} ({out.stat().st_size} bytes, {pkg.instances} instances)")
    if pkg.left_out:
        print(f"left out {len(pkg.left_out)} instances whose stored files cannot be read "
              "(listed in the zip's README.TXT)", file=sys.stderr)
    if password:
        print(f"password: {password}")
        print("(shown only now; send it separately from the file)")
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
                   "studies": _cmd_studies, "user": _cmd_user,
                   "transfer": _cmd_transfer, "export": _cmd_export, "send": _cmd_send,
                   "route": _cmd_route, "request": _cmd_request,
                   "recipient": _cmd_recipient}[args.command]
        return handler(args, settings)
    except ConfigError as exc:
        print(f"iepnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except (NodeError, ValueError, FileNotFoundError) as exc:
        print(f"iepnode: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
