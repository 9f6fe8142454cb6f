"""DICOMweb (WADO-RS) metadata and bulk data: the DICOM JSON of stored instances.

Metadata is read from the stored headers; pixel data and other values longer than
:data:`BULK_THRESHOLD` bytes become ``BulkDataURI`` links, answered by
:func:`read_bulk_value` (pixel data by :class:`~iepnode.viewing.dicomweb_frames.PixelData`).
:data:`METADATA` caches the JSON of the process's recent instances.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag

from iepnode.errors import NotFound
from iepnode.viewing.dicomweb import StoredInstance, resource_url
from iepnode.viewing.dicomweb_frames import NATIVE

#: Binary values longer than this (bytes) are sent as BulkDataURI links in metadata.
BULK_THRESHOLD = 1024
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def instance_metadata(item: StoredInstance, base_url: str,
                      threshold: int = BULK_THRESHOLD) -> dict[str, Any]:
    """The DICOM JSON of one stored instance, large binary values as BulkDataURIs.

    Only top-level values are linked (nested large values stay inline); pixel data
    always is.
    """
    ds = dcmread(item.path, stop_before_pixels=True)
    url = resource_url(base_url, item.study_uid, item.series_uid, item.sop_uid)
    out: dict[str, Any] = {}
    for elem in ds:
        tag = f"{elem.tag:08X}"
        if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > threshold:
            out[tag] = {"vr": elem.VR, "BulkDataURI": f"{url}/bulkdata/{tag}"}
        else:
            out[tag] = elem.to_json_dict(None, 10 ** 12)
    has_pixels = "Rows" in ds and ("BitsAllocated" in ds)
    if has_pixels:
        encapsulated = item.transfer_syntax not in NATIVE
        vr = "OB" if encapsulated or int(ds.BitsAllocated) <= 8 else "OW"
        out["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    # The file meta's transfer syntax, as AvailableTransferSyntaxUID (0008,3002).
    out.setdefault("00083002", {"vr": "UI", "Value": [item.transfer_syntax]})
    return dict(sorted(out.items()))


#: Stands for the request's base URL inside cached metadata (never in DICOM text:
#: JSON writes the NUL characters as ``\u0000``).
_BASE = "\u0000base\u0000"
_BASE_JSON = json.dumps(_BASE)[1:-1]


class MetadataCache:
    """DICOM JSON of stored instances, by file-store key, within a byte budget (LRU).

    A key's file never changes (a replaced instance gets a new key), so entries
    never go stale; they only age out. Entries hold the JSON text with a
    placeholder for the base URL, so one entry serves every base URL.
    """

    def __init__(self, budget: int = 64 << 20) -> None:
        self.budget = budget
        self.size = 0
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def text(self, item: StoredInstance, key: str) -> str:
        """The JSON text of one instance, with the base-URL placeholder."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        text = json.dumps(instance_metadata(item, _BASE), ensure_ascii=False)
        with self._lock:
            if key not in self._entries and len(text) < self.budget:
                self._entries[key] = text
                self.size += len(text)
                while self.size > self.budget:
                    _, old = self._entries.popitem(last=False)
                    self.size -= len(old)
        return text

    def blocks(self, items: Iterable[StoredInstance], base_url: str) -> Iterator[bytes]:
        """The metadata response body (a JSON array) of ``items`` under ``base_url``,
        one instance at a time (blocking reads: iterate in a worker thread)."""
        base = json.dumps(base_url)[1:-1]
        yield b"["
        for number, item in enumerate(items):
            text = self.text(item, item.key).replace(_BASE_JSON, base)
            yield (text if number == 0 else "," + text).encode()
        yield b"]"

    def body(self, items: Sequence[StoredInstance], base_url: str) -> bytes:
        """The whole metadata response body of ``items`` (see :meth:`blocks`)."""
        return b"".join(self.blocks(items, base_url))


def bulk_tag(tag_text: str) -> Tag:
    """The tag of a ``/bulkdata/{tag}`` URL (8 hex digits).

    Raises
    ------
    NotFound
        Not a tag.
    """
    try:
        if len(tag_text) == 8:
            return Tag(int(tag_text, 16))
    except ValueError:
        pass
    raise NotFound("no such bulk data")


def read_bulk_value(item: StoredInstance, tag: Tag) -> tuple[bytes, str]:
    """A top-level binary value other than Pixel Data, and its media type.

    An Encapsulated Document has its own MIME type (MIME Type of Encapsulated
    Document); anything else is ``application/octet-stream``.

    Raises
    ------
    NotFound
        No such tag, or not a binary value.
    """
    ds = dcmread(item.path, stop_before_pixels=True)
    elem = ds.get(tag)
    if elem is None or elem.VR not in _BINARY_VRS or elem.value is None:
        raise NotFound("no such bulk data")
    media = "application/octet-stream"
    if tag == 0x00420011:  # Encapsulated Document
        media = str(ds.get("MIMETypeOfEncapsulatedDocument", "") or media).strip().lower()
        length = ds.get("EncapsulatedDocumentLength")
        value = bytes(elem.value)
        return (value[:int(length)] if length else value), media
    return bytes(elem.value), media


#: The process's metadata cache.
METADATA = MetadataCache()


__all__ = [
    "BULK_THRESHOLD",
    "METADATA",
    "MetadataCache",
    "bulk_tag",
    "instance_metadata",
    "read_bulk_value",
]
