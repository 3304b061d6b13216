"""Cases API for reviewers and operators: list, read, assign reviewers, move the Task."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from fhir_gateway.api import views
from fhir_gateway.api.deps import ADMIN, STAFF, SettingsDep, StoreDep
from fhir_gateway.casebundle import held
from fhir_gateway.intake import hosted, tasks
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Case

router = APIRouter(prefix="/cases", tags=["cases"])


class AssignmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reviewer: str = Field(min_length=1, max_length=256)
    # A time zone is required: a naive time would mean a different instant on every server.
    expires_at: AwareDatetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _in_utc_range(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        try:
            return v.astimezone(UTC)
        except OverflowError:
            raise ValueError("expires_at is outside the years 1 to 9999 in UTC") from None


class StatusIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str = Field(min_length=1, max_length=32)
    reason: str | None = Field(default=None, max_length=1000)


@router.get("")
def list_cases(
    store: StoreDep, status: str | None = None, who: Principal = STAFF
) -> list[dict[str, Any]]:
    """Cases the caller may see (admin: all; reviewer: the ones assigned to them)."""
    with store.session(readonly=True) as s:  # no write lock while reading (SQLite)
        visible = access.visible_case_ids(s, who)
        stmt = select(Case).order_by(Case.created_at.desc())
        if visible is not None:
            stmt = stmt.where(Case.id.in_(visible))
        if status:
            stmt = stmt.where(Case.status == status)
        found = [views.case_summary(c) for c in s.scalars(stmt)]
    with store.session() as s:  # audited before anything is answered
        audit.record(s, "case.list", who.actor, entity=[f"count:{len(found)}"])
    return found


@router.get("/{case_id}")
def get_case(case_id: str, store: StoreDep, who: Principal = STAFF) -> dict[str, Any]:
    """Status, the referral, and the case's jobs with their state, attempts and progress."""
    with store.session(readonly=True) as s:  # no write lock while reading (SQLite)
        case = access.get_case(s, case_id, who)
        view = views.case_view(s, case)
    with store.session() as s:  # audited before anything is answered
        audit.record(
            s,
            "case.read",
            who.actor,
            case_id=case.id,
            patient=case.patient_ref,
            entity=[f"Task/{case.task_id}"],
        )
    return view


@router.post("/{case_id}/assignments", status_code=201)
def assign(
    case_id: str, body: AssignmentIn, store: StoreDep, who: Principal = ADMIN
) -> dict[str, Any]:
    """Assign a reviewer (by token subject) to the case, optionally until `expires_at`."""
    with store.session() as s:
        row = access.assign(s, case_id, body.reviewer, who, body.expires_at)
        return {
            "case": case_id,
            "reviewer": row.reviewer,
            "expiresAt": hosted.fhir_instant(row.expires_at) if row.expires_at else None,
        }


@router.post("/{case_id}/status")
def move_status(
    case_id: str, body: StatusIn, store: StoreDep, settings: SettingsDep, who: Principal = ADMIN
) -> dict[str, Any]:
    """Move the referral Task (accepted, in-progress, rejected, failed, ...); 409 if illegal."""
    with store.session() as s:
        case = access.get_case(s, case_id, who)
        task = hosted.read(s, "Task", case.task_id)
        tasks.transition_task(
            s, task, body.status, body.reason, partner=settings.partners.by_id(case.partner_id)
        )
        audit.record(
            s,
            "task.update",
            who.actor,
            case_id=case.id,
            patient=case.patient_ref,
            entity=[f"Task/{task.id}"],
        )
        return views.case_summary(case)


def _decide(store: StoreDep, case_id: str, held_id: str, decision: str, who: Principal) -> Any:
    with store.session() as s:
        access.get_case(s, case_id, who)
        return held.item_view(held.decide(s, case_id, held_id, decision, who.actor))


@router.post("/{case_id}/held/{held_id}/$release")
def release_held(
    case_id: str, held_id: str, store: StoreDep, who: Principal = ADMIN
) -> dict[str, Any]:
    """Release an item the identity check held: it enters the bundle and the per-case
    DICOMweb once the case is normalised again (queued now). 409 unless it is held."""
    out: dict[str, Any] = _decide(store, case_id, held_id, held.RELEASED, who)
    return out


@router.post("/{case_id}/held/{held_id}/$reject")
def reject_held(
    case_id: str, held_id: str, store: StoreDep, who: Principal = ADMIN
) -> dict[str, Any]:
    """Reject a held item: it stays out of the case for good (kept, marked rejected)."""
    out: dict[str, Any] = _decide(store, case_id, held_id, held.REJECTED, who)
    return out
