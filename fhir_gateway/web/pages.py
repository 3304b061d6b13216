"""The workspace pages: my cases, a case, the report editor, admin.

Each handler authenticates (the session's `Principal`), calls the step packages with the same
per-case rules and audit as the JSON API, and renders plain data."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from fhir_gateway import jobs
from fhir_gateway.api import views
from fhir_gateway.api.deps import SettingsDep, StoreDep
from fhir_gateway.casebundle import derived, held, reading
from fhir_gateway.casebundle.consult import question_text
from fhir_gateway.errors import ConflictError, NotFoundError, ValidationError
from fhir_gateway.reports import drafts
from fhir_gateway.security import access, audit
from fhir_gateway.security.access import Principal
from fhir_gateway.store.models import Assignment, Case, Delivery, Job, utcnow
from fhir_gateway.web import charts, session
from fhir_gateway.web.render import render

router = APIRouter(prefix="/app", include_in_schema=False)
WHO = Depends(session.principal)
FORM = Depends(session.form)
PDF = "application/pdf"
REPORT_KINDS = ("pathology", "radiology", "oncology")


def _age(created: datetime) -> str:
    now = utcnow()
    if created.tzinfo is None:
        created = created.replace(tzinfo=now.tzinfo)
    hours = int((now - created).total_seconds() // 3600)
    return f"{hours // 24} d" if hours >= 48 else f"{hours} h"


@router.get("", response_class=HTMLResponse)
def my_cases(request: Request, store: StoreDep, who: Principal = WHO) -> Response:
    """The cases the caller may see: status, age, completeness at a glance, the question."""
    with store.session() as s:
        visible = access.visible_case_ids(s, who)
        stmt = select(Case).order_by(Case.created_at.desc())
        if visible is not None:
            stmt = stmt.where(Case.id.in_(visible))
        found = list(s.scalars(stmt))
        # One small stored line per case (casebundle.derived), not each bundle's whole state.
        glances = derived.glances(s, [c.id for c in found])
        rows = []
        for case in found:
            line = glances.get(case.id)
            rows.append(
                {
                    **views.case_summary(case),
                    "age": _age(case.created_at),
                    "built": line is not None,
                    **(line or {"present": 0, "needs": 0, "missing": [], "question": ""}),
                }
            )
        audit.record(s, "case.list", who.actor, entity=[f"count:{len(rows)}"])
    return render(request, "cases.html", {"cases": rows})


def _patient_name(patient: dict[str, Any] | None) -> str:
    for name in (patient or {}).get("name") or []:
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("given", []), name.get("family", "")]
        if any(parts):
            return " ".join(p for p in parts if p)
    return "(no name)"


def _documents(documents: list[dict[str, Any]], pdfs: dict[tuple[int, int], str]) -> list[Any]:
    """The case view's documents with what the page can show of each attachment: its URL, or
    an inline PDF (read from its bundle row) as a data URL."""
    out = []
    for d in documents:
        data = pdfs.get((d["position"], d["n"])) if d.get("inline") else None
        src = d.get("url") or (f"data:{PDF};base64,{data}" if data is not None else None)
        out.append({**d, "src": src, "pdf": d["contentType"] == PDF and src is not None})
    return out


def _studies(case_id: str, studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **st,
            "viewer": (
                f"/viewer?StudyInstanceUIDs={quote(st['uid'])}&case={quote(case_id)}"
                if st.get("uid")
                else None
            ),
        }
        for st in studies
    ]


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(
    case_id: str, request: Request, store: StoreDep, settings: SettingsDep, who: Principal = WHO
) -> Response:
    """The case: completeness, question, markers, timeline, documents, images, holds."""
    with store.session() as s:
        case = access.get_case(s, case_id, who)
        view = views.case_view(s, case)
        audit.record(
            s,
            "case.read",
            who.actor,
            case_id=case.id,
            patient=case.patient_ref,
            entity=[f"Task/{case.task_id}"],
        )
        pending: str | None = None
        try:
            summary: dict[str, Any] | None = reading.summary(s, case_id, who)
            case, state, stored = reading.case_view(s, case_id, who)
            timeline = reading.timeline_view(case, state, stored)
            page: dict[str, Any] = stored.page
            pdfs = derived.inline_pdfs(s, case.id, page["documents"])
        except ConflictError as exc:  # not normalised yet: say so, show the rest
            summary, timeline, pdfs = None, {"count": 0, "events": []}, {}
            page = {"ranges": {}, "documents": [], "studies": []}
            pending = exc.message
    limit = settings.web.timeline_rows
    return render(
        request,
        "case.html",
        {
            "case": view,
            "patient": _patient_name(view["referral"].get("Patient")),
            "summary": summary,
            "pending": pending,
            "question": question_text((summary or {}).get("question")),
            "checklist": ((summary or {}).get("completeness") or {}).get("checklist") or [],
            "cancer": ((summary or {}).get("completeness") or {}).get("cancer") or [],
            "charts": charts.marker_series(timeline["events"], page["ranges"]),
            "events": timeline["events"][:limit],
            "event_count": timeline["count"],
            "documents": _documents(page["documents"], pdfs),
            "studies": _studies(case_id, page["studies"]),
            "held": view["identity"]["items"],
        },
    )


# ----------------------------------------------------------------------------- report editor


def _draft_from_form(fields: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The draft as the API takes it, from the editor's fields; errors the form itself has."""
    errors: dict[str, str] = {}

    def lines(name: str) -> list[str]:
        return [x.strip() for x in fields.get(name, "").splitlines() if x.strip()]

    codes = []
    for line in lines("conclusion_codes"):
        code, _, display = line.partition(" ")
        codes.append({"code": code.strip(), **({"display": display.strip()} if display else {})})
    findings: Any = []
    text = fields.get("findings", "").strip()
    if text:
        try:
            findings = json.loads(text)
        except json.JSONDecodeError as exc:
            errors["findings"] = f"not JSON (line {exc.lineno}, column {exc.colno})"
            findings = []
    reviewer: dict[str, Any] = {
        "family": fields.get("reviewer.family", "").strip(),
        "given": lines("reviewer.given") or fields.get("reviewer.given", "").split(),
    }
    for key in ("prefix", "role", "npi"):
        value = fields.get(f"reviewer.{key}", "").strip()
        if value:
            reviewer[key] = value
    draft = {
        "kind": fields.get("kind", ""),
        "conclusion": fields.get("conclusion", "").strip(),
        "conclusion_codes": codes,
        "findings": findings,
        "recommendations": lines("recommendations"),
        "reviewer": reviewer,
    }
    return draft, errors


