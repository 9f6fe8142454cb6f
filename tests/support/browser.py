"""A test client that keeps cookies like a browser on HTTPS.

aiohttp's cookie jar does not send ``Secure`` cookies over plain http, so the
tests read ``Set-Cookie`` themselves and send ``Cookie`` headers.
"""

from __future__ import annotations

import html
import re
from http.cookies import SimpleCookie
from typing import Any

import aiohttp


def input_value(page: str, name: str) -> str:
    """The value of the ``<input name=NAME>`` in ``page`` (unescaped), attributes in any order.

    Parameters
    ----------
    page : str
        An HTML page.
    name : str
        The input's ``name``.

    Returns
    -------
    str
        Its ``value``, or ``""`` when it has none.
    """
    tag = re.search(rf'<input[^>]*\sname="{name}"[^>]*>', page)
    assert tag, f"no field {name}"
    value = re.search(r'\svalue="([^"]*)"', tag.group(0))
    return html.unescape(value.group(1)) if value else ""


class Browser:
    """The test client plus a cookie store that sends Secure cookies, as a browser would.

    It also fills the staff pages' forms: :meth:`csrf` and :meth:`form`.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}
        #: Every ``Set-Cookie`` header received, for asserting cookie flags.
        self.set_cookies: list[str] = []

    async def request(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        """Send a request with the stored cookies (unless ``headers`` has ``Cookie``)."""
        headers = dict(kw.pop("headers", {}))
        if self.cookies and "Cookie" not in headers:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = await self.client.request(method, path, headers=headers,
                                             allow_redirects=False, **kw)
        for header in response.headers.getall("Set-Cookie", []):
            self.set_cookies.append(header)
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(header)
            for name, morsel in cookie.items():
                if morsel.value and morsel["max-age"] != "0":
                    self.cookies[name] = morsel.value
                else:
                    self.cookies.pop(name, None)
        return response

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        """GET ``path``."""
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        """POST to ``path``."""
        return await self.request("POST", path, **kw)

    async def page(self, path: str, status: int = 200) -> str:
        """GET ``path``, check the status and return the page text."""
        response = await self.get(path)
        assert response.status == status, (path, response.status)
        return await response.text()

    async def csrf(self, path: str = "/admin") -> str:
        """The session's CSRF token, read from a page's forms (a staff page by default)."""
        return input_value(await self.page(path), "csrf")

    async def form(self, path: str, data: dict[str, Any] | list[tuple[str, str]],
                   csrf: bool = True) -> aiohttp.ClientResponse:
        """POST a form with the session's CSRF token (read by :meth:`csrf`)."""
        items = list(data.items()) if isinstance(data, dict) else list(data)
        if csrf:
            items.append(("csrf", await self.csrf()))
        return await self.post(path, data=items)
