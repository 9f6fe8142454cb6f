"""Transactions, passcode login, sessions and staff accounts (domain rules, time controlled)."""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest

from config import load_settings
from iepnode.errors import (
    InvalidRequest,
    LoginRefused,
    NotFound,
    PasscodeRejected,
    RateLimited,
    RecipientLocked,
)
from iepnode.people import staff
from iepnode.people.audit import USER_AUTHENTICATION, Actor, events_for_transaction, record
from iepnode.security import load_or_create_secret
from iepnode.services import Services
from iepnode.sharing import logins
from iepnode.sharing import transactions as tx
from iepnode.wiring import build_services
from storage.models import Recipient
from tests import data_factory as factory
from tests.support.ingest import store_files as store

T0 = 1_800_000_000.0
CONTACT = tx.Contact("Dr Who", "Radiology", "radiology@hospital.example", "+441234567890")


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(load_settings(overrides={"data_dir": tmp_path / "data"}, environ={}))


def share(study_uids: list[str], email: str = "pat@example.org", *, now: float = T0,
          **kw: object) -> tuple:
    request = tx.NewTransfer(tuple(study_uids), email, otp_mobile=kw.pop("mobile", "+447700900123"),
                             **kw)
    return tx.create_transfer(request, contact=CONTACT, institution="St Elsewhere",
                              created_by="cli", now=now)


@pytest.fixture
def study(services: Services, tmp_path: Path) -> str:
    return store(services, factory.make_ct_series(tmp_path / "ct", 3, PatientName="Doe^Jane",
                                              PatientID="P1", StudyDate="20240105"))


def test_transfer_has_readable_id_details_and_thread(services: Services, study: str) -> None:
    transaction, token = share([study], message="Your CT from Monday.", priority="URGENT")
    assert transaction.public_id.startswith("IEP") and len(transaction.public_id) == 11
    assert len(token) >= 32 and transaction.link_token_hash != token
    assert (transaction.patient_name, transaction.patient_id) == ("Doe^Jane", "P1")
    assert transaction.status == tx.NEW and transaction.priority == "URGENT"
    assert transaction.expires_at == T0 + 14 * tx.DAY
    (row,) = transaction.studies
    assert (row.modality, row.exam_date, row.images_expected) == ("CT", "20240105", 3)
    (message,) = transaction.messages
    assert message.author_kind == "staff" and message.body == "Your CT from Monday."
    assert tx.by_link_token(token).id == transaction.id


def test_transfer_rules(services: Services, study: str, tmp_path: Path) -> None:
    other = store(services, factory.make_ct_series(tmp_path / "o", 1, PatientID="P2"))
    with pytest.raises(InvalidRequest, match="one patient"):
        share([study, other])
    with pytest.raises(InvalidRequest, match="unknown study"):
        share(["1.2.3.4"])
    with pytest.raises(InvalidRequest, match="exactly one passcode channel"):
        share([study], mobile="", otp_email="")
    with pytest.raises(InvalidRequest, match="not an email"):
        share([study], "not-an-email")
    with pytest.raises(InvalidRequest, match="not an email"):
        share([study], "a@b.example\r\nBcc: x@y.example")
    with pytest.raises(InvalidRequest, match="mobile"):
        share([study], mobile="call me")
    with pytest.raises(InvalidRequest, match="priority"):
        share([study], priority="HIGH")
    with pytest.raises(InvalidRequest, match="must differ"):
        share([study], mobile="", otp_email="PAT@example.org")


def test_recipient_sees_only_own_transactions(services: Services, study: str) -> None:
    mine, _ = share([study], "pat@example.org")
    theirs, _ = share([study], "someone@example.org", now=T0 + 60)
    me = Recipient.get(Recipient.email == "pat@example.org")
    assert tx.get_for_recipient(me, mine.public_id).id == mine.id
    with pytest.raises(NotFound):
        tx.get_for_recipient(me, theirs.public_id)
    with pytest.raises(NotFound):
        tx.get_for_recipient(me, "IEP00000000")
    assert [t.id for t in tx.for_recipient(me, action_required=True, days=28, now=T0)] == [mine.id]