def _form_from_draft(draft: dict[str, Any]) -> dict[str, str]:
    reviewer = draft.get("reviewer") or {}
    return {
        "kind": str(draft.get("kind") or ""),
        "conclusion": str(draft.get("conclusion") or ""),
        "conclusion_codes": "\n".join(
            f"{c.get('code', '')} {c.get('display', '')}".strip()
            for c in draft.get("conclusion_codes") or []
        ),
        "findings": json.dumps(draft.get("findings") or [], indent=2, ensure_ascii=False),
        "recommendations": "\n".join(draft.get("recommendations") or []),
        "reviewer.family": str(reviewer.get("family") or ""),
        "reviewer.given": " ".join(reviewer.get("given") or []),
        "reviewer.prefix": str(reviewer.get("prefix") or ""),
        "reviewer.role": str(reviewer.get("role") or ""),
        "reviewer.npi": str(reviewer.get("npi") or ""),
    }


FIELDS = ("kind", "conclusion", "conclusion_codes", "findings", "recommendations")


def _field_of(expression: str) -> str:
    """The editor field an OperationOutcome expression (a JSON path of the draft) points at."""
    head = expression.split(".")[0]
    if head == "reviewer":
        parts = expression.split(".")
        return f"reviewer.{parts[1]}" if len(parts) > 1 else "reviewer.npi"
    return head if head in FIELDS else ""


