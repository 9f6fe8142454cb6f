"""Per-process bounds on heavy work (issue 13): frames decoded and upload files inspected
a few at a time, whatever the number of requests asking at once.

Real files, a real node in ``tmp_path``, real threads. The work itself is wrapped to
count how many threads are inside it at once; the bound is what is asserted. That a
thread does *not* get in is seen over a short grace period (0.5 s) once the allowed
number are inside: without the bound, every thread is inside well within it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from iepnode.uploads import staging as uploads
from iepnode.viewing import rendering
from iepnode.wiring import build_services
from tests import data_factory as factory
from tests.support.node import wait_for
from tests.test_recipient_web import make_settings
from tests.test_upload_web import make_request

GRACE = 0.5


class Gate:
    """Wraps a function: counts the threads inside it and holds them until opened."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.inside = 0
        self.peak = 0
        self.entered = 0
        self.lock = threading.Lock()
        self.opened = threading.Event()

    def __call__(self, *args: Any, **kw: Any) -> Any:
        with self.lock:
            self.inside += 1
            self.entered += 1
            self.peak = max(self.peak, self.inside)
        try:
            assert self.opened.wait(30)
            return self.real(*args, **kw)
        finally:
            with self.lock:
                self.inside -= 1

    def run(self, calls: list[Callable[[], Any]], allowed: int) -> list[Any]:
        """Start every call at once; check that only ``allowed`` get in; let them finish."""
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            wait_for(lambda: self.entered >= allowed, timeout=30, what=f"{allowed} inside")
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline and self.entered == allowed:
                time.sleep(0.02)  # a negative: give the others their chance to get in
            inside = self.entered
            self.opened.set()
            results = [f.result(60) for f in futures]
        assert inside == allowed, f"{inside} threads got in at once, {allowed} allowed"
        assert self.peak == allowed and self.entered == len(calls)
        return results


@pytest.fixture
def turns() -> Any:
    yield
    rendering.set_concurrency(rendering.RENDER_CONCURRENCY)


@pytest.mark.parametrize("allowed", [1, 2])
def test_frames_are_decoded_a_few_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            turns: Any, allowed: int) -> None:
    import pydicom.pixels

    build_services(make_settings(tmp_path, render_concurrency=allowed))  # applies the setting
    path = factory.bundled("CT_small.dcm")
    gate = Gate(pydicom.pixels.pixel_array)  # the decode (imported by each call)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", gate)
    calls: list[Callable[[], Any]] = [
        lambda: rendering.render_bytes(path, 0, media_type="image/png"),
        lambda: rendering.raw_frame(path, 0),
        lambda: rendering.decode_frame(path, 0),
        lambda: rendering.render(path, 0, size=8),
        lambda: rendering.render_bytes(path, 0, size=16)]
    results = gate.run(calls, allowed)
    assert results[0].startswith(b"\x89PNG") and results[2].values.shape == (128, 128)


def test_default_render_concurrency_is_two(tmp_path: Path, turns: Any) -> None:
    assert build_services(make_settings(tmp_path)).settings.render_concurrency == 2
    assert rendering._TURNS.limit == 2


@pytest.mark.parametrize("allowed", [1, 2])
def test_upload_files_are_inspected_a_few_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allowed: int) -> None:
    services = build_services(make_settings(tmp_path, upload_inspections=allowed))
    request, _ = make_request()
    service = services.uploads
    data = factory.make_ct_series(tmp_path / "ct", 1, PatientID="CD-1")[0].read_bytes()
    chunks = []
    for number in range(4):
        file = service.add_file(request.recipient_id, request.public_id, f"IM{number}", "",
                                len(data))
        chunk = service.open_chunk(request.recipient_id, request.public_id, file.id, 0)
        chunk.write(data)
        chunks.append(chunk)
    gate = Gate(uploads.inspect_staged_file)
    monkeypatch.setattr(uploads, "inspect_staged_file", gate)
    finished = gate.run([lambda c=c: service.close_chunk(c) for c in chunks], allowed)
    assert [(f.verdict, f.objects) for f in finished] == [("dicom", 1)] * 4
