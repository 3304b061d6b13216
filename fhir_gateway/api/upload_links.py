"""Patient upload links: the admin API (`/cases/{id}/upload-links`: create, list, revoke) and
the link's own list of what it received (`/upload/{token}/received`; the page itself is
`web.upload`).
The files themselves go through the tus server (`api.uploads`) with the token in the
`Upload-Link` header. The token is a path parameter here: the access log line carries the
route template (`/upload/{token}`), never the path, so no token reaches the logs.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import ADMIN, SettingsDep, StoreDep
from fhir_gateway.api.documents import NO_STORE
from fhir_gateway.errors import InputError, PayloadTooLargeError
from fhir_gateway.records import upload_links
from fhir_gateway.security.access import Principal

router = APIRouter(tags=["upload-links"])
MAX_BODY = 4096


async def _options(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise PayloadTooLargeError(f"body is over the {MAX_BODY}-byte limit")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise InputError('body must be JSON: {"expiresInDays": n}') from None
    if not isinstance(body, dict):
        raise InputError('body must be a JSON object: {"expiresInDays": n}')
    return body


@router.post("/cases/{case_id}/upload-links")
async def create_upload_link(
    case_id: str,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = ADMIN,
) -> JSONResponse:
    """A new link for the case (admin): `{"expiresInDays": 1..30}` (default 7). The URL (with
    its token) is in this answer only."""
    body = await _options(request)
    days = body.get("expiresInDays")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool)):
        raise InputError("expiresInDays must be an integer", expression=["expiresInDays"])
    view = await run_in_threadpool(upload_links.create_link, store, settings, case_id, who, days)
    return JSONResponse(view, status_code=201, headers=NO_STORE)


@router.get("/cases/{case_id}/upload-links")
def list_upload_links(case_id: str, store: StoreDep, who: Principal = ADMIN) -> JSONResponse:
    """The case's links without their tokens (admin)."""
    return JSONResponse(upload_links.list_links(store, case_id, who), headers=NO_STORE)


@router.delete("/cases/{case_id}/upload-links/{link_id}")
def revoke_upload_link(
    case_id: str, link_id: str, store: StoreDep, who: Principal = ADMIN
) -> JSONResponse:
    """Revoke the link at once (admin): every later use is refused (410)."""
    return JSONResponse(upload_links.revoke_link(store, case_id, link_id, who), headers=NO_STORE)


@router.get(upload_links.PATH + "/{token}/received")
def upload_received(token: str, store: StoreDep) -> JSONResponse:
    """What this link received and refused (names, results, reasons): nothing of the case."""
    link = upload_links.resolve(store, token, "list")
    files = upload_links.received(store, link)
    upload_links.record_use(store, link, "upload-link.list", [f"count:{len(files)}"])
    counts = {k: sum(1 for f in files if f["result"] == k) for k in ("accepted", "rejected")}
    return JSONResponse({**counts, "files": files}, headers=NO_STORE)
