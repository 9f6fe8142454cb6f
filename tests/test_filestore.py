"""The file store's read verbs: open, size, read_range, stream and reader, by key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.filestore import FileStore, ShortFile

DATA = bytes(range(256)) * 64 + b"tail"  # 16388 bytes


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "objects", tmp_path / "staging", durable=False)


@pytest.fixture
def key(store: FileStore) -> str:
    key, size = store.put([DATA[:1000], memoryview(DATA)[1000:]])
    assert size == len(DATA)
    return key


def test_open_size_and_read_range(store: FileStore, key: str) -> None:
    with store.open(key) as fh:
        assert fh.read() == DATA
    assert store.size(key) == len(DATA)
    assert store.read_range(key, 0, 10) == DATA[:10]
    assert store.read_range(key, 5000, 3000) == DATA[5000:8000]
    assert store.read_range(key, len(DATA) - 4, 4) == b"tail"
    assert store.read_range(key, 7, 0) == b""


def test_reading_past_the_end_is_a_short_file(store: FileStore, key: str) -> None:
    with pytest.raises(ShortFile):
        store.read_range(key, len(DATA) - 2, 3)
    with pytest.raises(ShortFile):
        list(store.stream(key, 100, len(DATA)))
    assert issubclass(ShortFile, OSError)  # callers that catch OSError still do


def test_stream_yields_the_range_in_chunks(store: FileStore, key: str) -> None:
    chunks = list(store.stream(key, chunk=4096))
    assert b"".join(chunks) == DATA
    assert max(len(c) for c in chunks) == 4096
    assert b"".join(store.stream(key, 10, 5000, chunk=1000)) == DATA[10:5010]
    assert b"".join(store.stream(key, 16000)) == DATA[16000:]
    assert list(store.stream(key, 3, 0)) == []


def test_reader_fills_buffers_in_place(store: FileStore, key: str) -> None:
    buffer = bytearray(6000)
    with store.reader(key) as reader:
        reader.readinto(memoryview(buffer)[1000:], 300)
        assert bytes(buffer[1000:]) == DATA[300:5300]
        assert buffer[:1000] == bytes(1000)
        # The page cache holds a file just written: whatever it gives is the right bytes.
        view = memoryview(bytearray(4000))
        got = reader.readinto_cached(view, 2000)
        assert 0 <= got <= 4000
        assert bytes(view[:got]) == DATA[2000:2000 + got]
        with pytest.raises(ShortFile):
            reader.readinto(memoryview(bytearray(10)), len(DATA) - 5)
    reader.close()  # idempotent


def test_a_file_cut_short_after_the_plan_is_an_error(store: FileStore, key: str) -> None:
    os.truncate(store.path(key), 100)
    with store.reader(key) as reader, pytest.raises(ShortFile):
        reader.readinto(memoryview(bytearray(200)), 0)


def test_missing_and_malformed_keys(store: FileStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.open("ABSENT0000000000")
    with pytest.raises(FileNotFoundError):
        store.reader("ABSENT0000000000")
    with pytest.raises(OSError):
        store.size("ABSENT0000000000")
    for bad in ("", "../x", "a/b", "ÄÖ"):
        with pytest.raises(ValueError):
            store.open(bad)
        with pytest.raises(ValueError):
            store.read_range(bad, 0, 1)
