"""Settings for in-process tests: a portal of "St Elsewhere" in a test's ``tmp_path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config import Settings, load_settings


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with the data folder under ``tmp_path``, no fsync, a public URL.

    Parameters
    ----------
    tmp_path : Path
        The test's folder; the data folder is ``tmp_path / "data"``.
    **overrides : Any
        Settings to add or change (flat keys, as ``load_settings`` takes them).

    Returns
    -------
    Settings
        Validated settings, the environment ignored.
    """
    values = {"data_dir": tmp_path / "data", "institution": "St Elsewhere", "fsync": False,
              "public_url": "https://portal.example", **overrides}
    return load_settings(overrides=values, environ={})
