"""Request-body size limit: a pure ASGI middleware that answers 413 before any route reads or parses the body.

Contract:
- `BodySizeLimit(app, max_bytes)`: an HTTP request whose `Content-Length` exceeds `max_bytes` gets 413 at once,
  without a byte of its body being read (a client sending `Expect: 100-continue` never uploads it). A body of
  unknown length (chunked transfer encoding, or no valid Content-Length) is read and counted first; once it
  passes `max_bytes` the request gets 413 and the rest is not read. A body within the limit reaches the app
  unchanged (a counted body as one message); later `receive()` calls (disconnects) go straight to the server.
- The 413 carries `api.errors.error_body` (type `RequestTooLargeError`, the limit named in the message) and
  `Connection: close`, since the unread rest of the body cannot be told apart from a next request.
- Exactly `max_bytes` bytes are allowed. Non-HTTP scopes (lifespan) pass through.
"""

from __future__ import annotations

import json

from mtlora_server.api.errors import error_body

DEFAULT_MAX_REQUEST_BODY_SIZE = 8 * 2**20


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BODY_SIZE):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if length is not None:
            if length > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)   # the server never delivers more than Content-Length
        try:
            first = await self._read_counted(receive)
        except _TooLarge:
            return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return first
        await self.app(scope, replay, send)

    async def _read_counted(self, receive) -> dict:
        """The whole body as one `http.request` message (or the `http.disconnect` that cut it short)."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(
            f"the request body is larger than this server's limit of {self.max_bytes} bytes "
            "(mtlora-serve --max-request-body-size)", "RequestTooLargeError", 413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None


def _content_length(scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:          # servers reject these before the app; count the body instead
        return None

