"""Reading the stored case bundle for a caller: the summary and the timeline, each read checked
(`security.access`) and audited. The JSON API (`api/bundle.py`) and the reviewer's pages
(`web/`) both call these, so the rules and the audit trail are the same whichever way a
reviewer looks."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_gateway.casebundle import held, normalise
from fhir_gateway.casebundle.timeline import TIMELINE_TYPES, timeline
from fhir_gateway.errors import ConflictError
from fhir_gateway.resources import Resource
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Case, CaseBundleState, NormalisedResource


def read_built(
    s: Session, case_id: str, who: Principal, action: str = "case.bundle"
) -> tuple[Case, CaseBundleState]:
    """The case and its stored bundle state, the read audited.

    Raises:
        NotFoundError / ForbiddenError; ConflictError (409) when nothing is built yet.
    """
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


def summary(s: Session, case_id: str, who: Principal) -> dict[str, Any]:
    """GET /cases/{id}/summary: completeness, the question, specimens, issues, identity holds."""
    case, state = read_built(s, case_id, who)
    stored = dict(state.summary or {})
    question = stored.pop("question", None)
    specimens = stored.pop("specimens", [])
    return {
        "case": case.id,
        "bundle": f"Bundle/{state.patient_id}",
        "normalisation": normalise.bundle_state(s, case.id),
        "completeness": stored,
        "question": question,
        "specimens": specimens,
        "counts": state.counts,
        "resources": state.resource_count,
        "sources": state.sources,
        "issues": state.issues,
        "identity": held.case_identity(s, case.id),
    }


def timeline_resources(
    s: Session, case_id: str, who: Principal
) -> tuple[Case, CaseBundleState, list[Resource]]:
    """The normalised resources the timeline is made of (bundle order), the read audited."""
    case, state = read_built(s, case_id, who, "case.timeline")
    bodies = s.scalars(
        select(NormalisedResource.body)
        .where(
            NormalisedResource.case_id == case.id,
            NormalisedResource.resource_type.in_(sorted(TIMELINE_TYPES)),
        )
        .order_by(NormalisedResource.position)
    ).all()
    return case, state, [json.loads(body) for body in bodies]


def timeline_view(case: Case, state: CaseBundleState, resources: list[Resource]) -> dict[str, Any]:
    """GET /cases/{id}/timeline: the case's events in date order."""
    events = timeline(resources)
    return {
        "case": case.id,
        "bundle": f"Bundle/{state.patient_id}",
        "etag": state.etag,
        "count": len(events),
        "events": events,
    }


__all__ = ["read_built", "summary", "timeline_resources", "timeline_view"]
