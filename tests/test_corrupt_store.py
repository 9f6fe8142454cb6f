"""End to end: corrupted datasets sent to the real node (``iepnode serve``) are refused.

Each crafted corruption (tests/support/crafted.py) goes out as its exact bytes with a
pynetdicom SCU (``send_c_store(path)`` in chunked mode sends the file's dataset as it
is, never decoded), all on one association: each must get 0xC000 (or 0xA900 for pixel
data that disagrees with the image attributes) with nothing left in the store, the
staging folder or the index, and a good instance sent next on the same association
must still get Success. dcmtk's ``storescu`` sends what it can read.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import build_context

from tests.support import crafted
from tests.support.crafted import Crafted, Image, corruption, deflate, native_ct
from tests.support.node import RunningNode, running_node, wait_for
from tests.support.scu import associate, raw_sending, storescu

SYNTAXES = sorted({case(generate_uid()).transfer_syntax for case in crafted.CORRUPTIONS.values()})


def index_rows(node: RunningNode) -> int:
    with sqlite3.connect(node.data_dir / "index.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM instance").fetchone()[0]


def assert_nothing_stored(node: RunningNode) -> None:
    assert index_rows(node) == 0
    assert node.object_files() == []
    assert node.staging_files() == []


def good_instance(ts: str = crafted.ELE) -> Crafted:
    uid = generate_uid()
    stream = native_ct(uid, image=Image(rows=64, columns=64))
    if ts == DeflatedExplicitVRLittleEndian:
        stream = deflate(stream)
    return Crafted(stream, ts, uid, crafted.BadDataset, "")


def test_every_corruption_is_refused_and_the_association_goes_on(
        served_node: RunningNode, tmp_path: Path) -> None:
    cases = {name: corruption(name) for name in crafted.CORRUPTIONS}
    good = good_instance()
    paths = {name: case.write(tmp_path / "out") for name, case in cases.items()}
    contexts = [build_context(CTImageStorage, [ts]) for ts in SYNTAXES]
    statuses = {}
    with raw_sending():
        assoc = associate(served_node, contexts=contexts)
        try:
            for name, path in paths.items():
                statuses[name] = assoc.send_c_store(path).Status
            assert_nothing_stored(served_node)
            good_status = assoc.send_c_store(good.write(tmp_path / "good")).Status
        finally:
            assoc.release()
    assert statuses == {name: case.status for name, case in cases.items()}
    assert good_status == 0x0000
    assert index_rows(served_node) == 1 and len(served_node.object_files()) == 1
    assert served_node.staging_files() == []
    # The log says why, for each: the status, the SOP Instance UID and the check's message.
    wait_for(lambda: "association released: TESTSCU" in served_node.log_text, what="release log")
    for case in cases.values():
        line = next(line for line in served_node.log_text.splitlines() if case.sop_uid in line)
        assert f"C-STORE failed (0x{case.status:04X})" in line
        assert re.search(case.message.lstrip("^"), line), line
    assert "Traceback" not in served_node.log_text


def test_deflate_bomb_is_refused_within_max_inflated_mb(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IEPNODE_MAX_INFLATED_MB", "1")
    uid = generate_uid()
    bomb = Crafted(crafted.deflate_bomb(uid, 64 << 20), DeflatedExplicitVRLittleEndian, uid,
                   crafted.BadDataset, "")
    assert len(bomb.stream) < 200_000  # 64 MiB of pixels in well under 1% of that
    good = good_instance(DeflatedExplicitVRLittleEndian)
    with running_node(tmp_path / "n", register=[("TESTSCU", "127.0.0.1", 0, "store")]) as n, \
            raw_sending():
        assoc = associate(n, contexts=[build_context(CTImageStorage,
                                                     [DeflatedExplicitVRLittleEndian])])
        try:
            assert assoc.send_c_store(bomb.write(tmp_path / "bomb")).Status == 0xC000
            assert_nothing_stored(n)
            assert assoc.send_c_store(good.write(tmp_path / "good")).Status == 0x0000
        finally:
            assoc.release()
        assert index_rows(n) == 1
        wait_for(lambda: "inflates to more than 1048576 bytes" in n.log_text, what="log line")


def test_dcmtk_storescu_sends_pixel_data_one_frame_short(served_node: RunningNode,
                                                         tmp_path: Path) -> None:
    """dcmtk reads the file (its lengths are consistent) and sends it as it is: 0xA900.

    The structurally broken corruptions cannot go through dcmtk: storescu refuses to
    read them ("larger than remaining bytes", "Sequence Delimitation Item missing"), or
    repairs them when it reads (it sorts tags, pads odd fragments).
    """
    short = corruption("native-pixels-one-frame-short")
    result = storescu(served_node, [short.write(tmp_path / "short")], extra=("-v",))
    assert result.returncode != 0
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in result.stdout \
        + result.stderr
    assert_nothing_stored(served_node)
    good = good_instance()
    assert storescu(served_node, [good.write(tmp_path / "good")]).returncode == 0
    assert index_rows(served_node) == 1
    unreadable = corruption("pixels-128-declared-10-sent").write(tmp_path / "cut")
    refused = storescu(served_node, [unreadable])
    assert "larger (128) than remaining bytes" in refused.stderr + refused.stdout
    assert index_rows(served_node) == 1
