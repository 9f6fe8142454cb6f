"""The staff services are built from their dependencies alone, never from the Node."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config import load_settings
from iepnode.errors import InvalidRequest
from iepnode.outbound.messaging import Messenger
from iepnode.people import staff
from iepnode.people.audit import Actor
from iepnode.staff_side import build_staff_side
from storage.db import open_database
from storage.models import AuditEvent

REPO = Path(__file__).resolve().parent.parent
MODULES = ["iepnode/staff_side.py", "iepnode/people/staff_logins.py",
           "iepnode/people/staff_accounts.py", "iepnode/people/audit_trail.py",
           "iepnode/archive/peers.py", "iepnode/archive/study_search.py",
           "iepnode/sharing/staff_transactions.py", "iepnode/sharing/passcode_channels.py"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_staff_modules_import_neither_the_node_nor_the_edges(module: str) -> None:
    imported = _imports(REPO / module)
    assert not {n for n in imported if n == "iepnode.node" or n.split(".")[0] in
                ("web", "scp")}, imported


def test_built_without_a_node_and_the_secret_read_only_when_signing(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    open_database(settings.resolved_database_url)
    reads: list[int] = []

    def secret() -> bytes:
        reads.append(1)
        return b"k" * 32

    side = build_staff_side(settings, secret, Messenger(settings))
    assert side.accounts.throttle is side.logins.throttle
    cli = Actor("cli", "operator")
    _, created = side.peers.add_remote_ae("PACS", "10.0.0.5", "104", ["store"], cli)
    assert created and [a.ae_title for a in side.peers.remote_aes()] == ["PACS"]
    with pytest.raises(InvalidRequest, match="AE title"):
        side.peers.add_remote_ae("NO\\PE", "10.0.0.5", "104", [], cli)
    with pytest.raises(InvalidRequest, match="port"):
        side.peers.add_remote_ae("SCU", "10.0.0.5", "0", [], cli)  # 0 only with port_zero
    page = side.audit_trail.audit_log()
    assert [(e.actor_kind, e.actor, e.detail) for e in page.events] == [
        ("cli", "operator", "ae-add PACS 10.0.0.5:104 allow=echo,store")]
    assert side.studies.search_studies("Doe") == [] and reads == []
    user, _ = staff.create_user("kim", "a long enough password")
    enrolment = side.accounts.totp_enrolment(user, session_id=1)
    assert reads and side.accounts.check_enrolment(user, 1, enrolment.secret,
                                                   enrolment.signature) == enrolment
    assert AuditEvent.select().count() == 1
