"""Read-only FHIR AuditEvent search for security staff (admin): `GET /fhir/AuditEvent`."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import ColumnElement, select

from fhir_gateway.api.deps import ADMIN, SettingsDep, StoreDep
from fhir_gateway.api.responses import FhirResponse
from fhir_gateway.errors import NotFoundError, ValidationError
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import AuditRow

router = APIRouter(prefix="/fhir/AuditEvent", tags=["audit"])

PREFIXES = ("ge", "gt", "le", "lt", "eq")


def _date_filter(values: list[str]) -> list[ColumnElement[bool]]:
    """FHIR date search (`date=ge2026-01-01`, `date=lt2026-02-01T10:00:00Z`) on `recorded`."""
    clauses: list[ColumnElement[bool]] = []
    for raw in values:
        prefix, value = (raw[:2], raw[2:]) if raw[:2] in PREFIXES else ("eq", raw)
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            raise ValidationError(
                "date is not a FHIR date or dateTime (with an optional ge/gt/le/lt/eq prefix)",
                expression=["AuditEvent?date"],
                status_code=400,
            ) from exc
        column = AuditRow.recorded
        clause = {
            "ge": column >= when,
            "gt": column > when,
            "le": column <= when,
            "lt": column < when,
            "eq": column >= when,
        }[prefix]
        clauses.append(clause)
    return clauses


@router.get("", response_class=FhirResponse)
def search(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    patient: str | None = None,
    agent: str | None = None,
    date: Annotated[list[str] | None, Query()] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
    who: Principal = ADMIN,
) -> FhirResponse:
    """AuditEvents by `patient` (Patient/id), `agent` (token subject) and `date` range."""
    unknown = set(request.query_params) - {"patient", "agent", "date", "_count"}
    if unknown:
        raise ValidationError(
            f"unsupported search parameter(s): {', '.join(sorted(unknown))}",
            expression=["AuditEvent"],
            status_code=400,
        )
    stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(count)
    if patient:
        stmt = stmt.where(AuditRow.patient == patient)
    if agent:
        stmt = stmt.where(AuditRow.agent == agent)
    for clause in _date_filter(date or []):
        stmt = stmt.where(clause)
    server = f"{settings.base_url}/fhir"
    with store.session() as s:
        rows = list(s.scalars(stmt))
        events = [audit.to_audit_event(r, server) for r in rows]
        audit.record(s, "audit.search", who.actor, entity=[f"count:{len(rows)}"])
    return FhirResponse(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(events),
            "entry": [
                {
                    "fullUrl": f"{server}/AuditEvent/{e['id']}",
                    "resource": e,
                    "search": {"mode": "match"},
                }
                for e in events
            ],
        }
    )


@router.get("/{event_id}", response_class=FhirResponse)
def read(
    event_id: str, store: StoreDep, settings: SettingsDep, who: Principal = ADMIN
) -> FhirResponse:
    row = None
    with store.session() as s:
        if re.fullmatch(r"[0-9]{1,18}", event_id):  # ASCII digits that fit a BIGINT
            row = s.get(AuditRow, int(event_id))
        if row is None:
            raise NotFoundError("AuditEvent is not known", expression=["AuditEvent.id"])
        audit.record(s, "audit.read", who.actor, entity=[f"AuditEvent/{row.id}"])
        return FhirResponse(audit.to_audit_event(row, f"{settings.base_url}/fhir"))
