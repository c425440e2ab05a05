"""ASGI middleware in front of every route: request ids, access log, API key, body checks.

Each request gets an id (the client's ``X-Request-ID`` when it is short and printable, else
a new one), which is returned in the ``X-Request-ID`` header and starts every log line about
the request. The API key is checked on every path except ``/health``. POST bodies must be
JSON. The body is read in full before the route runs, so a body over the limit is rejected
with 413 whether or not the client sent a ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

logger = logging.getLogger("loratune.serve")

PUBLIC_PATHS = frozenset({"/health"})
_MAX_CLIENT_ID_LENGTH = 64


def error_body(message: str, kind: str, status: int) -> bytes:
    """Return an OpenAI-style error body, which OpenAI client libraries know how to show."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _request_id(headers: dict[bytes, bytes]) -> str:
    client_id = headers.get(b"x-request-id", b"").decode("latin-1")
    if client_id and len(client_id) <= _MAX_CLIENT_ID_LENGTH and client_id.isprintable() and " " not in client_id:
        return client_id
    return uuid.uuid4().hex[:16]


def _presented_key(headers: dict[bytes, bytes]) -> str | None:
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key is not None else None


class RequestGuard:
    """Pure ASGI middleware; ``api_key=None`` leaves every route open."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id, headers, request_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --shutdown-timeout ends. Respond to
            # them with 503 and end the task quietly instead of logging a traceback per request.
            logger.warning("%s %s %s cancelled by the server shutdown", request_id, scope["method"], scope["path"])
            if not status["code"]:
                await _reply(send_with_id, 503, error_body(
                    "the server shut down before this request finished; retry later", "server_shutting_down", 503
                ))
        except Exception:
            # Routes raise only RequestError and validation errors on purpose; anything else is
            # a bug. Log it under the request id and respond with 500 instead of dropping the connection.
            logger.exception("%s %s %s failed", request_id, scope["method"], scope["path"])
            if status["code"]:
                raise
            await _reply(send_with_id, 500, error_body(
                f"internal server error; the server log has details for request {request_id}", "server_error", 500
            ))
        finally:
            logger.info(
                "%s %s %s -> %s in %.1f ms",
                request_id, scope["method"], scope["path"], status["code"] or "no response",
                1000 * (time.perf_counter() - started),
            )

    async def _guarded(self, scope, receive, send, headers, request_id: str) -> None:
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            key = _presented_key(headers)
            if key is None or not hmac.compare_digest(key.encode(), self.api_key.encode()):
                problem = "missing API key" if key is None else "invalid API key"
                await _reject(
                    send, request_id, 401,
                    f"{problem}; send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    "authentication_error", extra_headers=[(b"www-authenticate", b"Bearer")],
                )
                return

        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if scope["method"] == "POST" and content_type != "application/json":
            await _reject(
                send, request_id, 415,
                f"unsupported content type {content_type or '(none)'!r}; send a JSON body with "
                "'Content-Type: application/json'",
            )
            return

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reject(send, request_id, 413, self._too_large_message())
            return
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > self.max_body_bytes:
                await _reject(send, request_id, 413, self._too_large_message())
                return
            more = message.get("more_body", False)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large_message(self) -> str:
        return (
            f"request body is larger than the server limit of {self.max_body_bytes} bytes "
            "(--max-body-bytes); send fewer or shorter texts"
        )


async def _reject(
    send, request_id: str, status: int, message: str, kind: str = "invalid_request_error",
    extra_headers: list | None = None,
) -> None:
    logger.info("%s rejected with %d: %s", request_id, status, message)
    await _reply(send, status, error_body(message, kind, status), extra_headers)


async def _reply(send, status: int, body: bytes, extra_headers: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
