"""Load and validate iepnode settings.

Precedence, lowest first: built-in defaults, the TOML file (``--config``),
environment variables (``IEPNODE_<NAME>``), command-line flags.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

#: AE titles: 1-16 characters of the default character repertoire, no backslash.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
DUPLICATE_POLICIES = ("keep", "replace")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""


@dataclass(frozen=True)
class Settings:
    """The node's settings.

    Attributes
    ----------
    data_dir : Path
        Root of everything the node writes: index, file store, file-sets, logs.
    ae_title : str
        The node's own AE title; associations calling another title are rejected.
    bind : str
        Address the DICOM and HTTP listeners bind to.
    dicom_port, http_port : int
        Listening ports; ``0`` picks a free ephemeral port (printed at start-up).
    database_url : str
        ``sqlite:///PATH`` (default, under ``data_dir``) or ``postgresql://...``.
    dicom_workers : int
        Number of SCP worker processes sharing the DICOM port (``SO_REUSEPORT``).
    max_pdu : int
        Largest P-DATA PDU the node accepts; larger PDUs mean fewer round trips.
    stable_age : float
        Seconds without a new instance after which a study is "stable" and its
        DICOMDIR file-set is (re)built.
    duplicate_policy : str
        ``keep`` (first copy wins, later copies acknowledged and discarded) or
        ``replace`` (the newest copy replaces the stored one).
    fsync : bool
        Flush files and directories to disk before acknowledging a C-STORE.
    log_level : str
        Python logging level name.
    """

    data_dir: Path = Path("data")
    ae_title: str = "IEPNODE"
    bind: str = "0.0.0.0"
    dicom_port: int = 11112
    http_port: int = 8080
    database_url: str = ""
    dicom_workers: int = 2
    max_pdu: int = 1 << 20
    stable_age: float = 60.0
    duplicate_policy: str = "keep"
    fsync: bool = True
    log_level: str = "INFO"
    config_file: Path | None = field(default=None, compare=False)

    @property
    def store_dir(self) -> Path:
        """Where received instances are kept, by generated key."""
        return self.data_dir / "objects"

    @property
    def fileset_dir(self) -> Path:
        """Where per-study DICOMDIR file-sets are built."""
        return self.data_dir / "filesets"

    @property
    def tmp_dir(self) -> Path:
        """Staging area on the same file system as the store (atomic renames)."""
        return self.data_dir / "tmp"

    @property
    def log_dir(self) -> Path:
        """Where the node's log file lives."""
        return self.data_dir / "logs"

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"


# TOML layout: section -> {toml key: Settings attribute}
_TOML_KEYS: dict[str, dict[str, str]] = {
    "node": {"data_dir": "data_dir", "log_level": "log_level"},
    "dicom": {
        "ae_title": "ae_title",
        "bind": "bind",
        "port": "dicom_port",
        "workers": "dicom_workers",
        "max_pdu": "max_pdu",
        "duplicate_policy": "duplicate_policy",
        "fsync": "fsync",
    },
    "http": {"bind": "bind", "port": "http_port"},
    "storage": {"database_url": "database_url", "stable_age": "stable_age"},
}


def _coerce(name: str, value: Any) -> Any:
    """Convert a raw value (TOML, env or CLI) to the type of setting ``name``."""
    types = {f.name: f.type for f in fields(Settings)}
    kind = types[name]
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        reason = str(exc) or "wrong type"
        raise ConfigError(f"setting {name!r}: cannot use {value!r} ({reason})") from exc


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in _TOML_KEYS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            if key not in _TOML_KEYS[section]:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
            values[_TOML_KEYS[section][key]] = value
    if "data_dir" in values:
        if not isinstance(values["data_dir"], str):
            raise ConfigError(f"{path}: data_dir must be a string, not {values['data_dir']!r}")
        data_dir = Path(values["data_dir"]).expanduser()
        values["data_dir"] = data_dir if data_dir.is_absolute() else path.parent / data_dir
    return values


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = f"IEPNODE_{f.name.upper()}"
        if key in environ and f.name != "config_file":
            values[f.name] = environ[key]
    return values


def _validate(s: Settings) -> Settings:
    if not _AE_TITLE.match(s.ae_title) or not s.ae_title.strip():
        raise ConfigError(f"ae_title {s.ae_title!r}: 1-16 printable characters, no backslash")
    for name in ("dicom_port", "http_port"):
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name} {port}: must be 0-65535")
    if s.dicom_workers < 1 or s.dicom_workers > 64:
        raise ConfigError(f"dicom_workers {s.dicom_workers}: must be 1-64")
    if s.max_pdu != 0 and s.max_pdu < 4096:
        raise ConfigError(f"max_pdu {s.max_pdu}: 0 (unlimited) or at least 4096")
    if s.stable_age < 0:
        raise ConfigError(f"stable_age {s.stable_age}: must not be negative")
    if s.duplicate_policy not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"duplicate_policy {s.duplicate_policy!r}: one of {', '.join(DUPLICATE_POLICIES)}"
        )
    url = s.resolved_database_url
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(f"database_url {url!r}: sqlite:///PATH or postgresql://...")
    return replace(s, ae_title=s.ae_title.strip(), data_dir=s.data_dir.resolve())


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build validated settings from defaults, a TOML file, env and overrides.

    Parameters
    ----------
    config_file : Path or str, optional
        A TOML file (see ``config/iepnode.example.toml``).
    overrides : dict, optional
        Values from command-line flags; ``None`` values are ignored.
    environ : dict, optional
        The environment to read ``IEPNODE_*`` variables from (default ``os.environ``).

    Returns
    -------
    Settings
        The frozen, validated settings.

    Raises
    ------
    ConfigError
        If a value is malformed or out of range.
    """
    values: dict[str, Any] = {}
    env = dict(os.environ if environ is None else environ)
    if config_file is None and env.get("IEPNODE_CONFIG"):
        config_file = env["IEPNODE_CONFIG"]
    if config_file is not None:
        values.update(_from_toml(Path(config_file)))
    values.update(_from_env(env))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    if config_file is not None:
        coerced["config_file"] = Path(config_file)
    return _validate(Settings(**coerced))
