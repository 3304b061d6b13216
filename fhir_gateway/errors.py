"""The one error hierarchy of fhir-gateway; each error knows its HTTP status and FHIR issue code.

```
GatewayError                      base; status_code + FHIR issue code
├── ConfigError                   bad or missing settings (startup)
├── InputError                    a document/message/request we were given is unusable (4xx)
│   ├── ParseError                not well-formed (JSON, XML, ER7, DICOM Part 10)
│   ├── ValidationError           well-formed but invalid FHIR (element path in `expression`)
│   ├── MappingError              well-formed but unmappable; carries source + path
│   ├── UnknownPartnerError       the referral names no registered partner
│   ├── NotFoundError             the requested resource does not exist here
│   │   └── GoneError             410: it existed but is no more (an expired or revoked link)
│   ├── ConflictError             state conflict (illegal Task transition, version mismatch)
│   │   └── CaseClosedError       the case's Task was cancelled or rejected: no more work on it
│   ├── PreconditionFailedError   conditional request matched several resources
│   ├── PayloadTooLargeError      body over the size limit
│   └── UnsupportedMediaTypeError wrong Content-Type
├── AuthError                     401: no or bad credentials
│   └── ForbiddenError            403: authenticated, not allowed
├── UpstreamError                 remote system failed; carries system, url, status, outcome
│   ├── UpstreamUnavailableError  timeout / connection / 5xx / 429 - retryable
│   ├── UpstreamRejectedError     4xx, often with an OperationOutcome
│   ├── UpstreamNotFoundError     404/410 from the remote system
│   └── TokenError                an OAuth token endpoint refused us; carries the OAuth `error`
├── DeliveryError                 the DiagnosticReport could not be delivered
└── StoreBusyError                503: our database stayed locked or busy; retry (Retry-After)
```

Only this module and `resources` may be imported by `mappers` and `connectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status_code: ClassVar[int] = 500
    issue_code: ClassVar[str] = "exception"  # FHIR IssueType (http://hl7.org/fhir/issue-type)

    def __init__(self, message: str, *, expression: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression or []

    def to_issue(self) -> dict[str, Any]:
        """This error as one OperationOutcome.issue."""
        issue: dict[str, Any] = {
            "severity": "error",
            "code": self.issue_code,
            "diagnostics": self.message,
        }
        if self.expression:
            issue["expression"] = self.expression
        return issue


class ConfigError(GatewayError):
    issue_code = "exception"


class InputError(GatewayError):
    status_code = 400
    issue_code = "invalid"


class ParseError(InputError):
    issue_code = "structure"

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        super().__init__(
            f"{message} (at {path})" if path else message, expression=[path] if path else None
        )
        self.source, self.path = source, path


class ValidationError(InputError):
    """Invalid FHIR content. 400 for structural failures, 422 for business-rule failures."""

    status_code = 422
    issue_code = "invalid"

    def __init__(
        self,
        message: str,
        *,
        expression: list[str] | None = None,
        issues: list[dict[str, Any]] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, expression=expression)
        self.issues = issues or []
        if status_code is not None:
            self.status_code = status_code  # type: ignore[misc]


class MappingError(InputError):
    status_code = 422
    issue_code = "processing"

    def __init__(self, message: str, *, source: str, path: str) -> None:
        super().__init__(f"{message} (at {path})", expression=[path])
        self.source, self.path = source, path


class UnknownPartnerError(InputError):
    status_code = 422
    issue_code = "business-rule"


class NotFoundError(InputError):
    status_code = 404
    issue_code = "not-found"


class GoneError(NotFoundError):
    status_code = 410
    issue_code = "expired"


class ConflictError(InputError):
    status_code = 409
    issue_code = "conflict"


class CaseClosedError(ConflictError):
    """The case's referral Task is cancelled or rejected (STANDARDS RF-03): nothing more may be
    pulled, written, submitted or delivered for it. A job that meets it stops without retry."""

    issue_code = "business-rule"

    def __init__(self, case_id: str, status: str, doing: str) -> None:
        super().__init__(
            f"case {case_id} is {status} (its referral Task was {status}); {doing} is not allowed",
            expression=["Task.status"],
        )
        self.case_id, self.status = case_id, status


class PreconditionFailedError(InputError):
    status_code = 412
    issue_code = "duplicate"


class PayloadTooLargeError(InputError):
    status_code = 413
    issue_code = "too-costly"


class UnsupportedMediaTypeError(InputError):
    status_code = 415
    issue_code = "not-supported"


class NotAcceptableError(InputError):
    """None of the representations the caller accepts can be served (e.g. no transcoding)."""

    status_code = 406
    issue_code = "not-supported"


class AuthError(GatewayError):
    status_code = 401
    issue_code = "login"


class ForbiddenError(AuthError):
    status_code = 403
    issue_code = "forbidden"


class UpstreamError(GatewayError):
    """A remote system failed. `retry_after` (seconds) is set when the remote said when to retry."""

    status_code = 502
    issue_code = "transient"

    def __init__(
        self,
        message: str,
        *,
        system: str = "",
        url: str = "",
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.system, self.url, self.status = system, url, status
        self.outcome, self.retry_after = outcome, retry_after


class UpstreamUnavailableError(UpstreamError):
    status_code = 503


class UpstreamRejectedError(UpstreamError):
    issue_code = "processing"


class UpstreamNotFoundError(UpstreamRejectedError):
    issue_code = "not-found"


class DeliveryError(GatewayError):
    status_code = 502
    issue_code = "transient"


class StoreBusyError(GatewayError):
    """Our own database stayed locked (SQLite) or hit a lock timeout / deadlock (PostgreSQL)
    for longer than we wait: the request changed nothing and may be retried after
    `retry_after` seconds (503 + Retry-After, never a 500)."""

    status_code = 503
    issue_code = "transient"
    retry_after: int = 1


def pydantic_message(err: Mapping[str, Any]) -> str:
    """The message of one pydantic error dict, never the value that was given: `input` and any
    copy of it inside the message are left out (a bad birth date must not come back, or go to
    a log, in the error about it)."""
    msg = str(err.get("msg") or "invalid value")
    given = err.get("input")
    if isinstance(given, (str, int, float)) and not isinstance(given, bool):
        text = str(given)
        if len(text) >= 3 and text in msg:
            msg = msg.replace(text, "(value)")
    return msg


def operation_outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    """An OperationOutcome resource holding `issues`."""
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


class TokenError(UpstreamRejectedError):
    """An OAuth 2.0 token endpoint refused us (RFC 6749 §5.2); `error` is its OAuth error code."""

    issue_code = "login"

    def __init__(
        self,
        message: str,
        *,
        error: str,
        description: str | None = None,
        system: str = "",
        url: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message, system=system, url=url, status=status)
        self.error, self.description = error, description
