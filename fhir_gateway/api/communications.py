"""Follow-up questions from the treating team at /fhir/Communication (create, read)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from fhir_gateway.api.deps import ANY_ROLE, EHR_OR_ADMIN, Body, SettingsDep, StoreDep
from fhir_gateway.api.fhir import FHIR_BODY, _check_access, _headers, _require_scope, json_only
from fhir_gateway.api.responses import FhirResponse
from fhir_gateway.intake import hosted
from fhir_gateway.reports import questions
from fhir_gateway.resources import Resource
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal

router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(json_only)])


@router.post("/Communication", response_class=FhirResponse, openapi_extra=FHIR_BODY)
async def create_communication(
    body: Body, store: StoreDep, settings: SettingsDep, who: Principal = EHR_OR_ADMIN
) -> FhirResponse:
    """A question about a delivered report (201; a repeat with the same identifier: 200)."""
    _require_scope(who, "Communication", "c")

    def run() -> tuple[Resource, dict[str, str], int]:
        with store.session() as s:
            row, created = questions.ask(s, body, who, settings)
            return row.body, _headers(row), 201 if created else 200

    payload, headers, status = await run_in_threadpool(run)
    return FhirResponse(payload, status_code=status, headers=headers)


@router.get("/Communication/{rid}", response_class=FhirResponse)
def read_communication(rid: str, store: StoreDep, who: Principal = ANY_ROLE) -> FhirResponse:
    _require_scope(who, "Communication", "r")
    with store.session() as s:
        row = hosted.read(s, "Communication", rid)
        _check_access(row, who, s)
        audit.record(
            s,
            "resource.read",
            who.actor,
            case_id=row.case_id,
            patient=audit.patient_of_case(s, row.case_id) if row.case_id else None,
            entity=[f"Communication/{rid}"],
        )
        return FhirResponse(row.body, headers=_headers(row))
