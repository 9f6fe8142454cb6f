"""Presentation contexts the node accepts and proposes."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom import uid
from pynetdicom import build_context
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

#: Stored as received: uncompressed, deflate and the common compressed syntaxes.
STORAGE_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
    uid.MPEG2MPML,
    uid.MPEG4HP41,
    uid.HEVCMP51,
]

UNCOMPRESSED = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]

QUERY_RETRIEVE = {
    "find": [PatientRootQueryRetrieveInformationModelFind,
             StudyRootQueryRetrieveInformationModelFind],
    "move": [PatientRootQueryRetrieveInformationModelMove,
             StudyRootQueryRetrieveInformationModelMove],
    "get": [PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet],
}

PATIENT_ROOT_MODELS = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}


def supported_contexts() -> list[PresentationContext]:
    """Return every context the SCP accepts.

    Storage contexts accept both roles, so a C-GET requestor that proposes the
    Storage SCP role (to receive sub-operations) is accepted.
    """
    contexts = [build_context(Verification)]
    for models in QUERY_RETRIEVE.values():
        contexts.extend(build_context(m) for m in models)
    for cx in AllStoragePresentationContexts:
        context = build_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
        context.scu_role = True
        context.scp_role = True
        contexts.append(context)
    return contexts


def sending_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts to propose for sending stored files as they are.

    Parameters
    ----------
    pairs : iterable of (SOP Class UID, Transfer Syntax UID)
        What the files to send are; at most 128 distinct pairs are proposed.
    """
    unique = sorted(set(pairs))[:128]
    contexts = []
    for sop_class, ts in unique:
        syntaxes = [ts]
        if ts in UNCOMPRESSED:
            # Uncompressed data can be converted if the peer refuses the stored syntax.
            syntaxes += [u for u in UNCOMPRESSED if u != ts]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts


def allowed_contexts(
    contexts: list[PresentationContext], allowed: frozenset[str]
) -> list[PresentationContext]:
    """Keep only the contexts of services an AE may use.

    Verification is always kept; storage contexts are kept for ``store`` and for
    ``get`` (C-GET sends its sub-operations over them).

    Parameters
    ----------
    contexts : list of PresentationContext
        The acceptor's contexts for this association.
    allowed : frozenset of str
        Services the calling AE may use (``store``, ``find``, ``move``, ``get``).
    """
    refused = {
        str(model)
        for service, models in QUERY_RETRIEVE.items()
        if service not in allowed
        for model in models
    }
    keep_storage = bool({"store", "get"} & allowed)
    qr_and_echo = refused | {str(m) for ms in QUERY_RETRIEVE.values() for m in ms}
    qr_and_echo.add(str(Verification))
    return [
        cx for cx in contexts
        if cx.abstract_syntax not in refused
        and (keep_storage or cx.abstract_syntax in qr_and_echo)
    ]
