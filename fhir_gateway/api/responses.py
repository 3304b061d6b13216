"""FHIR JSON responses and the one handler that turns errors into OperationOutcome."""

from __future__ import annotations

import errno
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_gateway.errors import (
    AuthError,
    GatewayError,
    UpstreamError,
    operation_outcome,
    pydantic_message,
)

FHIR_JSON = "application/fhir+json; charset=utf-8"
# Errors of a data directory that cannot be written: 503, not 500.
STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
log = structlog.get_logger(__name__)


class FhirResponse(Response):
    """`application/fhir+json; charset=utf-8` with UTF-8 JSON as written (no ASCII escaping)."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def outcome_response(
    status: int,
    issue_code: str,
    message: str,
    expression: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> FhirResponse:
    issue: dict[str, Any] = {"severity": "error", "code": issue_code, "diagnostics": message}
    if expression:
        issue["expression"] = expression
    return FhirResponse(operation_outcome(issue), status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> Response:
        issues = getattr(exc, "issues", None) or [exc.to_issue()]
        headers = (
            {"WWW-Authenticate": 'Bearer realm="fhir-gateway"'}
            if (type(exc) is AuthError)
            else None
        )
        if exc.status_code >= 500:
            log.error("request.failed", error=type(exc).__name__, status=exc.status_code)
            if not isinstance(exc, UpstreamError):  # internal detail (paths, config) stays here
                return outcome_response(
                    exc.status_code,
                    exc.issue_code,
                    "internal error; see the gateway log for the request id in X-Request-ID",
                )
        return FhirResponse(
            operation_outcome(*issues), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        issues = []
        for err in exc.errors()[:20]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            issues.append(
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": f"{where}: {pydantic_message(err)}",
                    "expression": [where],
                }
            )
        return FhirResponse(operation_outcome(*issues), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}.get(
            exc.status_code, "processing"
        )
        return outcome_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _database(request: Request, exc: sqlalchemy.exc.OperationalError) -> Response:
        # A database that cannot be reached or written (read-only file or mount, full disk,
        # lost connection): the caller may retry later; nothing was stored.
        log.error("request.database_unavailable", error=type(exc.orig).__name__)
        return _unavailable("the database is unavailable or cannot be written")

    @app.exception_handler(OSError)
    async def _storage(request: Request, exc: OSError) -> Response:
        if exc.errno not in STORAGE_ERRNOS:
            return await _unexpected(request, exc)
        log.error("request.storage_unavailable", error=type(exc).__name__, errno=exc.errno)
        return _unavailable("the gateway's storage cannot be written")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Never a traceback to the caller; the log has the class and the request id.
        log.exception("request.error", error=type(exc).__name__)
        response = outcome_response(
            500,
            "exception",
            "internal error; see the gateway log for the request id in X-Request-ID",
        )
        security_headers(request.url.path, response.headers)  # this one bypasses middleware
        return response


def _unavailable(message: str) -> FhirResponse:
    return outcome_response(
        503, "transient", f"{message}; try again later", headers={"Retry-After": "30"}
    )


async def request_id_middleware(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Bind a request id (ours, or a sane one the caller sent) to every log line of the request."""
    given = request.headers.get("x-request-id", "")
    rid = given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=rid)
    try:
        response = await call_next(request)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = rid
    security_headers(request.url.path, response.headers)
    return response


# Public documents without PHI that caches may keep (they set their own Cache-Control).
CACHEABLE_PATHS = frozenset(
    {"/fhir/metadata", "/fhir/.well-known/smart-configuration", "/.well-known/jwks.json"}
)


def security_headers(path: str, headers: MutableHeaders) -> None:
    """`nosniff` on every response; `Cache-Control: no-store` on every response but the public
    discovery documents, so no browser or proxy keeps a copy of PHI (a bundle, an image, an
    error naming a case)."""
    headers["X-Content-Type-Options"] = "nosniff"
    if path not in CACHEABLE_PATHS:
        headers["Cache-Control"] = "no-store"
