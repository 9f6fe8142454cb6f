"""Settings: precedence, the example file, validation errors, paths relative to the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings
from config.settings import DUPLICATE_POLICIES

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "iepnode.example.toml"


def write_toml(directory: Path, text: str, name: str = "iepnode.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def defaults() -> Settings:
    """The built-in defaults, as ``load_settings`` validates them (data_dir resolved)."""
    base = Settings()
    return dataclasses.replace(base, data_dir=base.data_dir.resolve())


# -- precedence ------------------------------------------------------------------------


def test_no_sources_gives_the_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == defaults()
    assert settings.config_file is None
    assert settings.data_dir.is_absolute()


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
[dicom]
ae_title = "TOMLAE"
port = 1000
workers = 3
[http]
port = 2000
[storage]
stable_age = 5
""")
    environ = {"IEPNODE_AE_TITLE": "ENVAE", "IEPNODE_DICOM_PORT": "3000",
               "IEPNODE_DICOM_WORKERS": "4", "UNRELATED": "x"}
    overrides = {"dicom_port": 4000, "dicom_workers": None, "fsync": False}

    settings = load_settings(path, overrides, environ)

    assert settings.dicom_port == 4000  # override beats env beats TOML
    assert settings.ae_title == "ENVAE"  # env beats TOML
    assert settings.dicom_workers == 4  # a None override is ignored, env stays
    assert settings.http_port == 2000  # TOML beats default
    assert settings.stable_age == 5.0 and isinstance(settings.stable_age, float)
    assert settings.fsync is False  # override beats default
    assert settings.max_pdu == Settings.max_pdu  # untouched default
    assert settings.duplicate_policy == "keep"
    assert settings.config_file == path


def test_each_layer_alone(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[dicom]\nduplicate_policy = "replace"\n')
    assert load_settings(path, environ={}).duplicate_policy == "replace"
    env = {"IEPNODE_DUPLICATE_POLICY": "replace"}
    assert load_settings(environ=env).duplicate_policy == "replace"
    assert load_settings(overrides={"duplicate_policy": "replace"},
                         environ={}).duplicate_policy == "replace"


def test_env_names_the_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[http]\nport = 8181\n")
    settings = load_settings(environ={"IEPNODE_CONFIG": str(path)})
    assert settings.http_port == 8181
    assert settings.config_file == path


def test_explicit_config_file_beats_env_config_file(tmp_path: Path) -> None:
    env_file = write_toml(tmp_path / "a", "[http]\nport = 1111\n")
    flag_file = write_toml(tmp_path / "b", "[http]\nport = 2222\n")
    settings = load_settings(flag_file, environ={"IEPNODE_CONFIG": str(env_file)})
    assert settings.http_port == 2222


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_booleans(raw: str, expected: bool) -> None:
    assert load_settings(environ={"IEPNODE_FSYNC": raw}).fsync is expected


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dicom_port = 1  # type: ignore[misc]


def test_ae_title_is_stripped() -> None:
    assert load_settings(overrides={"ae_title": " NODE  "}, environ={}).ae_title == "NODE"


def test_derived_paths_and_default_database(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "d"}, environ={})
    assert settings.store_dir == tmp_path / "d" / "objects"
    assert settings.tmp_dir == tmp_path / "d" / "tmp"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'd' / 'index.sqlite3'}"
    url = "postgresql://u:p@db:5432/iep"
    assert load_settings(overrides={"database_url": url}, environ={}).resolved_database_url == url


# -- the example file --------------------------------------------------------------------


def test_example_file_equals_defaults_except_data_dir() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.data_dir == EXAMPLE.parent / "data"
    assert dataclasses.replace(settings, data_dir=defaults().data_dir) == defaults()
    assert settings.config_file == EXAMPLE


# -- data_dir relative to the file -------------------------------------------------------


def test_relative_data_dir_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path / "etc" / "iep", '[node]\ndata_dir = "../store"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(path, environ={}).data_dir == tmp_path / "etc" / "store"
    # A relative path to the config file itself works the same way.
    relative = Path("..") / "etc" / "iep" / "iepnode.toml"
    assert load_settings(relative, environ={}).data_dir == tmp_path / "etc" / "store"


def test_absolute_and_home_data_dir_in_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absolute = tmp_path / "abs"
    path = write_toml(tmp_path / "conf", f'[node]\ndata_dir = "{absolute}"\n')
    assert load_settings(path, environ={}).data_dir == absolute
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_toml(tmp_path / "conf", '[node]\ndata_dir = "~/iep"\n')
    assert load_settings(path, environ={}).data_dir == tmp_path / "home" / "iep"


