"""The composition root of ``iepnode serve``: settings -> storage -> Node -> SCP + web.

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
from iepnode.node import Node
from iepnode.workers import WorkerPool, reserve_port
from scp.sender import make_transport
from scp.server import scp_pool
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


async def _housekeeping(node: Node, pools: list[WorkerPool]) -> None:
    passes = 0
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        sweep = passes % ORPHAN_SWEEP_EVERY == 0
        try:
            for pool in pools:
                await asyncio.to_thread(pool.restart_dead)
            await asyncio.to_thread(node.build_stable_filesets)
            await asyncio.to_thread(node.route_stable_studies)
            if sweep:
                await asyncio.to_thread(node.remove_orphan_filesets)
                await asyncio.to_thread(node.purge_expired)
        except Exception:
            log.exception("housekeeping failed")
        # Each sweep below in its own try: one failing does not stop the others.
        if sweep:
            try:  # uploads (issue 7)
                await asyncio.to_thread(node.recover_upload_releases)
                await asyncio.to_thread(node.purge_abandoned_uploads)
            except Exception:
                log.exception("housekeeping of uploads failed")
            try:  # issue 4: DICOMweb
                await asyncio.to_thread(node.purge_dicomweb_tokens)
            except Exception:
                log.exception("housekeeping of DICOMweb tokens failed")
        passes += 1


async def _start_http(settings: Settings, node: Node, port: int) -> web.AppRunner:
    """Start answering HTTP on ``port`` (shared with the other HTTP processes)."""
    limits = HttpLimits(settings.http_max_connections, settings.http_max_connections_per_address,
                        settings.http_head_timeout, settings.trusted_proxies)
    runner = GuardedAppRunner(create_app(settings, node), limits=limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind, port, reuse_address=True, reuse_port=True)
    await site.start()
    return runner


async def _serve_async(settings: Settings, node: Node, pools: list[WorkerPool],
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
    task = asyncio.create_task(_housekeeping(node, pools))
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
    node = Node(settings)

    async def run() -> None:
        runner = await _start_http(settings, node, port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await runner.cleanup()

    try:
        run_loop(run())
    finally:
        node.close()


def _start_send_runner(settings: Settings, node: Node) -> tuple[threading.Event,
                                                                threading.Thread]:
    """Work on send jobs in a thread of the main process (not in HTTP or SCP workers)."""
    runner = node.job_runner(make_transport(settings))
    stop = threading.Event()

    def run() -> None:
        try:
            runner.run_forever(stop)
        finally:
            node.close()

    thread = threading.Thread(target=run, name="send-runner", daemon=True)
    thread.start()
    return stop, thread


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM/SIGINT; return the process exit code."""
    setup_logging(settings, process_name="main")
    node = Node(settings)
    leftover = node.store.clear_staging()
    if leftover:
        log.warning("removed %d partial files left by an earlier crash", leftover)
    if not node.remote_aes():
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
        sending = _start_send_runner(settings, node)
        run_loop(_serve_async(settings, node, pools, dicom_port, http_port))
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
        node.close()
    return 0
