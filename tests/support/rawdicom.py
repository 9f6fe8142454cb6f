"""A minimal DICOM Upper Layer client over a raw socket, for hostile-peer tests.

It writes PDUs byte by byte as PS3.8 lays them out (not with pynetdicom, the library
under test), so a test can send what no well-behaved SCU would: lengths that lie,
partial PDUs, command sets with over-long UIDs. DIMSE command sets are encoded with
pydicom (implicit VR little endian, group length first) with value validation off.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
#: DIMSE Command Field values (PS3.7 E.1).
C_STORE_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0001, 0x0020, 0x0010, 0x0021, 0x0030
NO_DATASET, HAS_DATASET = 0x0101, 0x0000


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(calling: str, called: str, contexts: list[tuple[str, list[str]]],
                 max_pdu: int = 1 << 16) -> bytes:
    """Encode an A-ASSOCIATE-RQ PDU proposing ``contexts`` (abstract, [transfer syntaxes])."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for number, (abstract, syntaxes) in enumerate(contexts):
        body = struct.pack(">BBBB", 2 * number + 1, 0, 0, 0) + _item(0x30, abstract.encode())
        body += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, body)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu))
                   + _item(0x52, b"1.2.826.0.1.3680043.9.7433.99"))
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32 + items
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    """Encode a PDU of ``pdu_type`` around ``body``."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU carrying one PDV."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, header) + payload
    return pdu(0x04, pdv)


RELEASE_RQ = pdu(0x05, b"\0" * 4)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Let pydicom set and write values that break the standard (that is the point)."""
    settings = pydicom_config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


def encode_implicit(ds: Dataset) -> bytes:
    """Encode ``ds`` as implicit VR little endian, writing values unchecked."""
    with unchecked():
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        return fp.getvalue()


def command_set(command: int, sop_class: str, message_id: int = 1, *,
                has_dataset: bool = True, **elements: object) -> bytes:
    """A DIMSE command set (with its group length) for a request."""
    ds = Dataset()
    with unchecked():
        ds.AffectedSOPClassUID = sop_class
        ds.CommandField = command
        ds.MessageID = message_id
        ds.CommandDataSetType = HAS_DATASET if has_dataset else NO_DATASET
        if command != C_ECHO_RQ:
            ds.Priority = 0
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
    body = encode_implicit(ds)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


@dataclass
class Pdu:
    """A PDU as received."""

    type: int
    body: bytes


@dataclass
class Response:
    """A DIMSE response: its command set (and data set bytes, if any)."""

    command: Dataset
    dataset: bytes = b""

    @property
    def status(self) -> int:
        """The response's Status (0000,0900)."""
        return int(self.command.Status)


class RawAssociation:
    """A connection speaking the DICOM UL protocol by hand.

    Parameters
    ----------
    host, port : str, int
        The SCP.
    source : str, optional
        Local address to connect from (e.g. ``127.0.0.2``, to be another peer).
    timeout : float, optional
        Socket timeout for every read (seconds).
    """

    def __init__(self, host: str, port: int, *, source: str = "", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.accepted: dict[str, int] = {}

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def read_pdu(self) -> Pdu:
        """Read one whole PDU."""
        pdu_type, _, length = struct.unpack(">BBL", self._read_exact(6))
        return Pdu(pdu_type, self._read_exact(length))

    def associate(self, calling: str, called: str,
                  contexts: list[tuple[str, list[str]]]) -> Pdu:
        """Send an A-ASSOCIATE-RQ and read the answer; remember accepted contexts."""
        self.send(associate_rq(calling, called, contexts))
        answer = self.read_pdu()
        if answer.type == 0x02:
            offset = 68
            while offset < len(answer.body):
                item_type, _, length = struct.unpack(">BBH", answer.body[offset:offset + 4])
                item = answer.body[offset + 4:offset + 4 + length]
                if item_type == 0x21 and item[2] == 0:
                    context_id = item[0]
                    abstract = contexts[(context_id - 1) // 2][0]
                    self.accepted[abstract] = context_id
                offset += 4 + length
        return answer

    def request(self, sop_class: str, command: bytes, dataset: bytes = b"") -> Response:
        """Send a command (and data set) on the context of ``sop_class``; read the response.

        Pending C-FIND/C-GET/C-MOVE responses are skipped; the final one is returned.
        """
        context_id = self.accepted[sop_class]
        self.send(p_data(context_id, command, command=True))
        if dataset:
            self.send(p_data(context_id, dataset, command=False))
        while True:
            response = self.read_response()
            if response.status not in (0xFF00, 0xFF01):
                return response

    def read_response(self) -> Response:
        """Read P-DATA until one whole command set (and its data set) has arrived."""
        command = BytesIO()
        data = BytesIO()
        has_data = None
        while True:
            got = self.read_pdu()
            if got.type != 0x04:
                raise ConnectionError(f"expected P-DATA-TF, got PDU type 0x{got.type:02X}")
            offset = 0
            done = False
            while offset < len(got.body):
                (length,) = struct.unpack(">L", got.body[offset:offset + 4])
                header = got.body[offset + 5]
                fragment = got.body[offset + 6:offset + 4 + length]
                (command if header & 0x01 else data).write(fragment)
                if header & 0x02:
                    if header & 0x01:
                        ds = read_dataset(BytesIO(command.getvalue()), True, True)
                        has_data = int(ds.CommandDataSetType) != NO_DATASET
                        if not has_data:
                            done = True
                    else:
                        done = True
                offset += 4 + length
            if done:
                ds = read_dataset(BytesIO(command.getvalue()), True, True)
                return Response(ds, data.getvalue())
