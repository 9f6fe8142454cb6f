"""The download package: one zip a viewer, a PACS or a CD burner takes as it is.

Layout (IHE RAD TF PDI; DICOM PS3.10 and PS3.12 Annex V, General Purpose media)::

    DICOMDIR                       one file-set for all studies of the transaction
    README.TXT                     what is inside, who sent it, how to open it
    INDEX.HTM                      offline overview: patient, studies, reports
    IHE_PDI/STUDY001.HTM           a study's series, one JPEG preview each
    IHE_PDI/IMG00001.JPG
    REPORTS/RPT00001.PDF           the PDF of each Encapsulated PDF instance
    DICOM/PT000000/ST000000/SE000000/IM000000 ...   the stored files, byte for byte
    ATTACHED/ATT00001.PDF          files added to the transaction by its recipient or
    ATTACHED/ATT00002.PNG          staff and not filed into the study (issue 13): the
                                   document, or the picture as PNG; no DICOM, not in the
                                   DICOMDIR, README.TXT says who added each

Every name is generated (8.3 upper case, DICOM File IDs of 1-8 characters, no
extensions); none comes from a DICOM value. There are no executables.

A package is *planned*, not written:
:func:`~iepnode.sharing.package_plan.build_package` reads the members'
headers for the DICOMDIR, decodes one frame per series for the previews, and lays
the zip out (:class:`~iepnode.sharing.zipstream.ZipLayout`) with the stored files' cached
CRCs; the small generated members live in memory, the instances are read from the
store while streaming. Planning is deterministic: the same stored files give the
same bytes (the DICOMDIR's SOP Instance UID is derived from the inputs, times come
from the transaction), so a resumed download matches the first one even when it
is served by another process or after a restart. :class:`PackageCache` keeps
recent plans so a resume does not plan again.

One bad stored file does not break a package: the plan leaves out every instance
whose file :func:`storage.stored_file.read_instance_header` finds unusable
(missing, unreadable, empty, not DICOM, cut short), logs a warning for each,
lists them in README.TXT (series, image number, SOP Instance UID, the reason in
plain words) and says so on INDEX.HTM; :attr:`Package.left_out` carries them to
the download's audit event. The files' sizes, modification times and readability
are part of the plan's fingerprint, so a file damaged after a plan was cached is
planned again at the next request. A file damaged after the plan, while its
bytes are being streamed, ends the stream with an error (the reader sees a broken
download, never wrong bytes: its size no longer matches, and a changed content
no longer matches the CRC-32 in the zip).

This module holds the package's types, the stored files of its studies, the
fingerprint of a plan and the cache of plans; the planning itself is
:mod:`iepnode.sharing.package_plan`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iepnode import __version__
from iepnode.sharing import pdi
from iepnode.sharing.zipstream import ZipLayout
from storage.models import Instance, Patient, Series, Study

log = logging.getLogger("iepnode.package")

#: Bumped whenever the package's layout or generated content changes.
FORMAT = "iepnode-pdi-zip-1"
#: Folder of the DICOM files (a File ID component).
DICOM_FOLDER = "DICOM"
#: Left-out instances named one by one in the audit detail (the rest are counted).
AUDIT_LEFT_OUT = 20

#: ``crcs_of(files)``: the CRC-32 of each ``(key, path)`` by key
#: (:func:`iepnode.sharing.checksums.crcs_for`).
ChecksumSource = Callable[[Sequence[tuple[str, Path]]], Mapping[str, int]]


class NothingReadable(Exception):
    """None of a package's stored files can be read: there is nothing to download.

    Attributes
    ----------
    left_out : list of LeftOutEntry
        Every instance, and why it cannot be read.
    """

    def __init__(self, left_out: list[pdi.LeftOutEntry]) -> None:
        super().__init__(f"none of the {len(left_out)} stored files can be read")
        self.left_out = left_out


@dataclass(frozen=True)
class PackageSource:
    """What a package is made of and says about itself.

    Attributes
    ----------
    reference : str
        The transaction's public ID (``IEP...``), or ``""`` for a study export.
    study_uids : tuple of str
        Studies to include, in the transaction's order.
    institution : str
        The sending institution (``settings.institution``).
    created_at : float
        Time written into the zip and the pages (the transaction's creation time):
        fixed, so every copy of the package has the same bytes.
    patient_name, patient_id, birth_date, sex : str
        The patient, as the transaction recorded it.
    contact : tuple of str
        Lines telling whom to ask (README.TXT).
    filename : str
        Download name, e.g. ``IEP12345678.zip`` (generated, never from DICOM values).
    """

    reference: str
    study_uids: tuple[str, ...]
    institution: str
    created_at: float
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    contact: tuple[str, ...]
    filename: str
    #: Files only this transaction holds (not part of the hospital's record).
    attachments: tuple[AttachedFile, ...] = ()


@dataclass(frozen=True)
class AttachedFile:
    """A file added to a transaction and not filed into the study (``ATTACHED/``).

    Attributes
    ----------
    key : str
        File-store key of the wrapped DICOM object (never shipped as DICOM: a PACS
        importing the unzipped folder must not take it into the study).
    title : str
        The title the person who added it gave.
    media_type : str
        ``application/pdf``, ``image/jpeg`` or ``image/png``.
    added_by : str
        ``the recipient jane@example.org`` or ``staff Dr A. Smith``.
    added_at : float
        When (Unix time).
    """

    key: str
    title: str
    media_type: str
    added_by: str
    added_at: float


@dataclass(frozen=True)
class StoredFile:
    """A stored instance file to package, as the index and the file system see it now.

    Attributes
    ----------
    key, path : str, Path
        File-store key and path.
    size : int
        Current size in bytes; ``-1`` when the file cannot be found.
    study_uid, sop_uid : str
        The instance's study and SOP Instance UID.
    series_number, modality, instance_number : str
        As indexed (to name the instance when it is left out).
    mtime_ns : int
        Modification time (changes only if the file is damaged or replaced).
    readable : bool
        Whether this process may open the file for reading.
    """

    key: str
    path: Path
    size: int
    study_uid: str
    sop_uid: str = ""
    series_number: str = ""
    modality: str = ""
    instance_number: str = ""
    mtime_ns: int = 0
    readable: bool = True

    def left_out(self, reason: str) -> pdi.LeftOutEntry:
        """This instance as README.TXT lists it when it is left out for ``reason``."""
        return pdi.LeftOutEntry(self.series_number, self.modality, self.instance_number,
                                self.sop_uid, reason)


@dataclass(frozen=True)
class Package:
    """A planned package: the zip layout and what the web and audit need to know.

    Attributes
    ----------
    layout : ZipLayout
        The archive; stream it with :meth:`ZipLayout.pieces`.
    etag : str
        Strong validator of the archive's bytes (hex digest of its content).
    filename : str
        Download name.
    instances : int
        DICOM files inside.
    study_uids : tuple of str
        Studies that are inside.
    patient_id : str
        For the audit trail.
    left_out : tuple of LeftOutEntry
        Instances left out because their stored files cannot be read.
    """

    layout: ZipLayout
    etag: str
    filename: str
    instances: int
    study_uids: tuple[str, ...]
    patient_id: str
    left_out: tuple[pdi.LeftOutEntry, ...] = ()

    def left_out_text(self, limit: int = AUDIT_LEFT_OUT) -> str:
        """The left-out instances for an audit detail (``""`` when none)."""
        if not self.left_out:
            return ""
        named = ", ".join(f"{e.sop_uid} ({e.reason})" for e in self.left_out[:limit])
        more = f" and {len(self.left_out) - limit} more" if len(self.left_out) > limit else ""
        return f"left out {len(self.left_out)} unreadable instances: {named}{more}"

    @property
    def size(self) -> int:
        """Size of the zip in bytes."""
        return self.layout.size


def stored_files(study_uids: Sequence[str], path_of: Callable[[str], Path]) -> list[StoredFile]:
    """Return the stored files of the studies that are still indexed, in index order.

    A file that is missing or cannot be read is returned too (``size`` ``-1``,
    ``readable`` ``False``): the plan leaves it out and says why.

    Parameters
    ----------
    study_uids : sequence of str
        The studies.
    path_of : callable
        The file store's key -> path function.
    """
    rows = (Instance.select(Instance.key, Study.study_uid, Instance.sop_uid,
                            Series.series_number, Series.modality, Instance.instance_number)
            .join(Series).join(Study)
            .where(Study.study_uid.in_(list(study_uids)))
            .order_by(Study.id, Series.id, Instance.id).tuples())
    order = {uid: i for i, uid in enumerate(study_uids)}
    files = []
    for key, study_uid, sop_uid, series_number, modality, instance_number in rows:
        path = path_of(key)
        try:
            st = os.stat(path)
            size, mtime_ns, readable = st.st_size, st.st_mtime_ns, os.access(path, os.R_OK)
        except OSError:
            size, mtime_ns, readable = -1, 0, False
        files.append(StoredFile(key, path, size, study_uid, sop_uid, series_number, modality,
                                instance_number, mtime_ns, readable))
    files.sort(key=lambda f: order.get(f.study_uid, len(order)))  # stable: keeps index order
    return files


def fingerprint(source: PackageSource, files: Sequence[StoredFile]) -> str:
    """Digest of everything a package is built from (the cache key of its plan).

    Store keys name immutable files, so keys, sizes and modification times stand
    for the content (a damaged file changes them); whether each file can be read
    is part of it too, as are the versions of the code that renders the package.
    """
    import PIL
    import pydicom

    digest = hashlib.sha256()
    for part in (FORMAT, __version__, pydicom.__version__, PIL.__version__, repr(source)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    for f in files:
        digest.update(f"{f.key}:{f.size}:{f.mtime_ns}:{int(f.readable)}:{f.study_uid}\0"
                      .encode())
    return digest.hexdigest()



class PackageCache:
    """Recently planned packages by :func:`fingerprint` (a resume does not plan again).

    Parameters
    ----------
    capacity : int
        Packages kept; a plan holds the generated members (DICOMDIR, pages,
        previews: well under a megabyte per hundred instances), never instance data.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Package] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get_or_build(self, key: str, build: Callable[[], Package]) -> Package:
        """Return the cached package for ``key`` or build it (once, if asked concurrently)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            package = build()
            with self._lock:
                self._items[key] = package
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._building.pop(key, None)
        return package


def source_for_study(study_uid: str, institution: str) -> PackageSource:
    """A :class:`PackageSource` for one stored study (``iepnode export UID``).

    Raises
    ------
    KeyError
        If no such study is indexed.
    """
    study = Study.select(Study, Patient).join(Patient).where(
        Study.study_uid == study_uid).first()
    if study is None:
        raise KeyError(study_uid)
    patient = study.patient
    return PackageSource(
        reference="", study_uids=(study_uid,), institution=institution,
        created_at=study.last_received, patient_name=patient.name,
        patient_id=patient.patient_id, birth_date=patient.birth_date, sex=patient.sex,
        contact=(institution,) if institution else (), filename=f"STUDY_{study.key}.zip",
    )
