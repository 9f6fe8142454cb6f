"""The staff page of the audit log.

Routes::

    GET  /admin/audit?actor=&action=&patient=&page=  the audit log, 50 a page
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from aiohttp import web

from web.staff_pages import (
    Staff,
    render,
    staff_view,
)
from web.staff_pages import admin_service as _admin  # the name the views call it by

# -- audit log -------------------------------------------------------------------------------


@staff_view()
async def audit_log(request: web.Request, staff: Staff) -> web.StreamResponse:
    """``GET /admin/audit?actor=&action=&patient=&page=``: the audit log, newest first."""
    filters = {k: request.query.get(k, "")[:254] for k in ("actor", "action", "patient")}
    try:
        page_number = int(request.query.get("page", "1"))
    except ValueError:
        page_number = 1
    page = await asyncio.to_thread(_admin(request).audit_trail.audit_log, filters["actor"],
                                   filters["action"], filters["patient"], page_number)
    query = {k: v for k, v in filters.items() if v}
    links = {
        "newer": f"/admin/audit?{urlencode({**query, 'page': page.page - 1})}"
        if page.page > 1 else "",
        "older": f"/admin/audit?{urlencode({**query, 'page': page.page + 1})}"
        if page.page < page.pages else "",
    }
    return render(request, staff, "audit.html",
                  {"page": page, "filters": filters, "links": links}, section="audit")
