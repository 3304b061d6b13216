"""The normalised case bundle, its summary and timeline, served from the stored JSON (the bundle
is never re-serialised)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.api.deps import STAFF, StoreDep
from fhir_gateway.api.responses import FHIR_JSON
from fhir_gateway.casebundle import held, normalise
from fhir_gateway.casebundle.assemble import iter_bundle_json
from fhir_gateway.casebundle.timeline import TIMELINE_TYPES, timeline
from fhir_gateway.errors import ConflictError
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Case, CaseBundleState, NormalisedResource

router = APIRouter(prefix="/cases", tags=["bundle"])


def _read_built(
    s: Session, case_id: str, who: Principal, action: str = "case.bundle"
) -> tuple[Case, CaseBundleState]:
    """The case and its stored bundle state, the read audited (409 when nothing is built)."""
    case = access.get_case(s, case_id, who)
    state = s.get(CaseBundleState, case.id)
    if state is None:
        pending = normalise.bundle_state(s, case.id)["pending"]
        detail = f" ({', '.join(pending)})" if pending else " (no pull or normalise job pending)"
        raise ConflictError(f"case not normalised yet{detail}")
    audit.record(
        s,
        action,
        who.actor,
        case_id=case.id,
        patient=case.patient_ref,
        entity=[f"Bundle/{state.patient_id}"],
    )
    return case, state


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


@router.get("/{case_id}/bundle", response_class=Response)
def get_bundle(case_id: str, request: Request, store: StoreDep, who: Principal = STAFF) -> Response:
    """The case Bundle (collection, id = the patient id); `ETag`, 304 on `If-None-Match`."""
    with store.session() as s:
        case, state = _read_built(s, case_id, who)
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
        case, state = _read_built(s, case_id, who)
        summary = dict(state.summary or {})
        question = summary.pop("question", None)
        specimens = summary.pop("specimens", [])
        return {
            "case": case.id,
            "bundle": f"Bundle/{state.patient_id}",
            "normalisation": normalise.bundle_state(s, case.id),
            "completeness": summary,
            "question": question,
            "specimens": specimens,
            "counts": state.counts,
            "resources": state.resource_count,
            "sources": state.sources,
            "issues": state.issues,
            "identity": held.case_identity(s, case.id),
        }


@router.get("/{case_id}/timeline")
def get_timeline(case_id: str, store: StoreDep, who: Principal = STAFF) -> dict[str, Any]:
    """The case's events in date order, computed from the stored normalised bundle (audited)."""
    with store.session() as s:
        case, state = _read_built(s, case_id, who, "case.timeline")
        bodies = s.scalars(
            select(NormalisedResource.body)
            .where(
                NormalisedResource.case_id == case.id,
                NormalisedResource.resource_type.in_(sorted(TIMELINE_TYPES)),
            )
            .order_by(NormalisedResource.position)
        ).all()
        patient_id, etag = state.patient_id, state.etag
    events = timeline(json.loads(body) for body in bodies)
    return {
        "case": case.id,
        "bundle": f"Bundle/{patient_id}",
        "etag": etag,
        "count": len(events),
        "events": events,
    }
