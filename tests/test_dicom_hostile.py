"""Hostile DICOM peers: what an unauthenticated connection can make a worker do.

Every test talks to the real ``iepnode serve`` over raw sockets
(tests/support/rawdicom.py), from 127.0.0.2 (the attacker) while registered peers
connect from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.support import rawdicom as raw
from tests.support.node import RunningNode, running_node, wait_for
from tests.support.scu import dcmtk_run

ATTACKER = "127.0.0.2"
LONG_UID = "1.2." + "3" * 196
CONTEXTS = [(sop, [raw.IMPLICIT_LE]) for sop in (
    raw.VERIFICATION, raw.CT_IMAGE_STORAGE, raw.STUDY_ROOT_FIND, raw.STUDY_ROOT_MOVE,
    raw.STUDY_ROOT_GET)]
#: A-ASSOCIATE-RJ: transient (2), service-provider presentation (3), local limit (2).
LOCAL_LIMIT_RJ = bytes.fromhex("03000000000400020302")


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node with default limits for the request tests (started once: they only ask)."""
    data = tmp_path_factory.mktemp("hostile") / "node"
    with running_node(data, register=[("TESTSCU", "127.0.0.1", 0,
                                       "store,find,move,get")]) as node:
        yield node


def _config(tmp_path: Path, **dicom: object) -> list[str]:
    path = tmp_path / "iepnode.toml"
    lines = ["[dicom]"] + [f"{k} = {v!r}" for k, v in dicom.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--config", str(path)]


@pytest.fixture
def hostile_node(tmp_path: Path) -> Iterator[RunningNode]:
    """One SCP worker (so every connection meets the same limits), ARTIM at 2 s."""
    with running_node(tmp_path / "node", workers=1,
                      extra=_config(tmp_path, preassoc_timeout=2.0, max_pdu=65536),
                      register=[("SCU", "127.0.0.1", 0, "store,find,move,get")]) as node:
        yield node


def _scp_pids(node: RunningNode) -> list[int]:
    children = Path(f"/proc/{node.process.pid}/task/{node.process.pid}/children")
    return [int(p) for p in children.read_text().split() if _listens(int(p), node.dicom_port)]


def _listens(pid: int, port: int) -> bool:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def _connect(node: RunningNode, source: str = ATTACKER) -> socket.socket:
    return socket.create_connection((node.host, node.dicom_port), timeout=10,
                                    source_address=(source, 0))


def _echo(node: RunningNode) -> None:
    echo = dcmtk_run("echoscu", "-aet", "SCU", "-aec", node.ae_title, "-to", "10", "-ta", "10",
                     node.host, str(node.dicom_port))
    assert echo.returncode == 0, echo.stderr


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed ``sock`` (EOF or reset), whatever it sent before."""
    sock.settimeout(0.05)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_huge_associate_rq_is_aborted_before_it_is_read(hostile_node: RunningNode) -> None:
    """``01 00 FF FF FF F0``: A-ABORT at once, the worker's memory does not grow."""
    (worker,) = _scp_pids(hostile_node)
    before = _peak_rss_kb(worker)
    sent = 0
    with _connect(hostile_node) as sock:
        sock.sendall(b"\x01\x00\xff\xff\xff\xf0")
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while sent < 256 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        sock.settimeout(5)
        answer = sock.recv(10)
    assert sent < 64 << 20, f"the node read {sent >> 20} MiB of a request it should refuse"
    assert answer[:1] == b"\x07", f"expected A-ABORT, got {answer!r}"
    assert answer[-1:] == b"\x06"  # invalid PDU parameter value
    _echo(hostile_node)
    grown = _peak_rss_kb(worker) - before
    assert grown < 16 * 1024, f"worker peak RSS grew by {grown} KiB"
    wait_for(lambda: "announced 4294967280 bytes" in hostile_node.log_text, what="log line")


def test_pdata_larger_than_the_negotiated_pdu_is_aborted(hostile_node: RunningNode) -> None:
    with raw.RawAssociation(hostile_node.host, hostile_node.dicom_port) as assoc:
        answer = assoc.associate("SCU", hostile_node.ae_title, CONTEXTS)
        assert answer.type == 0x02
        assoc.send(struct.pack(">BBL", 0x04, 0, 65536 + 1) + b"\0" * 1024)
        assert assoc.read_pdu().type == 0x07
    _echo(hostile_node)


def test_an_unknown_pdu_type_after_acceptance_is_aborted_unread(
        hostile_node: RunningNode) -> None:
    (worker,) = _scp_pids(hostile_node)
    before = _peak_rss_kb(worker)
    with raw.RawAssociation(hostile_node.host, hostile_node.dicom_port) as assoc:
        assert assoc.associate("SCU", hostile_node.ae_title, CONTEXTS).type == 0x02
        assoc.send(b"\x09\x00\xff\xff\xff\xf0")  # no such PDU type; a 4 GB "length"
        assert assoc.read_pdu().type == 0x07
    assert _peak_rss_kb(worker) - before < 16 * 1024
    _echo(hostile_node)


def test_one_byte_connections_do_not_take_the_slots(hostile_node: RunningNode,
                                                    tmp_path: Path) -> None:
    """70 connections sending ``\\x01``: registered peers still get in, at once."""
    hostile = []
    try:
        started = time.monotonic()
        for _ in range(70):
            sock = _connect(hostile_node)
            sock.sendall(b"\x01")
            hostile.append(sock)
        answers = _answers(hostile, within=1.0)
        # Beyond the per-address limit (8): refused at once with A-ASSOCIATE-RJ.
        refused = sum(answer == LOCAL_LIMIT_RJ for answer in answers)
        if time.monotonic() - started < 2.0:  # no admitted one can have timed out yet
            assert refused == 70 - 8
        else:
            assert refused >= 70 - 2 * 8
        started = time.monotonic()
        _echo(hostile_node)  # (on main: "Local Limit Exceeded" for 330 s)
        ct = get_testdata_file("CT_small.dcm")
        store = dcmtk_run("storescu", "-aet", "SCU", "-aec", hostile_node.ae_title, "-to", "10",
                          hostile_node.host, str(hostile_node.dicom_port), ct)
        assert store.returncode == 0, store.stderr
        assert time.monotonic() - started < 10
        # The ones admitted are closed once their 2 s to send the request are over.
        wait_for(lambda: all(_closed_by_peer(s) for s in hostile), timeout=10,
                 what="the node to close every hostile connection")
    finally:
        for sock in hostile:
            sock.close()
    wait_for(lambda: "no complete A-ASSOCIATE-RQ within 2.0 s" in hostile_node.log_text,
             what="the timeout in the log")
    assert "local limit exceeded" in hostile_node.log_text


def _answers(socks: list[socket.socket], within: float) -> list[bytes]:
    """What each socket received in the next ``within`` seconds (up to 64 bytes each)."""
    got = {s: b"" for s in socks}
    deadline = time.monotonic() + within
    waiting = list(socks)
    while waiting and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(waiting, [], [], left)
        for sock in ready:
            with contextlib.suppress(OSError):
                got[sock] = sock.recv(64)
            waiting.remove(sock)
    return [got[s] for s in socks]


def test_partial_and_silent_connections_are_closed_after_the_timeout(
        hostile_node: RunningNode) -> None:
    rq = raw.associate_rq("SCU", hostile_node.ae_title, CONTEXTS)
    silent, half = _connect(hostile_node), _connect(hostile_node)
    with silent, half:
        half.sendall(rq[: len(rq) // 2])
        started = time.monotonic()
        wait_for(lambda: _closed_by_peer(silent) and _closed_by_peer(half), timeout=10,
                 what="both connections closed")
        assert time.monotonic() - started < 5


def test_a_complete_request_is_not_cut_by_the_timeout(hostile_node: RunningNode) -> None:
    """A slow but complete A-ASSOCIATE-RQ within the timeout is served normally."""
    rq = raw.associate_rq("SCU", hostile_node.ae_title, CONTEXTS)
    with raw.RawAssociation(hostile_node.host, hostile_node.dicom_port) as assoc:
        for i in range(0, len(rq), 16):
            assoc.send(rq[i:i + 16])
            time.sleep(0.01)  # a slow sender, well inside the 1 s: the point of the test
        assert assoc.read_pdu().type == 0x02


def _study_query() -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    return raw.encode_implicit(query)


def _ct() -> bytes:
    return raw.encode_implicit(dcmread(get_testdata_file("CT_small.dcm")))


def _no_dataset() -> bytes:
    return b""


@pytest.mark.parametrize(("name", "sop", "command", "dataset", "status", "comment"), [
    ("C-STORE 200-character Affected SOP Instance UID", raw.CT_IMAGE_STORAGE,
     lambda: raw.command_set(raw.C_STORE_RQ, raw.CT_IMAGE_STORAGE,
                             AffectedSOPInstanceUID=LONG_UID), _ct, 0xC000,
     "AffectedSOPInstanceUID"),
    ("C-FIND 200-character Affected SOP Class UID", raw.STUDY_ROOT_FIND,
     lambda: raw.command_set(raw.C_FIND_RQ, LONG_UID), _study_query, 0xC000,
     "AffectedSOPClassUID"),
    ("C-MOVE 40-character Move Destination", raw.STUDY_ROOT_MOVE,
     lambda: raw.command_set(raw.C_MOVE_RQ, raw.STUDY_ROOT_MOVE, MoveDestination="X" * 40),
     _study_query, 0xC000, "MoveDestination"),
    ("C-MOVE without Move Destination", raw.STUDY_ROOT_MOVE,
     lambda: raw.command_set(raw.C_MOVE_RQ, raw.STUDY_ROOT_MOVE), _study_query, 0xC000,
     "MoveDestination"),
    ("C-FIND on a storage context", raw.CT_IMAGE_STORAGE,
     lambda: raw.command_set(raw.C_FIND_RQ, raw.CT_IMAGE_STORAGE), _study_query, 0x0211,
     "not served"),
    ("C-STORE on the Verification context", raw.VERIFICATION,
     lambda: raw.command_set(raw.C_STORE_RQ, raw.VERIFICATION, AffectedSOPInstanceUID="1.2.3"),
     _ct, 0x0211, "not served"),
    ("C-STORE of another SOP class", raw.CT_IMAGE_STORAGE,
     lambda: raw.command_set(raw.C_STORE_RQ, "1.2.840.10008.5.1.4.1.1.4",
                             AffectedSOPInstanceUID="1.2.3"), _ct, 0x0122, "not the"),
    ("N-GET", raw.STUDY_ROOT_FIND,
     lambda: raw.command_set(0x0110, raw.STUDY_ROOT_FIND, has_dataset=False,
                             RequestedSOPInstanceUID="1.2.3"), _no_dataset, 0x0211, "not served"),
])
def test_unanswerable_requests_get_a_failure_response(
        shared_node: RunningNode, name: str, sop: str, command, dataset, status: int,
        comment: str) -> None:
    """pynetdicom alone answers none of these (silence or A-ABORT); the association lives on."""
    node = shared_node
    with raw.RawAssociation(node.host, node.dicom_port, timeout=10) as assoc:
        assert assoc.associate("TESTSCU", node.ae_title, CONTEXTS).type == 0x02
        response = assoc.request(sop, command(), dataset())
        assert response.status == status, name
        assert comment in str(response.command.get("ErrorComment", "")), name
        echo = assoc.request(raw.VERIFICATION, raw.command_set(
            raw.C_ECHO_RQ, raw.VERIFICATION, message_id=2, has_dataset=False))
        assert echo.status == 0x0000


@pytest.mark.parametrize("key", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_malformed_uid_keys_are_refused_not_matched(shared_node: RunningNode, key: str) -> None:
    node = shared_node
    query = Dataset()
    with raw.unchecked():
        query.QueryRetrieveLevel = {"StudyInstanceUID": "STUDY", "SeriesInstanceUID": "SERIES",
                                    "SOPInstanceUID": "IMAGE"}[key]
        query.StudyInstanceUID = "1.2.3"
        setattr(query, key, LONG_UID)
    with raw.RawAssociation(node.host, node.dicom_port, timeout=10) as assoc:
        assert assoc.associate("TESTSCU", node.ae_title, CONTEXTS).type == 0x02
        found = assoc.request(raw.STUDY_ROOT_FIND, raw.command_set(
            raw.C_FIND_RQ, raw.STUDY_ROOT_FIND), raw.encode_implicit(query))
        assert found.status == 0xA900
        assert "malformed" in str(found.command.ErrorComment)
        got = assoc.request(raw.STUDY_ROOT_GET, raw.command_set(
            raw.C_GET_RQ, raw.STUDY_ROOT_GET, message_id=2), raw.encode_implicit(query))
        assert got.status >> 12 == 0xC  # unable to process


def test_undecodable_command_set_is_aborted_not_ignored(shared_node: RunningNode) -> None:
    node = shared_node
    with raw.RawAssociation(node.host, node.dicom_port, timeout=10) as assoc:
        assert assoc.associate("TESTSCU", node.ae_title, CONTEXTS).type == 0x02
        unknown = raw.command_set(0x0AAA, raw.STUDY_ROOT_FIND, has_dataset=False)
        assoc.send(raw.p_data(assoc.accepted[raw.STUDY_ROOT_FIND], unknown, command=True))
        assert assoc.read_pdu().type == 0x07


def test_pending_connections_are_limited_in_all(tmp_path: Path) -> None:
    """Many addresses together cannot hold more than ``max_pending`` unfinished requests."""
    with running_node(tmp_path / "node", workers=1,
                      extra=_config(tmp_path, max_pending=4, max_pending_per_address=2),
                      register=[("SCU", "127.0.0.1", 0, "store")]) as node:
        socks = [_connect(node, f"127.0.0.{host}") for host in (2, 2, 3, 3)]
        socks += [_connect(node, "127.0.0.4")]
        try:
            answers = _answers(socks, within=1.0)
            assert answers[:4] == [b""] * 4  # admitted, waiting for their requests
            assert answers[4] == LOCAL_LIMIT_RJ
        finally:
            for sock in socks:
                sock.close()


def test_a_first_pdu_other_than_associate_rq_is_aborted(hostile_node: RunningNode) -> None:
    with _connect(hostile_node) as sock:
        sock.sendall(raw.p_data(1, b"\0" * 32, command=True))
        answer = _answers([sock], within=5.0)[0]
    assert answer[:1] == b"\x07" and answer[-1:] == b"\x02"  # unexpected PDU


def test_readiness_is_polled_for_any_descriptor_number() -> None:
    """select() fails for descriptors >= 1024 (pynetdicom then aborts); poll() does not."""
    import resource

    from scp.guard import PollingSocket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1030)]
    ours, theirs = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup(ours.fileno()))
        assert high.fileno() >= 1024
        with pytest.raises(ValueError):
            select.select([high], [], [], 0)
        wrapped = PollingSocket.__new__(PollingSocket)  # the wrapper, without an association
        wrapped.socket, wrapped._is_connected = high, True
        assert wrapped.ready is False
        theirs.sendall(b"\x01")
        assert wrapped.ready is True
        high.close()
    finally:
        for fd in filler:
            os.close(fd)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
