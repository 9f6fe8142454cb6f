"""The zip layout: readable by Python's zipfile, Info-ZIP ``unzip`` and 7-Zip; any range.

Archives are written to disk and checked with the real tools (``unzip -t``,
``7z t``). ZIP64 is exercised twice: with the threshold lowered (fast, every
record type) and with a real member over 4 GiB (sparse files, marked slow).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from iepnode.sharing.zipstream import (
    CHUNK,
    FileSlice,
    Member,
    ZipLayout,
    file_crc32,
    iter_batches,
    iter_bytes,
)

ZERO = bytes(CHUNK)


def tool(name: str) -> str:
    path = shutil.which(name, path="/usr/bin")
    if path is None:
        pytest.fail(f"/usr/bin/{name} not found: run scripts/install-system-deps")
    return path


def check_with_tools(archive: Path) -> None:
    """``unzip -t`` and ``7z t`` accept the archive."""
    unzip = subprocess.run([tool("unzip"), "-t", str(archive)], capture_output=True, text=True,
                           timeout=600)
    assert unzip.returncode == 0, unzip.stdout + unzip.stderr
    assert "No errors detected" in unzip.stdout
    seven = subprocess.run([tool("7z"), "t", str(archive)], capture_output=True, text=True,
                           timeout=600)
    assert seven.returncode == 0, seven.stdout + seven.stderr
    assert "Everything is Ok" in seven.stdout
    assert "WARNING" not in seven.stdout.upper()


def write_sparse(layout: ZipLayout, path: Path) -> None:
    """Write the archive, leaving holes where it is all zeros (cheap multi-GiB archives)."""
    with open(path, "wb") as out:
        for chunk in iter_bytes(layout):
            if len(chunk) == CHUNK and chunk == ZERO:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate()


@pytest.fixture
def members(tmp_path: Path) -> list[Member]:
    data = tmp_path / "data.bin"
    data.write_bytes(random.Random(1).randbytes(3 * CHUNK + 12345))
    return [
        Member.of_bytes("DICOMDIR", b"D" * 777),
        Member.of_bytes("README.TXT", "Grüße\r\n".encode()),
        Member.of_bytes("EMPTY", b""),
        Member("DICOM/PT000000/ST000000/SE000000/IM000000",
               FileSlice(data, 0, data.stat().st_size), file_crc32(data)),
        Member("DICOM/PT000000/ST000000/SE000000/IM000001",
               FileSlice(data, 100, 5000), zlib.crc32(data.read_bytes()[100:5100])),
    ]


@pytest.mark.parametrize("limit", [None, 1000], ids=["plain", "zip64-forced"])
def test_archive_reads_back_with_every_tool(members: list[Member], tmp_path: Path,
                                            limit: int | None) -> None:
    layout = ZipLayout(members, 1_700_000_000.0,
                       **({"zip64_limit": limit} if limit else {}))
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"".join(iter_bytes(layout)))
    assert archive.stat().st_size == layout.size

    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == [m.name for m in members]
        for member in members:
            expected = (member.source if isinstance(member.source, bytes) else
                        member.source.path.read_bytes()[member.source.offset:
                                                        member.source.offset + member.size])
            assert zf.read(member.name) == expected
            info = zf.getinfo(member.name)
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == (2023, 11, 14, 22, 13, 20)
            assert info.flag_bits & 0x08 == 0  # no data descriptors
    check_with_tools(archive)
    if limit:
        raw = archive.read_bytes()
        assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator


def test_any_range_is_the_same_bytes(members: list[Member]) -> None:
    layout = ZipLayout(members, 1_700_000_000.0)
    whole = b"".join(iter_bytes(layout))
    rng = random.Random(5)
    edges = sorted({0, layout.size, *layout.entry_offsets, layout.central_directory_offset})
    cuts = [(a, b) for a in edges for b in edges if a <= b]
    cuts += [tuple(sorted((rng.randrange(layout.size + 1), rng.randrange(layout.size + 1))))
             for _ in range(300)]
    for start, stop in cuts:
        assert b"".join(iter_bytes(layout, start, stop)) == whole[start:stop], (start, stop)
        batches = list(iter_batches(layout, start, stop, 5000))
        assert b"".join(batches) == whole[start:stop], (start, stop)
        assert all(len(b) < 2 * 5000 for b in batches)  # one batch held at a time
    with pytest.raises(ValueError):
        list(layout.pieces(0, layout.size + 1))


def test_same_members_same_bytes(members: list[Member]) -> None:
    first = b"".join(iter_bytes(ZipLayout(members, 1_700_000_000.0)))
    second = b"".join(iter_bytes(ZipLayout(list(members), 1_700_000_000.0)))
    assert first == second


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../b", "a//b", "a\\b", "", "a/", "."])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        ZipLayout([Member.of_bytes(name, b"x")], 0.0)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        ZipLayout([Member.of_bytes("A", b"1"), Member.of_bytes("A", b"2")], 0.0)


def test_file_shorter_than_planned_fails_loudly(tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"0123456789")
    layout = ZipLayout([Member("F", FileSlice(data, 0, 10), file_crc32(data))], 0.0)
    data.write_bytes(b"01234")
    with pytest.raises(OSError):
        b"".join(iter_bytes(layout))


@pytest.mark.slow
def test_member_over_4_gib(tmp_path: Path) -> None:
    """A real ZIP64 member (sizes in the local header's extra field), on sparse files."""
    started = time.monotonic()
    big = tmp_path / "big.bin"
    size = (4 << 30) + 3 * CHUNK + 17
    with open(big, "wb") as fh:
        fh.truncate(size)
        fh.seek(size - 5)
        fh.write(b"tail!")
    crc = file_crc32(big)
    layout = ZipLayout([Member.of_bytes("DICOMDIR", b"dir"), Member("DICOM/BIG", FileSlice(
        big, 0, size), crc), Member.of_bytes("README.TXT", b"after the big one")],
                       1_700_000_000.0)
    archive = tmp_path / "big.zip"
    write_sparse(layout, archive)
    assert archive.stat().st_size == layout.size > 4 << 30
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("DICOM/BIG").file_size == size
        assert zf.read("README.TXT") == b"after the big one"  # found past the 4 GiB member
    check_with_tools(archive)  # both tools read every byte and check the CRCs
    tail = b"".join(iter_bytes(layout, layout.size - 200, layout.size))
    with open(archive, "rb") as fh:
        fh.seek(layout.size - 200)
        assert fh.read() == tail
    print(f"4 GiB member: {time.monotonic() - started:.1f} s")
