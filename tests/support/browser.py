"""A test client that keeps cookies like a browser on HTTPS.

aiohttp's cookie jar does not send ``Secure`` cookies over plain http, so the
tests read ``Set-Cookie`` themselves and send ``Cookie`` headers.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import aiohttp


class Browser:
    """The test client plus a cookie store that sends Secure cookies, as a browser would."""

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
