"""C-FIND / retrieve semantics of ``ArchiveService.find`` and ``.retrieve``, SQLite and PostgreSQL.

A small known corpus (five patients, six studies, seven series, eleven instances,
names in ISO_IR 100, ISO_IR 192 and GB18030) is ingested through
``ArchiveService.store_received`` into a fresh database, then queried. Queries do not
change the index, so each backend's node is built once per module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

from config import Settings, load_settings
from iepnode.archive.ingest import parse_file_meta
from iepnode.archive.query import Root
from iepnode.errors import BadQuery
from iepnode.services import Services
from iepnode.wiring import build_services
from storage.index import Outcome
from storage.models import database_proxy
from tests.data_factory import make_ct_series
from tests.support.postgres import create_database, drop_database

MULLER = "Müller^Jürgen"
NUNEZ = "Ñúñez^José"
WANG = "王^小明"

PATIENTS: dict[str, dict[str, Any]] = {
    "P1": {"PatientName": MULLER, "PatientID": "PID-001", "PatientBirthDate": "19600101",
           "PatientSex": "M", "SpecificCharacterSet": "ISO_IR 100"},
    "P2": {"PatientName": NUNEZ, "PatientID": "PID-002", "PatientBirthDate": "19751231",
           "PatientSex": "F", "SpecificCharacterSet": "ISO_IR 192"},
    "P3": {"PatientName": WANG, "PatientID": "A_1", "PatientBirthDate": "19881111",
           "PatientSex": "M", "SpecificCharacterSet": "GB18030"},
    "P4": {"PatientName": "Smith^John", "PatientID": "AB1", "PatientBirthDate": "19990101",
           "PatientSex": "M"},
    "P5": {"PatientName": "O'Brien^Pat", "PatientID": "A%1", "PatientBirthDate": None,
           "PatientSex": "F"},
}

# -- the corpus --------------------------------------------------------------------------


@dataclass
class Corpus:
    """Encoded instances to store, and the UIDs they carry."""

    #: (dataset stream, transfer syntax, SOP class, SOP instance UID) per instance.
    items: list[tuple[bytes, str, str, str]] = field(default_factory=list)
    study: dict[str, str] = field(default_factory=dict)  # S1.. -> StudyInstanceUID
    series: dict[str, str] = field(default_factory=dict)  # S1-CT.. -> SeriesInstanceUID
    sops: dict[str, list[str]] = field(default_factory=dict)  # series name -> SOP UIDs
    study_sops: dict[str, set[str]] = field(default_factory=dict)
    patient_sops: dict[str, set[str]] = field(default_factory=dict)

    def add(self, patient: str, study: str, name: str, paths: list[Path]) -> None:
        first = dcmread(paths[0], stop_before_pixels=True)
        self.study[study] = first.StudyInstanceUID
        self.series[name] = first.SeriesInstanceUID
        self.sops[name] = []
        for path in paths:
            data = path.read_bytes()
            meta, offset = parse_file_meta(data)
            self.items.append((data[offset:], meta.transfer_syntax, meta.sop_class, meta.sop_uid))
            self.sops[name].append(meta.sop_uid)
            self.study_sops.setdefault(study, set()).add(meta.sop_uid)
            self.patient_sops.setdefault(patient, set()).add(meta.sop_uid)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    d = tmp_path_factory.mktemp("corpus")
    c = Corpus()
    s1_ct = make_ct_series(d, 3, **PATIENTS["P1"], StudyDate="20240110", StudyTime="101500",
                           StudyDescription="Head", AccessionNumber="ACC-1")
    c.add("P1", "S1", "S1-CT", s1_ct)
    c.add("P1", "S1", "S1-MR", make_ct_series(d, 2, like=s1_ct[0], Modality="MR",
                                              SeriesNumber=2, SeriesDescription="T1"))
    c.add("P1", "S2", "S2-CT", make_ct_series(d, 2, **PATIENTS["P1"], StudyDate="20240301",
                                              StudyDescription="Chest", AccessionNumber="ACC-2"))
    c.add("P2", "S3", "S3-MR", make_ct_series(d, 1, **PATIENTS["P2"], Modality="MR",
                                              StudyDate="20230615", StudyDescription="Knee"))
    c.add("P3", "S4", "S4-DX", make_ct_series(d, 1, **PATIENTS["P3"], Modality="DX",
                                              StudyDate="20240505", StudyDescription="Hand"))
    c.add("P4", "S5", "S5-CT", make_ct_series(d, 1, **PATIENTS["P4"], StudyDate=None,
                                              StudyDescription="HEAD"))
    c.add("P5", "S6", "S6-CT", make_ct_series(d, 1, **PATIENTS["P5"], StudyDate="20220101",
                                              StudyDescription="Scan [1]"))
    return c


# -- backends and the node ---------------------------------------------------------------


def _create_locale_database(server_url: str, name: str, locale: str) -> str:
    """Like ``create_database``, with a real (non-C) collation, as clusters default to."""
    conn = psycopg2.connect(server_url, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_collation WHERE collcollate = %s", (locale,))
            if cur.fetchone() is None:
                pytest.skip(f"the PostgreSQL server has no {locale} collation")
            cur.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                        f"LC_COLLATE '{locale}' LC_CTYPE '{locale}'")
    finally:
        conn.close()
    return urlunsplit(urlsplit(server_url)._replace(path="/" + name))


@pytest.fixture(scope="module", params=["sqlite", "postgres", "postgres-en_US"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """Settings under a temporary folder for a fresh SQLite or PostgreSQL index.

    Like ``fresh_postgres_url`` (C collation), but one database per module: the
    tests only read. ``postgres-en_US`` is a database with the collation most
    clusters are created with, where string order is not code-point order.
    """
    url = ""
    if request.param.startswith("postgres"):
        server_url = request.getfixturevalue("postgres_url")
        name = f"q_{uuid.uuid4().hex[:16]}"
        if request.param == "postgres":
            url = create_database(server_url, name)
        else:
            url = _create_locale_database(server_url, name, "en_US.utf8")
    data_dir = tmp_path_factory.mktemp(f"node-{request.param}")
    yield load_settings(
        overrides={"data_dir": data_dir, "database_url": url, "fsync": False}, environ={}
    )
    if url:
        drop_database(url)


@pytest.fixture(scope="module")
def populated(backend: Settings, corpus: Corpus) -> Iterator[Services]:
    n = build_services(backend)
    for stream, ts, sop_class, sop_uid in corpus.items:
        result = n.archive.store_received(stream, ts, calling_ae="TESTSCU", sop_class=sop_class,
                                  sop_uid=sop_uid)
        assert result.outcome is Outcome.STORED
    yield n
    n.close()


@pytest.fixture
def services(populated: Services) -> Services:
    """The populated node, its database bound to the (module-global) model proxy."""
    database_proxy.initialize(populated.database)
    return populated


# -- helpers -----------------------------------------------------------------------------


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find(services: Services, level: str, root: Root = Root.PATIENT, **keys: Any) -> list[Dataset]:
    return list(services.archive.find(ident(level, **keys), root))


def values(results: list[Dataset], keyword: str) -> set[Any]:
    return {str(r[keyword].value) if keyword in r else None for r in results}


def studies(services: Services, corpus: Corpus, **keys: Any) -> set[str]:
    """Names (S1..S6) of the studies a Study Root STUDY query matches."""
    by_uid = {uid: name for name, uid in corpus.study.items()}
    results = find(services, "STUDY", Root.STUDY, **{"StudyInstanceUID": "", **keys})
    return {by_uid[str(r.StudyInstanceUID)] for r in results}


def patients(services: Services, **keys: Any) -> set[str]:
    """PatientIDs a Patient Root PATIENT query matches."""
    return values(find(services, "PATIENT", **{"PatientID": "", **keys}), "PatientID")


def round_trip(ds: Dataset) -> tuple[bytes, Dataset]:
    """Encode ``ds`` as on the wire (explicit VR LE) and decode it again."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    raw = fp.getvalue()
    return raw, read_dataset(BytesIO(raw), is_implicit_VR=False, is_little_endian=True)


