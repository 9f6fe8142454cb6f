"""Per-request memory of the real ``iepnode serve`` (issue 13, amplification).

The node runs as a subprocess with one HTTP process, on ephemeral loopback ports.
Its HTTP serving process is found by the socket listening on the HTTP port (see
``tests/support/memory.py``) and its peak resident set (``VmHWM``) is measured
around each request, after a warm-up of the same kind of request on small data
(so imports and caches are not counted).

Bounds, and why:

* a frame list over the cap: refused before anything is read: under 16 MiB (the
  noise of answering any request);
* a cap-sized frame list of a 2 MiB frame (100 x 2 MiB = 200 MiB of frames), the
  bulk data of a 30-frame 60 MiB instance, the retrieve and the rendered images of a
  41-instance study of 2 MiB slices: under 64 MiB. A streamed response holds one
  frame (2 MiB) or one 1 MiB block, plus, for rendering, at most two decodes of one
  1024x1024 frame at a time (each ~25 MiB of arrays: values, float window, uint8,
  PIL image, JPEG); the rest is allocator and socket-buffer slack. Building the
  bodies in memory (as before) costs the whole body at least once: 200 to 400 MiB;
* an upload zip of 11 MB holding one ~400 MiB DICOM entry, inspected after its last
  chunk: under 64 MiB (the entry goes through a temporary file in 1 MiB blocks and is
  checked from a mapping whose pages are let go behind the check); read into memory
  (as before) it costs at least the entry, 400 MiB;
* a 60 MiB PDF uploaded as a file of its own: under 16 MiB (its last 2 KiB are
  checked); read whole (as before) it costs 60 MiB.
"""

from __future__ import annotations

import io
import re
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests import data_factory as factory
from tests.support.memory import PeakGrowth, serving_pids
from tests.support.node import RunningNode, run_cli, running_node
from tests.test_dicomweb import shown
from tests.test_download import http_browser, outbox_text, sign_in

MIB = 1 << 20
#: Growth allowed for work that is refused before it starts.
NOTHING = 16
#: Growth allowed for a streamed response or an inspection (see the module docstring).
BOUND = 64
ANY_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P1", "PatientBirthDate": "19800214",
           "PatientSex": "F"}


def serving(node: RunningNode) -> list[int]:
    pids = serving_pids(node.process.pid, node.http_port)
    assert pids, "no process of the node listens on its HTTP port"
    return pids


async def drain(response: aiohttp.ClientResponse) -> int:
    """Read a body to its end without keeping it; return its size."""
    size = 0
    async for block in response.content.iter_chunked(MIB):
        size += len(block)
    return size


# -- DICOMweb --------------------------------------------------------------------------


def large_study(folder: Path) -> tuple[str, list[Path]]:
    """40 slices of 1024x1024 16-bit (2 MiB each) and a 30-frame instance of them."""
    slices = factory.make_ct_series(folder / "slices", 40, rows=1024, columns=1024, **PATIENT)
    first = dcmread(slices[0])
    multi = factory.make_ct_series(folder / "multi", 1, rows=1024, columns=1024, like=first,
                                   NumberOfFrames=30, PixelData=first.PixelData * 30)
    return str(first.StudyInstanceUID), [*slices, *multi]


async def open_dicomweb(node: RunningNode, study_uids: list[str]) -> tuple[str, str]:
    """Share the studies, sign in from the mail, get a DICOMweb token: (base URL, token)."""
    args = [a for uid in study_uids for a in ("--study", uid)]
    public_id = node.cli("transfer", "create", *args, "--to", "pat@example.org",
                         "--otp-mobile", "+447700900123").stdout.strip()
    link = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(node.data_dir, "pat@example.org"))
    assert link
    async with http_browser(node.http_port) as browser:
        await sign_in(browser, node.data_dir, link.group(1))
        page = await browser.page(f"/transactions/{public_id}")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        response = await browser.post(f"/transactions/{public_id}/dicomweb-token",
                                      data={"csrf": csrf})
        token = shown(await response.text(), "dicomweb-token")
    return f"http://127.0.0.1:{node.http_port}/dicomweb/t/{public_id}", token