def test_action_required_and_28_days(services: Services, study: str) -> None:
    old, _ = share([study], now=T0 - 30 * tx.DAY, expiry_days=60)
    new, _ = share([study], now=T0)
    me = Recipient.get(Recipient.email == "pat@example.org")
    assert [t.id for t in tx.for_recipient(me, action_required=False, days=28, now=T0)] == [new.id]
    tx.decline(new, "Not my scan", now=T0 + 1)
    assert tx.for_recipient(me, action_required=True, days=28, now=T0 + 2) == []
    assert tx.for_recipient(me, action_required=False, days=60, now=T0)[-1].id == old.id
    assert new.messages[-1].body == "Declined: Not my scan"
    with pytest.raises(InvalidRequest):
        tx.decline(new, "again", now=T0 + 3)
    with pytest.raises(InvalidRequest, match="reason"):
        tx.decline(old, "  ", now=T0)


def test_messages(services: Services, study: str) -> None:
    transaction, _ = share([study])
    tx.add_message(transaction, "recipient", "pat@example.org", "Thanks!", now=T0 + 5)
    assert [m.body for m in transaction.messages] == ["Thanks!"]
    with pytest.raises(InvalidRequest):
        tx.add_message(transaction, "recipient", "pat@example.org", " ")
    with pytest.raises(InvalidRequest):
        tx.add_message(transaction, "recipient", "pat@example.org", "x" * 5000)


# -- passcode login ----------------------------------------------------------------------


@pytest.fixture
def secret(services: Services) -> bytes:
    return load_or_create_secret(services.settings.data_dir)


def test_link_then_passcode_then_session(services: Services, study: str, secret: bytes) -> None:
    _, token = share([study])
    sent = logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0)
    assert sent.channel == "sms" and sent.destination == "+447700900123"
    assert len(sent.code) == 6 and sent.code.isdigit()
    recipient = logins.verify_passcode(sent.attempt_id, sent.code, secret, now=T0 + 10)
    assert recipient.email == "pat@example.org"
    opened = logins.open_session(recipient, now=T0 + 10)
    assert logins.resume_session(opened.token, now=T0 + 20).recipient_id == recipient.id
    assert len(opened.token) >= 32 and opened.token != token
    with pytest.raises(PasscodeRejected, match="used"):
        logins.verify_passcode(sent.attempt_id, sent.code, secret, now=T0 + 11)


def test_passcode_expires(services: Services, study: str, secret: bytes) -> None:
    _, token = share([study])
    sent = logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0)
    with pytest.raises(PasscodeRejected, match="expired"):
        logins.verify_passcode(sent.attempt_id, sent.code, secret, now=T0 + 601)


def test_sixth_try_is_refused_even_with_the_right_code(services: Services, study: str,
                                                       secret: bytes) -> None:
    _, token = share([study])
    sent = logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0)
    wrong = f"{(int(sent.code) + 1) % 10**6:06d}"
    for i in range(5):
        with pytest.raises(PasscodeRejected):
            logins.verify_passcode(sent.attempt_id, wrong, secret, now=T0 + i)
    with pytest.raises(PasscodeRejected, match="too many"):
        logins.verify_passcode(sent.attempt_id, sent.code, secret, now=T0 + 6)


def test_passcode_is_bound_to_its_attempt(services: Services, study: str, secret: bytes) -> None:
    _, token = share([study])
    first = logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0)
    second = logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0 + 31)
    if first.code != second.code:
        with pytest.raises(PasscodeRejected):
            logins.verify_passcode(second.attempt_id, first.code, secret, now=T0 + 32)
    assert logins.verify_passcode(second.attempt_id, second.code, secret, now=T0 + 33)


def test_resend_is_rate_limited(services: Services, study: str, secret: bytes) -> None:
    _, token = share([study])
    logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0)
    with pytest.raises(RateLimited):
        logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0 + 10)
    assert logins.start_attempt(tx.by_link_token(token), secret, 600, now=T0 + 31)


def test_lockout_after_100_failures_until_unlocked(services: Services, study: str,
                                                   secret: bytes) -> None:
    _, token = share([study])
    now = T0
    with pytest.raises(RecipientLocked):
        for _ in range(25):
            sent = logins.start_attempt(tx.by_link_token(token), secret, 600, now=now)
            wrong = f"{(int(sent.code) + 1) % 10**6:06d}"
            for _ in range(5):
                with pytest.raises(PasscodeRejected):
                    logins.verify_passcode(sent.attempt_id, wrong, secret, now=now)
            now += 31
    recipient = Recipient.get(Recipient.email == "pat@example.org")
    assert recipient.locked_at is not None and recipient.consecutive_failures == 100
    with pytest.raises(RecipientLocked):
        logins.start_attempt(tx.by_link_token(token), secret, 600, now=now + 31)
    logins.unlock(recipient)
    sent = logins.start_attempt(tx.by_link_token(token), secret, 600, now=now + 62)
    assert logins.verify_passcode(sent.attempt_id, sent.code, secret, now=now + 63)


