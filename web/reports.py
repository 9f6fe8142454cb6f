"""Reports (PDF, SR) and attachments of a transaction, for its recipient and for staff.

Routes (recipient session; staff under ``/admin`` with a staff session)::

    GET  [/admin]/transactions/{public_id}/reports            the PDFs and SRs of its studies
    GET  [/admin]/transactions/{public_id}/reports/{sop_uid}  one report: a PDF inline, an
                                                              SR as a readable page
    GET  [/admin]/transactions/{public_id}/attachments        attachments + the upload form
    POST [/admin]/transactions/{public_id}/attachments        attach a PDF, JPEG or PNG
                                                              (multipart; CSRF as any POST)
    POST /admin/transactions/{public_id}/attachments/{id}/file    staff: file it into the
                                                                  patient's study
    POST /admin/transactions/{public_id}/attachments/{id}/remove  staff: delete an unfiled one

An attachment belongs to the transaction that added it (issue 13): the reports page
lists it apart from the hospital's reports, with who added it, and ``reports/{sop_uid}``
serves it (a PDF as below, a picture as PNG) to that transaction only. Filing and
removing need the ``confirm`` box ticked, and an administrator or the transaction's
hospital contact (:func:`iepnode.viewing.attachment_filing.may_file`).

Access is the download's: a recipient reaches only their own transactions (someone
else's is a 404) while they are live (declined, expired, purged: 410); staff reach any.
A PDF goes out as ``application/pdf`` with ``Content-Disposition: inline`` and a name
made here, ``nosniff``, and a ``sandbox`` CSP (no script of the document runs with the
site's origin). An SR is printed from text through autoescaped templates.

Upload size: the app's body limit is 1 MiB; :func:`web.middlewares.upload_limit` raises it
for the two attachment POSTs of a logged-in session only, to
:data:`~iepnode.viewing.attachments.MAX_UPLOAD_BYTES`
(aiohttp spools file fields to a temporary file, not memory).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import aiohttp_jinja2
from aiohttp import web

from iepnode.errors import InvalidRequest
from iepnode.sharing.recipients import recipient_by_id
from iepnode.viewing.attachments import MAX_UPLOAD_BYTES
from iepnode.viewing.reports import safe_filename
from web.common import client_ip, public_id_of, recipient_session, see_other, services_of
from web.keys import SESSION_KEY
from web.middlewares import SECURITY_HEADERS
from web.staff_pages import Staff, staff_view

#: The PDF's own policy: a sandboxed document (unique origin, no scripts, no forms).
PDF_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_NOTICES = {"added": "The file is attached to this transaction, marked as added by you, and "
                     "the other side has been told in the messages. It is not part of the "
                     "hospital's record of the patient unless hospital staff file it there."}

RECIPIENT_LAYOUT = "reports/_recipient_layout.html"
STAFF_LAYOUT = "reports/_staff_layout.html"


def _document_response(entry: Any, data: bytes) -> web.Response:
    """A PDF report, or an attachment (PDF, or a picture as PNG), shown inline."""
    image = entry.kind == "image"
    # An attachment's file name says so, wherever the file is saved to.
    stem = f"Attached_{entry.title}" if entry.attachment is not None else entry.title
    return web.Response(body=data, headers={
        **SECURITY_HEADERS,
        "Content-Type": "image/png" if image else "application/pdf",
        "Content-Disposition":
            f'inline; filename="{safe_filename(stem, ".png" if image else ".pdf")}"',
        "Content-Security-Policy": PDF_CSP,
        "X-Content-Type-Options": "nosniff",
    })


def _base(who: dict[str, Any], public_id: str) -> str:
    return f"{'/admin' if who.get('staff') else ''}/transactions/{public_id}"


async def _reports_page(request: web.Request, who: dict[str, Any], context: dict[str, Any],
                        ) -> web.StreamResponse:
    public_id = public_id_of(request)
    transaction, entries, attached = await asyncio.to_thread(
        services_of(request).reports.transaction_reports, public_id, **who,
        source_ip=client_ip(request))
    return aiohttp_jinja2.render_template("reports/list.html", request, {
        **context, "t": transaction, "entries": entries, "attached": attached,
        "base": _base(who, public_id)})


async def _report(request: web.Request, who: dict[str, Any], context: dict[str, Any],
                  ) -> web.StreamResponse:
    public_id = public_id_of(request)
    entry, content = await asyncio.to_thread(
        services_of(request).reports.open_report, public_id, request.match_info["sop_uid"], **who,
        source_ip=client_ip(request))
    if isinstance(content, bytes):
        return _document_response(entry, content)
    return aiohttp_jinja2.render_template("reports/sr.html", request, {
        **context, "doc": content, "entry": entry, "public_id": public_id,
        "base": _base(who, public_id)})


async def _attachments_page(request: web.Request, who: dict[str, Any],
                            context: dict[str, Any], *, error: str = "",
                            status: int = 200) -> web.StreamResponse:
    public_id = public_id_of(request)
    view = await asyncio.to_thread(services_of(request).reports.attachments_view, public_id, **who,
                                   source_ip=client_ip(request))
    return aiohttp_jinja2.render_template("reports/attachments.html", request, {
        **context, "view": view, "t": view.transaction, "error": error,
        "attach_notice": _NOTICES.get(request.query.get("done", ""), ""),
        "max_mb": view.max_bytes // (1024 * 1024), "base": _base(who, public_id)},
        status=status)


async def _attach(request: web.Request, who: dict[str, Any],
                  context: dict[str, Any]) -> web.StreamResponse:
    public_id = public_id_of(request)
    form = await request.post()  # already read (and CSRF-checked) by the middleware
    upload = form.get("file")
    title = form.get("title", "")
    study_uid = form.get("study", "")
    if not isinstance(upload, web.FileField):
        return await _attachments_page(request, who, context, status=400,
                                       error="Choose a PDF, JPEG or PNG file to attach.")

    def read() -> bytes:
        upload.file.seek(0)
        return upload.file.read(MAX_UPLOAD_BYTES + 1)

    data = await asyncio.to_thread(read)
    try:
        await asyncio.to_thread(
            services_of(request).reports.add_attachment, public_id, data=data,
            # Browsers send the name as typed; some clients percent-encode it.
            original_name=unquote(upload.filename or ""),
            title=title if isinstance(title, str) else "",
            study_uid=study_uid if isinstance(study_uid, str) else "", **who,
            source_ip=client_ip(request))
    except InvalidRequest as exc:  # AttachmentRefused included: nothing was stored
        return await _attachments_page(request, who, context, error=str(exc), status=400)
    return see_other(f"{_base(who, public_id)}/attachments?done=added")


# -- recipient ----------------------------------------------------------------------------


def _recipient(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    session = recipient_session(request)
    return ({"recipient_id": session.recipient_id},
            {"layout": RECIPIENT_LAYOUT, "csrf": session.csrf_token, "staff": False})


async def _with_recipient(request: web.Request, context: dict[str, Any]) -> dict[str, Any]:
    recipient = await asyncio.to_thread(recipient_by_id,
                                        request[SESSION_KEY].recipient_id)
    return {**context, "recipient": recipient}


async def recipient_reports(request: web.Request) -> web.StreamResponse:
    """``GET /transactions/{public_id}/reports``."""
    who, context = _recipient(request)
    return await _reports_page(request, who, await _with_recipient(request, context))


async def recipient_report(request: web.Request) -> web.StreamResponse:
    """``GET /transactions/{public_id}/reports/{sop_uid}``."""
    who, context = _recipient(request)
    return await _report(request, who, await _with_recipient(request, context))


async def recipient_attachments(request: web.Request) -> web.StreamResponse:
    """``GET /transactions/{public_id}/attachments``."""
    who, context = _recipient(request)
    return await _attachments_page(request, who, await _with_recipient(request, context))


async def recipient_attach(request: web.Request) -> web.StreamResponse:
    """``POST /transactions/{public_id}/attachments``."""
    who, context = _recipient(request)
    return await _attach(request, who, await _with_recipient(request, context))


# -- staff --------------------------------------------------------------------------------


def _staff(staff: Staff) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"staff": staff.user},
            {"layout": STAFF_LAYOUT, "csrf": staff.session.csrf_token, "me": staff.user,
             "section": "transactions"})


@staff_view()
async def staff_reports(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/transactions/{public_id}/reports``."""
    return await _reports_page(request, *_staff(staff))


