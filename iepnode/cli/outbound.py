"""``iepnode send`` and ``route``: sends to remote AEs and auto-routing rules."""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
import time
from typing import Any

from config import Settings


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


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode route add|list|remove``: the auto-routing rules (audited)."""
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
