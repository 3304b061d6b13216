"""Per-request observability: the request id, one access log line, the HTTP metrics, and the
security headers every response carries (`api.responses.security_headers`).

A plain ASGI middleware (not `BaseHTTPMiddleware`), so the duration runs until the last byte of
a streamed response. The access line carries the request id, method, route template (never the
raw path or the query string: both can hold identifiers), status, duration and the client
address as the gateway believes it (the peer, or the trusted proxy's `X-Forwarded-For`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_gateway.api.responses import security_headers
from fhir_gateway.metrics import HTTP_DURATION, HTTP_REQUESTS

log = structlog.get_logger("fhir_gateway.access")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route: the raw path is not a label (it can hold identifiers)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/fhir/{resource_type}/{rid}`), or `unmatched`."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers") or []:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if given.isalnum() and len(given) <= 64:
                return str(given)
    return uuid.uuid4().hex


class AccessMiddleware:
    """Bind a request id (ours, or a sane one the caller sent) to every log line of the request,
    echo it in `X-Request-ID`, then log one access line and count the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        structlog.contextvars.bind_contextvars(request_id=rid)
        started = time.perf_counter()
        status = [500]
        logged = [False]

        def finish() -> None:
            if logged[0]:
                return
            logged[0] = True
            elapsed = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            route = route_template(scope)
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status[0])).inc()
            HTTP_DURATION.labels(method=method, route=route).observe(elapsed)
            client = scope.get("client")
            log.info(
                "http.request.done",
                method=method,
                route=route,
                status=status[0],
                duration_ms=round(elapsed * 1000, 1),
                client=client[0] if client else None,
                scheme=scope.get("scheme"),
            )

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                message = {**message, "headers": list(message.get("headers") or [])}
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                security_headers(scope.get("path", ""), headers)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            # The error handler outside us answers 500; the request id stays bound for its log.
            status[0] = 500
            finish()
            raise
        finish()
        structlog.contextvars.unbind_contextvars("request_id")
