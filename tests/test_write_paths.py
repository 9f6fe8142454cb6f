"""The write paths pages use: group commit, the cross-process SQLite writer queue,
and the fixed-SQL dashboard statements (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import load_settings
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.wiring import build_services
from storage import hot_queries
from storage.db import open_database, write_transaction
from storage.group_commit import GroupCommitter
from storage.models import AuditEvent, Recipient, Transaction, TransactionMessage, WebSession
from tests import data_factory as factory
from tests.support.ingest import store_files as store

T0 = 1_800_000_000.0
CONTACT = tx.Contact("Dr Who", "Radiology", "radiology@hospital.example", "+441234567890")


@pytest.fixture(params=["sqlite", "postgresql"])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    services = build_services(load_settings(overrides={"data_dir": tmp_path / "data",
                                                   "database_url": url},
                              environ={}))
    yield services
    services.group_commit.close()
    services.close()


def _event(n: int) -> AuditEvent:
    return AuditEvent.create(at=T0 + n, event_code="110103", event_name="x", action=f"job-{n}",
                             actor_kind="system", actor="test")


# -- group commit -------------------------------------------------------------------------


def test_group_commit_runs_every_job_once_and_commits_before_returning(services: Services) -> None:
    committer = services.group_commit
    results: dict[int, int] = {}
    start = threading.Barrier(24)

    def worker(n: int) -> None:
        start.wait()
        results[n] = committer.run(lambda: _event(n).id)
        # Visible to a new connection of this thread as soon as run() returned.
        with services.database.connection_context():
            assert AuditEvent.get_by_id(results[n]).action == f"job-{n}"

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(24))
    assert len(set(results.values())) == 24
    assert committer.jobs == 24
    assert 1 <= committer.batches <= 24


def test_a_failing_job_gets_its_error_and_leaves_the_others_committed(services: Services) -> None:
    committer = services.group_commit
    gate = threading.Event()
    errors: list[BaseException] = []

    def blocker() -> None:  # holds the committer so the next jobs queue into one batch
        gate.wait(10)

    def failing() -> None:
        _event(100)
        raise ValueError("job failed")

    def run(job) -> None:
        try:
            committer.run(job)
        except ValueError as exc:
            errors.append(exc)

    first = threading.Thread(target=run, args=(blocker,))
    first.start()
    others = [threading.Thread(target=run, args=(job,))
              for job in (lambda: _event(1), failing, lambda: _event(2))]
    for t in others:
        t.start()
    gate.set()
    for t in [first, *others]:
        t.join()
    assert [str(e) for e in errors] == ["job failed"]
    actions = {e.action for e in AuditEvent.select()}
    assert actions == {"job-1", "job-2"}  # job-100 was rolled back with its savepoint


def test_committer_restarts_after_close(services: Services) -> None:
    services.group_commit.close()
    assert services.group_commit.run(lambda: 42) == 42


# -- the dashboard's fixed SQL ----------------------------------------------------------


def test_dashboard_statements_match_the_models(services: Services, tmp_path: Path) -> None:
    study = store(services, factory.make_ct_series(tmp_path / "ct", 2, PatientName="Doe^Jane",
                                               PatientID="P1"))
    request = tx.NewTransfer((study,), "pat@example.org", otp_mobile="+447700900123")
    made = [tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                               created_by="cli", now=T0 + i)[0] for i in range(3)]
    tx.add_message(made[0], "staff", "radiology@hospital.example", "Hello", now=T0 + 5)
    me = Recipient.get(Recipient.email == "pat@example.org")

    rows = hot_queries.recipient_transactions(me.id, T0)
    assert [r.public_id for r in rows] == [t.public_id for t in reversed(made)]
    model = Transaction.get_by_id(rows[0].id)
    assert tuple(rows[0]) == tuple(getattr(model, f.name if f.name != "recipient" else
                                           "recipient_id") for f in
                                   Transaction._meta.sorted_fields)
    assert hot_queries.recipient_transactions(me.id, T0 + 10) == []

    ids = [t.id for t in made]
    assert [(s.transaction_id, s.study_uid) for s in hot_queries.studies_of(ids)] == [
        (i, study) for i in ids]
    assert hot_queries.images_held([study, "1.2.3.4"]) == {study: 2}
    assert hot_queries.unread_messages(ids) == 1
    [message] = hot_queries.messages_of(ids)
    assert (message.body, bool(message.read_by_recipient)) == ("Hello", False)
    with write_transaction():
        hot_queries.mark_read([message.id])
    assert hot_queries.unread_messages(ids) == 0
    assert TransactionMessage.get_by_id(message.id).read_by_recipient is True
    assert hot_queries.recipient(me.id).email == "pat@example.org"
    assert hot_queries.recipient(10_000) is None


def test_dashboard_audits_and_marks_read_through_group_commit(services: Services,
                                                              tmp_path: Path) -> None:
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1, PatientID="P1"))
    request = tx.NewTransfer((study,), "pat@example.org", otp_mobile="+447700900123")
    transaction, _ = tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                                        created_by="cli")
    tx.add_message(transaction, "staff", "radiology@hospital.example", "Hello")
    me = Recipient.get(Recipient.email == "pat@example.org")
    board = services.sharing.recipient_dashboard(me.id, "all", "192.0.2.7")
    assert [v.transaction.public_id for v in board.transactions] == [transaction.public_id]
    assert board.transactions[0].unread == 1 and board.unread == 1
    event = AuditEvent.get(AuditEvent.transaction_public_id == transaction.public_id,
                           AuditEvent.action == "view-transaction")
    assert (event.source_ip, event.actor, event.patient_id) == ("192.0.2.7", me.email, "P1")
    assert services.sharing.recipient_dashboard(me.id, "all").unread == 0
    assert services.group_commit.jobs == 2


def test_session_activity_is_written_once_a_minute(services: Services) -> None:
    from iepnode.sharing import logins
    me = Recipient.create(email="a@example.org", created_at=T0)
    opened = logins.open_session(me, now=T0)
    logins.resume_session(opened.token, now=T0 + 30, run_write=services.group_commit.run)
    assert WebSession.get_by_id(opened.session.id).last_seen == T0
    logins.resume_session(opened.token, now=T0 + 61, run_write=services.group_commit.run)
    assert WebSession.get_by_id(opened.session.id).last_seen == T0 + 61


# -- SQLite writers of several processes ------------------------------------------------


def _hammer(url: str, worker: int, count: int) -> None:
    open_database(url)
    for n in range(count):
        with write_transaction():
            # A read, then a write: a deferred transaction would fail on the upgrade.
            AuditEvent.select().count()
            with write_transaction():  # nested: joins the outer transaction
                AuditEvent.create(at=n, event_code="1", event_name="x", action=f"w{worker}",
                                  actor_kind="system", actor="test")


def test_writers_of_several_processes_queue_without_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    open_database(url)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(url, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    _hammer(url, 9, 150)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with sqlite3.connect(tmp_path / "index.sqlite3") as conn:
        counts = dict(conn.execute(
            'SELECT "action", COUNT(*) FROM "auditevent" GROUP BY "action"').fetchall())
    assert counts == {"w0": 150, "w1": 150, "w2": 150, "w9": 150}
    assert (tmp_path / "index.sqlite3.writelock").exists()


def test_group_committer_without_database_connection_elsewhere(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    committer = GroupCommitter(database)
    try:
        assert committer.run(lambda: _event(1).action) == "job-1"
    finally:
        committer.close()
