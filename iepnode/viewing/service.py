"""The web viewer's domain: what a person may view, in which order, and its pixels.

Who sees what (the same rules as downloads, :mod:`iepnode.sharing.downloads`)
    A recipient views only their own transactions' studies (anyone else's
    transaction, or an instance outside the transaction, is "not found"), and only
    while the transaction is open: declined, expired or purged ones are
    :class:`~iepnode.errors.Gone`. Staff view any transaction whose images are
    still stored.

Order
    Studies oldest first (study date and time), series by series number, then
    instances by instance number (then SOP Instance UID). Instance number is what
    the modality writes in acquisition order; image position is not read, since it
    needs every header before the first image (0.6 ms each: 0.6 s for 1000 slices).
    Series of at most :data:`HEADER_SERIES_LIMIT` instances have their headers read
    for their frame counts (multi-frame objects come alone or in small sets); larger
    series count one frame per instance, and the frame response says otherwise.

Pixels: raw values, windowed in the browser (measured, see docs/benchmarks.md)
    A frame goes to the browser as little-endian modality values (``int16`` for
    CT, 0.5 MB for a 512x512 slice) that need no image codec in the browser.
    Images larger than the screen come first reduced (block means, e.g. a
    3328x4096 mammogram as 832x1024), then in full in the background. Window/level
    drags are instant (no request per mouse move) and what is drawn is exactly
    DICOM's window of the stored values (no lossy JPEG on top). Rendered JPEG/PNG
    (:mod:`iepnode.viewing.rendering`) serves the thumbnails and WADO-RS. Encoded frames
    are kept in a byte-bounded LRU cache (:class:`FrameCache`): a stored file
    never changes, so its key names its bytes for ever (and is the ETag).

Audit
    Opening a study in the viewer is one DICOM "Instances Accessed" (110103) event
    with the study and patient; frames are not audited one by one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iepnode import dicomtext
from iepnode.errors import Gone, NotFound
from iepnode.people import audit
from iepnode.sharing import downloads, transactions
from iepnode.viewing import rendering
from storage.filestore import FileStore
from storage.models import Transaction
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q
from storage.queries import viewing as queries

#: Series with at most this many instances have their headers read (frame counts).
HEADER_SERIES_LIMIT = 64
#: Bytes of encoded frames kept in memory per process.
CACHE_BYTES = 96 << 20
#: Longest side of series thumbnails, in pixels.
THUMB_SIZE = 96


class FrameCache:
    """A thread-safe LRU of encoded frames, bounded by their total size in bytes."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget = budget
        self._items: OrderedDict[tuple, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_make(self, key: tuple, make: Callable[[], tuple[bytes, dict[str, Any]]],
                    ) -> tuple[bytes, dict[str, Any]]:
        """The cached value for ``key``, else ``make()``'s (stored if it fits)."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        value = make()  # outside the lock: decoding takes milliseconds
        size = len(value[0])
        if size > self.budget // 4:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._size += size
                while self._size > self.budget:
                    _, (old, _) = self._items.popitem(last=False)
                    self._size -= len(old)
        return value


@dataclass(frozen=True)
class Located:
    """A stored instance the viewer may show: its file-store key and its study.

    The web holds it between :meth:`ViewingService.locate` and the pixel calls; the
    file is found from the key inside the service (no path leaves the domain).
    """

    key: str
    study_uid: str


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("inf")


class ViewingService:
    """What the viewer pages and their JSON/frames ask of the node."""

    def __init__(self, store: FileStore, cache: FrameCache | None = None) -> None:
        self.store = store
        self.cache = cache or FrameCache()

    # -- who may view ---------------------------------------------------------------

    @staticmethod
    def for_recipient(recipient_id: int, public_id: str) -> Transaction:
        """One of the recipient's open transactions.

        Raises
        ------
        NotFound
            No such transaction, or someone else's.
        Gone
            Declined, expired or purged (the reason is the message).
        """
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        reason = downloads.unavailable_reason(transaction, time.time())
        if reason is not None:
            raise Gone(reason.replace("downloaded", "viewed"))
        return transaction

    @staticmethod
    def for_staff(public_id: str) -> Transaction:
        """Any transaction whose images are still stored.

        Raises
        ------
        NotFound
            No such transaction.
        Gone
            Its images were purged.
        """
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise Gone("The images of this transaction have been removed.")
        return transaction

    # -- what there is to view -------------------------------------------------------

    @staticmethod
    def _study_uids(transaction: Transaction) -> list[str]:
        return transactions_q.study_uids_of(transaction.id)

    def manifest(self, transaction: Transaction) -> dict[str, Any]:
        """The transaction's patient, studies, series and instances in display order.

        Returns
        -------
        dict
            JSON-ready: ``patient`` (name, birth date, ID, sex, formatted) and
            ``studies`` (oldest first), each with ``series`` and their ``instances``
            (``uid``, ``number``, ``frames``).
        """
        studies = queries.studies_in_order(self._study_uids(transaction))
        out = []
        for study in studies:
            series_rows = sorted(queries.series_of_study(study.id),
                                 key=lambda s: (_number(s.series_number), s.id))
            series_out = []
            for series in series_rows:
                rows = sorted(queries.instance_summaries(series.id),
                              key=lambda i: (_number(i.instance_number), i.sop_uid))
                read = len(rows) <= HEADER_SERIES_LIMIT
                instances = []
                for row in rows:
                    frames, image = 1, True
                    if read:
                        try:
                            frames = rendering.read_info(self.store.path(row.key)).frames
                        except rendering.RenderError:
                            image = False  # SR, PDF, presentation state: nothing to draw
                    if image:
                        instances.append({"uid": row.sop_uid, "number": row.instance_number,
                                          "frames": frames})
                if not instances:
                    continue
                series_out.append({
                    "uid": series.series_uid, "number": series.series_number,
                    "modality": series.modality, "description": series.description,
                    "instances": instances,
                    "frames": sum(i["frames"] for i in instances),
                })
            out.append({
                "uid": study.study_uid, "date": dicomtext.dicom_date(study.study_date, ""),
                "time": study.study_time,
                "description": study.description, "accession": study.accession,
                "modalities": study.modalities.replace("\\", ", "),
                "series": series_out,
            })
        return {
            "transaction": transaction.public_id,
            "patient": {
                "name": dicomtext.person_name(transaction.patient_name, ""),
                "birth_date": dicomtext.dicom_date(transaction.patient_birth_date, ""),
                "id": transaction.patient_id, "sex": transaction.patient_sex,
            },
            "studies": out,
        }

    def locate(self, transaction: Transaction, sop_uid: str) -> Located:
        """The file of an instance of one of the transaction's studies.

        Raises
        ------
        NotFound
            No such instance in this transaction.
        """
        row = queries.locate_instance(sop_uid, self._study_uids(transaction))
        if row is None:
            raise NotFound(f"no instance {sop_uid!r} in {transaction.public_id}")
        key, study_uid = row
        return Located(key, study_uid)

    # -- pixels ----------------------------------------------------------------------

    def raw(self, located: Located, frame: int,
            max_size: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """Raw values of a frame and their header (see :func:`rendering.raw_frame`).

        Not compressed: zlib at its fastest level took 12 ms for a 512x512 CT slice
        (more than the rest of the request) and saved 21-31% of the bytes
        (docs/benchmarks.md); large images are reduced with ``max_size`` instead.

        Raises
        ------
        iepnode.viewing.rendering.RenderError
            Undecodable object or frame out of range.
        """
        def make() -> tuple[bytes, dict[str, Any]]:
            return rendering.raw_frame(self.store.path(located.key), frame, max_size)

        return self.cache.get_or_make(("raw", located.key, frame, max_size), make)

    def rendered(self, located: Located, frame: int, *, media_type: str = "image/jpeg",
                 center: float | None = None, width: float | None = None,
                 size: int | None = None) -> bytes:
        """A rendered frame (cached when it uses the file's own window)."""
        def make() -> tuple[bytes, dict[str, Any]]:
            return rendering.render_bytes(self.store.path(located.key), frame,
                                          media_type=media_type, center=center, width=width,
                                          size=size), {}

        if center is None and width is None:
            return self.cache.get_or_make(("img", located.key, frame, media_type, size), make)[0]
        return make()[0]

    def thumbnail(self, located: Located, frames: int = 1) -> bytes:
        """A small JPEG of the instance's middle frame (series thumbnails)."""
        return self.rendered(located, max(frames, 1) // 2, size=THUMB_SIZE)

    # -- audit -----------------------------------------------------------------------

    def record_view(self, transaction: Transaction, study_uid: str,
                    actor: audit.Actor) -> None:
        """One DICOM Instances Accessed event: ``actor`` opened ``study_uid`` in the viewer.

        Raises
        ------
        NotFound
            The study is not one of the transaction's.
        """
        if study_uid not in self._study_uids(transaction):
            raise NotFound(f"no study {study_uid!r} in {transaction.public_id}")
        audit.record(audit.INSTANCES_ACCESSED, "view-images", actor,
                     patient_id=transaction.patient_id, study_uid=study_uid,
                     transaction=transaction.public_id, detail="web viewer")


__all__ = ["CACHE_BYTES", "FrameCache", "Located", "ViewingService"]
