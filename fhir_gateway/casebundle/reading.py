"""Reading the stored case bundle for a caller: the summary and the timeline (the stored case
view, `derived`), each read checked (`security.access`) and audited. The JSON API
(`api/bundle.py`) and the reviewer's pages (`web/`) both call these, so the rules, the data and
the audit trail are the same whichever way a reviewer looks."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from fhir_gateway.casebundle import derived, held, normalise
from fhir_gateway.casebundle.derived import Derived
from fhir_gateway.errors import ConflictError
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Case, CaseBundleState


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


def case_view(s: Session, case_id: str, who: Principal) -> tuple[Case, CaseBundleState, Derived]:
    """The case's derived view (timeline, marker ranges, documents, studies: one stored row,
    `casebundle.derived`), read as the timeline: checked and audited `case.timeline`."""
    case, state = read_built(s, case_id, who, "case.timeline")
    return case, state, derived.load(s, state)


def _head(case: Case, state: CaseBundleState, view: Derived) -> dict[str, Any]:
    return {
        "case": case.id,
        "bundle": f"Bundle/{state.patient_id}",
        "etag": state.etag,
        "count": view.page["count"],
    }


def timeline_view(case: Case, state: CaseBundleState, view: Derived) -> dict[str, Any]:
    """GET /cases/{id}/timeline as data: the case's events in date order."""
    return {**_head(case, state, view), "events": view.events()}


def timeline_json(case: Case, state: CaseBundleState, view: Derived) -> bytes:
    """GET /cases/{id}/timeline as the JSON bytes of `timeline_view` (compact, as a JSON
    response writes it), the stored events spliced in without parsing them."""
    head = derived.dumps(_head(case, state, view))
    return f'{head[:-1]},"events":{view.timeline_json}}}'.encode()


__all__ = ["case_view", "read_built", "summary", "timeline_json", "timeline_view"]
