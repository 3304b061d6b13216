"""The rest-hook channel of topic-based subscriptions (FHIR R4 Subscriptions Backport IG 1.1.0):
POST a notification Bundle to the subscriber's endpoint, with its configured headers.

One attempt per call: the job queue retries (with backoff) and keeps the order, so a retry here
would only hold the subscription's send lease longer.
"""

from __future__ import annotations

from collections.abc import Mapping

import requests
import structlog

from connectors._http import FHIR_JSON, send
from fhir_gateway.resources import Resource

log = structlog.get_logger(__name__)


class RestHookChannel:
    """Sends notification Bundles to rest-hook endpoints (`Subscription.channel.endpoint`)."""

    def __init__(self, session: requests.Session, *, timeout_s: float = 10.0) -> None:
        self._session = session  # pooling and TLS settings: the caller's
        self._timeout = timeout_s

    def post(
        self, endpoint: str, bundle: Resource, *, headers: Mapping[str, str] | None = None
    ) -> int:
        """POST `bundle` to `endpoint`; returns the 2xx status.

        Raises:
            UpstreamUnavailableError: timeout, connection failure, 429 or 5xx (retry later).
            UpstreamRejectedError: any other 4xx from the subscriber.
        """
        resp = send(
            self._session,
            "POST",
            endpoint,
            system="subscriber",
            timeout=self._timeout,
            json=bundle,
            headers={**(headers or {}), "Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        )
        status = resp.status_code
        resp.close()
        log.info("subscription.post.done", status=status, kind=_kind(bundle))
        return status


def _kind(bundle: Resource) -> str:
    """The notification type (handshake, heartbeat, event-notification) for the log line."""
    for entry in bundle.get("entry") or []:
        for p in (entry.get("resource") or {}).get("parameter") or []:
            if p.get("name") == "type":
                return str(p.get("valueCode"))
    return "unknown"
