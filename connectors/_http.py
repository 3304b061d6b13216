"""HTTP request + error translation + retry, in one place, for every connector (STYLE.md §4-5).

- Every request has a timeout.
- 429/503 with `Retry-After` (delay-seconds or HTTP-date, RFC 9110 §10.2.3) are honoured;
  5xx, timeouts and connection errors back off exponentially with jitter (STANDARDS RS-40).
- Only idempotent requests are retried (RS-41): GET/HEAD/OPTIONS/PUT/DELETE, a POST search
  (`.../_search`) and a conditional create (`If-None-Exist`).
- Attempts and the total wait are capped; the last error is raised, typed (errors.py), with the
  remote OperationOutcome when there is one (RS-09: non-FHIR bodies still give a typed error).

Sleep, clock and randomness are injectable so tests need no real waiting.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import structlog

from fhir_gateway.errors import (
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

log = structlog.get_logger(__name__)

FHIR_JSON = "application/fhir+json"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts, and the backoff between them (seconds)."""

    max_attempts: int = 5
    max_total_wait_s: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 300.0  # a longer Retry-After is handed to the job queue instead


@dataclass
class Http:
    """The injectable parts of a connector's HTTP: session, timeout, retry policy, time."""

    session: requests.Session
    system: str = "remote"
    timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    rand: Callable[[], float] = random.random

    def request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool | None = None,
        accept_status: Collection[int] = (),
        **kwargs: Any,
    ) -> requests.Response:
        """Send one request (retrying what may be retried) and return a 2xx/3xx response.

        Statuses in `accept_status` are returned instead of raised (e.g. OAuth errors at 400).

        Raises:
            UpstreamUnavailableError: timeouts, connection errors, 5xx, 429, after the retries.
            UpstreamNotFoundError: 404 / 410.
            UpstreamRejectedError: any other 4xx.
        """
        method = method.upper()
        if idempotent is None:
            idempotent = is_idempotent(method, url, kwargs.get("headers"))
        kwargs.setdefault("timeout", self.timeout_s)
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.session.request(method, url, **kwargs)
            except requests.Timeout as exc:
                error: UpstreamError = UpstreamUnavailableError(
                    f"{self.system}: {method} {_path(url)} timed out", system=self.system, url=url
                )
                error.__cause__ = exc
            except requests.ConnectionError as exc:
                error = UpstreamUnavailableError(
                    f"{self.system}: {method} {_path(url)} could not connect",
                    system=self.system,
                    url=url,
                )
                error.__cause__ = exc
            else:
                if response.status_code < 400 or response.status_code in accept_status:
                    return response
                error = error_from_response(response, self.system, self.wall_clock())
                response.close()
            wait = self.retry_wait(error, attempt, waited, idempotent)
            fields = {"system": self.system, "method": method, "path": _path(url)}
            if wait is None:
                log.info("http.request.failed", **fields, status=error.status, attempts=attempt)
                raise error
            log.info(
                "http.request.retry",
                **fields,
                status=error.status,
                attempt=attempt,
                wait_s=round(wait, 3),
            )
            self.sleep(wait)
            waited += wait

    def retry_wait(
        self, error: UpstreamError, attempt: int, waited: float, idempotent: bool = True
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up (raise `error`)."""
        if not isinstance(error, UpstreamUnavailableError) or not idempotent:
            return None
        if attempt >= self.retry.max_attempts:
            return None
        if error.retry_after is not None:
            if error.retry_after > self.retry.max_retry_after_s:
                return None
            wait = error.retry_after
        else:
            cap = min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2 ** (attempt - 1))
            wait = cap / 2 + self.rand() * cap / 2  # "equal jitter"
        if waited + wait > self.retry.max_total_wait_s:
            return None
        return wait


def is_idempotent(method: str, url: str, headers: Mapping[str, str] | None) -> bool:
    """GET-like methods, POST searches and conditional creates may be sent twice (RS-41)."""
    if method in IDEMPOTENT_METHODS:
        return True
    if method == "POST":
        if urlsplit(url).path.rstrip("/").endswith("/_search"):
            return True
        return any(k.lower() == "if-none-exist" for k in (headers or {}))
    return False


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from `now`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def error_from_response(
    response: requests.Response, system: str, now: datetime | None = None
) -> UpstreamError:
    """The typed error for a 4xx/5xx response (one status table, as fhirpy has)."""
    status = response.status_code
    outcome = operation_outcome_of(response)
    detail = _outcome_text(outcome) if outcome else _body_hint(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now or datetime.now(UTC))
    method = response.request.method if response.request is not None else "?"
    url = response.url or ""
    message = f"{system}: {method} {_path(url)} -> HTTP {status}"
    if detail:
        message += f": {detail}"
    kwargs: dict[str, Any] = {
        "system": system,
        "url": url,
        "status": status,
        "outcome": outcome,
        "retry_after": retry_after,
    }
    if status in (404, 410):
        return UpstreamNotFoundError(message, **kwargs)
    if status in (408, 429) or (status >= 500 and status != 501):
        return UpstreamUnavailableError(message, **kwargs)
    return UpstreamRejectedError(message, **kwargs)


def operation_outcome_of(response: requests.Response) -> dict[str, Any] | None:
    """The OperationOutcome body of a response, if it has one."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _outcome_text(outcome: dict[str, Any]) -> str:
    parts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        parts.append(f"[{issue.get('code', '?')}] {text}".strip())
    return "; ".join(parts)[:500]


def _body_hint(response: requests.Response) -> str:
    """A short, safe description of a non-FHIR error body (OAuth JSON, HTML from a proxy)."""
    try:
        body = response.json()
    except ValueError:
        ctype = response.headers.get("Content-Type", "").split(";")[0]
        return f"non-FHIR body ({ctype or 'no content type'})"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"error={body['error']}"
    return "non-FHIR JSON body"


def _path(url: str) -> str:
    """The path of a URL without its query (queries may carry identifiers: never log them)."""
    return urlsplit(url).path or "/"


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    system: str,
    timeout: float,
    auth: requests.auth.AuthBase | None = None,
    stream: bool = False,
    **kwargs: Any,
) -> requests.Response:
    """One attempt, no retry: the imaging pull resumes per instance and the job queue retries
    the job, so a retry here would only multiply waits. Errors are typed as in `Http`."""
    http = Http(session, system=system, timeout_s=timeout, retry=RetryPolicy(max_attempts=1))
    return http.request(method, url, auth=auth, stream=stream, **kwargs)
