"""Index verbs through ``ArchiveService.store_received`` on SQLite and PostgreSQL.

Duplicate policies, study/series counters, concurrent stores into one new series,
a failing index, malformed input, and the file store's generated names.
"""

from __future__ import annotations

import random
import re
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from config import Settings, load_settings
from iepnode.archive.ingest import StoreResult, parse_file_meta
from iepnode.errors import BadDataset, DatasetMismatch, OutOfResources
from iepnode.services import Services
from iepnode.wiring import build_services
from storage import index
from storage.db import is_sqlite
from storage.index import Outcome
from storage.models import Instance, Patient, Series, Study
from tests.data_factory import copy_bundled, make_ct_series, rewrite

STORE_NAME = re.compile(r"^[0-9A-Z]{16}$")

# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Settings]:
    """Build settings under ``tmp_path`` for a fresh SQLite or PostgreSQL index."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_postgres_url")

    def settings(**overrides: Any) -> Settings:
        return load_settings(
            overrides={"data_dir": tmp_path / "node", "database_url": url, "fsync": False,
                       **overrides},
            environ={},
        )

    return settings


@pytest.fixture
def make_services(backend: Callable[..., Settings]) -> Iterator[Callable[..., Services]]:
    """One Services per test (the model proxy is module-global), closed afterwards."""
    built: list[Services] = []

    def make(**overrides: Any) -> Services:
        assert not built, "one Services per test"
        built.append(build_services(backend(**overrides)))
        return built[0]

    yield make
    for n in built:
        n.close()


@pytest.fixture
def services(make_services: Callable[..., Services]) -> Services:
    return make_services()


def split(path: Path) -> tuple[bytes, str, str, str]:
    """(dataset stream, transfer syntax, SOP class, SOP instance UID) of a Part-10 file."""
    data = path.read_bytes()
    meta, offset = parse_file_meta(data)
    return data[offset:], meta.transfer_syntax, meta.sop_class, meta.sop_uid


def store(services: Services, path: Path) -> StoreResult:
    stream, ts, sop_class, sop_uid = split(path)
    return services.archive.store_received(stream, ts, calling_ae="TESTSCU", sop_class=sop_class,
                               sop_uid=sop_uid)


def object_files(services: Services) -> list[Path]:
    return sorted(p for p in services.settings.store_dir.rglob("*") if p.is_file())


def staging_files(services: Services) -> list[Path]:
    return sorted(services.settings.tmp_dir.iterdir())


def stored_file(services: Services, sop_uid: str) -> Path:
    return services.store.path(Instance.get(Instance.sop_uid == sop_uid).key)


def encode(ds: Dataset) -> bytes:
    """Encode a dataset as explicit VR little endian (no File Meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def assert_nothing_stored(services: Services) -> None:
    assert object_files(services) == []
    assert staging_files(services) == []
    assert services.archive.counts() == {"patients": 0, "studies": 0, "instances": 0}


# -- duplicate policies ------------------------------------------------------------------


def test_keep_policy_keeps_the_first_copy(make_services: Callable[..., Services],
                                          tmp_path: Path) -> None:
    services = make_services(duplicate_policy="keep")
    first = make_ct_series(tmp_path / "in", 1)[0]
    second = rewrite(first, tmp_path / "again", SeriesDescription="Changed", InstanceNumber=7)
    assert store(services, first).outcome is Outcome.STORED
    sop_uid = split(first)[3]
    kept = stored_file(services, sop_uid)
    before = kept.read_bytes()

    result = store(services, second)

    assert result.outcome is Outcome.DUPLICATE_KEPT
    assert result.sop_uid == sop_uid
    assert object_files(services) == [kept]
    assert kept.read_bytes() == before
    assert dcmread(kept).SeriesDescription == "Axial"
    assert staging_files(services) == []
    series = Series.get()
    assert (series.num_instances, series.size_bytes) == (1, len(before))
    assert Study.get().num_instances == 1


def test_replace_policy_replaces_the_file(make_services: Callable[..., Services],
                                          tmp_path: Path) -> None:
    services = make_services(duplicate_policy="replace")
    paths = make_ct_series(tmp_path / "in", 2)
    for path in paths:
        store(services, path)
    sop_uid = split(paths[0])[3]
    old = stored_file(services, sop_uid)
    study_key = Study.get().key
    second = rewrite(paths[0], tmp_path / "again", SeriesDescription="Changed, longer text")

    result = store(services, second)

    assert result.outcome is Outcome.REPLACED
    new = stored_file(services, sop_uid)
    assert new != old
    assert not old.exists()
    assert len(object_files(services)) == 2
    assert dcmread(new).SeriesDescription == "Changed, longer text"
    assert new.read_bytes()[-len(split(second)[0]):] == split(second)[0]
    assert staging_files(services) == []
    sizes = sum(p.stat().st_size for p in object_files(services))
    series, study = Series.get(), Study.get()
    assert (series.num_instances, series.size_bytes) == (2, sizes)
    assert (study.num_series, study.num_instances, study.size_bytes) == (1, 2, sizes)
    assert study.key == study_key
    assert Patient.get().num_studies == 1
    assert Instance.select().count() == 2


def test_replace_the_only_instance(make_services: Callable[..., Services], tmp_path: Path) -> None:
    services = make_services(duplicate_policy="replace")
    path = make_ct_series(tmp_path / "in", 1)[0]
    store(services, path)
    result = store(services, rewrite(path, tmp_path / "again", StudyDescription="Again"))
    assert result.outcome is Outcome.REPLACED
    assert len(object_files(services)) == 1
    study, series, patient = Study.get(), Series.get(), Patient.get()
    assert (study.num_series, study.num_instances) == (1, 1)
    assert series.num_instances == 1
    assert patient.num_studies == 1
    assert series.size_bytes == study.size_bytes == object_files(services)[0].stat().st_size


# -- counters ----------------------------------------------------------------------------


def test_counters_after_several_series(services: Services, tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", 3)
    mr = make_ct_series(tmp_path / "mr", 2, like=ct[0], Modality="MR", SeriesNumber=2)
    other = make_ct_series(tmp_path / "other", 1, PatientID=dcmread(ct[0]).PatientID)
    for path in [ct[0], mr[0], ct[1], mr[1], ct[2], other[0]]:
        assert store(services, path).outcome is Outcome.STORED

    study = Study.get(Study.study_uid == dcmread(ct[0]).StudyInstanceUID)
    assert (study.num_series, study.num_instances) == (2, 5)
    assert study.modalities == "CT\\MR"
    files = {p.name: p.stat().st_size for p in object_files(services)}
    for paths in (ct, mr):
        uid = dcmread(paths[0]).SeriesInstanceUID
        series = Series.get(Series.series_uid == uid)
        keys = [i.key for i in Instance.select().where(Instance.series == series)]
        assert series.num_instances == len(paths) == len(keys)
        assert series.size_bytes == sum(files[k] for k in keys)
    assert study.size_bytes == sum(s.size_bytes for s in study.series)
    assert Patient.get().num_studies == 2
    assert services.archive.counts() == {"patients": 1, "studies": 2, "instances": 6}


def test_replace_moves_an_instance_to_another_series(
    make_services: Callable[..., Services], tmp_path: Path
) -> None:
    services = make_services(duplicate_policy="replace")
    a = make_ct_series(tmp_path / "a", 3)
    b = make_ct_series(tmp_path / "b", 2, like=a[0], Modality="MR", SeriesNumber=2)
    c = make_ct_series(tmp_path / "c", 1, like=a[0], SeriesNumber=3)
    for path in a + b + c:
        store(services, path)
    uid_a, uid_b, uid_c = (dcmread(x[0]).SeriesInstanceUID for x in (a, b, c))
    assert Study.get().num_series == 3

    # a[0] arrives again, now claiming to belong to series b.
    moved = rewrite(a[0], tmp_path / "moved", SeriesInstanceUID=uid_b)
    assert store(services, moved).outcome is Outcome.REPLACED

    def counts() -> dict[str, int]:
        return {s.series_uid: s.num_instances for s in Series.select()}

    assert counts() == {uid_a: 2, uid_b: 3, uid_c: 1}
    row = Instance.get(Instance.sop_uid == split(a[0])[3])
    assert row.series.series_uid == uid_b
    study = Study.get()
    assert (study.num_series, study.num_instances) == (3, 6)

    # The only instance of series c moves to a: series c disappears.
    assert store(services, rewrite(c[0], tmp_path / "moved2", SeriesInstanceUID=uid_a)).outcome \
        is Outcome.REPLACED
    assert counts() == {uid_a: 3, uid_b: 3}
    study = Study.get()
    assert (study.num_series, study.num_instances) == (2, 6)
    sizes = sum(p.stat().st_size for p in object_files(services))
    assert study.size_bytes == sizes == sum(s.size_bytes for s in Series.select())
    assert len(object_files(services)) == 6
    assert Patient.get().num_studies == 1


def test_replace_recomputes_modalities_when_a_series_goes(
    make_services: Callable[..., Services], tmp_path: Path
) -> None:
    services = make_services(duplicate_policy="replace")
    ct = make_ct_series(tmp_path / "ct", 2)
    mr = make_ct_series(tmp_path / "mr", 1, like=ct[0], Modality="MR", SeriesNumber=2)
    for path in ct + mr:
        store(services, path)
    assert Study.get().modalities == "CT\\MR"
    moved = rewrite(mr[0], tmp_path / "moved", SeriesInstanceUID=dcmread(ct[0]).SeriesInstanceUID,
                    Modality="CT")
    assert store(services, moved).outcome is Outcome.REPLACED
    study = Study.get()
    assert (study.num_series, study.num_instances, study.modalities) == (1, 3, "CT")


def test_delete_instance_removes_empty_parents(services: Services, tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", 2)
    mr = make_ct_series(tmp_path / "mr", 1, like=ct[0], Modality="MR", SeriesNumber=2)
    other = make_ct_series(tmp_path / "other", 1, PatientID="OTHER")
    for path in ct + mr + other:
        store(services, path)
    ct_uids, mr_uid = [split(p)[3] for p in ct], split(mr[0])[3]
    mr_key = Instance.get(Instance.sop_uid == mr_uid).key

    assert index.delete_instance(mr_uid) == mr_key
    assert index.delete_instance(mr_uid) is None
    study = Study.get(Study.study_uid == dcmread(ct[0]).StudyInstanceUID)
    assert (study.num_series, study.num_instances, study.modalities) == (1, 2, "CT")
    assert study.size_bytes == Series.get(Series.study == study).size_bytes

    index.delete_instance(ct_uids[0])
    assert Series.get(Series.study == study).num_instances == 1
    index.delete_instance(ct_uids[1])
    assert Study.get_or_none(Study.id == study.id) is None
    assert Series.select().where(Series.study == study.id).count() == 0
    # The patient without studies is gone; the other patient stays.
    assert [p.patient_id for p in Patient.select()] == ["OTHER"]
    assert Patient.get().num_studies == 1
    assert services.archive.counts() == {"patients": 1, "studies": 1, "instances": 1}


# -- concurrency -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hundred_slices(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, str, str, str]]:
    """100 instances of one new study/series, split into (stream, ts, class, uid)."""
    paths = make_ct_series(tmp_path_factory.mktemp("hundred"), 100, rows=4, columns=4)
    return [split(p) for p in paths]


def test_concurrent_stores_into_one_new_series(
    services: Services, hundred_slices: list[tuple[bytes, str, str, str]]
) -> None:
    threads_n, per_thread = 4, 25
    barrier = threading.Barrier(threads_n)
    results: list[StoreResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(chunk: list[tuple[bytes, str, str, str]]) -> None:
        try:
            barrier.wait(timeout=30)
            for stream, ts, sop_class, sop_uid in chunk:
                result = services.archive.store_received(stream, ts, calling_ae="TESTSCU",
                                             sop_class=sop_class, sop_uid=sop_uid)
                with lock:
                    results.append(result)
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)
        finally:
            services.close()  # this thread's connection

    # Interleave the slices so every thread starts with a brand-new series.
    chunks = [hundred_slices[i::threads_n] for i in range(threads_n)]
    threads = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)

    assert errors == []
    assert len(results) == threads_n * per_thread
    assert {r.outcome for r in results} == {Outcome.STORED}
    assert Instance.select().count() == 100
    assert Study.select().count() == 1
    assert Series.select().count() == 1
    assert Patient.select().count() == 1
    study, series = Study.get(), Series.get()
    assert (series.num_instances, study.num_instances, study.num_series) == (100, 100, 1)
    assert Patient.get().num_studies == 1
    files = object_files(services)
    assert len(files) == 100
    assert series.size_bytes == study.size_bytes == sum(p.stat().st_size for p in files)
    assert staging_files(services) == []


def test_concurrent_duplicates_are_kept_once(
    services: Services, hundred_slices: list[tuple[bytes, str, str, str]]
) -> None:
    """Four threads send the same 10 instances: each is stored exactly once."""
    barrier = threading.Barrier(4)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            for stream, ts, sop_class, sop_uid in hundred_slices[:10]:
                result = services.archive.store_received(stream, ts, calling_ae="TESTSCU",
                                             sop_class=sop_class, sop_uid=sop_uid)
                with lock:
                    outcomes.append(result.outcome)
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)
        finally:
            services.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert outcomes.count(Outcome.STORED) == 10
    assert outcomes.count(Outcome.DUPLICATE_KEPT) == 30
    assert Instance.select().count() == 10
    assert Series.get().num_instances == Study.get().num_instances == 10
    assert len(object_files(services)) == 10
    assert staging_files(services) == []


# -- a failing index ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep", "replace"])
@pytest.mark.parametrize("table", ["instance", "series"])
def test_failing_index_is_out_of_resources_and_leaves_no_file(
    make_services: Callable[..., Services], tmp_path: Path, policy: str, table: str
) -> None:
    services = make_services(duplicate_policy=policy)
    first, second = make_ct_series(tmp_path / "in", 2)
    store(services, first)
    before = object_files(services)
    cascade = "" if is_sqlite(services.database) else " CASCADE"
    services.database.execute_sql(f"DROP TABLE {table}{cascade}")

    with pytest.raises(OutOfResources, match="index failed"):
        store(services, second)

    assert object_files(services) == before
    assert staging_files(services) == []


def test_failing_index_on_a_new_study(make_services: Callable[..., Services],
                                      tmp_path: Path) -> None:
    services = make_services()
    path = make_ct_series(tmp_path / "in", 1)[0]
    services.database.execute_sql("DROP TABLE patient" + (
        "" if is_sqlite(services.database) else " CASCADE"))
    with pytest.raises(OutOfResources):
        store(services, path)
    assert object_files(services) == []
    assert staging_files(services) == []


# -- malformed input ---------------------------------------------------------------------


def _ct(tmp_path: Path) -> Dataset:
    return dcmread(make_ct_series(tmp_path / "src", 1, SOPInstanceUID="1.2.345")[0])


def set_sop_uid(stream: bytes, value: str) -> bytes:
    """Put any value, valid or not, in the SOP Instance UID ``1.2.345`` of ``stream``.

    Patched in the encoded bytes (length field included): pydicom would warn when
    setting an invalid UID the usual way.
    """
    def element(text: str) -> bytes:
        raw = text.encode("ascii")
        raw += b"\x00" * (len(raw) % 2)
        return b"\x08\x00\x18\x00UI" + struct.pack("<H", len(raw)) + raw

    assert stream.count(element("1.2.345")) == 1
    return stream.replace(element("1.2.345"), element(value))


def _random_bytes(tmp_path: Path) -> tuple[bytes, str, str]:
    return random.Random(7).randbytes(2048), ExplicitVRLittleEndian, "1.2.3.4"


def _random_implicit(tmp_path: Path) -> tuple[bytes, str, str]:
    return random.Random(8).randbytes(512), ImplicitVRLittleEndian, "1.2.3.4"


def _empty(tmp_path: Path) -> tuple[bytes, str, str]:
    return b"", ExplicitVRLittleEndian, "1.2.3.4"


def _truncated_header(tmp_path: Path) -> tuple[bytes, str, str]:
    stream = encode(_ct(tmp_path))
    cut = stream.index(b"\x20\x00\x0d\x00")  # (0020,000D) Study Instance UID
    return stream[: cut + 12], ExplicitVRLittleEndian, "1.2.345"


def _truncated_value(tmp_path: Path) -> tuple[bytes, str, str]:
    stream = encode(_ct(tmp_path))
    cut = stream.index(b"\x08\x00\x18\x00")  # (0008,0018) SOP Instance UID
    return stream[: cut + 10], ExplicitVRLittleEndian, "1.2.345"


def _missing_sop_uid(tmp_path: Path) -> tuple[bytes, str, str]:
    ds = _ct(tmp_path)
    del ds.SOPInstanceUID
    return encode(ds), ExplicitVRLittleEndian, "1.2.345"


def _missing_study_uid(tmp_path: Path) -> tuple[bytes, str, str]:
    ds = _ct(tmp_path)
    del ds.StudyInstanceUID
    return encode(ds), ExplicitVRLittleEndian, "1.2.345"


def _malformed_uid(tmp_path: Path) -> tuple[bytes, str, str]:
    return set_sop_uid(encode(_ct(tmp_path)), "1.2.abc"), ExplicitVRLittleEndian, "1.2.abc"


def _multi_valued_uid(tmp_path: Path) -> tuple[bytes, str, str]:
    return set_sop_uid(encode(_ct(tmp_path)), "1.2\\1.3"), ExplicitVRLittleEndian, "1.2\\1.3"


def _wrong_transfer_syntax(tmp_path: Path) -> tuple[bytes, str, str]:
    return encode(_ct(tmp_path)), "1.2.840.10008.1.2.abc", "1.2.345"


MALFORMED = {
    "random-bytes": _random_bytes,
    "random-bytes-implicit": _random_implicit,
    "empty": _empty,
    "truncated-header": _truncated_header,
    "truncated-value": _truncated_value,
    "missing-sop-uid": _missing_sop_uid,
    "missing-study-uid": _missing_study_uid,
    "malformed-uid": _malformed_uid,
    "multi-valued-uid": _multi_valued_uid,
    "bad-transfer-syntax": _wrong_transfer_syntax,
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_a_bad_dataset(services: Services, tmp_path: Path, case: str) -> None:
    stream, ts, sop_uid = MALFORMED[case](tmp_path)
    with pytest.raises(BadDataset) as info:
        services.archive.store_received(stream, ts, calling_ae="TESTSCU", sop_class=CTImageStorage,
                            sop_uid=sop_uid)
    assert type(info.value) is BadDataset
    assert_nothing_stored(services)


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
def test_over_long_uid_is_rejected_not_truncated(services: Services, tmp_path: Path) -> None:
    long_uid = "1.2.345" + ".6" * 40  # 87 characters; UIDs have at most 64
    stream = set_sop_uid(encode(_ct(tmp_path)), long_uid)
    # Without an expected UID (bulk import): the UID itself must be refused.
    with pytest.raises(BadDataset, match="malformed SOPInstanceUID"):
        services.ingester.ingest(stream, ExplicitVRLittleEndian)
    with pytest.raises(BadDataset):
        services.archive.store_received(stream, ExplicitVRLittleEndian, calling_ae="TESTSCU",
                            sop_class=CTImageStorage, sop_uid=long_uid)
    assert_nothing_stored(services)


# -- request / dataset mismatch ----------------------------------------------------------


def test_sop_instance_uid_mismatch(services: Services, tmp_path: Path) -> None:
    stream, ts, sop_class, sop_uid = split(make_ct_series(tmp_path / "in", 1)[0])
    with pytest.raises(DatasetMismatch, match=re.escape(sop_uid)):
        services.archive.store_received(stream, ts, calling_ae="TESTSCU", sop_class=sop_class,
                            sop_uid=sop_uid + ".1")
    assert_nothing_stored(services)


def test_sop_class_uid_mismatch(services: Services, tmp_path: Path) -> None:
    stream, ts, _, sop_uid = split(make_ct_series(tmp_path / "in", 1)[0])
    with pytest.raises(DatasetMismatch, match="SOP Class"):
        services.archive.store_received(stream, ts, calling_ae="TESTSCU",
                            sop_class="1.2.840.10008.5.1.4.1.1.4", sop_uid=sop_uid)
    assert_nothing_stored(services)


def test_request_uids_with_padding_match(services: Services, tmp_path: Path) -> None:
    stream, ts, sop_class, sop_uid = split(make_ct_series(tmp_path / "in", 1)[0])
    result = services.archive.store_received(stream, ts, calling_ae="TESTSCU",
                                         sop_class=sop_class + "\x00",
                                 sop_uid=sop_uid + "\x00")
    assert result.outcome is Outcome.STORED


# -- the file store ----------------------------------------------------------------------


def test_store_names_never_contain_dicom_values(services: Services, tmp_path: Path) -> None:
    paths = [
        *make_ct_series(tmp_path / "a", 2, PatientID="../../etc/passwd",
                        PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100"),
        *make_ct_series(tmp_path / "b", 1, PatientID="C:\\WINDOWS", StudyDescription="/tmp/x"),
        copy_bundled("CT_small.dcm", tmp_path / "c"),
        copy_bundled("MR_small.dcm", tmp_path / "c"),
    ]
    for path in paths:
        assert store(services, path).outcome is Outcome.STORED
    files = object_files(services)
    assert len(files) == len(paths)
    uids = {split(p)[3] for p in paths}
    for f in files:
        assert STORE_NAME.match(f.name), f.name
        assert f.parent.name == f.name[:2]
        assert f.parent.parent == services.settings.store_dir
        assert not any(uid in str(f) for uid in uids)
    # Everything under data_dir (index, WAL...) stays inside it.
    for entry in services.settings.data_dir.rglob("*"):
        assert entry.resolve().is_relative_to(services.settings.data_dir)
    assert staging_files(services) == []


def test_stored_file_is_the_received_stream_behind_new_file_meta(
    services: Services, tmp_path: Path
) -> None:
    path = copy_bundled("CT_small.dcm", tmp_path / "in")
    stream, ts, sop_class, sop_uid = split(path)
    services.archive.store_received(stream, ts, calling_ae="TESTSCU", sop_class=sop_class,
                                sop_uid=sop_uid)
    stored = stored_file(services, sop_uid)
    data = stored.read_bytes()
    meta, offset = parse_file_meta(data)
    assert data[offset:] == stream
    assert (meta.sop_class, meta.sop_uid, meta.transfer_syntax) == (sop_class, sop_uid, ts)
    ds = dcmread(stored)
    assert ds.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert ds.SOPInstanceUID == sop_uid
    row = Instance.get(Instance.sop_uid == sop_uid)
    assert (row.size_bytes, row.source_ae, row.transfer_syntax) == (len(data), "TESTSCU", ts)
