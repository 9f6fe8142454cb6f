"""End to end: the real node (``iepnode serve``) against real DICOM peers.

dcmtk's echoscu/storescu/findscu/movescu/getscu/storescp and a pynetdicom SCU
(where exact bytes or statuses matter) talk to the node on ephemeral loopback ports.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from tests import data_factory as factory
from tests.conftest import SCU_AE
from tests.support.node import RunningNode, running_node, wait_for
from tests.support.peers import storescp_on
from tests.support.scu import (
    associate,
    dataset_bytes,
    dcmtk_run,
    send_raw,
    storescu,
)
from tests.support.tools import dicom3tools

#: One bundled file per transfer syntax the node must store as received.
TRANSFER_SYNTAX_FILES = {
    "explicit-le": "CT_small.dcm",
    "implicit-le": "MR_small_implicit.dcm",
    "explicit-be": "MR_small_bigendian.dcm",
    "deflate": "image_dfl.dcm",
    "jpeg-baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg-extended": "JPEG-lossy.dcm",
    "jpeg-lossless-sv1": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg-ls-lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg2000-lossless": "MR_small_jp2klossless.dcm",
    "jpeg2000": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
}


def index_rows(node: RunningNode, table: str = "instance") -> int:
    with sqlite3.connect(node.data_dir / "index.sqlite3") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def stored_by_uid(node: RunningNode) -> dict[str, Path]:
    """Map SOP Instance UID -> stored file."""
    with sqlite3.connect(node.data_dir / "index.sqlite3") as db:
        rows = db.execute("SELECT sop_uid, key FROM instance").fetchall()
    return {uid: node.data_dir / "objects" / key[:2] / key for uid, key in rows}


# -- association control ---------------------------------------------------------------


def test_echo_from_registered_ae(served_node: RunningNode) -> None:
    result = dcmtk_run("echoscu", "-aet", SCU_AE, "-aec", served_node.ae_title, served_node.host,
                       str(served_node.dicom_port))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "association released: TESTSCU" in served_node.log_text, what="log line")


def test_unregistered_calling_ae_is_rejected(served_node: RunningNode) -> None:
    result = dcmtk_run("echoscu", "-aet", "STRANGER", "-aec", served_node.ae_title,
                       served_node.host, str(served_node.dicom_port))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    wait_for(lambda: "'STRANGER' is not registered" in served_node.log_text, what="rejection log")


def test_wrong_called_ae_is_rejected(served_node: RunningNode) -> None:
    result = dcmtk_run("echoscu", "-aet", SCU_AE, "-aec", "NOTME", served_node.host,
                       str(served_node.dicom_port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout


def test_peer_address_must_match_registration(tmp_path: Path) -> None:
    with running_node(tmp_path / "n", register=[("FARAWAY", "127.0.0.2", 104, "store")]) as n:
        result = dcmtk_run("echoscu", "-aet", "FARAWAY", "-aec", n.ae_title, n.host,
                           str(n.dicom_port))
        assert result.returncode != 0
        wait_for(lambda: "registered as 127.0.0.2" in n.log_text, what="address log")


def test_only_echo_unless_allowed(tmp_path: Path) -> None:
    ct = factory.make_ct_series(tmp_path / "in", 1)
    with running_node(tmp_path / "n", register=[("ECHOONLY", "127.0.0.1", 104, "")]) as n:
        echo = dcmtk_run("echoscu", "-aet", "ECHOONLY", "-aec", n.ae_title, n.host,
                         str(n.dicom_port))
        assert echo.returncode == 0, echo.stderr
        store = storescu(n, ct, aet="ECHOONLY")
        assert store.returncode != 0
        find = dcmtk_run("findscu", "-aet", "ECHOONLY", "-aec", n.ae_title, "-S",
                         "-k", "QueryRetrieveLevel=STUDY", n.host, str(n.dicom_port))
        assert find.returncode != 0
        assert n.object_files() == []


def test_ae_registry_cli(tmp_path: Path) -> None:
    from tests.support.node import run_cli

    data = tmp_path / "d"
    run_cli(data, "ae", "add", "PACS1", "10.0.0.5", "104", "--allow", "store,move")
    run_cli(data, "ae", "add", "PACS2", "pacs2.example", "11112")
    listing = run_cli(data, "ae", "list").stdout
    assert re.search(r"PACS1\s+10\.0\.0\.5\s+104\s+echo,store,move", listing)
    assert re.search(r"PACS2\s+pacs2\.example\s+11112\s+echo\s*$", listing, re.M)
    bad = run_cli(data, "ae", "add", "X", "h", "1", "--allow", "store,delete", check=False)
    assert bad.returncode != 0 and "delete" in bad.stderr
    assert run_cli(data, "ae", "remove", "PACS1").returncode == 0
    assert "PACS1" not in run_cli(data, "ae", "list").stdout
    assert run_cli(data, "ae", "remove", "PACS1", check=False).returncode == 1


# -- C-STORE ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFER_SYNTAX_FILES.values(), ids=TRANSFER_SYNTAX_FILES)
def test_store_each_transfer_syntax_byte_identical(served_node: RunningNode, tmp_path: Path,
                                                   name: str) -> None:
    source = factory.copy_bundled(name, tmp_path / "in")
    uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert send_raw(served_node, source) == 0x0000
    stored = stored_by_uid(served_node)[uid]
    assert dataset_bytes(stored) == dataset_bytes(source)
    meta = dcmread(stored, stop_before_pixels=True).file_meta
    sent = dcmread(source, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == sent.TransferSyntaxUID
    assert meta.SourceApplicationEntityTitle == SCU_AE
    assert re.fullmatch(r"[0-9A-Z]{16}", stored.name)


def test_storescu_study_is_stored_and_indexed(served_node: RunningNode, tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 5)
    result = storescu(served_node, files, extra=("-R",))
    assert result.returncode == 0, result.stderr
    # storescu proposes a compressed syntax only when told which one.
    for name, flag in (("MR_small_RLE.dcm", "-xr"), ("JPEG2000.dcm", "-xw"),
                       ("MR_small_jpeg_ls_lossless.dcm", "-xt")):
        # pydicom ships MR_small in several syntaxes under one SOP Instance UID.
        files.append(factory.copy_bundled(name, tmp_path / "in", SOPInstanceUID=generate_uid()))
        result = storescu(served_node, files[-1:], extra=(flag,))
        assert result.returncode == 0, result.stderr
    stored = stored_by_uid(served_node)
    for path in files[:5]:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[uid]) == dataset_bytes(path)
    for path in files[5:]:
        # storescu adds a Basic Offset Table to encapsulated pixel data; frames and
        # transfer syntax are kept (the node does not transcode).
        source, kept = dcmread(path), dcmread(stored[dcmread(path).SOPInstanceUID])
        assert kept.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        frames = int(source.get("NumberOfFrames", 1))
        assert list(generate_frames(kept.PixelData, number_of_frames=frames)) == list(
            generate_frames(source.PixelData, number_of_frames=frames))
    assert index_rows(served_node) == len(files)


def test_duplicate_sop_instance_keeps_first_copy(served_node: RunningNode, tmp_path: Path) -> None:
    first = factory.make_ct_series(tmp_path / "a", 1, PatientName="First^Copy")[0]
    second = factory.rewrite(first, tmp_path / "b", PatientName="Second^Copy")
    assert storescu(served_node, [first]).returncode == 0
    assert storescu(served_node, [second]).returncode == 0  # acknowledged, not stored
    assert index_rows(served_node) == 1
    (stored,) = stored_by_uid(served_node).values()
    assert dataset_bytes(stored) == dataset_bytes(first)
    assert len(served_node.object_files()) == 1
    wait_for(lambda: "first copy kept" in served_node.log_text, what="duplicate log line")


def test_sop_instance_uid_mismatch_is_refused(served_node: RunningNode, tmp_path: Path) -> None:
    good = factory.make_ct_series(tmp_path / "in", 1)[0]
    ds = dcmread(good)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"  # the request's UID
    lying = tmp_path / "lying.dcm"
    ds.save_as(lying, enforce_file_format=False)
    assert dcmread(lying).file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    assert send_raw(served_node, lying) == 0xA900
    assert index_rows(served_node) == 0
    assert served_node.object_files() == [] and served_node.staging_files() == []
    wait_for(lambda: "differs from the request" in served_node.log_text, what="failure log line")


def test_unparseable_dataset_is_refused(served_node: RunningNode, tmp_path: Path) -> None:
    good = factory.make_ct_series(tmp_path / "in", 1)[0]
    data = bytearray(good.read_bytes())
    _, offset = __import__("iepnode.archive.ingest", fromlist=["x"]).parse_file_meta(bytes(data))
    # Break the first element's length so the dataset cannot be parsed.
    data[offset + 6: offset + 8] = b"\xff\xff"
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(data))
    assert send_raw(served_node, broken, propose=good) in (0xC000, 0xA900)
    assert index_rows(served_node) == 0 and served_node.object_files() == []


def test_aborted_association_leaves_nothing(served_node: RunningNode, tmp_path: Path) -> None:
    source = factory.make_ct_series(tmp_path / "in", 1, rows=512, columns=512)[0]
    ds = dcmread(source)
    assoc = associate(served_node, [source])
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    from io import BytesIO

    request.DataSet = BytesIO(dataset_bytes(source))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(context.context_id, 16384))
    assert len(fragments) > 4
    for pdu in fragments[:-2]:  # the command and most, but not all, of the dataset
        assoc.dul.send_pdu(pdu)
    assoc.abort()
    wait_for(lambda: "association aborted: TESTSCU" in served_node.log_text, what="abort log line")
    assert index_rows(served_node) == 0
    assert served_node.object_files() == [] and served_node.staging_files() == []
    # The node still works afterwards.
    assert storescu(served_node, [source]).returncode == 0
    assert index_rows(served_node) == 1


def test_concurrent_associations(served_node: RunningNode, tmp_path: Path) -> None:
    first = factory.make_ct_series(tmp_path / "s0", 10)
    series = [first] + [factory.make_ct_series(tmp_path / f"s{i}", 10, like=first[0])
                        for i in range(1, 4)]
    procs = [
        subprocess.Popen(
            [shutil.which("storescu", path="/usr/bin"), "-aet", SCU_AE, "-aec",
             served_node.ae_title, served_node.host, str(served_node.dicom_port),
             *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                 "TCP_NODELAY": "1"})
        for files in series
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert index_rows(served_node) == 40
    assert index_rows(served_node, "study") == 1 and index_rows(served_node, "series") == 4
    with sqlite3.connect(served_node.data_dir / "index.sqlite3") as db:
        assert db.execute("SELECT num_instances, num_series FROM study").fetchone() == (40, 4)


def test_disk_full_gives_out_of_resources(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                   check=True)
    try:
        files = factory.make_ct_series(tmp_path / "in", 12, rows=512, columns=512)
        with running_node(mount_point / "data", register=[(SCU_AE, "127.0.0.1", 0, "store")],
                          workers=1) as n:
            assoc = associate(n, files[:1])
            statuses = [assoc.send_c_store(dcmread(f)).Status for f in files]
            assoc.release()
            assert statuses[0] == 0x0000
            assert 0xA700 in statuses
            succeeded = statuses.count(0x0000)
            assert set(statuses) <= {0x0000, 0xA700}
            assert n.staging_files() == []
            assert len(n.object_files()) == succeeded
            assert index_rows(n) == succeeded
            wait_for(lambda: "disk full" in n.log_text or "full" in n.log_text,
                     what="disk-full log")
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# -- C-FIND ----------------------------------------------------------------------------


def test_findscu_non_ascii_names_round_trip(served_node: RunningNode, tmp_path: Path) -> None:
    names = {
        "ISO_IR 100": "Müller^Jürgen",
        "ISO_IR 192": "Ñúñez^José=山田^太郎",
        "GB18030": "王^小明",
    }
    files = []
    for i, (charset, name) in enumerate(names.items()):
        files += factory.make_ct_series(tmp_path / f"p{i}", 1, PatientName=name,
                                        PatientID=f"NA{i}", SpecificCharacterSet=charset)
    assert storescu(served_node, files).returncode == 0
    out = tmp_path / "responses"
    out.mkdir()
    result = dcmtk_run("findscu", "-aet", SCU_AE, "-aec", served_node.ae_title, "-P", "-X",
                       "-od", str(out), "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientName",
                       "-k", "PatientID", served_node.host, str(served_node.dicom_port))
    assert result.returncode == 0, result.stderr
    found = {}
    for path in out.iterdir():
        ds = dcmread(path, force=True)
        found[ds.PatientID] = str(ds.PatientName)
    assert found == {f"NA{i}": name for i, name in enumerate(names.values())}


def test_findscu_levels_and_matching(served_node: RunningNode, tmp_path: Path) -> None:
    a = factory.make_ct_series(tmp_path / "a", 3, PatientName="Smith^John", PatientID="P1",
                               StudyDate="20240105", AccessionNumber="ACC1")
    b = factory.make_ct_series(tmp_path / "b", 2, PatientName="Smythe^Ann", PatientID="P2",
                               StudyDate="20230301", AccessionNumber="ACC2")
    assert storescu(served_node, a + b).returncode == 0

    def find(*keys: str, model: str = "-S") -> list[dict[str, str]]:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        args = [model, "-X", "-od", str(out)]
        for key in keys:
            args += ["-k", key]
        result = dcmtk_run("findscu", "-aet", SCU_AE, "-aec", served_node.ae_title, *args,
                           served_node.host, str(served_node.dicom_port))
        assert result.returncode == 0, result.stderr
        rows = []
        for path in sorted(out.iterdir()):
            ds = dcmread(path, force=True)
            rows.append({e.keyword: str(e.value) for e in ds if e.keyword})
        return rows

    rows = find("QueryRetrieveLevel=STUDY", "PatientName=SM?TH^*", "StudyInstanceUID",
                "NumberOfStudyRelatedInstances", "StudyDate")
    assert [(r["PatientName"], r["NumberOfStudyRelatedInstances"]) for r in rows] == [
        ("Smith^John", "3")]
    rows = find("QueryRetrieveLevel=STUDY", "StudyDate=20240101-", "AccessionNumber")
    assert [r["AccessionNumber"] for r in rows] == ["ACC1"]
    rows = find("QueryRetrieveLevel=STUDY", "StudyDate=-20231231", "AccessionNumber")
    assert [r["AccessionNumber"] for r in rows] == ["ACC2"]
    rows = find("QueryRetrieveLevel=STUDY", "PatientName", "AccessionNumber")
    assert sorted(r["AccessionNumber"] for r in rows) == ["ACC1", "ACC2"]
    study_uid = dcmread(a[0]).StudyInstanceUID
    rows = find("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid}", "Modality",
                "NumberOfSeriesRelatedInstances")
    assert [(r["Modality"], r["NumberOfSeriesRelatedInstances"]) for r in rows] == [("CT", "3")]
    rows = find("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid}",
                f"SeriesInstanceUID={dcmread(a[0]).SeriesInstanceUID}", "SOPInstanceUID",
                "InstanceNumber")
    assert sorted(r["InstanceNumber"] for r in rows) == ["1", "2", "3"]
    rows = find("QueryRetrieveLevel=PATIENT", "PatientID=P2", "PatientName",
                "NumberOfPatientRelatedStudies", model="-P")
    assert [(r["PatientName"], r["NumberOfPatientRelatedStudies"]) for r in rows] == [
        ("Smythe^Ann", "1")]


# -- C-MOVE / C-GET --------------------------------------------------------------------


def test_movescu_sends_study_byte_identical(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 4)
    files.append(factory.copy_bundled("MR_small_RLE.dcm", tmp_path / "in2"))
    received = tmp_path / "received"
    with storescp_on(0, received, "DEST") as dest, running_node(
        tmp_path / "n",
        register=[(SCU_AE, "127.0.0.1", 0, "store,move"), ("DEST", "127.0.0.1", dest.port, "")],
    ) as n:
        assert storescu(n, files[:4]).returncode == 0
        assert storescu(n, files[4:], extra=("-xr",)).returncode == 0
        study_uid = dcmread(files[0]).StudyInstanceUID
        move = dcmtk_run("movescu", "-aet", SCU_AE, "-aec", n.ae_title, "-aem", "DEST", "-S",
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                         n.host, str(n.dicom_port))
        assert move.returncode == 0, move.stderr
        got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received.iterdir()}
        assert len(got) == 4
        for path in files[:4]:
            assert dataset_bytes(got[dcmread(path).SOPInstanceUID]) == dataset_bytes(path)
        unknown = dcmtk_run("movescu", "-aet", SCU_AE, "-aec", n.ae_title, "-aem", "NOBODY",
                            "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={study_uid}", n.host, str(n.dicom_port))
        assert unknown.returncode != 0
        assert "MoveDestinationUnknown" in unknown.stdout + unknown.stderr
        wait_for(lambda: "'NOBODY' is not registered" in n.log_text, what="log line")


def test_getscu_retrieves_byte_identical(served_node: RunningNode, tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 3)
    assert storescu(served_node, files).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    study_uid = dcmread(files[0]).StudyInstanceUID
    get = dcmtk_run("getscu", "-aet", SCU_AE, "-aec", served_node.ae_title, "-S", "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    served_node.host, str(served_node.dicom_port))
    assert get.returncode == 0, get.stderr
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert len(got) == 3
    for path in files:
        assert dataset_bytes(got[dcmread(path).SOPInstanceUID]) == dataset_bytes(path)


# -- file-sets -------------------------------------------------------------------------


def test_stable_study_gets_a_valid_dicomdir(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 3, StudyID=None, StudyDate=None,
                                   StudyTime=None, AccessionNumber=None)
    files.append(factory.make_pdf(tmp_path / "in", like=files[0]))
    with running_node(tmp_path / "n", register=[(SCU_AE, "127.0.0.1", 0, "store")],
                      stable_age=0.5) as n:
        assert storescu(n, files, extra=("-R",)).returncode == 0
        # The builder stages in a hidden sibling folder and swaps it in: wait for the
        # log line, then look only at the finished (non-hidden) file-set.
        wait_for(lambda: "file-set built" in n.log_text, what="file-set log line")
        dicomdir = next(p for p in (n.data_dir / "filesets").glob("*/DICOMDIR")
                        if not p.parent.name.startswith("."))
    assert isinstance(dicomdir, Path)
    check = subprocess.run([dicom3tools("dciodvfy"), str(dicomdir)], capture_output=True,
                           text=True)
    assert not [ln for ln in (check.stdout + check.stderr).splitlines()
                if ln.startswith("Error")], check.stderr
    members = [p for p in dicomdir.parent.rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(members) == 4
    for member in members:
        rel = member.relative_to(dicomdir.parent)
        assert all(re.fullmatch(r"[A-Z0-9_]{1,8}", part) for part in rel.parts)
    entity = subprocess.run([dicom3tools("dcentvfy"), *map(str, members)], capture_output=True,
                            text=True)
    assert not [ln for ln in (entity.stdout + entity.stderr).splitlines()
                if ln.startswith("Error")], entity.stderr


def test_fileset_cli_builds_on_demand(served_node: RunningNode, tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 2)
    assert storescu(served_node, files).returncode == 0
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    out = served_node.cli("fileset", study_uid).stdout.strip()
    assert out.endswith("DICOMDIR") and Path(out).is_file()
    assert served_node.cli("fileset", "1.2.3.999", check=False).returncode == 1


def test_context_proposal_without_store_keeps_move(served_node: RunningNode) -> None:
    assoc = associate(served_node,
                      contexts=[build_context(CTImageStorage, [ExplicitVRLittleEndian])])
    assert any(cx.abstract_syntax == CTImageStorage for cx in assoc.accepted_contexts)
    assoc.release()


@pytest.mark.postgres
def test_node_on_postgresql(tmp_path: Path, fresh_postgres_url: str) -> None:
    files = factory.make_ct_series(tmp_path / "in", 6, PatientName="Ødegård^Åse",
                                   SpecificCharacterSet="ISO_IR 100")
    extra = ["--database-url", fresh_postgres_url]
    with running_node(tmp_path / "n", extra=extra,
                      register=[(SCU_AE, "127.0.0.1", 0, "store,find")]) as n:
        halves = [files[:3], files[3:]]
        procs = [subprocess.Popen([shutil.which("storescu", path="/usr/bin"), "-aet", SCU_AE,
                                   "-aec", n.ae_title, n.host, str(n.dicom_port),
                                   *map(str, half)], env={**os.environ, "TCP_NODELAY": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for half in halves]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        out = tmp_path / "r"
        out.mkdir()
        find = dcmtk_run("findscu", "-aet", SCU_AE, "-aec", n.ae_title, "-S", "-X", "-od",
                         str(out), "-k", "QueryRetrieveLevel=STUDY",
                         "-k", "SpecificCharacterSet=ISO_IR 192",
                         "-k", "PatientName=ØDE*",
                         "-k", "NumberOfStudyRelatedInstances", n.host, str(n.dicom_port))
        assert find.returncode == 0, find.stderr
        (response,) = [dcmread(p, force=True) for p in out.iterdir()]
        assert str(response.PatientName) == "Ødegård^Åse"
        assert response.NumberOfStudyRelatedInstances == 6
        assert "ae" in n.cli("ae", "list").stdout.lower()
        # Each association runs in its own thread; its connection goes back to the
        # pool when it ends and the next association reuses it instead of opening one.
        import psycopg2

        def sessions() -> int:
            with psycopg2.connect(fresh_postgres_url) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_stat_force_next_flush()")
                cur.execute("SELECT sessions FROM pg_stat_database "
                            "WHERE datname = current_database()")
                return cur.fetchone()[0]

        before = sessions()
        for _ in range(12):
            echo = dcmtk_run("echoscu", "-aet", SCU_AE, "-aec", n.ae_title, n.host,
                             str(n.dicom_port))
            assert echo.returncode == 0, echo.stderr
        assert sessions() - before <= 4
    assert not (tmp_path / "n" / "index.sqlite3").exists()


def test_retrieve_without_unique_key_is_refused(tmp_path: Path) -> None:
    files = factory.make_ct_series(tmp_path / "in", 2)
    received = tmp_path / "received"
    with storescp_on(0, received, "DEST") as dest, running_node(
        tmp_path / "n",
        register=[(SCU_AE, "127.0.0.1", 0, "store,move,get"),
                  ("DEST", "127.0.0.1", dest.port, "")],
    ) as n:
        assert storescu(n, files).returncode == 0
        move = dcmtk_run("movescu", "-aet", SCU_AE, "-aec", n.ae_title, "-aem", "DEST", "-S",
                         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=*",
                         n.host, str(n.dicom_port))
        assert move.returncode != 0
        get = dcmtk_run("getscu", "-aet", SCU_AE, "-aec", n.ae_title, "-S", "-od",
                        str(tmp_path), "-k", "QueryRetrieveLevel=STUDY", "-k",
                        "StudyInstanceUID=*", n.host, str(n.dicom_port))
        assert "Failed: UnableToProcess" in get.stdout + get.stderr, get.stderr
        assert "Release Failed" not in get.stdout + get.stderr
        wait_for(lambda: "needs a StudyInstanceUID" in n.log_text, what="log line")
    assert not received.exists() or not any(received.iterdir())
