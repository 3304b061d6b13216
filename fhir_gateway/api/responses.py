"""FHIR JSON responses and the one handler that turns errors into OperationOutcome."""

from __future__ import annotations

import errno
import re
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_gateway.errors import (
    AuthError,
    ConfigError,
    GatewayError,
    StoreBusyError,
    UpstreamError,
    operation_outcome,
    pydantic_message,
)
from fhir_gateway.resources import json_bytes
from fhir_gateway.security import audit

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
        return json_bytes(content)


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


_CASE_ID = re.compile(r"^[A-Za-z0-9-]{1,36}$")


def _record_refused(request: Request, status: int) -> None:
    """One AuditEvent per refused request (IHE BALP pattern, failing outcome 8): who if known,
    the route template and method, the case id when it is a well-formed id; no values."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        return
    who = getattr(request.state, "principal", None)
    actor = who.actor if who is not None else audit.Actor("anonymous", "none")
    route = getattr(request.scope.get("route"), "path", None) or "unmatched"
    case_id = request.path_params.get("case_id")
    try:
        with store.session() as s:
            audit.record(
                s,
                audit.REFUSED_ACTIONS[status],
                actor,
                case_id=case_id if isinstance(case_id, str) and _CASE_ID.match(case_id) else None,
                entity=[f"route:{request.method} {route}", f"status:{status}"],
                outcome=audit.SERIOUS_FAILURE,
            )
    except Exception:  # the refusal is answered even if its audit row could not be written
        log.exception("audit.refused.error", status=status)


async def audit_refused(request: Request, status: int) -> None:
    """Audit a 401/403 answer (from a request handler's event loop)."""
    if status in audit.REFUSED_ACTIONS:
        await run_in_threadpool(_record_refused, request, status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> Response:
        if isinstance(exc, AuthError):
            await audit_refused(request, exc.status_code)
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
            # A configuration problem's message names settings, files and packages, never
            # patient data: the operator needs it to fix the cause. Others keep only the class.
            reason = {"reason": exc.message} if isinstance(exc, ConfigError) else {}
            log.error("request.failed", error=type(exc).__name__, status=exc.status_code, **reason)
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
        await audit_refused(request, exc.status_code)
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
