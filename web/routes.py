"""Every URL of the node in one table: method, path, view, and the name of its resource.

:data:`ROUTES` is read top to bottom (recipient pages, downloads, forwards, staff
pages, viewer, DICOMweb, uploads, reports); :func:`add_routes` installs it, with the
static files, on the application (:func:`web.app.create_app`). View modules define
views only: none registers a route itself (``tests/test_routes.py`` checks both).

A GET route answers HEAD with the same view unless ``allow_head=False``. The name is
the name of the URL's resource, shared by its methods (``app.router[name]``). The
viewer and DICOMweb URLs repeat under two prefixes (recipient and staff); they are
spelled out once by :func:`_viewer` and :func:`_dicomweb` below.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from iepnode.archive.query import Level
from web import (
    admin,
    admin_aes,
    admin_audit,
    admin_requests,
    admin_transactions,
    admin_users,
    dicomweb,
    dicomweb_pages,
    download,
    forward,
    health,
    recipient,
    reports,
    upload,
    uploads_admin,
    viewer,
)
from web.middlewares import Handler

#: The static files: served under ``/static/`` from ``web/static``, resource ``static``.
STATIC_PREFIX = "/static"
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_NAME = "static"


@dataclass(frozen=True)
class Route:
    """One method of one URL.

    Parameters
    ----------
    method : str
        The HTTP method.
    path : str
        The URL path, aiohttp-style (``{name}`` or ``{name:regex}`` placeholders).
    view : callable
        The view: ``async (request) -> response``.
    name : str
        The name of the URL's resource (the same for every method of one path).
    allow_head : bool
        GET only: whether HEAD is answered by the same view.
    """

    method: str
    path: str
    view: Handler
    name: str
    allow_head: bool = True


def get(path: str, view: Handler, name: str, *, allow_head: bool = True) -> Route:
    """A GET route (HEAD too unless ``allow_head=False``)."""
    return Route(hdrs.METH_GET, path, view, name, allow_head)


def post(path: str, view: Handler, name: str) -> Route:
    """A POST route."""
    return Route(hdrs.METH_POST, path, view, name)


def route(method: str, path: str, view: Handler, name: str) -> Route:
    """A route of any other method (HEAD, PATCH, DELETE, OPTIONS)."""
    return Route(method, path, view, name)


def _viewer(prefix: str, views: dict[str, Any], name: str) -> tuple[Route, ...]:
    """The viewer's routes under ``prefix`` (``views``: :data:`web.viewer.RECIPIENT_VIEWS`
    or :data:`web.viewer.STAFF_VIEWS`)."""
    base = f"{prefix}/view"
    return (
        get(base, views["page"], f"{name}"),
        get(f"{base}/manifest.json", views["manifest"], f"{name}.manifest"),
        get(f"{base}/opened", views["opened"], f"{name}.opened"),
        get(base + "/instances/{sop}/frames/{frame}.raw", views["raw"], f"{name}.raw"),
        get(base + "/instances/{sop}/frames/{frame}.{fmt:png|jpg}", views["rendered"],
            f"{name}.rendered"),
        get(base + "/instances/{sop}/thumbnail.jpg", views["thumbnail"], f"{name}.thumbnail"),
    )


def _dicomweb(base: str, name: str) -> tuple[Route, ...]:
    """The DICOMweb routes under ``base`` (every view wrapped by
    :func:`web.dicomweb.dicomweb_view`: authorisation, PS3.18 error statuses)."""
    study, series, instance = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    search, view = dicomweb.search_view, dicomweb.dicomweb_view
    retrieve, metadata = dicomweb.retrieve, dicomweb.metadata
    rendered, thumbnail = dicomweb.rendered, dicomweb.thumbnail
    table: list[tuple[str, Any, str]] = [
        ("/studies", search(Level.STUDY), "studies"),
        ("/series", search(Level.SERIES), "series"),
        ("/instances", search(Level.IMAGE), "instances"),
        (f"{study}/series", search(Level.SERIES), "study.series"),
        (f"{study}/instances", search(Level.IMAGE), "study.instances"),
        (f"{study}{series}/instances", search(Level.IMAGE), "series.instances"),
        (study, retrieve, "study"),
        (f"{study}{series}", retrieve, "study.series.one"),
        (f"{study}{series}{instance}", retrieve, "instance"),
        (f"{study}/metadata", metadata, "study.metadata"),
        (f"{study}{series}/metadata", metadata, "series.metadata"),
        (f"{study}{series}{instance}/metadata", metadata, "instance.metadata"),
        (f"{study}{series}{instance}/frames/{{frames}}", dicomweb.frames, "frames"),
        (f"{study}{series}{instance}/bulkdata/{{tag}}", dicomweb.bulkdata, "bulkdata"),
        (f"{study}/rendered", rendered, "study.rendered"),
        (f"{study}{series}/rendered", rendered, "series.rendered"),
        (f"{study}{series}{instance}/rendered", rendered, "instance.rendered"),
        (f"{study}{series}{instance}/frames/{{frames}}/rendered", rendered, "frames.rendered"),
        (f"{study}/thumbnail", thumbnail, "study.thumbnail"),
        (f"{study}{series}/thumbnail", thumbnail, "series.thumbnail"),
        (f"{study}{series}{instance}/thumbnail", thumbnail, "instance.thumbnail"),
        (f"{study}{series}{instance}/frames/{{frames}}/thumbnail", thumbnail,
         "frames.thumbnail"),
    ]
    return tuple(get(base + path, view(handler), f"{name}.{what}")
                 for path, handler, what in table)


ROUTES: tuple[Route, ...] = (
    get("/healthz", health.healthz, "healthz"),
    # -- recipients (web.recipient) --
    # No HEAD: link scanners probing with HEAD must not send passcodes.
    get("/t/{token}", recipient.link, "recipient.link", allow_head=False),
    post("/t/{token}/resend", recipient.resend, "recipient.resend"),
    post("/t/{token}/login", recipient.login, "recipient.login"),
    post("/t/{token}/login-app", recipient.login_app, "recipient.login_app"),
    get("/signin", recipient.signin, "recipient.signin"),
    get("/dashboard", recipient.dashboard, "recipient.dashboard"),
    get("/transactions/{public_id}", recipient.transaction, "recipient.transaction"),
    post("/transactions/{public_id}/messages", recipient.post_message, "recipient.messages"),
    post("/transactions/{public_id}/decline", recipient.decline, "recipient.decline"),
    post("/transactions/{public_id}/send", recipient.send_to_pacs, "recipient.send"),
    get("/account/authenticator", recipient.authenticator, "recipient.authenticator"),
    post("/account/authenticator", recipient.enrol_authenticator, "recipient.authenticator"),
    post("/account/authenticator/remove", recipient.remove_authenticator,
         "recipient.authenticator.remove"),
    post("/logout", recipient.logout, "recipient.logout"),
    get("/favicon.ico", recipient.favicon, "favicon"),
    # -- downloads (web.download) --
    get("/transactions/{public_id}/download", download.download, "download"),
    post("/transactions/{public_id}/download-protected", download.protect,
         "download.protected"),
    get("/downloads/{token}", download.protected_file, "download.protected_file"),
    # -- forwards (web.forward) --
    get("/transactions/{public_id}/forward", forward.dialog, "forward"),
    post("/transactions/{public_id}/forward", forward.forward, "forward"),
    get("/transactions/{public_id}/forwards", forward.forwards, "forward.list"),
    # -- staff: sign-in (web.admin), transactions and sharing (web.admin_transactions) --
    get("/admin/login", admin.login_form, "admin.login"),
    post("/admin/login", admin.login, "admin.login"),
    post("/admin/logout", admin.logout, "admin.logout"),
    get("/admin", admin_transactions.home, "admin.home"),
    get("/admin/studies", admin_transactions.studies, "admin.studies"),
    post("/admin/transfers", admin_transactions.create_transfer, "admin.transfers"),
    get("/admin/transactions/{public_id}", admin_transactions.transaction,
        "admin.transaction"),
    post("/admin/transactions/{public_id}/messages", admin_transactions.reply,
         "admin.transaction.messages"),
    post("/admin/transactions/{public_id}/unlock", admin_transactions.unlock,
         "admin.transaction.unlock"),
    post("/admin/transactions/{public_id}/authenticator/remove",
         admin_transactions.remove_recipient_app, "admin.transaction.authenticator.remove"),
    post("/admin/transactions/{public_id}/passcode-channel", admin_transactions.change_channel,
         "admin.transaction.passcode_channel"),
    # -- staff: audit log (web.admin_audit), remote AEs (web.admin_aes), users --
    get("/admin/audit", admin_audit.audit_log, "admin.audit"),
    get("/admin/aes", admin_aes.aes, "admin.aes"),
    post("/admin/aes", admin_aes.add_ae, "admin.aes"),
    post("/admin/aes/remove", admin_aes.remove_ae, "admin.aes.remove"),
    get("/admin/users", admin_users.users, "admin.users"),
    post("/admin/users", admin_users.add_user, "admin.users"),
    post("/admin/users/{user_id}/disable", admin_users.disable_user, "admin.user.disable"),
    post("/admin/users/{user_id}/enable", admin_users.enable_user, "admin.user.enable"),
    post("/admin/users/{user_id}/password-reset", admin_users.reset_password,
         "admin.user.password_reset"),
    post("/admin/users/{user_id}/totp-reset", admin_users.reset_totp, "admin.user.totp_reset"),
    # -- staff: sends to DICOM nodes and auto-routing (issue 6) --
    post("/admin/transactions/{public_id}/send", admin_transactions.send_transaction,
         "admin.transaction.send"),
    post("/admin/transactions/{public_id}/recipient-send", admin_transactions.recipient_send,
         "admin.transaction.recipient_send"),
    get("/admin/sends", admin_aes.sends, "admin.sends"),
    get("/admin/sends.json", admin_aes.sends_json, "admin.sends.json"),
    get("/admin/routes", admin_aes.routes, "admin.routes"),
    post("/admin/routes", admin_aes.add_route, "admin.routes"),
    post("/admin/routes/{rule_id}/remove", admin_aes.remove_route, "admin.route.remove"),
    # -- staff: own account, the steps after a reset (web.admin) --
    get("/admin/account", admin.account, "admin.account"),
    post("/admin/account/password", admin.change_password, "admin.account.password"),
    get("/admin/account/totp", admin.totp_form, "admin.account.totp"),
    post("/admin/account/totp", admin.totp_confirm, "admin.account.totp"),
    get("/admin/setup/totp", admin.setup_totp_form, "admin.setup.totp"),
    post("/admin/setup/totp", admin.setup_totp, "admin.setup.totp"),
    get("/admin/setup/password", admin.setup_password_form, "admin.setup.password"),
    post("/admin/setup/password", admin.setup_password, "admin.setup.password"),
    # -- staff: review of patient uploads (web.uploads_admin, issue 7) --
    get("/admin/uploads", uploads_admin.uploads, "admin.uploads"),
    get("/admin/uploads/{upload_id}", uploads_admin.upload, "admin.upload"),
    post("/admin/uploads/{upload_id}/recheck", uploads_admin.recheck, "admin.upload.recheck"),
    post("/admin/uploads/{upload_id}/release", uploads_admin.release, "admin.upload.release"),
    post("/admin/uploads/{upload_id}/reject", uploads_admin.reject, "admin.upload.reject"),
    # -- the viewer (web.viewer, issue 4) --
    *_viewer("/transactions/{public_id}", viewer.RECIPIENT_VIEWS, "viewer"),
    *_viewer("/admin/transactions/{public_id}", viewer.STAFF_VIEWS, "admin.viewer"),
    # -- DICOMweb (web.dicomweb, issue 4): staff over all studies, one transaction --
    *_dicomweb("/dicomweb", "dicomweb"),
    *_dicomweb("/dicomweb/t/{public_id}", "dicomweb.t"),
    get("/dicomweb/ohif/{token}.json", dicomweb.ohif_data_source, "dicomweb.ohif"),
    route(hdrs.METH_OPTIONS, "/dicomweb/{tail:.*}", dicomweb.preflight, "dicomweb.preflight"),
    # -- DICOMweb tokens (web.dicomweb_pages) --
    post("/transactions/{public_id}/dicomweb-token", dicomweb_pages.recipient_token,
         "recipient.dicomweb_token"),
    post("/transactions/{public_id}/dicomweb-token/revoke", dicomweb_pages.recipient_revoke,
         "recipient.dicomweb_token.revoke"),
    get("/admin/dicomweb", dicomweb_pages.staff_page, "admin.dicomweb"),
    post("/admin/dicomweb/token", dicomweb_pages.staff_token, "admin.dicomweb.token"),
    post("/admin/dicomweb/revoke", dicomweb_pages.staff_revoke, "admin.dicomweb.revoke"),
    # -- uploads on request (web.upload, issue 7): a resumable, tus-like protocol --
    get("/transactions/{public_id}/upload", upload.page, "upload"),
    post("/transactions/{public_id}/upload/files", upload.add_file, "upload.files"),
    get("/transactions/{public_id}/upload/files/{file_id}", upload.get_file, "upload.file",
        allow_head=False),
    route(hdrs.METH_HEAD, "/transactions/{public_id}/upload/files/{file_id}", upload.head_file,
          "upload.file"),
    route(hdrs.METH_PATCH, "/transactions/{public_id}/upload/files/{file_id}",
          upload.patch_file, "upload.file"),
    route(hdrs.METH_DELETE, "/transactions/{public_id}/upload/files/{file_id}",
          upload.delete_file, "upload.file"),
    post("/transactions/{public_id}/upload/send", upload.send, "upload.send"),
    post("/transactions/{public_id}/upload/cancel", upload.cancel, "upload.cancel"),
    # -- staff: requests for images (web.admin_requests, issue 7) --
    get("/admin/requests/new", admin_requests.new_request, "admin.request.new"),
    post("/admin/requests", admin_requests.create_request, "admin.requests"),
    # -- reports and attachments (web.reports, issue 4; attachments issue 13) --
    get("/transactions/{public_id}/reports", reports.recipient_reports, "reports"),
    get("/transactions/{public_id}/reports/{sop_uid}", reports.recipient_report, "report"),
    get("/transactions/{public_id}/attachments", reports.recipient_attachments, "attachments"),
    post("/transactions/{public_id}/attachments", reports.recipient_attach, "attachments"),
    get("/admin/transactions/{public_id}/reports", reports.staff_reports, "admin.reports"),
    get("/admin/transactions/{public_id}/reports/{sop_uid}", reports.staff_report,
        "admin.report"),
    get("/admin/transactions/{public_id}/attachments", reports.staff_attachments,
        "admin.attachments"),
    post("/admin/transactions/{public_id}/attachments", reports.staff_attach,
         "admin.attachments"),
    post("/admin/transactions/{public_id}/attachments/{attachment_id}/file",
         reports.staff_file_attachment, "admin.attachment.file"),
    post("/admin/transactions/{public_id}/attachments/{attachment_id}/remove",
         reports.staff_remove_attachment, "admin.attachment.remove"),
)


def add_routes(app: web.Application, routes: Iterable[Route] = ROUTES) -> None:
    """Install the static files and ``routes`` on ``app``'s router.

    Each path becomes one resource, named by its routes, with one route per method
    (a GET's HEAD added before it, as :meth:`aiohttp.web.UrlDispatcher.add_get` does).

    Parameters
    ----------
    app : web.Application
        The application (not yet frozen).
    routes : iterable of Route
        The table (:data:`ROUTES` unless a test passes another).

    Raises
    ------
    ValueError
        Two routes of one path with different names, or one name for two paths.
    """
    router = app.router
    router.add_static(STATIC_PREFIX, STATIC_DIR, name=STATIC_NAME)
    resources: dict[str, web.Resource] = {}
    for entry in routes:
        resource = resources.get(entry.path)
        if resource is None:
            resource = resources[entry.path] = router.add_resource(entry.path, name=entry.name)
        elif resource.name != entry.name:
            raise ValueError(f"{entry.method} {entry.path}: named {entry.name!r}, but its "
                             f"other methods {resource.name!r}")
        if entry.method == hdrs.METH_GET and entry.allow_head:
            resource.add_route(hdrs.METH_HEAD, entry.view)
        resource.add_route(entry.method, entry.view)
