"""Absolute paths of the system DICOM tools the tests use as real peers.

Always call dcmtk by absolute path: pynetdicom installs console scripts named
``storescu``, ``findscu``, ``getscu``, ``movescu``, ``echoscu`` and ``storescp``
into the virtualenv, and with the venv on PATH they shadow dcmtk's tools of the
same names (different flags, different code).
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_BIN = Path("/usr/bin")


class MissingSystemToolError(RuntimeError):
    """A system tool the tests need is not installed."""


def _system_tool(name: str, package: str) -> str:
    if not name or "/" in name:
        raise ValueError(f"expected a bare tool name, got {name!r}")
    path = SYSTEM_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingSystemToolError(
            f"{path} not found: install the Debian package {package!r} "
            f"(run scripts/install-system-deps, or apt-get install {package})"
        )
    return str(path)


def dcmtk(name: str) -> str:
    """Absolute path of dcmtk's ``name`` (e.g. ``"storescu"``), from the ``dcmtk`` package."""
    return _system_tool(name, "dcmtk")


def dicom3tools(name: str) -> str:
    """Absolute path of dicom3tools' ``name`` (e.g. ``"dciodvfy"``)."""
    return _system_tool(name, "dicom3tools")
