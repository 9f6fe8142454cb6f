"""The one seam between the upload protocol and the inspection/reconciliation of uploads.

The upload side (:mod:`iepnode.uploads`, :mod:`web.upload`) calls the two functions
here; the checks themselves (what a file is, which patients it holds, the whole
upload's review for staff) live in :mod:`iepnode.upload_intake` (helper branch
``reconcile``). Until that module is merged, files are left uninspected and Send
only marks the upload for staff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # merged from branch `reconcile`
    from iepnode import upload_intake as _intake  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - before the merge
    _intake = None


@dataclass(frozen=True)
class Inspection:
    """What the page shows for one finished file.

    ``verdict`` is the accepted kind (``dicom``, ``dicomdir``, ``zip``, ``pdf``,
    ``image``), ``skipped`` (with ``reason``), or "" when nothing inspected it.
    """

    verdict: str = ""
    reason: str = ""
    objects: int = 0
    detail: str = ""


def _field(result: Any, name: str, default: Any) -> Any:
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


def inspect(path: Path, display_name: str, relpath: str) -> Inspection:
    """Inspect a staged file that finished uploading (never raises for bad content)."""
    if _intake is None:
        return Inspection()
    result = _intake.inspect_staged_file(path, display_name, relpath)
    if hasattr(result, "to_dict"):
        detail = json.dumps(result.to_dict(), default=str)
    else:
        detail = json.dumps(_field(result, "detail", {}), default=str)
    return Inspection(str(_field(result, "verdict", _field(result, "kind", ""))),
                      str(_field(result, "reason", "")), int(_field(result, "objects", 0)),
                      detail)


def intake(upload_id: int) -> None:
    """Check a sent upload as a whole and put it before staff (see module docstring)."""
    if _intake is None or not hasattr(_intake, "intake"):
        return
    from storage.models import Upload

    _intake.intake(Upload.get_by_id(upload_id))