def _errors_of(exc: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    issues = exc.issues or [{"diagnostics": exc.message, "expression": exc.expression or []}]
    for issue in issues:
        message = str(issue.get("diagnostics") or "invalid")
        for expression in issue.get("expression") or [""]:
            field = _field_of(str(expression))
            out[field] = f"{out[field]}; {message}" if field in out else message
    return out


def _editor(
    request: Request,
    s: Any,
    case: Case,
    who: Principal,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    saved: bool = False,
) -> dict[str, Any]:
    try:
        report: dict[str, Any] | None = drafts.report_view(s, case.id, who)
    except NotFoundError:
        report = None
    deliveries = drafts.list_deliveries(s, case.id, who)
    entity = [f"report:{report['id']}"] if report else [f"count:{len(deliveries)}"]
    audit.record(
        s, "report.read", who.actor, case_id=case.id, patient=case.patient_ref, entity=entity
    )
    if form is None:
        form = _form_from_draft((report or {}).get("draft") or {})
    return {
        "case": views.case_summary(case),
        "report": report,
        "form": form,
        "errors": errors or {},
        "saved": saved,
        "kinds": REPORT_KINDS,
        "deliveries": deliveries,
        "polling": any(d["status"] == drafts.PENDING for d in deliveries),
    }


@router.get("/cases/{case_id}/report", response_class=HTMLResponse)
def report_page(case_id: str, request: Request, store: StoreDep, who: Principal = WHO) -> Response:
    with store.session() as s:
        case = access.get_case(s, case_id, who)
        context = _editor(request, s, case, who)
    return render(request, "report.html", context)


@router.post("/cases/{case_id}/report", response_class=HTMLResponse)
def save_report(
    case_id: str,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = WHO,
    fields: dict[str, str] = FORM,
) -> Response:
    """Save the draft through `reports.drafts.save_draft`; a bad draft comes back with each
    error beside its field (from the OperationOutcome's expressions), nothing stored."""
    draft, errors = _draft_from_form(fields)
    form = {k: v for k, v in fields.items() if k in (*FIELDS, *_REVIEWER)}
    if not errors:
        try:
            with store.session() as s:
                drafts.save_draft(s, case_id, draft, who, settings)
        except ValidationError as exc:
            errors = _errors_of(exc)
    if errors:
        with store.session() as s:
            case = access.get_case(s, case_id, who)
            context = _editor(request, s, case, who, form=form, errors=errors)
        return render(request, "report.html", context, status_code=422)
    return RedirectResponse(f"/app/cases/{quote(case_id)}/report?saved=1", status_code=303)


_REVIEWER = tuple(f"reviewer.{k}" for k in ("family", "given", "prefix", "role", "npi"))


@router.post("/cases/{case_id}/report/submit")
def submit_report(
    case_id: str,
    store: StoreDep,
    settings: SettingsDep,
    who: Principal = WHO,
    fields: dict[str, str] = FORM,
) -> Response:
    """Submit through `reports.drafts.submit` (delivery queued in the same transaction)."""
    with store.session() as s:
        drafts.submit(s, case_id, who, settings, correction=fields.get("correction") == "1")
    return RedirectResponse(f"/app/cases/{quote(case_id)}/report", status_code=303)


@router.get("/cases/{case_id}/report/deliveries", response_class=HTMLResponse)
def deliveries_partial(
    case_id: str, request: Request, store: StoreDep, who: Principal = WHO
) -> Response:
    """The delivery status (htmx polls it while a delivery is pending)."""
    with store.session() as s:
        found = drafts.list_deliveries(s, case_id, who)
        audit.record(
            s,
            "deliveries.read",
            who.actor,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=[f"count:{len(found)}"],
        )
    return render(
        request,
        "_deliveries.html",
        {
            "case": {"id": case_id},
            "deliveries": found,
            "polling": any(d["status"] == drafts.PENDING for d in found),
        },
    )


@router.get("/cases/{case_id}/report/preview.pdf")
def report_preview(
    case_id: str, store: StoreDep, settings: SettingsDep, who: Principal = WHO
) -> Response:
    """The PDF as it would be delivered now (the saved draft through the report mapper; nothing
    is stored or sent)."""
    with store.session() as s:
        pdf = drafts.preview_pdf(s, case_id, who, settings)
        audit.record(
            s,
            "report.read",
            who.actor,
            case_id=case_id,
            patient=audit.patient_of_case(s, case_id),
            entity=["preview"],
        )
    return Response(
        pdf,
        media_type=PDF,
        headers={"Cache-Control": "no-store", "Content-Disposition": "inline"},
    )


# ---------------------------------------------------------------------------------- admin


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, store: StoreDep, who: Principal = WHO) -> Response:
    """Assignments, dead jobs and deliveries, records held by the identity check."""
    access.require_role(who, "admin")
    with store.session() as s:
        cases = [views.case_summary(c) for c in s.scalars(select(Case).order_by(Case.created_at))]
        assignments: dict[str, list[dict[str, Any]]] = {}
        for row in s.scalars(select(Assignment).order_by(Assignment.assigned_at)):
            assignments.setdefault(row.case_id, []).append(
                {"reviewer": row.reviewer, "expires": row.expires_at}
            )
        dead_jobs = [
            {**views.job_view(j), "case": j.case_id}
            for j in s.scalars(
                select(Job).where(Job.state == jobs.DEAD).order_by(Job.created_at).limit(500)
            )
        ]
        dead_deliveries = drafts.failed_deliveries(s)
        held_items = [held.item_view(r) for r in held.list_items(s, None, held.HELD)]
        audit.record(s, "deliveries.read", who.actor, entity=[f"count:{len(dead_deliveries)}"])
        audit.record(s, "identity.list", who.actor, entity=[f"count:{len(held_items)}"])
    return render(
        request,
        "admin.html",
        {
            "cases": cases,
            "assignments": assignments,
            "dead_jobs": dead_jobs,
            "dead_deliveries": dead_deliveries,
            "held": held_items,
            "done": request.query_params.get("done", "")[:80],
        },
    )


