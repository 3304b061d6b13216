"""Follow-up questions about a delivered report (issue "Close the loop", part 3).

The treating team's EHR pushes a `Communication` to /fhir: `about` the DiagnosticReport we
delivered to it, `basedOn` the referral ServiceRequest and/or `partOf` the referral Task. It is
validated, kept with its case (only the partner the report went to may ask), counted against
`reports.max_questions_per_case`, and shown to the case's reviewer. The reviewer's answer is an
addendum: the report goes out again `amended` (to the destination and every further recipient,
each exactly once) and a reply `Communication` (`inResponseTo` the question) is created on the
treating EHR once (conditional create on its identifier), after the amended report is there.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fhir_gateway import jobs
from fhir_gateway.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UpstreamUnavailableError,
    ValidationError,
)
from fhir_gateway.intake import hosted
from fhir_gateway.intake.validation import validate_resource
from fhir_gateway.reports import delivery, drafts
from fhir_gateway.resources import Resource, identifiers_of, new_id
from fhir_gateway.security import access, audit
from fhir_gateway.settings import Settings
from fhir_gateway.store.models import Case, Delivery, FhirResource, Question, Report, utcnow
from mappers.report import reply_communication

log = structlog.get_logger(__name__)

SEND_REPLY = "send_question_reply"
MAX_QUESTION_CHARS = 4000
_FOREVER = 1_000_000


def _bad(msg: str, path: str) -> ValidationError:
    return ValidationError(msg, expression=[path])


def ask(
    session: Session, body: Any, who: access.Principal, settings: Settings
) -> tuple[FhirResource, bool]:
    """POST /fhir/Communication from a partner's EHR: a question about a delivered report.
    Returns the stored Communication and whether it was created (a repeat with the same
    identifier returns the first, 200).

    Raises:
        ForbiddenError: not a partner's token.
        ValidationError (400/422): not a Communication; no question text; `about` names no
            report delivered to this partner; no link to that report's referral; too many
            questions on the case. Messages name the rule and element, never the values.
    """
    if who.role != "ehr" or not who.partner_id:
        raise ForbiddenError("only a partner's EHR may ask about a report")
    comm = validate_resource(body, allowed=frozenset({"Communication"}))
    for token in (f"{s}|{v}" for s, v in identifiers_of(comm)):
        found = hosted.find_by_identifier(
            session, "Communication", token, partner_id=who.partner_id
        )
        if found:
            return found[0], False
    text = _question_text(comm)
    report, case = _about(session, comm, who.partner_id, settings)
    _check_referral_link(session, comm, case, settings)
    asked = session.scalar(
        select(func.count()).select_from(Question).where(Question.case_id == case.id)
    )
    limit = settings.reports.max_questions_per_case
    if (asked or 0) >= limit:
        raise _bad(f"at most {limit} follow-up questions per case", "Communication")
    row = hosted.create(session, comm, partner_id=who.partner_id, case_id=case.id)
    question = Question(
        id=new_id(),
        case_id=case.id,
        communication_id=row.id,
        text=text,
        status="open",
    )
    session.add(question)
    session.flush()
    audit.record(
        session,
        "question.create",
        who.actor,
        case_id=case.id,
        patient=audit.patient_of_case(session, case.id),
        entity=[f"Communication/{row.id}", f"report:{report.id}"],
    )
    log.info("question.received", case_id=case.id, question_id=question.id)
    return row, True


def _question_text(comm: Resource) -> str:
    texts = [
        p.get("contentString")
        for p in comm.get("payload") or []
        if isinstance(p.get("contentString"), str) and p["contentString"].strip()
    ]
    if not texts:
        raise _bad("the question needs a payload with contentString", "Communication.payload")
    text = "\n".join(str(t) for t in texts)
    if len(text) > MAX_QUESTION_CHARS:
        raise _bad(
            f"the question is longer than {MAX_QUESTION_CHARS} characters",
            "Communication.payload",
        )
    return text


def _about(
    session: Session, comm: Resource, partner_id: str, settings: Settings
) -> tuple[Report, Case]:
    """The report `about` names: by its id on the partner's EHR (relative or absolute
    reference to a delivered DiagnosticReport) or by our report identifier."""
    for about in comm.get("about") or []:
        ref = str(about.get("reference") or "")
        ident = about.get("identifier") or {}
        found: Report | None = None
        if ident.get("system") == settings.reports.identifier_system and ident.get("value"):
            found = session.scalar(
                select(Report).where(
                    Report.identifier_system == ident["system"],
                    Report.identifier_value == str(ident["value"]),
                )
            )
        elif "DiagnosticReport/" in ref:
            server_id = ref.rsplit("/", 1)[-1]
            d = session.scalar(
                select(Delivery)
                .join(Case, Case.id == Delivery.case_id)
                .where(
                    Delivery.server_type == "DiagnosticReport",
                    Delivery.server_id == server_id,
                    Delivery.status == drafts.DELIVERED,
                    Delivery.recipient == drafts.DESTINATION,  # the treating EHR's copy
                    Case.partner_id == partner_id,
                )
                .limit(1)
            )
            found = session.get(Report, d.report_id) if d is not None else None
        if found is None:
            continue
        case = session.get(Case, found.case_id)
        if case is None or case.partner_id != partner_id or found.version == 0:
            continue  # not yours: answered as "not found", nothing about it revealed
        return found, case
    raise _bad(
        "Communication.about must reference a DiagnosticReport delivered to you",
        "Communication.about",
    )


def _check_referral_link(session: Session, comm: Resource, case: Case, settings: Settings) -> None:
    """`basedOn` the referral ServiceRequest or `partOf` the referral Task of that case (by
    our id or URL, or the identifier they gave it)."""
    base = f"{settings.base_url}/fhir"
    wanted: dict[str, tuple[str, str]] = {
        "basedOn": ("ServiceRequest", case.service_request_id),
        "partOf": ("Task", case.task_id),
    }
    for element, (rtype, rid) in wanted.items():
        row = session.get(FhirResource, (rtype, rid))
        idents = set(identifiers_of(row.body)) if row is not None else set()
        for ref in comm.get(element) or []:
            r = str(ref.get("reference") or "")
            if r in (f"{rtype}/{rid}", f"{base}/{rtype}/{rid}"):
                return
            ident = ref.get("identifier") or {}
            if (ident.get("system"), ident.get("value")) in idents:
                return
    raise _bad(
        "Communication.basedOn (the referral ServiceRequest) or Communication.partOf (the "
        "referral Task) must link the report's referral",
        "Communication.basedOn",
    )


def question_view(q: Question) -> dict[str, Any]:
    return {
        "id": q.id,
        "communication": f"Communication/{q.communication_id}",
        "status": q.status,
        "text": q.text,
        "askedAt": hosted.fhir_instant(q.asked_at),
        "answer": q.answer,
        "answeredBy": q.answered_by,
        "answeredAt": hosted.fhir_instant(q.answered_at) if q.answered_at else None,
        "reportVersion": q.report_version,
        "reply": f"Communication/{q.reply_id}" if q.reply_id else None,
    }


def list_questions(session: Session, case_id: str, who: access.Principal) -> list[dict[str, Any]]:
    """GET /cases/{id}/questions (the case's reviewer, or an admin), the read audited."""
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    rows = session.scalars(
        select(Question).where(Question.case_id == case.id).order_by(Question.asked_at)
    ).all()
    audit.record(
        session,
        "question.read",
        who.actor,
        case_id=case.id,
        patient=audit.patient_of_case(session, case.id),
        entity=[f"Communication/{q.communication_id}" for q in rows],
    )
    return [question_view(q) for q in rows]


def question_summary(session: Session, case_id: str) -> dict[str, Any]:
    """For GET /cases/{id} (the case's reviewer): the questions, how many are still open."""
    rows = session.scalars(
        select(Question).where(Question.case_id == case_id).order_by(Question.asked_at)
    ).all()
    return {
        "total": len(rows),
        "open": sum(1 for q in rows if q.status == "open"),
        "items": [question_view(q) for q in rows],
    }


def answer(
    session: Session,
    case_id: str,
    question_id: str,
    text: str,
    who: access.Principal,
    settings: Settings,
) -> dict[str, Any]:
    """POST /cases/{id}/questions/{qid}/answer: the addendum goes into the report, which is
    submitted again (`amended`, delivered to every recipient once), and the reply is queued, in
    this transaction. Answering again with the same text returns the first answer.

    Raises:
        NotFoundError: no such question on this case. ConflictError: already answered
        differently, or the report was retracted. ValidationError: empty or too long answer.
    """
    access.require_role(who, "reviewer", "admin")
    case = access.get_case(session, case_id, who)
    jobs.require_case_open(session, case.id, "answering a question")
    q = session.get(Question, question_id)
    if q is None or q.case_id != case.id:
        raise NotFoundError(f"question {question_id} is not on this case")
    text = text.strip()
    if not text or len(text) > 20000:
        raise _bad("the answer must be 1 to 20000 characters", "answer")
    if q.status == "answered":
        if q.answer == text:
            return question_view(q)
        raise ConflictError("this question was already answered")
    report = session.scalar(select(Report).where(Report.case_id == case.id).with_for_update())
    if report is None or report.version == 0:
        raise ConflictError("the report was never delivered; there is nothing to amend")
    if report.status == "retracted":
        raise ConflictError("the report on this case was retracted")
    now = utcnow()
    draft = copy.deepcopy(report.draft)
    draft["addenda"] = [
        *(draft.get("addenda") or []),
        {"date": now.date().isoformat(), "question": q.text, "answer": text},
    ]
    report.draft, report.draft_changed = draft, True
    delivered = drafts.submit(session, case.id, who, settings, now=now)
    q.status, q.answer, q.answered_by, q.answered_at = "answered", text, who.sub, now
    q.report_version = delivered.report_version
    q.reply_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"fhir-gateway:question-reply:{q.id}"))
    jobs.enqueue(
        session,
        SEND_REPLY,
        case_id=case.id,
        payload={"question": q.id},
        dedup_key=f"reply:{q.id}",
        max_attempts=_FOREVER,
    )
    audit.record(
        session,
        "question.answer",
        who.actor,
        case_id=case.id,
        patient=audit.patient_of_case(session, case.id),
        entity=[f"Communication/{q.communication_id}", f"report:{report.id}"],
    )
    log.info("question.answered", case_id=case.id, question_id=q.id, version=report.version)
    return question_view(q)


