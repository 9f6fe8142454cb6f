"""The composition root of ``iepnode serve``: settings -> storage -> Services -> SCP + web.

The main process is a supervisor: it holds the two ports, starts the SCP and HTTP
worker processes (which share the ports with ``SO_REUSEPORT``), restarts any that
die, and runs housekeeping and the send runner. It answers no network request
itself, so a hostile peer cannot make it grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Coroutine
from multiprocessing.synchronize import Event as EventType
from typing import Any

from aiohttp import web

from config import Settings
from iepnode.logs import setup_logging
from iepnode.outbound import routing
from iepnode.services import Services
from iepnode.uploads import housekeeping as upload_housekeeping
from iepnode.viewing import dicomweb_access
from iepnode.wiring import build_services
from iepnode.workers import WorkerPool, reserve_port, stop_on_sigterm
from scp.sender import make_transport
from scp.server import serve_associations
from storage import registry
from web.app import create_app
from web.connections import GuardedAppRunner, HttpLimits

log = logging.getLogger("iepnode.serve")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when installed (measured: more pages/s), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)

#: Seconds between housekeeping passes (file-set builds, worker checks).
HOUSEKEEPING_INTERVAL = 1.0


#: Housekeeping passes between sweeps for file-sets of studies that no longer exist.
ORPHAN_SWEEP_EVERY = 300


async def _housekeeping(services: Services, pools: list[WorkerPool]) -> None:
    passes = 0
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        sweep = passes % ORPHAN_SWEEP_EVERY == 0
        try:
            for pool in pools:
                await asyncio.to_thread(pool.restart_dead)
            await asyncio.to_thread(services.filesets.build_stable_filesets)
            await asyncio.to_thread(routing.route_stable, services.settings.stable_age)
            if sweep:
                await asyncio.to_thread(services.filesets.remove_orphan_filesets)
                await asyncio.to_thread(services.sharing.purge_expired)
        except Exception:
            log.exception("housekeeping failed")
        # Each sweep below in its own try: one failing does not stop the others.
        if sweep:
            try:  # uploads (issue 7)
                await asyncio.to_thread(upload_housekeeping.recover_releases)
                await asyncio.to_thread(services.requests.purge_abandoned_uploads)
            except Exception:
                log.exception("housekeeping of uploads failed")
            try:  # issue 4: DICOMweb
                await asyncio.to_thread(dicomweb_access.purge_tokens)
            except Exception:
                log.exception("housekeeping of DICOMweb tokens failed")
        passes += 1


async def _start_http(settings: Settings, services: Services, port: int) -> web.AppRunner:
    """Start answering HTTP on ``port`` (shared with the other HTTP processes)."""
    limits = HttpLimits(settings.http_max_connections, settings.http_max_connections_per_address,
                        settings.http_head_timeout, settings.trusted_proxies)
    runner = GuardedAppRunner(create_app(settings, services), limits=limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind, port, reuse_address=True, reuse_port=True)
    await site.start()
    return runner


async def _serve_async(settings: Settings, services: Services, pools: list[WorkerPool],
                       dicom_port: int, http_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("node %s ready: DICOM %s:%d (%d workers), HTTP %s:%d (%d processes), data in %s",
             settings.ae_title, settings.bind, dicom_port, settings.dicom_workers,
             settings.bind, http_port, settings.http_workers, settings.data_dir)
    print(f"READY dicom={settings.bind}:{dicom_port} http={settings.bind}:{http_port}",
          flush=True)
    task = asyncio.create_task(_housekeeping(services, pools))
    await stop.wait()
    log.info("shutting down")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run_http_worker(number: int, ready: EventType, settings: Settings, port: int) -> None:
    """Entry point of an HTTP process: answer requests until SIGTERM.

    Pages are served only by these processes, each with its own database
    connections; the main process supervises them and the SCP workers and runs
    housekeeping and sends, so no request can take its memory.
    """
    setup_logging(settings, process_name=f"http-{number}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    services = build_services(settings)

    async def run() -> None:
        runner = await _start_http(settings, services, port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await runner.cleanup()

    try:
        run_loop(run())
    finally:
        services.close()


def run_scp_worker(number: int, ready: EventType, settings: Settings, port: int) -> None:
    """Entry point of an SCP worker process: serve associations until SIGTERM.

    Each worker builds its own services (its own database connections and file
    store) and hands the SCP the archive service.
    """
    setup_logging(settings, process_name=f"scp-{number}")
    stop = stop_on_sigterm()
    services = build_services(settings)
    try:
        serve_associations(settings, services.archive, port, ready, stop)
    finally:
        services.close()


def scp_pool(settings: Settings, port: int) -> WorkerPool:
    """The SCP's worker processes (``settings.dicom_workers``) on the reserved ``port``."""
    return WorkerPool("scp", run_scp_worker, settings.dicom_workers, (settings, port))


def _start_send_runner(settings: Settings, services: Services) -> tuple[threading.Event,
                                                                threading.Thread]:
    """Work on send jobs in a thread of the main process (not in HTTP or SCP workers)."""
    runner = services.sends.job_runner(make_transport(settings))
    stop = threading.Event()

    def run() -> None:
        try:
            runner.run_forever(stop)
        finally:
            services.close()

    thread = threading.Thread(target=run, name="send-runner", daemon=True)
    thread.start()
    return stop, thread


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM/SIGINT; return the process exit code."""
    setup_logging(settings, process_name="main")
    services = build_services(settings)
    leftover = services.store.clear_staging()
    if leftover:
        log.warning("removed %d partial files left by an earlier crash", leftover)
    if not registry.list_remote_aes():
        log.warning("no remote AE is registered: every association will be rejected until "
                    "one is added with `iepnode ae add NAME HOST PORT --allow store,...`")
    reserved: list[socket.socket] = []
    pools: list[WorkerPool] = []
    sending: tuple[threading.Event, threading.Thread] | None = None
    try:
        reserved = [reserve_port(settings.bind, settings.dicom_port),
                    reserve_port(settings.bind, settings.http_port)]
        dicom_port, http_port = (sock.getsockname()[1] for sock in reserved)
        pools = [scp_pool(settings, dicom_port),
                 WorkerPool("http", run_http_worker, settings.http_workers,
                            (settings, http_port))]
        for pool in pools:
            pool.start()
        sending = _start_send_runner(settings, services)
        run_loop(_serve_async(settings, services, pools, dicom_port, http_port))
    except OSError as exc:
        print(f"iepnode: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if sending is not None:
            # The runner hands an unfinished job back (it resumes at the next start).
            sending[0].set()
            sending[1].join(60)
        for pool in pools:
            pool.stop()
        for sock in reserved:
            sock.close()
        services.close()
    return 0
