"""A flood of failed staff logins cannot starve page views or the memory of a web process.

Every staff login costs an argon2id hash (64 MiB, ~0.1 s of CPU). A real
``iepnode serve --http-workers 2`` gets 32 clients that send failed logins (each
with a new username, so the per-username lockout never stops them) without pause;
meanwhile a recipient of the portal and a signed-in staff member load pages. The
pages' 95th percentile latency and each HTTP process's peak resident memory
(``VmHWM``) are measured before and during the flood. The pool that bounds the
hashing (:class:`iepnode.people.passwords.PasswordWork`) is also tested on its own, and
through the login page of an in-process app.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config import load_settings
from iepnode.errors import Busy
from iepnode.people import passwords, staff
from iepnode.sharing import logins
from iepnode.wiring import build_services
from storage.models import AuditEvent, StaffLoginFailures
from tests.support.node import RunningNode, running_node
from tests.test_worker_processes import _listeners
from web.app import create_app

FLOOD = 32
SAMPLES = 40
#: Seconds a page view may take before the measurement gives up on it.
PATIENCE = 3.0
CSRF = "c" * 32
PRELOGIN_COOKIE = "__Host-iepnode-csrf"
SESSION_COOKIE = "__Host-iepnode"
MIB = 1 << 20


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[tuple[RunningNode, str]]:
    local = build_services(load_settings(overrides={"data_dir": tmp_path / "node", "fsync": False},
                               environ={}))
    try:
        user, _ = staff.create_user("drwho", "correct horse battery staple")
        session = logins.open_session(staff_id=user.id).token
        with running_node(local.settings.data_dir, extra=["--http-workers", "2"]) as running:
            yield running, session
    finally:
        local.group_commit.close()
        local.close()


def peak_rss(running: RunningNode) -> dict[int, int]:
    """``VmHWM`` (bytes) of every process listening on the node's HTTP port."""
    peaks = {}
    for pid in _listeners(running.http_port):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1]) * 1024
    assert len(peaks) == 2, peaks  # the main process and one more HTTP worker
    return peaks


async def page_latencies(base: str, session: str, count: int = SAMPLES) -> list[float]:
    """Seconds each page view took: ``/healthz`` and the staff home page, in turn.

    Every view opens a new connection, so the kernel spreads them over both processes.
    A view slower than :data:`PATIENCE` counts as that long, and three such end the
    measurement (the pages are starved: no need to wait for every one).
    """
    times: list[float] = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base, connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as client:
        for n in range(count):
            path, headers = (("/healthz", {}) if n % 2 else
                             ("/admin", {"Cookie": f"{SESSION_COOKIE}={session}"}))
            started = time.perf_counter()
            try:
                async with client.get(path, headers=headers, allow_redirects=False,
                                      timeout=aiohttp.ClientTimeout(total=PATIENCE)) as answer:
                    await answer.read()
                    assert answer.status == 200, (path, answer.status)
                times.append(time.perf_counter() - started)
            except TimeoutError:
                times.append(PATIENCE)
                if times.count(PATIENCE) == 3:
                    break
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