# -- levels and roots --------------------------------------------------------------------


def test_patient_root_patient_level(services: Services, corpus: Corpus) -> None:
    results = find(services, "PATIENT", PatientID="", PatientName="",
                   NumberOfPatientRelatedStudies="")
    assert len(results) == 5
    by_id = {r.PatientID: r for r in results}
    assert set(by_id) == {"PID-001", "PID-002", "A_1", "AB1", "A%1"}
    assert by_id["PID-001"].NumberOfPatientRelatedStudies == 2
    assert by_id["AB1"].NumberOfPatientRelatedStudies == 1
    assert str(by_id["AB1"].PatientName) == "Smith^John"
    for r in results:
        assert r.QueryRetrieveLevel == "PATIENT"


def test_patient_root_study_level(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", PatientID="PID-001", StudyInstanceUID="", StudyDate="",
                   NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
    by_uid = {r.StudyInstanceUID: r for r in results}
    assert set(by_uid) == {corpus.study["S1"], corpus.study["S2"]}
    s1, s2 = by_uid[corpus.study["S1"]], by_uid[corpus.study["S2"]]
    assert (s1.StudyDate, s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (
        "20240110", 2, 5)
    assert (s2.StudyDate, s2.NumberOfStudyRelatedSeries, s2.NumberOfStudyRelatedInstances) == (
        "20240301", 1, 2)
    assert {r.QueryRetrieveLevel for r in results} == {"STUDY"}


@pytest.mark.parametrize("root", [Root.PATIENT, Root.STUDY])
def test_series_level(services: Services, corpus: Corpus, root: Root) -> None:
    results = find(services, "SERIES", root, StudyInstanceUID=corpus.study["S1"],
                   SeriesInstanceUID="", Modality="", SeriesNumber="",
                   NumberOfSeriesRelatedInstances="")
    by_uid = {r.SeriesInstanceUID: r for r in results}
    assert set(by_uid) == {corpus.series["S1-CT"], corpus.series["S1-MR"]}
    ct, mr = by_uid[corpus.series["S1-CT"]], by_uid[corpus.series["S1-MR"]]
    assert (ct.Modality, ct.SeriesNumber, ct.NumberOfSeriesRelatedInstances) == ("CT", 1, 3)
    assert (mr.Modality, mr.SeriesNumber, mr.NumberOfSeriesRelatedInstances) == ("MR", 2, 2)
    assert {r.StudyInstanceUID for r in results} == {corpus.study["S1"]}


@pytest.mark.parametrize("root", [Root.PATIENT, Root.STUDY])
def test_image_level(services: Services, corpus: Corpus, root: Root) -> None:
    results = find(services, "IMAGE", root, StudyInstanceUID=corpus.study["S1"],
                   SeriesInstanceUID=corpus.series["S1-CT"], SOPInstanceUID="",
                   SOPClassUID="", InstanceNumber="")
    assert [r.QueryRetrieveLevel for r in results] == ["IMAGE"] * 3
    assert {r.SOPInstanceUID for r in results} == set(corpus.sops["S1-CT"])
    assert {r.InstanceNumber for r in results} == {1, 2, 3}
    assert {r.SOPClassUID for r in results} == {"1.2.840.10008.5.1.4.1.1.2"}


def test_study_root_study_level_with_patient_keys(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", Root.STUDY, StudyInstanceUID="", PatientName="",
                   PatientID="", ModalitiesInStudy="")
    assert len(results) == 6
    by_uid = {r.StudyInstanceUID: r for r in results}
    s1 = by_uid[corpus.study["S1"]]
    assert str(s1.PatientName) == MULLER
    assert list(s1.ModalitiesInStudy) == ["CT", "MR"]
    assert by_uid[corpus.study["S4"]].ModalitiesInStudy == "DX"


def test_study_root_has_no_patient_level(services: Services) -> None:
    with pytest.raises(BadQuery, match="PATIENT"):
        find(services, "PATIENT", Root.STUDY, PatientID="")
    with pytest.raises(BadQuery):
        services.archive.retrieve(ident("PATIENT", PatientID="PID-001"), Root.STUDY)


@pytest.mark.parametrize("level", ["", "SERIESX", "INSTANCE"])
def test_invalid_level(services: Services, level: str) -> None:
    with pytest.raises(BadQuery):
        find(services, level, PatientID="")


def test_missing_level(services: Services) -> None:
    identifier = Dataset()
    identifier.PatientID = ""
    with pytest.raises(BadQuery):
        list(services.archive.find(identifier, Root.PATIENT))


# -- matching ----------------------------------------------------------------------------


def test_universal_matching_returns_all_with_values(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", Root.STUDY, StudyInstanceUID="", StudyDate="",
                   StudyDescription="", AccessionNumber="")
    assert len(results) == 6
    assert all("StudyDate" in r and "StudyDescription" in r for r in results)
    assert values(results, "StudyDate") == {"20240110", "20240301", "20230615", "20240505",
                                            "", "20220101"}
    assert values(results, "StudyDescription") == {"Head", "Chest", "Knee", "Hand", "HEAD",
                                                   "Scan [1]"}
    assert "ACC-1" in values(results, "AccessionNumber")


def test_lone_asterisk_is_universal(services: Services) -> None:
    assert len(patients(services, PatientName="*")) == 5
    # ...even for a key with an empty value (P5 has no birth date).
    assert len(patients(services, PatientName="*", PatientBirthDate="")) == 5


def test_single_value_matching(services: Services, corpus: Corpus) -> None:
    assert patients(services, PatientID="PID-002") == {"PID-002"}
    assert patients(services, PatientSex="F") == {"PID-002", "A%1"}
    assert studies(services, corpus, AccessionNumber="ACC-2") == {"S2"}
    assert studies(services, corpus, StudyDate="20240110") == {"S1"}
    assert studies(services, corpus, StudyInstanceUID=corpus.study["S3"]) == {"S3"}


def test_single_value_text_matching_is_case_sensitive(services: Services, corpus: Corpus) -> None:
    assert studies(services, corpus, StudyDescription="Head") == {"S1"}
    assert studies(services, corpus, StudyDescription="HEAD") == {"S5"}
    assert studies(services, corpus, StudyDescription="head") == set()


def test_wildcard_text_matching_is_case_sensitive(services: Services, corpus: Corpus) -> None:
    assert studies(services, corpus, StudyDescription="H*") == {"S1", "S4", "S5"}
    assert studies(services, corpus, StudyDescription="*ead") == {"S1"}
    assert studies(services, corpus, StudyDescription="*EAD") == {"S5"}
    assert studies(services, corpus, StudyDescription="h*") == set()
    assert studies(services, corpus, StudyDescription="?ead") == {"S1"}
    assert studies(services, corpus, StudyDescription="K?ee") == {"S3"}
    assert studies(services, corpus, StudyDescription="*e*") == {"S1", "S2", "S3"}


@pytest.mark.parametrize(("pattern", "expected"), [
    ("müll*", {"PID-001"}),
    ("MÜLL*", {"PID-001"}),
    ("m?ller^j?rgen", {"PID-001"}),
    ("müller^jürgen", {"PID-001"}),
    ("*josé", {"PID-002"}),
    ("?ÚÑEZ*", {"PID-002"}),
    ("ñúñez^josé", {"PID-002"}),
    ("王*", {"A_1"}),
    ("*小明", {"A_1"}),
    ("*^J*", {"PID-001", "PID-002", "AB1"}),
    ("smith^john", {"AB1"}),
    ("o'brien*", {"A%1"}),
    ("Mueller*", set()),
])
def test_person_name_matching_is_case_insensitive(
    services: Services, pattern: str, expected: set[str]
) -> None:
    assert patients(services, SpecificCharacterSet="ISO_IR 192", PatientName=pattern) == expected


def test_name_query_encoded_in_latin1_matches(services: Services) -> None:
    """An identifier received in ISO_IR 100 is decoded before matching."""
    query = ident("PATIENT", SpecificCharacterSet="ISO_IR 100", PatientName="müll*",
                  PatientID="")
    raw, decoded = round_trip(query)
    assert "müll*".encode("latin-1") in raw
    results = list(services.archive.find(decoded, Root.PATIENT))
    assert [r.PatientID for r in results] == ["PID-001"]
    assert str(results[0].PatientName) == MULLER


@pytest.mark.parametrize(("value", "expected"), [
    ("20240101-20240331", {"S1", "S2"}),
    ("20240110-20240110", {"S1"}),
    ("20240301-", {"S2", "S4"}),
    ("-20231231", {"S3", "S6"}),
    ("19000101-", {"S1", "S2", "S3", "S4", "S6"}),
    ("20250101-", set()),
])
def test_study_date_ranges(services: Services, corpus: Corpus, value: str,
                           expected: set[str]) -> None:
    assert studies(services, corpus, StudyDate=value) == expected


def test_other_ranges(services: Services, corpus: Corpus) -> None:
    assert patients(services, PatientBirthDate="19700101-19891231") == {"PID-002", "A_1"}
    assert patients(services, PatientBirthDate="-19700101") == {"PID-001"}
    assert studies(services, corpus, StudyTime="1000-1100") == {"S1"}
    assert studies(services, corpus, StudyTime="-0959") == {"S2", "S3", "S4", "S5", "S6"}


def test_empty_range_is_a_bad_query(services: Services) -> None:
    identifier = ident("STUDY", StudyInstanceUID="")
    # "-" is no valid DA value: pydicom would warn if it were set the usual way.
    identifier[Tag("StudyDate")] = DataElement(Tag("StudyDate"), "DA", "-",
                                               validation_mode=config.IGNORE)
    with pytest.raises(BadQuery):
        list(services.archive.find(identifier, Root.STUDY))


def test_uid_list_matching(services: Services, corpus: Corpus) -> None:
    uids = [corpus.study["S1"], corpus.study["S3"]]
    assert studies(services, corpus, StudyInstanceUID=uids) == {"S1", "S3"}
    # A list given as one backslash-joined string is the same query.
    assert studies(services, corpus, StudyInstanceUID="\\".join(uids)) == {"S1", "S3"}
    wanted = [corpus.sops["S1-CT"][0], corpus.sops["S2-CT"][1], "1.2.3.999"]
    results = find(services, "IMAGE", Root.STUDY, SOPInstanceUID=wanted)
    assert {r.SOPInstanceUID for r in results} == set(wanted[:2])
    series = [corpus.series["S1-MR"], corpus.series["S4-DX"]]
    results = find(services, "SERIES", Root.STUDY, SeriesInstanceUID=series, Modality="")
    assert values(results, "Modality") == {"MR", "DX"}


def test_modalities_in_study(services: Services, corpus: Corpus) -> None:
    assert studies(services, corpus, ModalitiesInStudy=["CT", "MR"]) == {"S1", "S2", "S3", "S5",
                                                                     "S6"}
    assert studies(services, corpus, ModalitiesInStudy="CT\\MR") == {"S1", "S2", "S3", "S5", "S6"}
    assert studies(services, corpus, ModalitiesInStudy="MR") == {"S1", "S3"}
    assert studies(services, corpus, ModalitiesInStudy="DX") == {"S4"}
    assert studies(services, corpus, ModalitiesInStudy="US") == set()
    # The matched study returns all its modalities, not only the requested one.
    results = find(services, "STUDY", Root.STUDY, StudyInstanceUID=corpus.study["S1"],
                   ModalitiesInStudy="MR")
    assert list(results[0].ModalitiesInStudy) == ["CT", "MR"]


def test_modalities_in_study_at_series_level(services: Services, corpus: Corpus) -> None:
    results = find(services, "SERIES", Root.STUDY, ModalitiesInStudy="MR", SeriesInstanceUID="",
                   Modality="")
    assert {r.SeriesInstanceUID for r in results} == {
        corpus.series["S1-CT"], corpus.series["S1-MR"], corpus.series["S3-MR"]}


def test_combined_keys_are_anded(services: Services, corpus: Corpus) -> None:
    assert studies(services, corpus, PatientID="PID-001", StudyDate="20240201-") == {"S2"}
    assert studies(services, corpus, PatientName="müll*", ModalitiesInStudy="MR") == {"S1"}
    assert studies(services, corpus, PatientID="PID-002", StudyDescription="Head") == set()


@pytest.mark.parametrize(("pattern", "expected"), [
    ("A%1", {"A%1"}),
    ("A_1", {"A_1"}),
    ("A_*", {"A_1"}),
    ("A%*", {"A%1"}),
    ("*%1", {"A%1"}),
    ("*_1", {"A_1"}),
    ("A?1", {"A_1", "AB1", "A%1"}),
    ("A*1", {"A_1", "AB1", "A%1"}),
    ("A!*", set()),
    ("%", set()),
    ("_*", set()),
])
def test_like_metacharacters_are_literal(services: Services, pattern: str,
                                         expected: set[str]) -> None:
    assert patients(services, PatientID=pattern) == expected


@pytest.mark.parametrize("pattern", ["Scan [1]", "*[1]", "Scan [?]", "Scan ?1]", "*[*"])
def test_brackets_are_literal(services: Services, corpus: Corpus, pattern: str) -> None:
    assert studies(services, corpus, StudyDescription=pattern) == {"S6"}


# -- return keys -------------------------------------------------------------------------


def test_only_requested_keys_are_returned(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", StudyInstanceUID=corpus.study["S1"], PatientID="")
    assert len(results) == 1
    assert {e.keyword for e in results[0]} == {"QueryRetrieveLevel", "RetrieveAETitle",
                                               "StudyInstanceUID", "PatientID"}
    assert results[0].RetrieveAETitle == services.settings.ae_title
    assert results[0].PatientID == "PID-001"


def test_unsupported_keys_come_back_empty(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", StudyInstanceUID=corpus.study["S1"], PatientWeight="70",
                   OtherPatientIDs="", SOPInstanceUID="", SeriesDescription="T1")
    # Unsupported keys and keys below the level do not restrict the match...
    assert len(results) == 1
    r = results[0]
    # ...and are returned without a value.
    for keyword in ("PatientWeight", "OtherPatientIDs", "SOPInstanceUID", "SeriesDescription"):
        assert keyword in r
        assert r[keyword].value in (None, "", b"")
    assert r.StudyInstanceUID == corpus.study["S1"]


def test_counters_are_returned_never_matched(services: Services, corpus: Corpus) -> None:
    results = find(services, "STUDY", Root.STUDY, StudyInstanceUID="",
                   NumberOfStudyRelatedInstances="99")
    assert len(results) == 6
    by_uid = {r.StudyInstanceUID: r.NumberOfStudyRelatedInstances for r in results}
    assert by_uid == {corpus.study[s]: len(sops) for s, sops in corpus.study_sops.items()}


# -- character sets ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [MULLER, NUNEZ, WANG])
def test_non_ascii_names_round_trip(services: Services, name: str) -> None:
    results = find(services, "PATIENT", PatientName=name, PatientID="")
    assert len(results) == 1
    response = results[0]
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert str(response.PatientName) == name
    raw, decoded = round_trip(response)
    assert name.encode("utf-8") in raw
    assert decoded.SpecificCharacterSet == "ISO_IR 192"
    assert str(decoded.PatientName) == name


def test_ascii_response_needs_no_character_set(services: Services) -> None:
    results = find(services, "PATIENT", PatientID="AB1", PatientName="")
    assert str(results[0].PatientName) == "Smith^John"
    assert results[0].get("SpecificCharacterSet") in (None, "", "ISO_IR 6", "ISO_IR 192")


def test_names_are_stored_decoded(services: Services) -> None:
    results = find(services, "PATIENT", PatientID="", PatientName="")
    assert {str(r.PatientName) for r in results} == {MULLER, NUNEZ, WANG, "Smith^John",
                                                     "O'Brien^Pat"}


# -- retrieve ----------------------------------------------------------------------------


def _retrieved(services: Services, root: Root, level: str, **keys: Any) -> list[str]:
    items = services.archive.retrieve(ident(level, **keys), root)
    for item in items:
        assert services.store.exists(item.key)
        with services.store.open(item.key) as fh:
            header = dcmread(fh, stop_before_pixels=True)
        assert header.SOPInstanceUID == item.sop_uid
        assert header.SOPClassUID == item.sop_class
        assert header.file_meta.TransferSyntaxUID == item.transfer_syntax
    return [item.sop_uid for item in items]


@pytest.mark.parametrize("root", [Root.PATIENT, Root.STUDY])
def test_retrieve_study(services: Services, corpus: Corpus, root: Root) -> None:
    sops = _retrieved(services, root, "STUDY", StudyInstanceUID=corpus.study["S1"])
    assert len(sops) == 5
    assert set(sops) == corpus.study_sops["S1"]
    two = [corpus.study["S3"], corpus.study["S4"]]
    sops = _retrieved(services, root, "STUDY", StudyInstanceUID=two)
    assert sorted(sops) == sorted(corpus.study_sops["S3"] | corpus.study_sops["S4"])


def test_retrieve_series(services: Services, corpus: Corpus) -> None:
    sops = _retrieved(services, Root.STUDY, "SERIES", StudyInstanceUID=corpus.study["S1"],
                      SeriesInstanceUID=corpus.series["S1-MR"])
    assert sorted(sops) == sorted(corpus.sops["S1-MR"])


def test_retrieve_images(services: Services, corpus: Corpus) -> None:
    wanted = [corpus.sops["S1-CT"][1], corpus.sops["S2-CT"][0]]
    sops = _retrieved(services, Root.STUDY, "IMAGE", SOPInstanceUID=wanted)
    assert sorted(sops) == sorted(wanted)
    assert _retrieved(services, Root.STUDY, "IMAGE", SOPInstanceUID="1.2.3.999") == []


def test_retrieve_patient(services: Services, corpus: Corpus) -> None:
    sops = _retrieved(services, Root.PATIENT, "PATIENT", PatientID="PID-001")
    assert len(sops) == 7
    assert set(sops) == corpus.patient_sops["P1"]


def test_retrieve_is_in_series_then_instance_order(services: Services, corpus: Corpus) -> None:
    sops = _retrieved(services, Root.STUDY, "STUDY", StudyInstanceUID=corpus.study["S1"])
    assert sops == corpus.sops["S1-CT"] + corpus.sops["S1-MR"]
