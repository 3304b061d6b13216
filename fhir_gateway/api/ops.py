"""Operator endpoints: `/ready` (readiness, no auth) and `/metrics` (Prometheus text format).

`/metrics` is open to the client addresses in `metrics.allow_from` (default loopback: a
Prometheus on the same host, or one the reverse proxy lets through) and to admin tokens from
anywhere. The metrics carry no PHI (kinds, states, route templates, counts), but queue sizes and
traffic are still nobody else's business.
"""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from fhir_gateway import metrics, readiness
from fhir_gateway.api.deps import SettingsDep, StoreDep, principal_of
from fhir_gateway.errors import ForbiddenError
from fhir_gateway.settings import Settings

router = APIRouter(tags=["ops"])


@router.get("/ready")
def ready(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """200 when every check passes, else 503 naming the failed checks (reasons in the log)."""
    checks = readiness.check_all(store, settings)
    failed = [c.name for c in checks if not c.ok]
    body = {
        "status": "not ready" if failed else "ready",
        "checks": {c.name: "ok" if c.ok else "failed" for c in checks},
        "failed": failed,
    }
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics")
def scrape(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """Prometheus text exposition: counters of this process, job gauges from the database."""
    if not _allowed_address(request, settings):
        who = principal_of(request)  # 401 without a token
        if who.role != "admin":
            raise ForbiddenError("metrics are for admins or the configured scrapers")
    return Response(metrics.render(store), media_type=metrics.CONTENT_TYPE)


def _allowed_address(request: Request, settings: Settings) -> bool:
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(
        address in ipaddress.ip_network(net, strict=False) for net in settings.metrics.allow_from
    )
