"""CLI for the portal: `iepnode user add/unlock` and `iepnode transfer create`."""

from __future__ import annotations

import email
import re
import subprocess
import sys
from email import policy
from pathlib import Path

import pyotp

from config import load_settings
from iepnode.sharing import transactions as tx
from iepnode.wiring import build_services
from storage.models import AuditEvent, Recipient, StaffUser, Transaction
from tests import data_factory as factory
from tests.support.ingest import store_files
from tests.support.node import REPO, run_cli


def _stored_study(data: Path, tmp_path: Path) -> str:
    services = build_services(load_settings(overrides={"data_dir": data}, environ={}))
    study_uid = store_files(services, factory.make_ct_series(tmp_path / "ct", 2,
                                                         PatientName="Doe^Jane"))
    services.close()
    return study_uid


def _outbox(data: Path) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(p.read_bytes(), policy=policy.default)
            for p in sorted((data / "outbox").glob("*.eml"))]


def test_transfer_create_emails_a_link_to_the_outbox(tmp_path: Path) -> None:
    data = tmp_path / "data"
    study = _stored_study(data, tmp_path)
    subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", "drwho", "--name", "Dr Who",
         "--email", "rad@hosp.example", "--department", "Radiology", "--password-stdin",
         "--data-dir", str(data)],
        input="a long enough password\n", capture_output=True, text=True, cwd=REPO,
        timeout=60, check=True,
    )
    out = run_cli(data, "transfer", "create", "--study", study, "--to", "Pat@Example.org",
                  "--otp-mobile", "+44 7700 900123", "--message", "Your CT", "--as-user",
                  "drwho").stdout.strip()
    assert re.fullmatch(r"IEP\d{8}", out)
    (mail,) = _outbox(data)
    assert mail["To"] == "pat@example.org"
    body = mail.get_body(preferencelist=("plain",)).get_content()
    token = re.search(r"/t/([A-Za-z0-9_-]{32,})", body).group(1)
    build_services(load_settings(overrides={"data_dir": data}, environ={}))
    assert tx.by_link_token(token).public_id == out
    transaction = Transaction.get(Transaction.public_id == out)
    assert (transaction.contact_name, transaction.contact_department) == ("Dr Who", "Radiology")
    assert AuditEvent.select().where(AuditEvent.action == "transfer-create").count() == 1


def test_transfer_create_refuses_bad_requests_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    study = _stored_study(data, tmp_path)
    bad = run_cli(data, "transfer", "create", "--study", "1.2.3", "--to", "p@example.org",
                  "--otp-mobile", "+447700900123", check=False)
    assert bad.returncode == 1 and "unknown study" in bad.stderr
    both = run_cli(data, "transfer", "create", "--study", study, "--to", "p@example.org",
                   "--otp-mobile", "+447700900123", "--otp-email", "x@example.org", check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert not (data / "outbox").exists() or not list((data / "outbox").iterdir())


def test_user_add_prints_totp_uri_and_unlock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", "radadmin", "--admin",
         "--password-stdin", "--data-dir", str(data)],
        input="correct horse battery staple\n", capture_output=True, text=True, cwd=REPO,
        timeout=60, check=True,
    )
    uri = next(line for line in proc.stdout.splitlines() if line.startswith("otpauth://"))
    secret = pyotp.parse_uri(uri).secret
    build_services(load_settings(overrides={"data_dir": data}, environ={}))
    user = StaffUser.get(StaffUser.username == "radadmin")
    assert user.is_admin and user.totp_secret == secret
    assert "correct horse" not in user.password_hash
    short = subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", "bob", "--password-stdin",
         "--data-dir", str(data)], input="short\n", capture_output=True, text=True, cwd=REPO,
        timeout=60)
    assert short.returncode == 1 and "12 characters" in short.stderr
    Recipient.create(email="locked@example.org", created_at=0, locked_at=1.0,
                     consecutive_failures=100)
    assert "unlocked" in run_cli(data, "user", "unlock", "locked@example.org").stdout
    recipient = Recipient.get(Recipient.email == "locked@example.org")
    assert recipient.locked_at is None and recipient.consecutive_failures == 0