def send_reply_job(ctx: jobs.JobContext) -> None:
    """Create the reply Communication on the treating EHR once (If-None-Exist on its
    identifier), after the amended report it is about was delivered there."""
    qid = str(ctx.payload["question"])
    with ctx.store.session() as s:
        q = s.get(Question, qid)
        if q is None or q.reply_id is None or q.answer is None:
            return
        jobs.require_case_open(s, q.case_id, "replying to a question", lock=False)
        report = s.scalar(select(Report).where(Report.case_id == q.case_id))
        assert report is not None
        d = s.scalar(
            select(Delivery).where(
                Delivery.report_id == report.id,
                Delivery.report_version == q.report_version,
                Delivery.recipient == drafts.DESTINATION,
            )
        )
        if d is None or d.status != drafts.DELIVERED:
            if d is not None and d.status == drafts.SUPERSEDED:
                d = s.scalar(
                    select(Delivery)
                    .where(
                        Delivery.report_id == report.id,
                        Delivery.recipient == drafts.DESTINATION,
                        Delivery.status == drafts.DELIVERED,
                        Delivery.report_version > (q.report_version or 0),
                    )
                    .order_by(Delivery.report_version)
                    .limit(1)
                )
            if d is None or d.status != drafts.DELIVERED:
                raise UpstreamUnavailableError("waiting for the amended report's delivery")
        comm_row = s.get(FhirResource, ("Communication", q.communication_id))
        assert comm_row is not None
        question_body = copy.deepcopy(comm_row.body)
        report_ref = f"{d.server_type}/{d.server_id}"
        answer_text, reply_id = q.answer, q.reply_id
        ident_system = f"{report.identifier_system}:question-reply"
    partner = ctx.partner
    if partner is None or partner.destination is None:
        raise UpstreamUnavailableError("the partner has no destination endpoint configured")
    org = ctx.settings.partners.organization
    base = f"{ctx.settings.base_url}/fhir"
    reply = reply_communication(
        question_body,
        question_url=f"{base}/Communication/{comm_row.id}",
        answer=answer_text,
        report_reference=report_ref,
        identifier=(ident_system, reply_id),
        organization_name=org.name,
        organization_identifier=(org.identifier.system, org.identifier.value),
        sent=utcnow(),
    )
    sink = delivery.SINK_FACTORY(partner.destination, ctx.settings)
    receipt = sink.create(reply)
    with ctx.store.session() as s:
        audit.record(
            s,
            "question.reply",
            audit.Actor(sub="fhir-gateway", role="system"),
            case_id=ctx.case_id,
            entity=[receipt.reference],
        )
    log.info("question.reply.sent", question_id=qid, status=receipt.status_code)
