"""The routes table (:mod:`web.routes`): every URL resolves to its view, and only the table
registers routes (issue 14: there were 11 ``setup_routes`` functions)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from aiohttp import hdrs, web
from aiohttp.test_utils import make_mocked_request

from config import load_settings
from iepnode.wiring import build_services
from web.app import create_app
from web.routes import ROUTES, STATIC_NAME, STATIC_PREFIX, Route, add_routes, get

WEB = Path(__file__).resolve().parent.parent / "web"
#: What registering a route takes: the router (``app.router.add_get(...)``, ...) or a
#: route table definition (``web.RouteTableDef``, for ``app.add_routes``).
REGISTERING = {"router", "RouteTableDef", "add_routes"}
#: A value for a URL placeholder that fits its pattern (the first that does).
SAMPLES = ("IEP00000001", "png", "1.2.3", "x/y")


def sample_url(app: web.Application, entry: Route) -> str:
    """A concrete URL of ``entry``'s path: each placeholder filled to fit its pattern."""
    resource = app.router[entry.name]
    info = resource.get_info()
    if "pattern" not in info:  # a plain path
        return info["path"]
    pattern: re.Pattern[str] = info["pattern"]
    parts = {}
    for group in pattern.groupindex:
        sub = re.compile(rf"\{{{group}(:[^{{}}]*)?\}}")
        regex = (sub.search(entry.path).group(1) or ":[^{}/]+")[1:]
        parts[group] = next(s for s in SAMPLES if re.fullmatch(regex, s))
    url = str(resource.url_for(**parts))
    assert pattern.fullmatch(url), (entry.path, url)
    return url


def routed_app() -> web.Application:
    app = web.Application()
    add_routes(app)
    return app


async def test_every_route_resolves_to_its_view() -> None:
    app = routed_app()
    for entry in ROUTES:
        url = sample_url(app, entry)
        methods = [entry.method] + (
            [hdrs.METH_HEAD] if entry.method == hdrs.METH_GET and entry.allow_head else [])
        for method in methods:
            match = await app.router.resolve(make_mocked_request(method, url, app=app))
            assert match.http_exception is None, (method, entry.path)
            assert match.route.handler is entry.view, (method, entry.path)
            assert match.route.resource is not None
            assert match.route.resource.name == entry.name, (method, entry.path)


async def test_a_get_without_head_answers_head_405() -> None:
    # /t/{token} sends a passcode: a link scanner probing with HEAD must not reach it.
    app = routed_app()
    without = [entry for entry in ROUTES if entry.method == hdrs.METH_GET and not entry.allow_head]
    assert "/t/{token}" in {entry.path for entry in without}
    for entry in without:
        url = sample_url(app, entry)
        match = await app.router.resolve(make_mocked_request(hdrs.METH_HEAD, url, app=app))
        explicit = [e.view for e in ROUTES if e.path == entry.path and e.method == "HEAD"]
        if explicit:  # the upload protocol's HEAD has its own view
            assert match.route.handler is explicit[0]
        else:
            assert isinstance(match.http_exception, web.HTTPMethodNotAllowed), entry.path


def test_the_table_is_consistent() -> None:
    pairs = [(entry.method, entry.path) for entry in ROUTES]
    assert len(pairs) == len(set(pairs)), "a method of a path is in the table twice"
    names: dict[str, str] = {}
    for entry in ROUTES:
        assert names.setdefault(entry.name, entry.path) == entry.path, (
            f"{entry.name!r} names {names[entry.name]} and {entry.path}")
    paths: dict[str, str] = {}
    for entry in ROUTES:
        assert paths.setdefault(entry.path, entry.name) == entry.name, (
            f"{entry.path}: named {paths[entry.path]!r} and {entry.name!r}")
    assert STATIC_NAME not in names


def test_add_routes_refuses_two_names_for_one_path() -> None:
    async def view(request: web.Request) -> web.Response:
        return web.Response()

    with pytest.raises(ValueError, match="named"):
        add_routes(web.Application(), [get("/a", view, "a"), Route("POST", "/a", view, "b")])


def test_create_app_serves_exactly_the_table(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    app = create_app(settings, build_services(settings))
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.resource.name != STATIC_NAME}
    table = {(entry.method, app.router[entry.name].canonical) for entry in ROUTES}
    table |= {(hdrs.METH_HEAD, app.router[entry.name].canonical) for entry in ROUTES
              if entry.method == hdrs.METH_GET and entry.allow_head}
    assert served == table
    assert app.router[STATIC_NAME].canonical == STATIC_PREFIX


def test_no_view_module_registers_routes_itself() -> None:
    offenders = []
    for path in sorted(WEB.glob("*.py")):
        if path.name in ("routes.py", "app.py"):  # the table, and the factory installing it
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.name == "setup_routes":
                offenders.append(f"{path.name}: def setup_routes")
            elif isinstance(node, ast.Attribute) and node.attr in REGISTERING:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Name) and node.id in REGISTERING:
                offenders.append(f"{path.name}:{node.lineno}: {node.id}")
    assert offenders == []
    app_module = ast.parse((WEB / "app.py").read_text())
    assert not [n for n in ast.walk(app_module)
                if isinstance(n, ast.Attribute) and n.attr == "router"], (
        "create_app installs web.routes.ROUTES (add_routes), nothing else")