def _back(done: str) -> Response:
    return RedirectResponse(f"/app/admin?done={quote(done)}", status_code=303)


@router.post("/admin/assignments")
def admin_assign(store: StoreDep, who: Principal = WHO, fields: dict[str, str] = FORM) -> Response:
    access.require_role(who, "admin")
    reviewer = fields.get("reviewer", "").strip()[:256]
    if not reviewer:
        raise ValidationError("reviewer: a reviewer is required", expression=["reviewer"])
    with store.session() as s:
        access.assign(s, fields.get("case", ""), reviewer, who)
    return _back("assigned")


@router.post("/admin/jobs/{job_id}/requeue")
def admin_requeue(
    job_id: str, store: StoreDep, who: Principal = WHO, fields: dict[str, str] = FORM
) -> Response:
    access.require_role(who, "admin")
    with store.session() as s:
        job = jobs.requeue_dead(s, job_id)
        audit.record(s, "job.requeue", who.actor, case_id=job.case_id, entity=[f"job:{job.id}"])
    return _back("requeued")


@router.post("/admin/deliveries/{delivery_id}/redeliver")
def admin_redeliver(
    delivery_id: str, store: StoreDep, who: Principal = WHO, fields: dict[str, str] = FORM
) -> Response:
    access.require_role(who, "admin")
    with store.session() as s:
        delivery: Delivery = drafts.redeliver(s, delivery_id)
        audit.record(
            s,
            "report.redeliver",
            who.actor,
            case_id=delivery.case_id,
            entity=[f"delivery:{delivery.id}"],
        )
    return _back("redelivery queued")


@router.post("/admin/held/{case_id}/{held_id}/{decision}")
def admin_decide(
    case_id: str,
    held_id: str,
    decision: str,
    store: StoreDep,
    who: Principal = WHO,
    fields: dict[str, str] = FORM,
) -> Response:
    access.require_role(who, "admin")
    choice = {"release": held.RELEASED, "reject": held.REJECTED}.get(decision)
    if choice is None:
        raise NotFoundError(f"no decision {decision[:20]!r} (release or reject)")
    with store.session() as s:
        access.get_case(s, case_id, who)
        held.decide(s, case_id, held_id, choice, who.actor)
    return _back(f"{decision}d")