async def test_dicomweb_responses_stay_within_one_part(tmp_path: Path) -> None:
    small = factory.make_ct_series(tmp_path / "small", 2, **PATIENT)
    small_uid = str(dcmread(small[0]).StudyInstanceUID)
    study_uid, files = large_study(tmp_path / "large")
    with running_node(tmp_path / "node") as node:
        node.cli("import", str(tmp_path / "small"))
        node.cli("import", str(tmp_path / "large"))
        base, token = await open_dicomweb(node, [small_uid, study_uid])
        headers = {"Authorization": f"Bearer {token}"}
        pids = serving(node)

        def urls(study: str, path: Path) -> tuple[str, str]:
            ds = dcmread(path, stop_before_pixels=True)
            return (f"{base}/studies/{study}",
                    f"{base}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/"
                    f"{ds.SOPInstanceUID}")

        small_study, small_one = urls(small_uid, small[0])
        large, slice_one = urls(study_uid, files[0])
        _, multi = urls(study_uid, files[-1])
        cap = ",".join(["1"] * 100)
        frames_of_multi = ",".join(str(1 + n % 30) for n in range(100))
        requests = {  # name: (warm-up URL, measured URL, Accept, expected status)
            "frames over the cap": (f"{small_one}/frames/1", f"{slice_one}/frames/"
                                    + ",".join(["1"] * 150), ANY_FRAMES, 400),
            "100 x a 2 MiB frame": (f"{small_one}/frames/1,1", f"{slice_one}/frames/{cap}",
                                    ANY_FRAMES, 200),
            "100 frames of a 30-frame instance": (f"{small_one}/frames/1",
                                                  f"{multi}/frames/{frames_of_multi}",
                                                  ANY_FRAMES, 200),
            "bulk data of 60 MiB": (f"{small_one}/bulkdata/7FE00010",
                                    f"{multi}/bulkdata/7FE00010", "", 200),
            "retrieve a 140 MiB study": (small_study, large, "", 200),
            "metadata": (f"{small_study}/metadata", f"{large}/metadata", "", 200),
            "rendered study": (f"{small_study}/rendered", f"{large}/rendered", "", 200),
        }
        measured: dict[str, tuple[float, int]] = {}
        async with aiohttp.ClientSession(headers=headers) as session:
            for name, (warm, url, accept, status) in requests.items():
                extra = {"Accept": accept} if accept else {}
                async with session.get(warm, headers=extra) as response:
                    assert response.status == 200, (name, await response.text())
                    await drain(response)
                with PeakGrowth(pids) as growth:
                    async with session.get(url, headers=extra) as response:
                        size = await drain(response)
                        assert response.status == status, name
                measured[name] = (growth.mib, size)
                print(f"{name}: {size / MIB:.1f} MiB body, {growth}")
    assert measured["frames over the cap"][0] < NOTHING, measured
    assert measured["100 x a 2 MiB frame"][1] > 200 * MIB  # the frames were all sent
    assert measured["bulk data of 60 MiB"][1] > 60 * MIB
    assert measured["retrieve a 140 MiB study"][1] > 140 * MIB
    for name, (mib, _) in measured.items():
        assert mib < BOUND, (name, measured)


# -- upload inspection -----------------------------------------------------------------


