"""The composition root of ``iepnode serve``: settings -> storage -> Node -> SCP + web."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from config import Settings
from iepnode.logs import setup_logging
from iepnode.node import Node
from scp.server import WorkerPool, reserve_port
from web.app import create_app

log = logging.getLogger("iepnode.serve")

#: Seconds between housekeeping passes (file-set builds, worker checks).
HOUSEKEEPING_INTERVAL = 1.0


#: Housekeeping passes between sweeps for file-sets of studies that no longer exist.
ORPHAN_SWEEP_EVERY = 300


async def _housekeeping(node: Node, pool: WorkerPool) -> None:
    passes = 0
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        try:
            await asyncio.to_thread(pool.restart_dead)
            await asyncio.to_thread(node.build_stable_filesets)
            if passes % ORPHAN_SWEEP_EVERY == 0:
                await asyncio.to_thread(node.remove_orphan_filesets)
                await asyncio.to_thread(node.purge_expired)
        except Exception:
            log.exception("housekeeping failed")
        passes += 1


async def _serve_async(settings: Settings, node: Node, pool: WorkerPool, dicom_port: int) -> None:
    app = create_app(settings, node)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind, settings.http_port, reuse_address=True)
    await site.start()
    http_port = runner.addresses[0][1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("node %s ready: DICOM %s:%d (%d workers), HTTP %s:%d, data in %s",
             settings.ae_title, settings.bind, dicom_port, settings.dicom_workers,
             settings.bind, http_port, settings.data_dir)
    print(f"READY dicom={settings.bind}:{dicom_port} http={settings.bind}:{http_port}",
          flush=True)
    task = asyncio.create_task(_housekeeping(node, pool))
    await stop.wait()
    log.info("shutting down")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runner.cleanup()


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
    reserved = reserve_port(settings.bind, settings.dicom_port)
    dicom_port = reserved.getsockname()[1]
    pool = WorkerPool(settings, dicom_port)
    try:
        pool.start()
        asyncio.run(_serve_async(settings, node, pool, dicom_port))
    except OSError as exc:
        print(f"iepnode: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        pool.stop()
        reserved.close()
        node.close()
    return 0