@staff_view()
async def staff_report(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/transactions/{public_id}/reports/{sop_uid}``."""
    return await _report(request, *_staff(staff))


@staff_view()
async def staff_attachments(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/transactions/{public_id}/attachments``."""
    return await _attachments_page(request, *_staff(staff))


@staff_view()
async def staff_attach(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/attachments``."""
    return await _attach(request, *_staff(staff))


def _attachment_id(request: web.Request) -> int:
    text = request.match_info["attachment_id"]
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise web.HTTPNotFound()
    return int(text)


async def _staff_decides(request: web.Request, staff: Staff, verb: str) -> web.StreamResponse:
    """File or remove one attachment, once the staff member ticked the confirmation."""
    public_id = public_id_of(request)
    attachment_id = _attachment_id(request)
    form = await request.post()
    if form.get("confirm") != "yes":
        raise InvalidRequest("Tick the box to confirm first: nothing was changed.")
    services = services_of(request)
    act = services.reports.file_attachment if verb == "file" else services.reports.remove_attachment
    await asyncio.to_thread(act, public_id, attachment_id, staff=staff.user,
                            source_ip=client_ip(request))
    done = "attachment-filed" if verb == "file" else "attachment-removed"
    return see_other(f"/admin/transactions/{public_id}?done={done}#attachments")


@staff_view()
async def staff_file_attachment(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/attachments/{attachment_id}/file``."""
    return await _staff_decides(request, staff, "file")


@staff_view()
async def staff_remove_attachment(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``POST /admin/transactions/{public_id}/attachments/{attachment_id}/remove``."""
    return await _staff_decides(request, staff, "remove")