def large_zip(path: Path, frames: int = 200) -> tuple[Path, int]:
    """A zip with one DICOM entry of ``frames`` 1024x1024 16-bit frames (2 MiB each).

    The pixels are sparse noise (1 byte in 176 random, the rest zero): it deflates
    about 36:1, under the 100:1 zip and 200:1 entry limits. Written straight into
    the zip a block at a time; returns the zip and the entry's size.
    """
    ds = Dataset()
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.StudyDate = "OT", "20240105"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    head = path.with_suffix(".head")
    ds.save_as(head, enforce_file_format=True)
    frame = 1024 * 1024 * 2
    length = frame * frames
    rng = np.random.default_rng(13)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive, \
            archive.open("CD/DICOM/IM000001", "w", force_zip64=True) as entry:
        entry.write(head.read_bytes())
        entry.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        for _ in range(frames):
            block = np.zeros(frame, dtype=np.uint8)
            where = rng.integers(0, frame, frame // 176)
            block[where] = rng.integers(1, 256, where.size, dtype=np.uint8)
            entry.write(block.tobytes())
    return path, head.stat().st_size + 12 + length


async def upload(node: RunningNode, public_id: str, browser: Any, name: str,
                 data: bytes) -> dict[str, Any]:
    """Announce a file and send it in 16 MiB chunks, as the page does; the last answer."""
    page = await browser.page(f"/transactions/{public_id}/upload")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    announced = await browser.post(f"/transactions/{public_id}/upload/files", data={
        "csrf": csrf, "name": name, "relpath": "", "size": str(len(data))})
    assert announced.status == 201, await announced.text()
    url = urllib.parse.urlsplit(announced.headers["Location"]).path
    answer: dict[str, Any] = {}
    for offset in range(0, len(data), 16 * MIB):
        chunk = io.BytesIO(data[offset:offset + 16 * MIB])
        response = await browser.request("PATCH", url, data=chunk,
                                          headers={"X-CSRF-Token": csrf,
                                                   "Upload-Offset": str(offset)})
        assert response.status == 200, await response.text()
        answer = await response.json()
    return answer


async def test_an_upload_zip_with_a_large_entry_is_inspected_in_bounded_memory(
        tmp_path: Path) -> None:
    zipped, entry_size = large_zip(tmp_path / "cd.zip")
    data = zipped.read_bytes()
    assert entry_size > 400 * MIB and len(data) < 16 * MIB
    warm = tmp_path / "warm.zip"
    with zipfile.ZipFile(warm, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(factory.make_ct_series(tmp_path / "ct", 1, **PATIENT)[0], "IM1")
    data_dir = tmp_path / "node"
    public_id = run_cli(data_dir, "request", "create", "--to", "pat@example.org",
                        "--otp-mobile", "+447700900123", "--last-name", "Doe",
                        "--first-name", "Jane", "--birth-date", "14/02/1980", "--sex", "F",
                        "--patient-id", "P1", "--reason", "CD from abroad").stdout.strip()
    with running_node(data_dir) as node:
        link = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        assert link
        async with http_browser(node.http_port) as browser:
            await sign_in(browser, data_dir, link.group(1))
            warmed = await upload(node, public_id, browser, "warm.zip", warm.read_bytes())
            assert (warmed["verdict"], warmed["objects"]) == ("zip", 1), warmed
            staging = sorted(p.name for p in (data_dir / "staging").rglob("*"))
            with PeakGrowth(serving(node)) as growth:
                answer = await upload(node, public_id, browser, "cd.zip", data)
            print(f"inspection of a {entry_size / MIB:.0f} MiB entry in a "
                  f"{len(data) / MIB:.1f} MiB zip: {growth}")
            # A 60 MiB PDF: its tail is checked, not the whole of it read.
            pdf = b"%PDF-1.4\n%" + b"x" * (60 * MIB) + b"\n" + factory.minimal_pdf()
            await upload(node, public_id, browser, "warm.pdf", factory.minimal_pdf())
            with PeakGrowth(serving(node)) as document:
                checked = await upload(node, public_id, browser, "letter.pdf", pdf)
            print(f"inspection of a {len(pdf) / MIB:.0f} MiB PDF: {document}")
    assert (answer["verdict"], answer["objects"]) == ("zip", 1), answer
    assert growth.mib < BOUND, str(growth)
    assert checked["verdict"] == "pdf", checked
    assert document.mib < NOTHING, str(document)
    # Nothing of the entry's temporary copy is left beside the staged files.
    after = sorted(p.name for p in (data_dir / "staging").rglob("*"))
    assert len(after) == len(staging) + 3 and set(staging) <= set(after)


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc (Linux)")
