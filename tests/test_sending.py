"""Send jobs in the database: atomic claims (SQLite and PostgreSQL), leases, retries.

The transport is the seam between jobs and the network: the end-to-end tests
(tests/test_forward_dicom.py) use the real one against dcmtk and Orthanc; here a
function plays the peer to script answers the real peers cannot be made to give
on demand (a transient 0xA700, a refusal 0xC000).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from config import load_settings
from iepnode.errors import PeerUnavailable
from iepnode.outbound import send_runner, sending
from iepnode.outbound.sending import Destination, ItemResult, Outgoing, RetryPolicy
from iepnode.people import audit
from iepnode.services import Services
from iepnode.wiring import build_services
from scp.sender import propose
from storage import registry
from storage.models import AuditEvent, SendItem, SendJob
from tests import data_factory as factory
from tests.support.ingest import store_files

ACTOR = audit.Actor("cli", "tester")


def make_services(tmp_path: Path, database_url: str = "") -> Services:
    values = {"data_dir": tmp_path / "data", "fsync": False}
    if database_url:
        values["database_url"] = database_url
    return build_services(load_settings(overrides=values, environ={}))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Services:
    url = request.getfixturevalue("fresh_postgres_url") if request.param == "postgres" else ""
    return make_services(tmp_path, url)


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    registry.add_remote_ae("DEST", "127.0.0.1", 104, set(), send_to=True)
    return store_files(services, factory.make_ct_series(tmp_path / "ct", 3))


Script = Callable[[Outgoing], ItemResult]


def scripted(answers: Script) -> sending.Transport:
    """A transport whose peer answers each item with ``answers(item)``."""

    def transport(destination: Destination, items: Sequence[Outgoing],
                  report: Callable[[ItemResult], bool]) -> None:
        for item in items:
            if not report(answers(item)):
                return

    return transport


def runner(services: Services, transport: sending.Transport,
           attempts: int = 5) -> send_runner.JobRunner:
    return send_runner.JobRunner(services.store, transport, RetryPolicy(5.0, 60.0, attempts))


def test_only_one_of_two_runners_claims_a_job(services: Services, study: str) -> None:
    job = sending.queue_job([study], "DEST", ACTOR)
    barrier = threading.Barrier(2)
    claims: list[object] = []

    def claim(owner: str) -> None:
        barrier.wait()
        claims.append(send_runner.claim_job(owner))
        services.close()

    threads = [threading.Thread(target=claim, args=(f"h/{n}/x",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    won = [c for c in claims if c is not None]
    assert len(claims) == 2 and len(won) == 1
    row = SendJob.get_by_id(job.id)
    assert row.state == "running" and row.attempts == 1 and row.lease_owner == won[0].lease_owner
    # While the lease lasts nobody else gets it; once it has run out, someone does.
    assert send_runner.claim_job("h/3/x") is None
    SendJob.update(lease_until=time.time() - 1).execute()
    assert send_runner.claim_job("h/3/x").lease_owner == "h/3/x"


def test_transient_failures_retry_refusals_do_not(services: Services, study: str) -> None:
    job = sending.queue_job([study], "DEST", ACTOR)
    items = [i.id for i in SendItem.select().order_by(SendItem.id)]
    first = {items[0]: ItemResult(items[0], True, 0), items[1]: sending.failure_result(
        items[1], 0xA700, "disk full"), items[2]: sending.failure_result(items[2], 0xC000)}
    ran = runner(services, scripted(lambda item: first[item.item_id])).run_one()
    assert ran is not None
    row = SendJob.get_by_id(job.id)
    assert (row.state, row.sent, row.failed, row.attempts) == ("queued", 1, 1, 1)
    assert row.next_try_at > time.time() + 3 and "retrying in 5 s" in row.error
    states = [i.state for i in SendItem.select().order_by(SendItem.id)]
    assert states == ["sent", "pending", "failed"]
    assert runner(services, scripted(lambda item: first[item.item_id])).run_one() is None  # not due

    SendJob.update(next_try_at=0).execute()
    sent_now: list[str] = []

    def second(item: Outgoing) -> ItemResult:
        sent_now.append(item.sop_uid)
        return ItemResult(item.item_id, True, 0xB000)

    runner(services, scripted(second)).run_one()
    assert len(sent_now) == 1  # only the pending one: nothing is sent twice
    row = SendJob.get_by_id(job.id)
    assert (row.state, row.sent, row.failed) == ("failed", 2, 1)
    assert "1 of 3 instances could not be sent; first: peer answered 0xC000" in row.error
    (event,) = AuditEvent.select().where(AuditEvent.action == "dicom-send")
    assert (event.event_code, event.outcome, event.study_uid) == (
        "110104", audit.MINOR_FAILURE, study)


def test_unreachable_peer_gives_up_after_the_last_attempt(services: Services, study: str) -> None:
    job = sending.queue_job([study], "DEST", ACTOR)

    def down(destination: Destination, items: Sequence[Outgoing],
             report: Callable[[ItemResult], bool]) -> None:
        raise PeerUnavailable(f"{destination} cannot be reached")

    for _ in range(2):
        runner(services, down, attempts=2).run_one()
        SendJob.update(next_try_at=0).execute()
    row = SendJob.get_by_id(job.id)
    assert row.state == "failed" and row.sent == 0 and row.finished_at
    assert row.error.startswith("gave up after 2 attempts; 3 instances not sent: DEST at")
    (event,) = AuditEvent.select().where(AuditEvent.action == "dicom-send")
    assert event.outcome == audit.SERIOUS_FAILURE


def test_a_peer_that_drops_the_association_on_one_instance(services: Services, study: str) -> None:
    job = sending.queue_job([study], "DEST", ACTOR)
    poison = SendItem.select().order_by(SendItem.id).first().id

    def transport(destination: Destination, items: Sequence[Outgoing],
                  report: Callable[[ItemResult], bool]) -> None:
        for item in items:
            if item.item_id == poison:
                report(ItemResult(item.item_id, False, None, sending.DROPPED))
                raise PeerUnavailable("dropped")
            report(ItemResult(item.item_id, True, 0))

    for _ in range(sending.MAX_DROPS):
        runner(services, transport, attempts=10).run_one()
        SendJob.update(next_try_at=0).execute()
    # The instance has failed for good; the next attempt sends the rest.
    assert SendJob.get_by_id(job.id).failed == 1
    runner(services, transport, attempts=10).run_one()
    row = SendJob.get_by_id(job.id)
    assert (row.state, row.sent, row.failed) == ("failed", 2, 1)
    assert "dropped the association 3 times" in row.error


def test_stopping_hands_the_job_back(services: Services, study: str) -> None:
    job = sending.queue_job([study], "DEST", ACTOR)
    stop = threading.Event()

    def first_then_stop(item: Outgoing) -> ItemResult:
        stop.set()
        return ItemResult(item.item_id, True, 0)

    runner(services, scripted(first_then_stop)).run_one(stop)
    row = SendJob.get_by_id(job.id)
    assert (row.state, row.sent, row.attempts, row.lease_owner) == ("queued", 1, 0, "")


def test_back_off_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(10.0, 900.0, 20)
    assert [policy.delay(n) for n in (1, 2, 3, 7, 20)] == [10, 20, 40, 640, 900]


def test_contexts_keep_the_stored_syntax_first() -> None:
    def item(ts: str) -> Outgoing:
        return Outgoing(1, "1.2.3", CTImageStorage, ts, "/x")

    contexts = propose([item(ExplicitVRLittleEndian), item(RLELossless),
                        item(DeflatedExplicitVRLittleEndian)])
    assert [cx.transfer_syntax for cx in contexts] == [
        [ExplicitVRLittleEndian], [DeflatedExplicitVRLittleEndian], [RLELossless],
        [ImplicitVRLittleEndian]]
