"""Forwarding a package to a person: the rules, the copy, expiry and purge, concurrency.

The domain runs over a real index (SQLite, and PostgreSQL where concurrency or the
schema matters); mail goes to the outbox (``DATA_DIR/outbox``) or, for the failure
path, to a closed port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from config import load_settings
from iepnode.outbound.messaging import DeliveryError
from iepnode.people.audit import Actor, events_for_transaction
from iepnode.services import Services
from iepnode.sharing import forwarding as fw
from iepnode.sharing import transactions as tx
from iepnode.sharing.forwarding import ForwardInvalid, ForwardRefused, ForwardRequest
from iepnode.wiring import build_services
from storage.db import open_database
from storage.models import Recipient, Transaction, TransactionMessage, TransactionStudy
from tests import data_factory as factory
from tests.support.ingest import store_files as store
from tests.test_recipient_web import outbox, read_eml

T0 = 1_800_000_000.0
CONTACT = tx.Contact("Dr Who", "Radiology", "radiology@hospital.example", "+441234567890")
ACTOR = Actor("recipient", "pat@example.org", "127.0.0.1")


def make_services(tmp_path: Path, url: str = "", **overrides: Any) -> Services:
    return build_services(load_settings(overrides={
        "data_dir": tmp_path / "data", "database_url": url, "fsync": False,
        "institution": "St Elsewhere", "public_url": "https://portal.example", **overrides},
        environ={}))


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    services = make_services(tmp_path)
    yield services
    services.group_commit.close()
    services.close()


def stored_study(services: Services, folder: Path, count: int = 2, **tags: str) -> str:
    tags = {"PatientName": "Doe^Jane", "PatientID": "PAT4711", "StudyDate": "20240105", **tags}
    return store(services, factory.make_ct_series(folder, count, **tags))


def share(study_uids: list[str], email: str = "pat@example.org", *, now: float = T0,
          expiry_days: int = 14) -> Transaction:
    request = tx.NewTransfer(tuple(study_uids), email, otp_mobile="+447700900123",
                             expiry_days=expiry_days, nhs_number="9434765919")
    return tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                              created_by="cli", now=now)[0]


def person(email: str = "solicitor@law.example", **kw: Any) -> ForwardRequest:
    values: dict[str, Any] = {
        "email": email, "email_confirm": email.upper(), "first_name": "Sol",
        "last_name": "Icitor", "address": "1 Law Lane\nLeeds", "phone": "+44 20 7946 0000",
        "otp_mobile": "+44 7700 900555", "purpose": "legal", "organisation": "Law & Co",
        "message": "Please review.", "agreed": True, **kw}
    return ForwardRequest(**values)


def checked(request: ForwardRequest, known: frozenset[str] = frozenset()) -> fw.CheckedForward:
    return fw.check_request(request, forwarder_email="pat@example.org", known=set(known))


def forward(source: Transaction, request: ForwardRequest | None = None, *, now: float = T0,
            max_forwards: int = 3, default_days: int = 14) -> fw.Forwarded:
    forwarder = Recipient.get_by_id(source.recipient_id)
    return fw.create_copy(source.id, forwarder, checked(request or person()),
                          max_forwards=max_forwards, default_days=default_days, actor=ACTOR,
                          now=now)


# -- pure rules -----------------------------------------------------------------------------


def row(**kw: Any) -> SimpleNamespace:
    values = {"kind": tx.TRANSFER, "direction": tx.IN, "status": tx.NEW, "expires_at": T0 + 10,
              "purged_at": None, "forwarded_from_id": None, **kw}
    return SimpleNamespace(**values)


def test_refusal_rules() -> None:
    assert fw.refusal(row(), 0, max_forwards=3, now=T0) == ""
    assert fw.refusal(row(), 2, max_forwards=3, now=T0) == ""
    assert "3 times already" in fw.refusal(row(), 3, max_forwards=3, now=T0)
    assert "cannot be forwarded again" in fw.refusal(row(forwarded_from_id=7), 0,
                                                     max_forwards=3, now=T0)
    assert "declined" in fw.refusal(row(status=tx.DECLINED), 0, max_forwards=3, now=T0)
    for expired in (row(status=tx.EXPIRED), row(expires_at=T0), row(purged_at=T0 - 1)):
        assert "expired" in fw.refusal(expired, 0, max_forwards=3, now=T0)
    assert "turned off" in fw.refusal(row(), 0, max_forwards=0, now=T0)
    assert "sent to you" in fw.refusal(row(kind=tx.REQUEST), 0, max_forwards=3, now=T0)
    assert "1 time already" in fw.refusal(row(), 1, max_forwards=1, now=T0)


def test_copy_expiry_is_never_later_than_the_source() -> None:
    day = tx.DAY
    assert fw.copy_expiry(T0 + 30 * day, T0, days=None, default_days=14) == T0 + 14 * day
    assert fw.copy_expiry(T0 + 5 * day, T0, days=None, default_days=14) == T0 + 5 * day
    assert fw.copy_expiry(T0 + 30 * day, T0, days=3, default_days=14) == T0 + 3 * day
    assert fw.copy_expiry(T0 + 30 * day, T0, days=100, default_days=14) == T0 + 14 * day
    assert fw.copy_expiry(T0 + 2 * day, T0, days=7, default_days=14) == T0 + 2 * day
    choices = fw.periods(T0 + 10 * day, T0, default_days=14)
    assert choices[0] == (None, T0 + 10 * day)
    assert [d for d, _ in choices[1:]] == [7, 3, 1]


def test_check_request_normalises_and_says_which_step_to_fix() -> None:
    good = checked(person(" Solicitor@Law.example "))
    assert (good.email, good.known, good.name, good.phone, good.otp_mobile, good.address) == (
        "solicitor@law.example", False, "Sol Icitor", "+442079460000", "+447700900555",
        "1 Law Lane\nLeeds")
    cases = [
        (person(email_confirm="other@law.example"), 1, "differ"),
        (person(email="not-an-email", email_confirm="not-an-email"), 1, "email address"),
        (person("pat@example.org"), 1, "yourself"),
        (person(first_name=" "), 1, "first name"),
        (person(last_name="x" * 65), 1, "last name"),
        (person(address=""), 1, "address"),
        (person(address="a\x00b"), 1, "address"),
        (person(phone="call me"), 1, "telephone"),
        (person(otp_mobile=""), 1, "mobile number or a second email"),
        (person(otp_email="other@law.example"), 1, "one of them"),
        (person(otp_mobile="12"), 1, "mobile number for the passcode"),
        (person(otp_mobile="", otp_email="solicitor@law.example"), 1, "differ"),
        (person(otp_mobile="", otp_email="nope"), 1, "second email"),
        (person(purpose="fun"), 2, "why"),
        (person(organisation="x" * 129), 2, "organisation"),
        (person(message="x" * 4001), 3, "4000"),
        (person(days=0), 4, "how long"),
        (person(agreed=False), 4, "tick the box"),
    ]
    for request, step, text in cases:
        with pytest.raises(ForwardInvalid, match=text) as caught:
            checked(request)
        assert caught.value.step == step, (request, text)
    # Someone forwarded to before: no new-individual details needed, typed ones ignored.
    known = checked(person(first_name="", address="", phone="", otp_mobile=""),
                    frozenset({"solicitor@law.example"}))
    assert known.known and (known.name, known.address, known.otp_mobile) == ("", "", "")


# -- the copy ------------------------------------------------------------------------------


def test_forwarded_copy_shares_the_studies_and_is_audited(services: Services,
                                                          tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    source = share([uid])
    files_before = sorted(p for p in services.settings.store_dir.rglob("*") if p.is_file())
    done = forward(source, now=T0 + 60)
    copy = Transaction.get_by_id(done.copy.id)
    assert copy.forwarded_from_id == source.id and copy.public_id != source.public_id
    assert (copy.kind, copy.direction, copy.status) == (tx.TRANSFER, tx.IN, tx.NEW)
    assert copy.expires_at == source.expires_at  # 14 days asked, 14 days - 1 minute left
    for name in ("patient_name", "patient_id", "nhs_number", "institution", "contact_email"):
        assert getattr(copy, name) == getattr(source, name), name
    assert copy.created_by == "pat@example.org"
    rows = [(s.study_uid, s.images_expected) for s in copy.studies]
    assert rows == [(uid, 2)] == [(s.study_uid, s.images_expected) for s in source.studies]
    assert sorted(p for p in services.settings.store_dir.rglob("*") if p.is_file()) == files_before
    recipient = Recipient.get(Recipient.email == "solicitor@law.example")
    assert done.recipient_created and recipient.id == copy.recipient_id
    assert (recipient.name, recipient.address, recipient.phone, recipient.otp_mobile) == (
        "Sol Icitor", "1 Law Lane\nLeeds", "+442079460000", "+447700900555")
    (note,) = TransactionMessage.select().where(TransactionMessage.transaction == copy.id)
    assert (note.author_kind, note.body, note.read_by_recipient) == (
        "forwarder", "Please review.", False)
    assert tx.by_link_token(done.token).id == copy.id
    (event,) = [e for e in events_for_transaction(source.public_id) if e.action == "forward"]
    assert (event.event_code, event.actor, event.source_ip, event.patient_id, event.study_uid,
            event.at) == ("110106", "pat@example.org", "127.0.0.1", "PAT4711", uid, T0 + 60)
    assert f"to solicitor@law.example as {copy.public_id}" in event.detail
    assert "Legal or medico-legal review" in event.detail and "Law & Co" in event.detail
    (created,) = events_for_transaction(copy.public_id)
    assert created.action == "forward-create" and source.public_id in created.detail
    assert fw.known_recipients(source.recipient_id) == ["solicitor@law.example"]
    assert fw.known_recipients(recipient.id) == []


def test_an_existing_recipient_is_never_changed_by_a_forward(services: Services,
                                                             tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    source = share([uid])
    share([uid], "gp@example.org")  # staff know gp@ with passcodes to +447700900123
    done = forward(source, person("gp@example.org", first_name="Mallory",
                                  otp_mobile="+447700666666"))
    gp = Recipient.get(Recipient.email == "gp@example.org")
    assert not done.recipient_created and done.copy.recipient_id == gp.id
    assert (gp.name, gp.otp_mobile, gp.address) == ("", "+447700900123", "")


def test_limit_copies_declined_and_expired(services: Services, tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    source = share([uid])
    copies = [forward(source, person(f"p{n}@law.example")).copy for n in range(3)]
    with pytest.raises(ForwardRefused, match="forwarded 3 times already"):
        forward(source, person("p4@law.example"))
    with pytest.raises(ForwardRefused, match="cannot be forwarded again"):
        forward(copies[0], person("p5@law.example"))
    assert Transaction.select().where(Transaction.forwarded_from == source.id).count() == 3
    # A declined copy still counts; a higher limit allows more.
    tx.decline(Transaction.get_by_id(copies[0].id), "not mine", now=T0)
    forward(source, person("p4@law.example"), max_forwards=4)

    declined = share([uid], "other@example.org")
    tx.decline(declined, "wrong patient", now=T0)
    with pytest.raises(ForwardRefused, match="declined"):
        forward(Transaction.get_by_id(declined.id))
    short = share([uid], "third@example.org", expiry_days=1)
    with pytest.raises(ForwardRefused, match="expired"):
        forward(short, now=T0 + tx.DAY)
    assert fw.forward_counts([source.id, short.id]) == {source.id: 4}


def test_states_for_the_dashboard(services: Services, tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    source = share([uid])
    copy = forward(source).copy
    states = fw.states([Transaction.get_by_id(source.id), Transaction.get_by_id(copy.id)],
                       max_forwards=3, now=T0)
    assert states[source.public_id] == fw.ForwardState(True, 1, 3, "")
    assert states[source.public_id].left == 2
    assert not states[copy.public_id].allowed and states[copy.public_id].left == 0
    assert "again" in states[copy.public_id].reason


def test_purge_keeps_shared_files_until_every_holder_expired(services: Services,
                                                             tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    now = time.time()
    source = share([uid], now=now - 5 * tx.DAY, expiry_days=10)
    copy = forward(source, person(days=2), now=now - 4 * tx.DAY).copy
    assert copy.expires_at == now - 2 * tx.DAY
    files = sorted(p for p in services.settings.store_dir.rglob("*") if p.is_file())
    assert len(files) == 2
    # The copy has expired, its source has not: the shared files stay.
    assert services.sharing.purge_expired() == 0
    assert all(p.exists() for p in files)
    assert Transaction.get_by_id(copy.id).purged_at is not None
    assert Transaction.get_by_id(source.id).purged_at is None
    # Once the source has expired too, the files go.
    Transaction.update(expires_at=now - 1).where(Transaction.id == source.id).execute()
    assert services.sharing.purge_expired() == 2
    assert not any(p.exists() for p in files)
    assert Transaction.get_by_id(source.id).purged_at is not None


# -- concurrency --------------------------------------------------------------------------


def _race(services: Services, sources: list[Transaction], emails: list[str]) -> list[str]:
    """Forward ``sources[i]`` to ``emails[i]`` from one thread each, all at once."""
    start = threading.Barrier(len(emails))
    outcomes: list[str] = [""] * len(emails)

    def one(n: int) -> None:
        source = sources[n]
        forwarder = Recipient.get_by_id(source.recipient_id)
        request = checked(person(emails[n]))
        start.wait()
        try:
            fw.create_copy(source.id, forwarder, request, max_forwards=3, default_days=14,
                           actor=ACTOR)
            outcomes[n] = "created"
        except ForwardRefused:
            outcomes[n] = "refused"
        except Exception as exc:  # any other outcome fails the test
            outcomes[n] = f"{type(exc).__name__}: {exc}"
        finally:
            services.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(emails))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_ten_simultaneous_forwards_create_exactly_the_limit(any_db_services: Services,
                                                            tmp_path: Path) -> None:
    uid = stored_study(any_db_services, tmp_path / "ct")
    source = share([uid], now=1e10)  # far in the future: not expired whatever the clock
    emails = [f"p{n}@law.example" for n in range(10)]
    outcomes = _race(any_db_services, [source] * 10, emails)
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 7, outcomes
    copies = Transaction.select().where(Transaction.forwarded_from == source.id)
    assert copies.count() == 3
    assert TransactionStudy.select().join(Transaction).where(
        Transaction.forwarded_from == source.id).count() == 3
    forwards = [e for e in events_for_transaction(source.public_id) if e.action == "forward"]
    assert len(forwards) == 3


def test_simultaneous_forwards_of_two_packages_to_one_new_person(any_db_services: Services,
                                                                 tmp_path: Path) -> None:
    uid = stored_study(any_db_services, tmp_path / "ct")
    sources = [share([uid], f"pat{n}@example.org", now=1e10) for n in range(6)]
    outcomes = _race(any_db_services, sources, ["same@law.example"] * 6)
    assert outcomes == ["created"] * 6
    assert Recipient.select().where(Recipient.email == "same@law.example").count() == 1
    same = Recipient.get(Recipient.email == "same@law.example")
    assert Transaction.select().where(Transaction.recipient == same.id).count() == 6


# -- schema --------------------------------------------------------------------------------


def test_open_database_adds_the_forward_columns_to_old_tables(tmp_path: Path,
                                                              fresh_postgres_url: str) -> None:
    for url in (f"sqlite:///{tmp_path}/old.db", fresh_postgres_url):
        added = {Transaction: ["forwarded_from"], Recipient: ["address", "phone"]}
        removed = {model: {n: model._meta.fields[n] for n in names}
                   for model, names in added.items()}
        for model, fields in removed.items():
            for name in fields:
                model._meta.remove_field(name)
        try:
            database = open_database(url)  # the tables as an older release made them
            with database.connection_context():
                assert "forwarded_from_id" not in {
                    c.name for c in database.get_columns("transaction")}
            database.close_all()
        finally:
            for model, fields in removed.items():
                for name, field in fields.items():
                    model._meta.add_field(name, field)
        for _ in range(2):  # idempotent
            database = open_database(url)
            with database.connection_context():
                assert {"address", "phone"} <= {c.name for c in database.get_columns("recipient")}
                assert "transaction_forwarded_from_id" in {
                    i.name for i in database.get_indexes("transaction")}
                keys = {(k.column, k.dest_table) for k in database.get_foreign_keys("transaction")}
                assert ("forwarded_from_id", "transaction") in keys
            database.close_all()


# -- the node: mail to the new recipient and the hospital ----------------------------------


async def test_node_forward_mails_the_recipient_and_tells_the_hospital(services: Services,
                                                                       tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    source = share([uid], now=1e10)
    forwarder = Recipient.get_by_id(source.recipient_id)
    done = await services.forwards.forward_to_person(forwarder.id, source.public_id, person(),
                                                 "10.0.0.9")
    mails = {str(m["To"]): m for m in map(read_eml, outbox(services))}
    link_mail = mails["solicitor@law.example"]
    assert link_mail["X-Iepnode-Kind"] == "forward-link"
    assert f"https://portal.example/t/{done.token}" in link_mail.get_content()
    assert "pat@example.org has forwarded medical images from St Elsewhere" in (
        link_mail.get_content())
    notice = mails["radiology@hospital.example"]
    text = notice.get_content()
    assert notice["X-Iepnode-Kind"] == "forward-notice"
    assert f"pat@example.org has forwarded transaction {source.public_id}" in text
    for part in ("solicitor@law.example", "Sol Icitor", "+442079460000", "1 Law Lane",
                 "Legal or medico-legal review", done.copy.public_id,
                 f"https://portal.example/admin/transactions/{source.public_id}"):
        assert part in text, part
    assert "Doe" not in text and "PAT4711" not in text  # no patient in the mail
    actions = [(e.action, e.outcome, e.source_ip)
               for e in events_for_transaction(source.public_id)]
    assert ("forward", 0, "10.0.0.9") in actions and ("forward-notice", 0, "") in actions


async def test_link_mail_failure_undoes_the_forward(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    services = make_services(tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_tls="none",
                     smtp_timeout=5)
    try:
        uid = stored_study(services, tmp_path / "ct")
        source = share([uid], now=1e10)
        with pytest.raises(DeliveryError):
            await services.forwards.forward_to_person(source.recipient_id, source.public_id,
                                                      person())
        assert Transaction.select().where(Transaction.forwarded_from == source.id).count() == 0
        assert Recipient.get_or_none(Recipient.email == "solicitor@law.example") is None
        events = {e.action: e for e in events_for_transaction(source.public_id)}
        assert events["forward-not-sent"].outcome == 8
        assert "solicitor@law.example" in events["forward-not-sent"].detail
    finally:
        services.group_commit.close()
        services.close()


async def test_a_package_without_hospital_email_is_forwarded_and_that_is_audited(
        services: Services, tmp_path: Path) -> None:
    uid = stored_study(services, tmp_path / "ct")
    request = tx.NewTransfer((uid,), "pat@example.org", otp_mobile="+447700900123")
    source, _ = tx.create_transfer(request, contact=tx.Contact(), institution="St Elsewhere",
                                   created_by="cli", now=1e10)
    done = await services.forwards.forward_to_person(source.recipient_id, source.public_id,
                                                     person())
    assert [str(read_eml(p)["To"]) for p in outbox(services)] == ["solicitor@law.example"]
    (notice,) = [e for e in events_for_transaction(source.public_id)
                 if e.action == "forward-notice"]
    assert notice.outcome == 4 and notice.detail == "no hospital contact email: not told"
    assert Transaction.get_by_id(done.copy.id).forwarded_from_id == source.id
