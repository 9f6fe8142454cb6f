"""Import reconciliation: give imported objects the hospital's patient identity.

Follows the IHE Import Reconciliation Workflow (RAD TF-2 4.59/4.61): the patient
attributes of an object imported from media (a patient's CD, an upload) are
replaced by the hospital's (Patient ID + issuer, name, birth date, sex), and the
values they had are kept in the object:

* the original Patient ID (and its issuer) goes into Other Patient IDs Sequence
  (0010,1002);
* every attribute changed or removed goes, with its previous value, into an item of
  Original Attributes Sequence (0400,0561) > Modified Attributes Sequence
  (0400,0550), with the source of the previous values, the time, the modifying
  system and the reason ``COERCE`` (PS3.3 C.12.1.1.9).

Study, Series and SOP Instance UIDs are kept. Pixel Data is never decoded: the
dataset is parsed only up to (7FE0,0010); that element and everything after it
are copied byte for byte behind the rewritten header, in the original transfer
syntax (a deflated dataset is inflated and written as Explicit VR Little Endian,
its pixel bytes unchanged).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from iepnode.archive.ingest import file_meta_bytes, parse_file_meta
from iepnode.errors import BadDataset

#: Attributes replaced from the hospital's record, in this order.
PATIENT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex")
#: Attributes removed because they qualify the original (replaced) Patient ID.
REMOVED_KEYWORDS = ("IssuerOfPatientIDQualifiersSequence",)
REASON = "COERCE"
_PIXEL_DATA = 0x7FE00010
_UTF8 = "ISO_IR 192"


@dataclass(frozen=True)
class PatientIdentity:
    """A patient's identifying attributes as DICOM values.

    Attributes
    ----------
    patient_id, issuer : str
        Patient ID (0010,0020) and Issuer of Patient ID (0010,0021).
    name : str
        Patient's Name in DICOM PN form (``Family^Given``).
    birth_date : str
        ``YYYYMMDD`` or empty.
    sex : str
        ``M``, ``F``, ``O`` or empty.
    """

    patient_id: str
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""

    @classmethod
    def of(cls, ds: Dataset) -> PatientIdentity:
        """Read the identity an object carries (values decoded, stripped)."""
        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip(" \x00")

        return cls(text("PatientID"), text("IssuerOfPatientID"), text("PatientName"),
                   text("PatientBirthDate"), text("PatientSex"))

    def values(self) -> dict[str, str]:
        """The identity by DICOM keyword (see :data:`PATIENT_KEYWORDS`)."""
        return dict(zip(PATIENT_KEYWORDS, (self.patient_id, self.issuer, self.name,
                                           self.birth_date, self.sex), strict=True))


@dataclass(frozen=True)
class Coercion:
    """What reconciling one object changed.

    Attributes
    ----------
    original : PatientIdentity
        The identity the object carried.
    changed : tuple of str
        Keywords of the attributes whose value changed (empty: already reconciled).
    """

    original: PatientIdentity
    changed: tuple[str, ...]


def _encodable(value: str, charsets: list[str]) -> bool:
    """Whether ``value`` can be written in the dataset's character set without loss."""
    if value.isascii():
        return True
    if not charsets or charsets == ["ISO_IR 6"]:  # the default repertoire is ASCII
        return False
    codecs = convert_encodings(charsets or [""])
    if len(codecs) != 1:  # ISO 2022 code extensions: not worth the risk
        return False
    try:
        value.encode(codecs[0], errors="strict")
    except (UnicodeError, LookupError):
        return False
    return True