def test_link_token_alone_is_no_session(services: Services, study: str) -> None:
    _, token = share([study])
    with pytest.raises(NotFound):
        logins.resume_session(token, now=T0)
    with pytest.raises(NotFound):
        tx.by_link_token("x" + token)


def test_session_idle_and_absolute_expiry(services: Services, study: str) -> None:
    recipient = Recipient.create(email="a@b.example", created_at=T0)
    opened = logins.open_session(recipient, now=T0)
    with pytest.raises(NotFound):
        logins.resume_session(opened.token, now=T0 + 30 * 60 + 1)
    busy = logins.open_session(recipient, now=T0)
    for minute in range(0, 12 * 60, 20):
        logins.resume_session(busy.token, now=T0 + minute * 60)
    with pytest.raises(NotFound):
        logins.resume_session(busy.token, now=T0 + 12 * 3600 + 1)
    ended = logins.open_session(recipient, now=T0)
    logins.end_session(ended.token)
    with pytest.raises(NotFound):
        logins.resume_session(ended.token, now=T0 + 1)


def test_expired_link_is_gone(services: Services, study: str) -> None:
    _, token = share([study], expiry_days=1)
    assert tx.by_link_token(token, now=T0 + tx.DAY - 1)
    with pytest.raises(NotFound):  # past its expiry before housekeeping has marked it
        tx.by_link_token(token, now=T0 + tx.DAY + 1)
    assert tx.expire_due(now=T0 + tx.DAY + 1) == 1
    with pytest.raises(NotFound):
        tx.by_link_token(token)


def test_purge_keeps_studies_shared_by_live_transactions(services: Services, study: str,
                                                         tmp_path: Path) -> None:
    only_here = store(services, factory.make_ct_series(tmp_path / "b", 2, PatientID="P1"))
    share([study, only_here], expiry_days=1)
    share([study], "gp@example.org", expiry_days=30)
    uids, expired = tx.studies_to_purge(now=T0 + 2 * tx.DAY)
    assert uids == [only_here] and len(expired) == 1
    tx.mark_purged(expired, now=T0 + 2 * tx.DAY)
    assert tx.studies_to_purge(now=T0 + 2 * tx.DAY) == ([], [])


# -- staff and audit -----------------------------------------------------------------------


def test_staff_password_and_totp(services: Services) -> None:
    user, uri = staff.create_user("radadmin", "correct horse battery", is_admin=True)
    assert uri.startswith("otpauth://totp/") and "$argon2id$" in user.password_hash
    code = pyotp.TOTP(user.totp_secret).now()
    assert staff.authenticate("RadAdmin", "correct horse battery", code).id == user.id
    for bad in (("radadmin", "wrong password!!", code), ("radadmin", "correct horse battery",
                "000000" if code != "000000" else "111111"), ("nobody", "x" * 12, code)):
        with pytest.raises(LoginRefused, match="wrong username, password or code"):
            staff.authenticate(*bad)
    with pytest.raises(InvalidRequest, match="12 characters"):
        staff.create_user("short", "tooshort")
    with pytest.raises(InvalidRequest, match="exists"):
        staff.create_user("radadmin", "another long password")


def test_audit_trail(services: Services, study: str) -> None:
    transaction, _ = share([study])
    record(USER_AUTHENTICATION, "login", Actor("recipient", "pat@example.org", "10.1.2.3"),
           patient_id="P1", transaction=transaction.public_id, now=T0 + 1)
    record(USER_AUTHENTICATION, "login-failed", Actor("recipient", "pat@example.org"),
           outcome=4, transaction=transaction.public_id, now=T0 + 2)
    trail = events_for_transaction(transaction.public_id)
    assert [(e.event_code, e.action, e.outcome) for e in trail] == [
        ("110114", "login", 0), ("110114", "login-failed", 4)]
    assert trail[0].source_ip == "10.1.2.3"