def test_relative_data_dir_from_env_or_flag_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path / "conf", '[node]\ndata_dir = "fromfile"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path, environ={"IEPNODE_DATA_DIR": "fromenv"})
    assert settings.data_dir == tmp_path / "fromenv"
    settings = load_settings(path, {"data_dir": "fromflag"}, environ={})
    assert settings.data_dir == tmp_path / "fromflag"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("[nodes]\ndata_dir = 'x'\n", "unknown section [nodes]"),
    ("port = 104\n", "unknown section [port]"),
    ("[dicom]\naetitle = 'X'\n", "unknown key 'aetitle' in [dicom]"),
    ("[http]\nthreads = 2\n", "unknown key 'threads' in [http]"),
])
def test_unknown_section_or_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("title", ["A" * 17, "AB\\CD", "", "    ", "NÖDE", "TAB\tX"])
def test_bad_ae_title(title: str) -> None:
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(overrides={"ae_title": title}, environ={})


def test_ae_title_of_16_characters_is_fine() -> None:
    assert load_settings(overrides={"ae_title": "A" * 16}, environ={}).ae_title == "A" * 16


@pytest.mark.parametrize("toml_value", ["70000", "-1", '"abc"', "true", "104.5", "[104]"])
def test_bad_port_in_toml(tmp_path: Path, toml_value: str) -> None:
    path = write_toml(tmp_path, f"[dicom]\nport = {toml_value}\n")
    with pytest.raises(ConfigError, match="dicom_port"):
        load_settings(path, environ={})


@pytest.mark.parametrize("raw", ["65536", "-5", "http", "1e3", ""])
def test_bad_port_from_env(raw: str) -> None:
    with pytest.raises(ConfigError, match="http_port"):
        load_settings(environ={"IEPNODE_HTTP_PORT": raw})


def test_port_bounds_are_inclusive() -> None:
    settings = load_settings(overrides={"dicom_port": 0, "http_port": 65535}, environ={})
    assert (settings.dicom_port, settings.http_port) == (0, 65535)


def test_bad_duplicate_policy() -> None:
    with pytest.raises(ConfigError, match="duplicate_policy 'overwrite'") as info:
        load_settings(overrides={"duplicate_policy": "overwrite"}, environ={})
    for policy in DUPLICATE_POLICIES:
        assert policy in str(info.value)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:relative.db", "/var/lib/x.db",
                                 "postgresq://h/db"])
def test_bad_database_url(url: str) -> None:
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(overrides={"database_url": url}, environ={})


@pytest.mark.parametrize(("name", "value"), [
    ("dicom_workers", 0), ("dicom_workers", 65), ("http_workers", 0), ("max_pdu", 100),
    ("max_pdu", 0), ("max_pdu", 1 << 27), ("stable_age", -1),
    ("dicom_max_associations", 0), ("dicom_max_pending", 65),
    ("dicom_max_pending_per_address", 33), ("dicom_preassoc_timeout", 0.1),
    ("dicom_max_associate_rq", 1024),
    # -- hardening (issue 13): bad files --
    ("fileset_retry_seconds", 0), ("fileset_retry_seconds", 3601),
    ("fileset_retry_max_seconds", 8 * 86400),
    # -- hardening (issue 13): attachments --
    ("max_attachments", -1), ("max_attachments", 1001),
    # hardening (issue 13): limits
    ("password_hash_concurrency", 0), ("password_hash_concurrency", 17),
    ("password_hash_queue", -1), ("password_hash_queue", 1001),
    ("http_max_connections", 1), ("http_max_connections_per_address", 0),
    ("http_head_timeout", 0.1),
    # -- hardening (issue 13): dataset check --
    ("max_inflated_mb", 0), ("max_inflated_mb", 16385),
])
def test_other_out_of_range_values(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(overrides={name: value}, environ={})


def test_dicom_limits_from_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[dicom]\nmax_pending = 4\nmax_pending_per_address = 2\n"
                                "preassoc_timeout = 2.5\nmax_associate_rq = 32768\n"
                                "max_associations = 16\n")
    settings = load_settings(path, environ={})
    assert (settings.dicom_max_pending, settings.dicom_max_pending_per_address,
            settings.dicom_preassoc_timeout, settings.dicom_max_associate_rq,
            settings.dicom_max_associations) == (4, 2, 2.5, 32768, 16)


def test_bad_boolean_from_env() -> None:
    with pytest.raises(ConfigError, match="fsync"):
        load_settings(environ={"IEPNODE_FSYNC": "maybe"})


def test_non_toml_text_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "this is not = = toml\n[[[")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(path, environ={})


def test_binary_file_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM\x02\x00\x00\x00UL\x04\x00\xff\xfe\xfd")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(path, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_config_path_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, environ={})


def test_data_dir_of_the_wrong_type(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[node]\ndata_dir = 5\n")
    with pytest.raises(ConfigError, match="data_dir"):
        load_settings(path, environ={})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
