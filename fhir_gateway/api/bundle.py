"""The normalised case bundle, its summary and timeline, served from the stored JSON (the bundle
is never re-serialised)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from fhir_gateway.api.deps import STAFF, StoreDep
from fhir_gateway.api.responses import FHIR_JSON
from fhir_gateway.casebundle import reading
from fhir_gateway.casebundle.assemble import iter_bundle_json
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import NormalisedResource

router = APIRouter(prefix="/cases", tags=["bundle"])


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


@router.get("/{case_id}/bundle", response_class=Response)
def get_bundle(case_id: str, request: Request, store: StoreDep, who: Principal = STAFF) -> Response:
    """The case Bundle (collection, id = the patient id); `ETag`, 304 on `If-None-Match`."""
    with store.session() as s:
        case, state = reading.read_built(s, case_id, who)
        headers = {"ETag": state.etag, "Cache-Control": "private, no-cache"}
        if _matches(request.headers.get("if-none-match"), state.etag):
            return Response(status_code=304, headers=headers)
        # One query, one short transaction (SQLite: no lock held while the client reads).
        rows = s.execute(
            select(
                NormalisedResource.resource_type,
                NormalisedResource.resource_id,
                NormalisedResource.body,
            )
            .where(NormalisedResource.case_id == case.id)
            .order_by(NormalisedResource.position)
        ).all()
        patient_id, base_url = state.patient_id, state.base_url
    # The body is assembled here, in the worker thread, in 1 MiB chunks, then sent from the
    # event loop: a sync iterator would cost a thread hop per chunk (~150 for 10,000 resources).
    chunks = list(
        iter_bundle_json(
            patient_id, ((t, i, b) for t, i, b in rows), base_url=base_url, chunk_size=BODY_CHUNK
        )
    )
    del rows
    return StreamingResponse(_sent(chunks), media_type=FHIR_JSON, headers=headers)


BODY_CHUNK = 1 << 20


async def _sent(chunks: list[bytes]) -> AsyncIterator[bytes]:
    while chunks:
        yield chunks.pop(0)  # each chunk freed once sent


@router.get("/{case_id}/summary")
def get_summary(case_id: str, store: StoreDep, who: Principal = STAFF) -> dict[str, Any]:
    """Completeness for the reviewer, data-quality issues with source paths, counts per type."""
    with store.session() as s:
        return reading.summary(s, case_id, who)


@router.get("/{case_id}/timeline", response_class=Response)
def get_timeline(case_id: str, store: StoreDep, who: Principal = STAFF) -> Response:
    """The case's events in date order, derived from the normalised bundle when it was built
    and served as stored (audited); the case page shows the same events."""
    with store.session() as s:
        case, state, view = reading.case_view(s, case_id, who)
        body = reading.timeline_json(case, state, view)
    return Response(body, media_type="application/json")
