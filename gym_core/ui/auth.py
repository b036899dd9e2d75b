"""The UI's token: the UI launches training processes and reads the runs folder, so
every page, asset and websocket needs the token printed at start (like Jupyter's), or
the one given with ``--token``.

The first visit carries it in the address (``/?token=...``); the answer sets a cookie
(HttpOnly, SameSite=Strict, named after the port, so two UIs on one machine keep their
own) and redirects to the same address without it. Scripts may send
``Authorization: Bearer TOKEN`` instead. Anything else gets 401 (a websocket is closed
before it opens)."""

from __future__ import annotations

import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

REFUSED = (b"gym ui: this page needs the UI's token: open the address python -m gym_core.ui "
           b"printed when it started (it ends in ?token=...)\n")


def cookie_name(port: int) -> str:
    return f"gym_ui_token_{port}"


class TokenGuard:
    """ASGI middleware requiring the token on every HTTP request and websocket."""

    def __init__(self, app, token: str, port: int):
        self.app, self.token, self.cookie = app, token, cookie_name(port)

    def _matches(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        given = dict(query).get("token")
        if self._matches(given):
            if scope["type"] == "http" and scope.get("method") == "GET":
                # set the cookie and drop the token from the address bar
                rest = urlencode([(k, v) for k, v in query if k != "token"])
                location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
                await send({"type": "http.response.start", "status": 303, "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", (f"{self.cookie}={self.token}; Path=/; HttpOnly; "
                                     "SameSite=Strict").encode("latin-1")),
                    (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            return await self.app(scope, receive, send)
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header: no token in it
            jar = SimpleCookie()
        morsel = jar.get(self.cookie)
        bearer = headers.get("authorization", "")
        if (morsel is not None and self._matches(morsel.value)) or \
                (bearer.startswith("Bearer ") and self._matches(bearer[7:])):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(REFUSED)).encode())]})
        await send({"type": "http.response.body", "body": REFUSED})
