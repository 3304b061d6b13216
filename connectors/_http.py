"""One request + error translation for the imaging connectors (STYLE.md 5: one status table).

timeout / connection error / 429 / 5xx -> UpstreamUnavailableError (retryable, Retry-After kept),
404 / 410 -> UpstreamNotFoundError, other 4xx -> UpstreamRejectedError.
"""

from __future__ import annotations

from typing import Any

import requests
import structlog

from fhir_gateway.errors import (
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)

log = structlog.get_logger(__name__)


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
    """`session.request(...)`, returning only a < 400 response; errors become ours."""
    try:
        r = session.request(method, url, timeout=timeout, auth=auth, stream=stream, **kwargs)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise UpstreamUnavailableError(
            f"{system} unreachable: {type(exc).__name__}", system=system, url=url
        ) from exc
    except requests.RequestException as exc:
        raise UpstreamError(
            f"{system} request failed: {type(exc).__name__}", system=system, url=url
        ) from exc
    if r.status_code < 400:
        return r
    status = r.status_code
    r.close()
    message = f"{system} answered {status} to {method} {url.split('?')[0]}"
    if status in (404, 410):
        raise UpstreamNotFoundError(message, system=system, url=url, status=status)
    if status == 429 or status >= 500:
        raise UpstreamUnavailableError(
            message,
            system=system,
            url=url,
            status=status,
            retry_after=_retry_after(r.headers.get("Retry-After")),
        )
    log.warning("upstream.request.rejected", system=system, status=status)
    raise UpstreamRejectedError(message, system=system, url=url, status=status)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP-date: let the job's backoff decide
