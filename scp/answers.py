"""Every DIMSE request an SCP worker receives gets an answer.

pynetdicom (3.0) leaves some requests without any reply, so the peer waits until its
own DIMSE timeout: an N-GET or other operation the node does not serve, a request that
lacks a required field (a C-MOVE without Move Destination), a request of one service
sent on another service's presentation context. A command set whose values its
primitives refuse (a 200-character Affected SOP Instance UID, a 20-character Move
Destination) makes it abort the association instead. And it picks the service class
from the request's Affected SOP Class UID rather than from the presentation context,
so a C-STORE naming the Verification class on the Verification context is answered
as an echo.

The node answers each of these with a failure response of the request's own type and
an Error Comment saying why, and keeps the association:

======================================  ===============================================
what arrived                            answer
======================================  ===============================================
a field whose value is malformed,       0xC000 (C-STORE, C-FIND, C-GET, C-MOVE: cannot
or a required field missing             understand / unable to process), 0x0122 (C-ECHO)
an operation the context is not for     0x0211 (unrecognised operation)
(or a DIMSE-N operation)
an Affected SOP Class UID other than    0x0122 (SOP class not supported)
the context's
======================================  ===============================================

Only a command set that cannot be read at all (no Message ID, an unknown Command
Field, broken encoding) still ends with A-ABORT: it cannot be answered.

Two pynetdicom objects of each accepted association are adapted
(:func:`answer_every_request`): its DIMSE provider converts a received message with
:func:`tolerant_primitive` (the same conversion, keeping what is valid and recording
what is not), and its ``_serve_request`` goes through :func:`problem_with` first.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _DATASET_KEYWORDS, _MSG_TO_PRIMITVE, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.sop_class import Verification

from scp.contexts import QUERY_RETRIEVE

log = logging.getLogger("iepnode.scp")

CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNISED_OPERATION = 0x0211
#: Error Comment (0000,0902) is LO: 64 characters.
COMMENT_LENGTH = 64

_SERVICE_OF_MODEL = {str(model): {"find": C_FIND, "move": C_MOVE, "get": C_GET}[service]
                     for service, models in QUERY_RETRIEVE.items() for model in models}


def request_type_for(abstract_syntax: str) -> type:
    """The DIMSE-C request the node serves on a context of ``abstract_syntax``."""
    if abstract_syntax == Verification:
        return C_ECHO
    return _SERVICE_OF_MODEL.get(str(abstract_syntax), C_STORE)


def tolerant_primitive(message: DIMSEMessage) -> Any:
    """pynetdicom's ``message_to_primitive``, but keeping going past refused values.

    Returns the primitive as pynetdicom builds it when every value is accepted.
    Otherwise returns the primitive with the accepted values and the keywords of the
    refused ones in its ``iepnode_problems`` attribute (for :func:`problem_with`).

    Raises
    ------
    Exception
        pynetdicom's own error when no single value is to blame (the message cannot be
        answered).
    """
    try:
        return type(message).message_to_primitive(message)
    except Exception as first:
        name = type(message).__name__
        primitive = _MSG_TO_PRIMITVE[name[:name.rfind("_R")]]()
        problems = []
        for elem in message.command_set:
            if not hasattr(primitive, elem.keyword):
                continue
            value = elem.value[0] if elem.VM > 1 and isinstance(elem.value, list) else elem.value
            try:
                setattr(primitive, elem.keyword, value)
            except Exception as exc:
                log.warning("%s: %s", type(message).__name__, exc)
                problems.append(elem.keyword)
        if name in _DATASET_KEYWORDS:
            setattr(primitive, _DATASET_KEYWORDS[name], message.data_set)
        primitive._context_id = message.context_id
        primitive._dataset_path = message._data_set_path
        primitive._dataset_file = message._data_set_file
        if not problems:
            raise first
        primitive.iepnode_problems = problems
        return primitive


def problem_with(request: Any, abstract_syntax: str) -> tuple[int, str] | None:
    """Why the node cannot serve ``request`` on a context of ``abstract_syntax``.

    Returns
    -------
    tuple of (int, str) or None
        The failure status and the reason, or ``None`` when pynetdicom may serve it.
    """
    expected = request_type_for(abstract_syntax)
    if not isinstance(request, expected):
        return UNRECOGNISED_OPERATION, (
            f"{request.msg_type} is not served on a {expected.__name__.replace('_', '-')} "
            "presentation context")
    refused = getattr(request, "iepnode_problems", None)
    invalid_status = SOP_CLASS_NOT_SUPPORTED if expected is C_ECHO else CANNOT_UNDERSTAND
    if refused:
        return invalid_status, f"malformed {', '.join(refused)}"
    missing = [k for k in request.REQUEST_KEYWORDS if getattr(request, k) is None]
    if missing:
        return invalid_status, f"missing {', '.join(missing)}"
    if request.AffectedSOPClassUID != abstract_syntax:
        return SOP_CLASS_NOT_SUPPORTED, (
            f"Affected SOP Class UID {request.AffectedSOPClassUID} is not the "
            f"presentation context's {abstract_syntax}")
    return None


def error_comment(text: str) -> str:
    """``text`` as an Error Comment (0000,0902): LO, plain ASCII, 64 characters at most."""
    return text.encode("ascii", "replace").decode()[:COMMENT_LENGTH]


def _answer(assoc: Association, request: Any, context_id: int, status: int,
            reason: str) -> None:
    """Send a failure response of ``request``'s own type, or abort when there is no ID."""
    requestor = assoc.requestor
    calling = (requestor.primitive.calling_ae_title if requestor.primitive else "").strip()
    if request.MessageID is None:
        log.warning("%s request from %s cannot be answered (%s): association aborted",
                    request.msg_type, calling, reason)
        assoc.abort()
        return
    log.warning("%s request %s from %s refused (0x%04X): %s", request.msg_type,
                request.MessageID, calling, status, reason)
    response = type(request)()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.Status = status
    if hasattr(response, "ErrorComment"):
        response.ErrorComment = error_comment(reason)
    assoc.dimse.send_msg(response, context_id)


class AnsweringDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an accepted association, converting messages tolerantly."""

    def receive_primitive(self, primitive: Any) -> None:
        """pynetdicom's, with :func:`tolerant_primitive` for the message conversion.

        A message that cannot be decoded at all (no known Command Field) aborts the
        association, where pynetdicom would drop it silently.
        """
        if self.message is None:
            message = DIMSEMessage()
            message.message_to_primitive = functools.partial(  # type: ignore[method-assign]
                tolerant_primitive, message)
            self.message = message
        try:
            super().receive_primitive(primitive)
        except Exception as exc:
            log.warning("undecodable DIMSE message from %s: %s (association aborted)",
                        self.assoc.requestor.address, exc)
            self.message = None
            self.dul.event_queue.put("Evt19")


class AnsweringAssociation(Association):
    """An accepted association whose requests all get an answer (module docstring)."""

    def _serve_request(self, msg: Any, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        is_request = getattr(msg, "MessageIDBeingRespondedTo", None) is None
        if context is not None and is_request and not self._sent_release:
            problem = problem_with(msg, str(context.abstract_syntax))
            if problem is not None:
                _answer(self, msg, context_id, *problem)
                return
        super()._serve_request(msg, context_id)


def answer_every_request(assoc: Association) -> None:
    """Adapt an accepted association (before it starts) as the module docstring says."""
    assoc.__class__ = AnsweringAssociation
    assoc.dimse.__class__ = AnsweringDIMSE
