"""Shared helpers for the bench scripts: the synthetic CT generator and file groups.

The generator is ``../shared/bench/make_ct.py`` relative to the repository root
(CI clones the repository with ``shared/`` beside it). It is run as a
subprocess, never copied or imported, so every study it writes has new UIDs.
``IEPNODE_BENCH_MAKE_CT`` overrides its location.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import PeerError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAKE_CT = REPO_ROOT.parent / "shared" / "bench" / "make_ct.py"


#: A bench step failed (peer did not start, send failed, counts differ...): the peer
#: harness's own error, so one ``except BenchError`` catches both.
BenchError = PeerError


@dataclass(frozen=True)
class Study:
    """A synthetic study on disk."""

    directory: Path
    files: tuple[Path, ...]
    study_uid: str
    patient_id: str

    def __len__(self) -> int:
        return len(self.files)


def make_ct_path() -> Path:
    path = Path(os.environ.get("IEPNODE_BENCH_MAKE_CT") or DEFAULT_MAKE_CT)
    if not path.is_file():
        raise BenchError(
            f"synthetic CT generator not found at {path} (expected ../shared/bench/make_ct.py "
            "relative to the repository root; set IEPNODE_BENCH_MAKE_CT to override)"
        )
    return path


def make_study(out_dir: Path, n: int, patient_id: str, study_uid: str | None = None) -> Study:
    """Write a fresh ``n``-slice CT study (new Series/SOP Instance UIDs) into ``out_dir``."""
    args = [sys.executable, str(make_ct_path()), str(out_dir), str(n), patient_id]
    if study_uid:
        args.append(study_uid)
    try:
        res = subprocess.run(
            args, capture_output=True, text=True, timeout=60 + 0.2 * n, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"make_ct.py timed out writing {n} slices") from exc
    if res.returncode != 0:
        raise BenchError(f"make_ct.py failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    files = tuple(sorted(Path(out_dir).glob("*.dcm")))
    if len(files) != n:
        raise BenchError(f"make_ct.py wrote {len(files)} files into {out_dir}, expected {n}")
    uid = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else (study_uid or "")
    return Study(Path(out_dir), files, uid, patient_id)


def split(items: list | tuple, k: int) -> list[list]:
    """Split ``items`` into ``k`` contiguous groups of near-equal size (no empty groups)."""
    items = list(items)
    k = max(1, min(k, len(items)))
    q, r = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
