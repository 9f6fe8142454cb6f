"""Attachments: wrap + store a 5 MB PDF and a 12 MP JPEG, against dcmtk's pdf2dcm / img2dcm.

iepnode's number is the whole attach step of :func:`iepnode.viewing.attaching.add` (check the
content, wrap as DICOM, encode, check the header as ingest would, write durably to the
file store, record the attachment, message and audit event; since issue 13 it is held by
the transaction, not indexed into the study) on a Node in a temporary folder with a one-image
study shared in a transaction. The peers are dcmtk's converters doing the wrapping
alone (``pdf2dcm`` -> Encapsulated PDF, ``img2dcm`` -> Secondary Capture keeping the JPEG
bitstream), writing a file and nothing else (no fsync, no index).

    flock /tmp/iepnode-bench.lock python -m bench.attachments [--repeat 5] [--json PATH]

Prints one line per file: medians in ms and the ratio iepnode / dcmtk.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from config import load_settings
from iepnode.people import audit
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.viewing import attaching
from iepnode.wiring import build_services
from storage.models import Transaction

PDF2DCM = "/usr/bin/pdf2dcm"
IMG2DCM = "/usr/bin/img2dcm"


def big_pdf(size: int) -> bytes:
    """A valid one-page PDF padded to ``size`` bytes with an unused binary stream."""
    filler = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>",
        b"<</Length %d>>stream\n" % len(filler) + filler + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def photo_jpeg(width: int, height: int) -> bytes:
    """A 4:2:0 baseline JPEG that compresses like a photo (gradients plus noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(2)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def one_image_study(node: Services) -> str:
    """Store one small CT image; return its Study Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Doe^Jane", "P1", "19800214", "F")
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = (
        "20240105", "101500", "ACC1", "1")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(16 * 16 * 2)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return node.ingester.ingest(fp.getvalue(), ExplicitVRLittleEndian, source_ae="BENCH").study_uid


def time_iepnode(node: Services, transaction: Transaction, data: bytes, name: str) -> float:
    actor = audit.Actor("staff", "bench")
    start = time.perf_counter()
    attaching.add(node.store, transaction, data=data, original_name=name, title="",
                    study_uid="", actor=actor, author_label="bench", max_attachments=1000)
    return time.perf_counter() - start


def time_dcmtk(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pdf-mb", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="iepnode-bench-attach-") as tmp:
        work = Path(tmp)
        settings = load_settings(overrides={"data_dir": work / "node"}, environ={})
        node = build_services(settings)
        study = one_image_study(node)
        transaction, _ = tx.create_transfer(
            tx.NewTransfer((study,), "bench@example.org", otp_mobile="+447700900123"),
            contact=tx.Contact("Bench"), institution="Bench", created_by="bench")
        pdf = big_pdf(int(args.pdf_mb * 1024 * 1024))
        jpeg = photo_jpeg(4000, 3000)
        (work / "in.pdf").write_bytes(pdf)
        (work / "in.jpg").write_bytes(jpeg)
        cases = {
            f"pdf {len(pdf) / 1e6:.1f} MB": (pdf, "in.pdf", [
                PDF2DCM, str(work / "in.pdf"), str(work / "out-pdf.dcm"),
                "--patient-name", "Doe^Jane", "--patient-id", "P1", "--title", "in"]),
            f"jpeg 4000x3000 ({len(jpeg) / 1e6:.1f} MB)": (jpeg, "in.jpg", [
                IMG2DCM, "-i", "JPEG", str(work / "in.jpg"), str(work / "out-jpg.dcm")]),
        }
        for label, (data, name, command) in cases.items():
            ours, theirs = [], []
            time_iepnode(node, transaction, data, name)  # warm-up (imports, first write)
            time_dcmtk(command)
            for _ in range(args.repeat):
                ours.append(time_iepnode(node, transaction, data, name))
                theirs.append(time_dcmtk(command))
            a, b = statistics.median(ours), statistics.median(theirs)
            results[label] = {"iepnode_s": ours, "dcmtk_s": theirs}
            print(f"attach {label}: iepnode {a * 1000:.0f} ms (wrap+store+record, fsync "
                  f"{'on' if settings.fsync else 'off'}) | dcmtk {Path(command[0]).name} "
                  f"{b * 1000:.0f} ms (wrap to a file) | iepnode/dcmtk {a / b:.2f}x",
                  flush=True)
        node.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
