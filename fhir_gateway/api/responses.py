"""FHIR JSON responses and the one handler that turns errors into OperationOutcome."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_gateway.errors import (
    AuthError,
    GatewayError,
    StoreBusyError,
    UpstreamError,
    operation_outcome,
)

FHIR_JSON = "application/fhir+json; charset=utf-8"
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
        if isinstance(exc, StoreBusyError):  # nothing changed: the caller may simply retry
            log.warning("request.busy", status=exc.status_code)
            return outcome_response(
                exc.status_code,
                exc.issue_code,
                exc.message,
                headers={"Retry-After": str(exc.retry_after)},
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
                    "diagnostics": f"{where}: {err.get('msg')}",
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Never a traceback to the caller; the log has the class and the request id.
        log.exception("request.error", error=type(exc).__name__)
        return outcome_response(
            500,
            "exception",
            "internal error; see the gateway log for the request id in X-Request-ID",
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
    return response
