"""Microbenchmark of the C-STORE dataset check.

:func:`iepnode.archive.dataset_check.check_dataset`.

Times, per dataset, the structural check and the header parse that ingest does on
every received instance (:func:`iepnode.archive.ingest.parse_header`), on:

* ``ct-slice``: one 512x512 16-bit CT slice from ``../shared/bench/make_ct.py``;
* ``enhanced-ct-200``: a 200-frame 512x512 CT with per-frame functional groups
  (800 items, 600 nested sequences), native;
* ``jpeg-400``: 400 encapsulated frames of 20 KB (synthetic fragments), explicit VR LE;
* ``deflated-sr``: a deflated structured report with 2,000 content items.

    python -m bench.dataset_check [--repeat 2000] [--json PATH]

Prints one line per dataset: median microseconds of the check, the header parse,
and the check's share of both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from bench._ct import make_study
from iepnode.archive.dataset_check import check_dataset
from iepnode.archive.ingest import parse_file_meta, parse_header


def encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def base(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Patient", "BENCH001", "CT"
    return ds


def ct_slice(tmp: Path) -> tuple[bytes, str]:
    path = make_study(tmp / "ct", 1, "BENCH001").files[0]
    data = path.read_bytes()
    meta, offset = parse_file_meta(data)
    return data[offset:], meta.transfer_syntax


def enhanced_ct(frames: int) -> tuple[bytes, str]:
    ds = base(EnhancedCTImageStorage)
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = frames
    groups = []
    for i in range(frames):
        item = Dataset()
        position, plane, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(i)]
        plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        content.InStackPositionNumber, content.DimensionIndexValues = i + 1, [1, i + 1]
        item.PlanePositionSequence = Sequence([position])
        item.PlaneOrientationSequence = Sequence([plane])
        item.FrameContentSequence = Sequence([content])
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.PixelData = np.zeros(512 * 512 * frames, np.int16).tobytes()
    return encode(ds), ExplicitVRLittleEndian


def jpeg_frames(frames: int) -> tuple[bytes, str]:
    ds = base("1.2.840.10008.5.1.4.1.1.7")
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.NumberOfFrames = frames
    fragment = b"\xff\xd8" + bytes(20_000) + b"\xff\xd9"
    ds.PixelData = encapsulate([fragment] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return encode(ds), JPEGBaseline8Bit


def deflated_sr(items: int) -> tuple[bytes, str]:
    ds = base("1.2.840.10008.5.1.4.1.1.88.11")
    ds.Modality = "SR"
    content = []
    for i in range(items):
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", "Finding"
        item.ConceptNameCodeSequence = Sequence([code])
        item.TextValue = f"Finding number {i}"
        content.append(item)
    ds.ContentSequence = Sequence(content)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(encode(ds)) + compressor.flush()
    return deflated + b"\x00" * (len(deflated) % 2), DeflatedExplicitVRLittleEndian


def median_us(fn, repeat: int) -> tuple[float, float, float]:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    q = len(times) // 4
    return (statistics.median(times) * 1e6, times[q] * 1e6, times[-q - 1] * 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "ct-slice": ct_slice(Path(tmp)),
            "enhanced-ct-200": enhanced_ct(200),
            "jpeg-400": jpeg_frames(400),
            "deflated-sr": deflated_sr(2000),
        }
    results = {}
    for name, (stream, ts) in cases.items():
        repeat = args.repeat if len(stream) < (8 << 20) else max(20, args.repeat // 20)
        check = median_us(lambda s=stream, t=ts: check_dataset(s, t), repeat)
        header = median_us(lambda s=stream, t=ts: parse_header(s, t), repeat)
        results[name] = {"bytes": len(stream), "check_us": check, "header_us": header}
        print(f"{name}: {len(stream) / 1e6:.2f} MB | check {check[0]:.1f} us "
              f"(IQR {check[1]:.1f}-{check[2]:.1f}) | header parse {header[0]:.1f} us "
              f"(IQR {header[1]:.1f}-{header[2]:.1f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
