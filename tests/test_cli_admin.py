"""The CLI's admin commands go through the staff pages' services: same checks, same audit.

`iepnode ae add/remove` and `iepnode user add/unlock` call
:class:`iepnode.archive.peers.RemotePeers`, :class:`iepnode.people.staff_accounts.StaffAccounts`
and :class:`iepnode.sharing.staff_transactions.StaffTransactions`, with the
operating-system user as the actor (kind ``cli``).
"""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path

import pytest

from config import load_settings
from storage.db import open_database
from storage.models import AuditEvent, Recipient, RemoteAE, StaffUser
from tests.support.node import REPO, run_cli


def _open_index(data: Path) -> None:
    """Open the node's index in this process (after the CLI has written it)."""
    open_database(load_settings(overrides={"data_dir": data}, environ={}).resolved_database_url)


def _changes() -> list[tuple[str, str, str, str, str]]:
    return [(e.event_code, e.action, e.actor_kind, e.actor, e.detail)
            for e in AuditEvent.select().order_by(AuditEvent.id)]


@pytest.mark.parametrize("title", ["BAD\\TITLE", "SEVENTEEN_CHARS_X", "TAB\tAE", " "])
def test_ae_add_with_a_bad_ae_title_exits_2_and_writes_nothing(tmp_path: Path,
                                                              title: str) -> None:
    data = tmp_path / "data"
    bad = run_cli(data, "ae", "add", title, "127.0.0.1", "104", "--allow", "store",
                  check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("iepnode: ae add: an AE title has 1 to 16 characters, no "
                                  "backslash or control characters")
    assert bad.stdout == ""
    assert not (data / "secret.key").exists()  # the staff services read it only when needed
    _open_index(data)
    assert not RemoteAE.select().exists()
    assert not AuditEvent.select().exists()


@pytest.mark.parametrize(("args", "message"), [
    (["PACS", "bad host!", "104"], "the host is"),
    (["PACS", "127.0.0.1", "70000"], "the port is"),
    (["PACS", "127.0.0.1", "104", "--allow", "store,delete"], "delete"),
])
def test_ae_add_checks_host_port_and_services_like_the_staff_page(
        tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "data"
    bad = run_cli(data, "ae", "add", *args, check=False)
    assert bad.returncode == 2 and message in bad.stderr
    _open_index(data)
    assert not RemoteAE.select().exists() and not AuditEvent.select().exists()


def test_ae_add_and_remove_are_audited_as_the_operating_system_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = run_cli(data, "ae", "add", "PACS1", "10.0.0.5", "104", "--allow", "store,move")
    assert added.stdout.strip() == "registered PACS1 10.0.0.5:104 allow=echo,store,move"
    run_cli(data, "ae", "add", "PACS1", "10.0.0.6", "104", "--send-to")
    run_cli(data, "ae", "add", "SCU", "127.0.0.1", "0")  # port 0: an AE that never listens
    run_cli(data, "ae", "remove", "SCU")
    me = getpass.getuser()
    _open_index(data)
    assert _changes() == [
        ("110113", "admin-change", "cli", me, "ae-add PACS1 10.0.0.5:104 allow=echo,store,move"),
        ("110113", "admin-change", "cli", me, "ae-update PACS1 10.0.0.6:104 allow=echo send-to"),
        ("110113", "admin-change", "cli", me, "ae-add SCU 127.0.0.1:0 allow=echo"),
        ("110113", "admin-change", "cli", me, "ae-remove SCU"),
    ]
    assert [(ae.ae_title, ae.host, ae.send_to) for ae in RemoteAE.select()] == [
        ("PACS1", "10.0.0.6", True)]


def test_ae_remove_of_an_unknown_ae_fails_and_audits_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gone = run_cli(data, "ae", "remove", "NOBODY", check=False)
    assert gone.returncode == 1 and "no remote AE named 'NOBODY'" in gone.stderr
    _open_index(data)
    assert not AuditEvent.select().exists()


def test_user_add_and_unlock_are_audited_as_the_operating_system_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "iepnode.cli", "user", "add", "radadmin", "--admin",
         "--name", "Dr\x07 Rad", "--password-stdin", "--data-dir", str(data)],
        input="correct horse battery staple\n", capture_output=True, text=True, cwd=REPO,
        timeout=60, check=True)
    _open_index(data)
    assert StaffUser.get(StaffUser.username == "radadmin").display_name == "Dr Rad"
    Recipient.create(email="locked@example.org", created_at=0, locked_at=1.0,
                     consecutive_failures=100)
    Recipient.create(email="free@example.org", created_at=0)
    assert run_cli(data, "user", "unlock", "locked@example.org").stdout.strip() == (
        "unlocked locked@example.org")
    not_locked = run_cli(data, "user", "unlock", "free@example.org", check=False)
    assert not_locked.returncode == 1 and "free@example.org is not locked" in not_locked.stderr
    unknown = run_cli(data, "user", "unlock", "who@example.org", check=False)
    assert unknown.returncode == 1 and "no recipient who@example.org" in unknown.stderr
    me = getpass.getuser()
    assert _changes() == [
        ("110113", "admin-change", "cli", me, "user-add radadmin (admin)"),
        ("110113", "recipient-unlock", "cli", me, "locked@example.org"),
    ]
