"""Who may see which case: the authenticated caller, roles, and reviewer assignments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from fhir_gateway.errors import ForbiddenError, NotFoundError
from fhir_gateway.security import audit
from fhir_gateway.security.audit import Actor
from fhir_gateway.store.models import Assignment, Case, utcnow


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    sub: str
    role: str  # ehr | reviewer | admin
    partner_id: str | None = None
    scopes: frozenset[str] | None = None  # SMART system scopes; None: the role decides alone

    @property
    def actor(self) -> Actor:
        return Actor(sub=self.sub, role=self.role)


def visible_case_ids(session: Session, who: Principal) -> list[str] | None:
    """Case ids the caller may see; None means all (admin)."""
    if who.role == "admin":
        return None
    if who.role == "reviewer":
        now = utcnow()
        rows = session.scalars(select(Assignment).where(Assignment.reviewer == who.sub))
        return [a.case_id for a in rows if a.expires_at is None or a.expires_at > now]
    if who.role == "ehr" and who.partner_id:
        return list(session.scalars(select(Case.id).where(Case.partner_id == who.partner_id)))
    return []


def get_case(session: Session, case_id: str, who: Principal) -> Case:
    """The case, if the caller may see it.

    Raises:
        NotFoundError / ForbiddenError.
    """
    case = session.get(Case, case_id)
    if case is None:
        raise NotFoundError(f"case {case_id} is not known")
    visible = visible_case_ids(session, who)
    if visible is not None and case_id not in visible:
        raise ForbiddenError("you are not assigned to this case")
    return case


# The case's patient and partner, and the asking reviewer's assignment to it if any: one query
# for `case_patient`, built once (building a statement costs more than running this one).
_CASE_AND_ASSIGNMENT = (
    select(Case.patient_ref, Case.partner_id, Assignment.reviewer, Assignment.expires_at)
    .outerjoin(
        Assignment,
        (Assignment.case_id == Case.id) & (Assignment.reviewer == bindparam("sub")),
    )
    .where(Case.id == bindparam("case_id"))
)


def case_patient(session: Session | Connection, case_id: str, who: Principal) -> str:
    """The case's patient reference, if the caller may see the case: the same rule as
    `get_case` (admin: any; reviewer: assigned, assignment not expired; ehr: its partner's
    cases), in one query without loading the case. For hot read paths (per-case DICOMweb).

    Raises:
        NotFoundError / ForbiddenError.
    """
    row = session.execute(_CASE_AND_ASSIGNMENT, {"case_id": case_id, "sub": who.sub}).first()
    if row is None:
        raise NotFoundError(f"case {case_id} is not known")
    patient_ref, partner_id, reviewer, expires_at = row
    if who.role == "admin":
        allowed = True
    elif who.role == "reviewer":
        allowed = reviewer is not None and (expires_at is None or expires_at > utcnow())
    elif who.role == "ehr":
        allowed = bool(who.partner_id) and partner_id == who.partner_id
    else:
        allowed = False
    if not allowed:
        raise ForbiddenError("you are not assigned to this case")
    return str(patient_ref)


def assign(
    session: Session, case_id: str, reviewer: str, by: Principal, expires_at: Any = None
) -> Assignment:
    """Assign a reviewer to a case (admin). Re-assigning updates the expiry."""
    get_case(session, case_id, by)
    row = session.get(Assignment, (case_id, reviewer))
    if row is None:
        row = Assignment(
            case_id=case_id, reviewer=reviewer, assigned_by=by.sub, expires_at=expires_at
        )
        session.add(row)
    else:
        row.expires_at, row.assigned_by = expires_at, by.sub
    audit.record(session, "case.assign", by.actor, case_id=case_id, entity=[f"reviewer:{reviewer}"])
    return row


def require_role(who: Principal, *roles: str) -> None:
    if who.role not in roles:
        raise ForbiddenError(f"role {who.role!r} may not do this (needs {' or '.join(roles)})")
