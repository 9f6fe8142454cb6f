"""The zip byte loop behind the domain: a package's bytes read through the file store."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from iepnode.sharing.download_stream import BATCH, package_bytes
from iepnode.sharing.package import Package
from iepnode.sharing.zipstream import FileSlice, Member, ZipLayout, file_crc32, iter_bytes
from storage.filestore import FileStore


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "objects", tmp_path / "staging", durable=False)


def _package(store: FileStore, sizes: list[int]) -> tuple[Package, dict[str, bytes]]:
    members = [Member.of_bytes("README.TXT", b"read me\n")]
    contents = {"README.TXT": b"read me\n"}
    for number, size in enumerate(sizes):
        data = os.urandom(size)
        key, _ = store.put([data])
        name = f"DICOM/IM{number:06d}"
        path = store.path(key)
        members.append(Member(name, FileSlice(path, 0, size, key), file_crc32(path)))
        contents[name] = data
    layout = ZipLayout(members, 1_700_000_000.0)
    return Package(layout, "etag", "X.zip", len(sizes), (), ""), contents


async def _collect(store: FileStore, package: Package, start: int = 0,
                   stop: int | None = None) -> list[bytearray]:
    return [chunk async for chunk in package_bytes(store, package, start, stop)]


async def test_the_bytes_are_the_zip_and_go_out_in_batches(store: FileStore) -> None:
    package, contents = _package(store, [10, BATCH + 5, 3 * BATCH, 0, 7])
    chunks = await _collect(store, package)
    data = b"".join(chunks)
    assert data == b"".join(iter_bytes(package.layout)) and len(data) == package.size
    assert max(len(c) for c in chunks) <= 2 * BATCH
    assert len(chunks) <= 8  # headers ride with the data after them
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert {n: archive.read(n) for n in archive.namelist()} == contents


async def test_any_range_is_the_same_bytes(store: FileStore) -> None:
    package, _ = _package(store, [1000, BATCH + 17, 3])
    whole = b"".join(iter_bytes(package.layout))
    for start, stop in [(0, 1), (5, 900), (100, BATCH + 300), (package.size - 10, package.size),
                        (3, 3)]:
        assert b"".join(await _collect(store, package, start, stop)) == whole[start:stop]


async def test_a_file_cut_short_since_the_plan_is_an_error(store: FileStore) -> None:
    package, _ = _package(store, [5000, 5000])
    slices = [m.source for m in package.layout.members if isinstance(m.source, FileSlice)]
    os.truncate(slices[1].path, 10)
    with pytest.raises(OSError):
        await _collect(store, package)
    os.unlink(slices[0].path)
    with pytest.raises(FileNotFoundError):
        await _collect(store, package)


async def test_a_slice_without_a_store_key_is_refused(store: FileStore, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(b"x" * 10)
    layout = ZipLayout([Member("F", FileSlice(loose, 0, 10), file_crc32(loose))], 0.0)
    with pytest.raises(ValueError):
        await _collect(store, Package(layout, "e", "F.zip", 1, (), ""))
