"""Operator API (admin): partners (read-only view of the partners file), jobs, deliveries,
identity holds, and HL7 v2 messages held for an operator."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from fhir_gateway import jobs
from fhir_gateway.api import views
from fhir_gateway.api.deps import ADMIN, SettingsDep, StoreDep
from fhir_gateway.casebundle import held
from fhir_gateway.intake import v2inbox
from fhir_gateway.reports import drafts as reports
from fhir_gateway.security import audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Delivery, Job

router = APIRouter(prefix="/admin", tags=["admin"])


class V2Assign(BaseModel):
    """Body of `$assign`: the case a held HL7 v2 message belongs to."""

    case: str = Field(min_length=1, max_length=36)


@router.get("/partners")
def list_partners(settings: SettingsDep, who: Principal = ADMIN) -> list[dict[str, Any]]:
    """Registered partners and their endpoints (never a secret: auth shows its type only).
    Partners are changed in the partners file, reviewed like code, and read at startup."""
    out = []
    for p in settings.partners.partners:
        endpoints = {}
        for name in ("fhir", "dicomweb", "destination"):
            ep = getattr(p, name)
            if ep is not None:
                endpoints[name] = {"baseUrl": ep.base_url, "auth": ep.auth.type}
        out.append(
            {
                "id": p.id,
                "name": p.name,
                "identifier": p.identifier.token,
                "endpoints": endpoints,
                "client": p.client.client_id if p.client is not None else None,
            }
        )
    return out


@router.get("/jobs")
def list_jobs(
    store: StoreDep, state: str | None = None, kind: str | None = None, who: Principal = ADMIN
) -> list[dict[str, Any]]:
    """Jobs with their state, attempts, last error and progress (newest first, at most 500)."""
    stmt = select(Job).order_by(Job.created_at.desc()).limit(500)
    if state:
        stmt = stmt.where(Job.state == state)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    with store.session() as s:
        return [{**views.job_view(j), "case": j.case_id} for j in s.scalars(stmt)]


@router.post("/jobs/{job_id}/$requeue")
def requeue_job(
    job_id: str, store: StoreDep, settings: SettingsDep, who: Principal = ADMIN
) -> dict[str, Any]:
    """Put a dead job back in the queue with fresh attempts (409 unless it is dead)."""
    with store.session() as s:
        job = jobs.requeue_dead(s, job_id)
        audit.record(s, "job.requeue", who.actor, case_id=job.case_id, entity=[f"job:{job.id}"])
        return {**views.job_view(job), "case": job.case_id}


@router.post("/deliveries/{delivery_id}/$redeliver")
def redeliver(delivery_id: str, store: StoreDep, who: Principal = ADMIN) -> dict[str, Any]:
    """Re-queue a dead report delivery; its retry window starts again (409 unless dead)."""
    with store.session() as s:
        delivery = reports.redeliver(s, delivery_id)
        audit.record(
            s,
            "report.redeliver",
            who.actor,
            case_id=delivery.case_id,
            entity=[f"delivery:{delivery.id}"],
        )
        return {"id": delivery.id, "status": delivery.status, "case": delivery.case_id}


@router.get("/deliveries")
def list_deliveries(
    store: StoreDep, status: str | None = None, who: Principal = ADMIN
) -> list[dict[str, Any]]:
    """Report deliveries, with attempts, status codes and the EHR's answer."""
    with store.session() as s:
        stmt = select(Delivery).order_by(Delivery.created_at)
        if status:
            stmt = stmt.where(Delivery.status == status)
        found = [reports.delivery_view(s, d) for d in s.scalars(stmt)]
        audit.record(s, "deliveries.read", who.actor, entity=[f"count:{len(found)}"])
        return found


@router.get("/held")
def list_held(
    store: StoreDep,
    state: Literal["held", "released", "rejected", "all"] = "held",
    case: str | None = None,
    who: Principal = ADMIN,
) -> list[dict[str, Any]]:
    """Items the identity check held out of their case (default: awaiting a decision), with
    the names of the fields that differ; release or reject them under /cases/{id}/held."""
    with store.session() as s:
        rows = held.list_items(s, case, None if state == "all" else state)
        audit.record(s, "identity.list", who.actor, case_id=case, entity=[f"count:{len(rows)}"])
        return [held.item_view(r) for r in rows]


@router.get("/v2-messages")
def list_v2_messages(
    store: StoreDep,
    state: Literal["held", "matched", "assigned", "referral", "discarded", "all"] = "held",
    who: Principal = ADMIN,
) -> list[dict[str, Any]]:
    """HL7 v2 messages received over MLLP (default: held for an operator, with the matching
    rule that failed); ids, type, sender and state only, never content."""
    with store.session() as s:
        rows = v2inbox.list_messages(s, None if state == "all" else state)
        audit.record(s, "v2.list", who.actor, entity=[f"count:{len(rows)}"])
        return [v2inbox.message_view(r) for r in rows]


@router.post("/v2-messages/{message_id}/$assign")
def assign_v2_message(
    message_id: str,
    body: V2Assign,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = ADMIN,
) -> dict[str, Any]:
    """Put a held result message into a case (identity check, then the case is normalised
    again). 404 unknown message or case; 409 not held or the case is closed."""
    with store.session() as s:
        return v2inbox.message_view(v2inbox.assign(s, message_id, body.case, who.actor, settings))


@router.post("/v2-messages/{message_id}/$discard")
def discard_v2_message(message_id: str, store: StoreDep, who: Principal = ADMIN) -> dict[str, Any]:
    """Discard a held message (kept, marked discarded). 404 unknown; 409 not held."""
    with store.session() as s:
        return v2inbox.message_view(v2inbox.discard(s, message_id, who.actor))