@contextlib.asynccontextmanager
async def login_flood(base: str) -> AsyncIterator[dict[int, int]]:
    """``FLOOD`` clients sending failed logins without pause; yields status -> count.

    Yields once every client has a login under way and the first answers came back.
    """
    statuses: dict[int, int] = {}
    stop = asyncio.Event()
    under_way: set[int] = set()
    started = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(base, cookie_jar=aiohttp.DummyCookieJar(),
                                         connector=aiohttp.TCPConnector(limit=1)) as http:
            while not stop.is_set():
                data = {"csrf": CSRF, "username": f"x{uuid.uuid4().hex[:12]}",
                        "password": "not the password", "code": "000000", "next": "/admin"}
                under_way.add(n)
                async with http.post("/admin/login", data=data, allow_redirects=False,
                                     headers={"Cookie": f"{PRELOGIN_COOKIE}={CSRF}"}) as answer:
                    await answer.read()
                    statuses[answer.status] = statuses.get(answer.status, 0) + 1
                    if len(under_way) == FLOOD:
                        started.set()

    tasks = [asyncio.ensure_future(client(n)) for n in range(FLOOD)]
    try:
        await asyncio.wait_for(started.wait(), 60)
        yield statuses
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_failed_login_flood_leaves_pages_fast_and_memory_bounded(
        portal: tuple[RunningNode, str]) -> None:
    running, session = portal
    base = f"http://127.0.0.1:{running.http_port}"
    await page_latencies(base, session, 10)  # warm up (templates, connections)
    before = await page_latencies(base, session)
    rss_before = peak_rss(running)
    async with login_flood(base) as statuses:
        during = await page_latencies(base, session)
    rss_after = peak_rss(running)
    growth = {pid: rss_after[pid] - rss_before[pid] for pid in rss_after}
    print(f"\npages p95 before {p95(before) * 1000:.0f} ms, during the flood "
          f"{p95(during) * 1000:.0f} ms (median {statistics.median(during) * 1000:.0f} ms); "
          f"failed logins answered {statuses}; peak RSS growth "
          f"{', '.join(f'{g / MIB:.0f} MiB' for g in growth.values())}")
    assert statuses.get(403, 0) >= FLOOD // 2  # the flood really checked passwords
    assert len(during) == SAMPLES and p95(during) < 0.5, (before, during)
    # argon2 takes 64 MiB per hash: at most password_hash_concurrency at a time.
    bound = passwords.HASH_MEMORY * load_settings(environ={}).password_hash_concurrency
    assert max(growth.values()) < bound + 32 * MIB, growth


# -- the pool itself ---------------------------------------------------------------------------


async def test_password_work_runs_one_at_a_time_and_refuses_beyond_its_queue() -> None:
    work = passwords.PasswordWork(concurrency=1, queue=2)
    release, lock = threading.Event(), threading.Lock()
    running, most = [0], [0]

    def job() -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        released = release.wait(30)
        with lock:
            running[0] -= 1
        return released

    jobs = [asyncio.ensure_future(work.run(job)) for _ in range(3)]
    while work.admitted < 3:  # let the three reach the pool
        await asyncio.sleep(0)
    started = time.perf_counter()
    with pytest.raises(Busy, match="try again"):
        await work.run(job)
    assert time.perf_counter() - started < 0.1  # refused at once, not after a wait
    release.set()
    assert await asyncio.gather(*jobs) == [True, True, True]
    assert most[0] == 1 and work.admitted == 0
    assert await work.run(job) is True  # room again
    work.close()


async def test_a_login_beyond_the_queue_gets_503_and_costs_no_check(
        aiohttp_client: Any, tmp_path: Path) -> None:
    services = build_services(load_settings(overrides={"data_dir": tmp_path / "data"}, environ={}))
    services.admin.logins.failure_delay = 0.0
    services.admin.logins.password_work = passwords.PasswordWork(concurrency=1, queue=0)
    staff.create_user("drwho", "correct horse battery staple")
    client = await aiohttp_client(create_app(services.settings, services),
                                  cookie_jar=aiohttp.DummyCookieJar())
    release = threading.Event()
    holding = asyncio.ensure_future(services.admin.logins.password_work.run(release.wait, 30))
    while services.admin.logins.password_work.admitted < 1:
        await asyncio.sleep(0)
    response = await client.post("/admin/login", data={
        "csrf": CSRF, "username": "drwho", "password": "a wrong password", "code": "000000"},
        headers={"Cookie": f"{PRELOGIN_COOKIE}={CSRF}"}, allow_redirects=False)
    page = await response.text()
    release.set()
    await holding
    assert response.status == 503 and response.headers["Retry-After"] == "2"
    assert "Many passwords are being checked just now" in page
    assert not AuditEvent.select().where(AuditEvent.action == "login-failed").exists()
    assert StaffLoginFailures.get(StaffLoginFailures.username == "drwho").failures == 0
    services.group_commit.close()
    services.close()