def _charsets(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet", "")
    if not value:
        return []
    return [str(v) for v in value] if not isinstance(value, str) else [value]


def _decode_everything(ds: Dataset) -> None:
    """Turn every raw element (recursively) into a decoded one, in the current charset.

    Needed before changing Specific Character Set: raw text would otherwise be
    written as its old bytes and read back in the new character set.
    """
    for _ in ds.iterall():
        pass


def reconcile_dataset(
    ds: Dataset,
    target: PatientIdentity,
    *,
    source: str,
    modifying_system: str,
    now: datetime | None = None,
) -> Coercion:
    """Give ``ds`` the ``target`` patient identity, keeping the original values (in place).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object's dataset (or its header up to Pixel Data).
    target : PatientIdentity
        The hospital's values; an empty issuer removes the object's issuer (it
        qualified the original Patient ID), other empty values are written empty.
    source : str
        Source of Previous Values (0400,0564), e.g. ``"Patient upload IEP1234"``.
    modifying_system : str
        Modifying System (0400,0563), e.g. the node's AE title.
    now : datetime, optional
        Attribute Modification DateTime (default: now, UTC).

    Returns
    -------
    Coercion
        The original identity and what changed.
    """
    original = PatientIdentity.of(ds)
    wanted = target.values()
    changed = [k for k in PATIENT_KEYWORDS
               if (k in ds or wanted[k]) and str(ds.get(k, "") or "").strip(" \x00") != wanted[k]]
    removed = [k for k in REMOVED_KEYWORDS if k in ds and "PatientID" in changed]
    if not changed and not removed:
        return Coercion(original, ())
    charsets = _charsets(ds)
    switch = not all(_encodable(v, charsets) for v in wanted.values())
    if switch:
        _decode_everything(ds)

    previous = Dataset()
    touched = [*changed, *removed]
    if "PatientID" in changed and original.patient_id:
        touched.append("OtherPatientIDsSequence")
    if switch:
        touched.append("SpecificCharacterSet")
    for keyword in touched:
        if keyword in ds:
            previous[keyword] = copy.deepcopy(ds[keyword])
        else:  # absent before: recorded as empty (the attribute was added)
            previous.add_new(keyword, _vr(keyword), None)

    if "PatientID" in changed and original.patient_id:
        other = Dataset()
        other.PatientID = original.patient_id
        if original.issuer:
            other.IssuerOfPatientID = original.issuer
        other.TypeOfPatientID = "TEXT"
        items = list(ds.get("OtherPatientIDsSequence") or [])
        ds.OtherPatientIDsSequence = Sequence([*items, other])
    if switch:
        ds.SpecificCharacterSet = _UTF8
    for keyword in changed:
        if keyword == "IssuerOfPatientID" and not wanted[keyword]:
            del ds[keyword]
        else:
            ds[keyword] = DataElement(_tag(keyword), _vr(keyword), wanted[keyword])
    for keyword in removed:
        del ds[keyword]

    when = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S.%f%z")
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([previous])
    item.SourceOfPreviousValues = source[:64]
    item.AttributeModificationDateTime = when
    item.ModifyingSystem = modifying_system[:64] or "IEPNODE"
    item.ReasonForTheAttributeModification = REASON
    ds.OriginalAttributesSequence = Sequence([*(ds.get("OriginalAttributesSequence") or []),
                                              item])
    return Coercion(original, tuple(touched))


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def _vr(keyword: str) -> str:
    from pydicom.datadict import dictionary_VR

    return dictionary_VR(_tag(keyword))


def _stop_at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag >= _PIXEL_DATA


@dataclass(frozen=True)
class Reconciled:
    """A reconciled dataset, encoded.

    Attributes
    ----------
    stream : bytes
        The dataset (no File Meta): rewritten header + the original bytes from
        Pixel Data on.
    transfer_syntax : str
        Its transfer syntax (the original; Explicit VR Little Endian for deflated input).
    sop_class, sop_uid, study_uid, series_uid : str
        From the dataset (unchanged).
    coercion : Coercion
        What changed.
    """

    stream: bytes
    transfer_syntax: str
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    coercion: Coercion


def reconcile_stream(
    stream: bytes | memoryview,
    transfer_syntax: str,
    target: PatientIdentity,
    *,
    source: str,
    modifying_system: str,
    now: datetime | None = None,
) -> Reconciled:
    """Reconcile an encoded dataset without touching its pixel data.

    Parameters
    ----------
    stream : bytes or memoryview
        The dataset as encoded in ``transfer_syntax`` (no File Meta).
    transfer_syntax : str
        Its transfer syntax UID.
    target, source, modifying_system, now
        See :func:`reconcile_dataset`.

    Returns
    -------
    Reconciled
        The new encoding; pass ``stream`` and ``transfer_syntax`` to
        :meth:`iepnode.archive.ingest.Ingester.ingest`.

    Raises
    ------
    BadDataset
        The header cannot be parsed or written.
    """
    ts = UID(transfer_syntax)
    data = bytes(stream)
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise BadDataset(f"corrupt deflated dataset: {exc}") from exc
        ts = ExplicitVRLittleEndian
    try:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except ValueError:  # a private transfer syntax: explicit VR little endian
        implicit, little = False, True
    fp = BytesIO(data)
    try:
        ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixels)
        ds.set_original_encoding(implicit, little, None)
        header_end = fp.tell()
        coercion = reconcile_dataset(ds, target, source=source,
                                     modifying_system=modifying_system, now=now)
        out = DicomBytesIO()
        out.is_little_endian = little
        out.is_implicit_VR = implicit
        write_dataset(out, ds)
        ids = [str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID",
                                            "StudyInstanceUID", "SeriesInstanceUID")]
    except BadDataset:
        raise
    except Exception as exc:  # pydicom raises many kinds on malformed headers
        raise BadDataset(f"cannot reconcile: {exc}") from exc
    body = out.getvalue() + data[header_end:]
    return Reconciled(body, str(ts), *ids, coercion=coercion)


def reconcile_file(
    src: Path,
    dst: Path,
    target: PatientIdentity,
    *,
    source: str,
    modifying_system: str,
    now: datetime | None = None,
) -> Reconciled:
    """Write a reconciled copy of the Part-10 file ``src`` to ``dst``.

    The File Meta Information is written anew (same SOP Class/Instance UIDs and
    transfer syntax); pixel data and every element after it are copied unchanged.

    Raises
    ------
    BadDataset
        ``src`` is not a readable Part-10 file.
    """
    data = src.read_bytes()
    meta, offset = parse_file_meta(data)
    result = reconcile_stream(memoryview(data)[offset:], meta.transfer_syntax, target,
                              source=source, modifying_system=modifying_system, now=now)
    header = file_meta_bytes(result.sop_class or meta.sop_class,
                             result.sop_uid or meta.sop_uid, result.transfer_syntax, "")
    dst.write_bytes(header + result.stream)
    return result
